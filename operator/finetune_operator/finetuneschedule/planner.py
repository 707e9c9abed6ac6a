"""The FineTuneSchedule planner: observed (the schedule, its data Jobs and runs, the pool) → what to create
and delete, the status, the Events and when to look again. Pure: `now` is observed, nothing is read.

A run n: the data Job `<fts>-<n>-data` assembles the training set; when it reports `ready` the FineTuneJob
`<fts>-<n>` is created and the data Job deleted (its summary lives on in the job's annotation and status).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from finetune_operator.api.conditions import timestamp
from finetune_operator.api.finetunejob_status import Phase
from finetune_operator.api.finetuneschedule import FineTuneScheduleSpec, parse_schedule_spec
from finetune_operator.api.schema import SpecError
from finetune_operator.config import OperatorConfig
from finetune_operator.finetuneschedule import builders, cron
from finetune_operator.finetuneschedule.builders import Assembly, ScheduleRef
from finetune_operator.k8s.observe import parse_time
from finetune_operator.serving_contract import pool_report

# A run whose FineTuneJob is in one of these phases is no longer active (Forbid lets the next one start).
# Suspended is not among them: such a job waits (for budget, or its spec.suspend) and goes on by itself.
ENDED_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.REJECTED, Phase.SERVING})
MAX_MISSED = 100  # like CronJob: beyond it the count stops (and the newest missed time is still found)
RESYNC = timedelta(minutes=10)  # looked at again even when nothing is due (a lost watch event)


class Reason(StrEnum):
    SCHEDULED = "Scheduled"
    SUSPENDED = "Suspended"
    INVALID_SPEC = "InvalidSpec"
    CAPTURE_UNAVAILABLE = "CaptureUnavailable"
    ASSEMBLING = "Assembling"
    ASSEMBLE_FAILED = "AssembleFailed"
    NOT_ENOUGH_EXAMPLES = "NotEnoughExamples"
    RUN_CREATED = "RunCreated"
    RUN_REFUSED = "RunRefused"  # the API server refused the run (controller.refused)
    RUN_REPLACED = "RunReplaced"
    RUN_DELETED = "RunDeleted"
    MISSED_SCHEDULE = "MissedSchedule"
    CONCURRENCY_FORBIDDEN = "ConcurrencyForbidden"


@dataclass(frozen=True)
class DataJobView:
    """One data Job as observed: its run, purpose and window (annotations) and outcome."""

    name: str
    run: int
    purpose: str
    since: str | None
    until: str
    state: str  # running | succeeded | failed
    summary: Mapping[str, Any] = field(default_factory=dict)
    message: str = ""
    deleting: bool = False


@dataclass(frozen=True)
class RunView:
    """One run's FineTuneJob as observed."""

    name: str
    run: int
    uid: str
    created: str | None
    phase: str | None
    reason: str | None
    examples: int | None
    deleting: bool = False

    @property
    def ended(self) -> bool:
        return self.phase in ENDED_PHASES


@dataclass(frozen=True)
class ScheduleObserved:
    namespace: str
    name: str
    uid: str
    generation: int
    created: datetime
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    now: datetime
    data_jobs: Sequence[DataJobView] = ()
    runs: Sequence[RunView] = ()
    server: Mapping[str, Any] | None = None


@dataclass
class SchedulePlan:
    create: list[Mapping[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_at: datetime | None = None
    # a run's FineTuneJob → its data Job: deleted too when the API server refuses the run (controller.act)
    data_job_of: dict[str, str] = field(default_factory=dict)

    def event(self, reason: Reason, message: str, warning: bool = False) -> None:
        self.events.append(("Warning" if warning else "Normal", reason.value, message))

    def wake(self, when: datetime) -> None:
        self.requeue_at = when if self.requeue_at is None else min(self.requeue_at, when)


@dataclass(frozen=True)
class _Parsed:
    ref: ScheduleRef
    cron: cron.Cron | None
    zone: ZoneInfo
    model: str | None
    config: OperatorConfig


def _parse(observed: ScheduleObserved, config: OperatorConfig) -> _Parsed:
    """The spec, its cron expression and its template, or SpecError naming each bad field."""
    schedule: FineTuneScheduleSpec = parse_schedule_spec(dict(observed.spec))
    expression = None
    if schedule.schedule is not None:
        try:
            expression = cron.parse(schedule.schedule)
        except cron.CronError as error:
            raise SpecError([("spec.schedule", str(error))]) from None
    placeholder = builders.train_uri("s3://placeholder/x", observed.namespace, observed.name, 0)
    template = builders.template_spec(schedule, placeholder)
    ref = ScheduleRef(observed.namespace, observed.name, observed.uid, schedule, template)
    zone = ZoneInfo(schedule.time_zone or "UTC")
    return _Parsed(ref, expression, zone, builders.served_model(schedule, template)[1], config)


def _condition(status: Mapping[str, Any], ready: bool, reason: Reason, message: str, now: str) -> list[Any]:
    old: Mapping[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    value = "True" if ready else "False"
    since = old.get("lastTransitionTime") if old.get("status") == value else now
    return [
        {
            "type": "Ready",
            "status": value,
            "reason": reason.value,
            "message": message[:1024],
            "lastTransitionTime": since or now,
        }
    ]


def _runs_status(observed: ScheduleObserved, model: str | None, plan: SchedulePlan) -> str | None:
    """status.runs (newest first), latest, serving; returns the name of the run the pool serves."""
    serving_uid = None
    if observed.server is not None and model:
        champion = pool_report(observed.server).champion(model)
        serving_uid = champion.job_uid if champion else None
    runs = sorted(observed.runs, key=lambda r: r.run, reverse=True)
    serving = next((r.name for r in runs if r.uid == serving_uid), None)
    entries = (
        {"name": r.name, "created": r.created, "phase": r.phase, "reason": r.reason, "examples": r.examples}
        for r in runs[:64]
    )
    plan.status["runs"] = [
        {**{k: v for k, v in entry.items() if v is not None}, "serving": run.uid == serving_uid}
        for entry, run in zip(entries, runs, strict=False)
    ]
    plan.status["latest"] = runs[0].name if runs else None
    plan.status["serving"] = serving
    return serving


def _prune(observed: ScheduleObserved, limit: int, serving: str | None, plan: SchedulePlan) -> None:
    """Ended runs beyond historyLimit, newest kept; never the serving run, never an active one."""
    ended = sorted(
        (r for r in observed.runs if r.ended and not r.deleting), key=lambda r: r.run, reverse=True
    )
    for run in ended[limit:]:
        if run.name != serving:
            plan.delete.append(("FineTuneJob", run.name))
            plan.event(Reason.RUN_DELETED, f"run {run.name} deleted: beyond historyLimit {limit}")


def plan_schedule(observed: ScheduleObserved, config: OperatorConfig) -> SchedulePlan:
    """What one pass does (module docstring)."""
    plan = SchedulePlan()
    now = timestamp(observed.now)
    status = observed.status
    plan.status["observedGeneration"] = observed.generation
    try:
        parsed = _parse(observed, config)
    except SpecError as error:
        message = f"invalid spec: {error}"
        if status.get("message") != message:
            plan.event(Reason.INVALID_SPEC, message, warning=True)
        plan.status.update(
            message=message[:256], conditions=_condition(status, False, Reason.INVALID_SPEC, message, now)
        )
        return plan
    serving = _runs_status(observed, parsed.model, plan)
    last_run = max([int(status.get("lastRun") or 0), *(r.run for r in observed.runs)])
    plan.status["lastRun"] = last_run
    _read_data_jobs(observed, parsed, plan)
    _prune(observed, parsed.ref.schedule.history_limit, serving, plan)
    _start(observed, parsed, plan, last_run)
    plan.wake(observed.now + RESYNC)
    return plan


def _active_runs(observed: ScheduleObserved) -> list[RunView]:
    return [r for r in observed.runs if not r.ended and not r.deleting]


def _replace(observed: ScheduleObserved, parsed: _Parsed, plan: SchedulePlan, starting: str) -> None:
    """concurrencyPolicy Replace: the active runs are deleted before `starting` begins."""
    if parsed.ref.schedule.concurrency_policy != "Replace":
        return
    for run in _active_runs(observed):
        plan.delete.append(("FineTuneJob", run.name))
        plan.event(
            Reason.RUN_REPLACED, f"run {run.name} deleted: {starting} replaces it (concurrencyPolicy Replace)"
        )


def _read_data_jobs(observed: ScheduleObserved, parsed: _Parsed, plan: SchedulePlan) -> None:
    """Finished data Jobs: a ready set becomes the run's FineTuneJob; the Job is then deleted."""
    existing = {r.run for r in observed.runs}
    for data in observed.data_jobs:
        if data.deleting or data.state == "running":
            continue
        summary = data.summary
        if data.state == "failed":
            message = f"data Job {data.name} failed: {data.message or 'no message'}"
            plan.event(Reason.ASSEMBLE_FAILED, message, warning=True)
            plan.status["message"] = message[:256]
        elif isinstance(summary.get("newExamples"), int):
            plan.status["newExamples"] = summary["newExamples"]
        if data.state == "succeeded" and summary.get("ready") is True and data.run not in existing:
            _create_run(observed, parsed, plan, data)
            return  # the Job is deleted once its FineTuneJob exists (next pass): a failed create retries
        plan.delete.append(("Job", data.name))


def _create_run(observed: ScheduleObserved, parsed: _Parsed, plan: SchedulePlan, data: DataJobView) -> None:
    summary = data.summary
    train, examples = summary.get("train"), summary.get("examples")
    examples = examples if isinstance(examples, Mapping) else {}
    if not isinstance(train, str) or not train.startswith("s3://"):
        plan.event(Reason.ASSEMBLE_FAILED, f"data Job {data.name} reported no train file", warning=True)
        plan.delete.append(("Job", data.name))
        return
    if parsed.ref.schedule.suspend:
        plan.delete.append(("Job", data.name))
        return
    name = builders.run_name(parsed.ref, data.run)
    _replace(observed, parsed, plan, name)
    plan.create.append(builders.finetune_job(parsed.ref, data.run, train, examples))
    plan.data_job_of[name] = data.name
    total = examples.get("total")
    plan.event(
        Reason.RUN_CREATED,
        f"run {name} created ({data.purpose}): {json.dumps(dict(examples), sort_keys=True)}",
    )
    plan.status.update(
        lastRun=max(plan.status.get("lastRun", 0), data.run),
        latest=name,
        cutoff=str(summary.get("cutoff") or data.until),
        train=train,
        message=f"run {name} started with {total if isinstance(total, int) else '?'} examples",
    )


def _start(observed: ScheduleObserved, parsed: _Parsed, plan: SchedulePlan, last_run: int) -> None:
    """Cron first, then the trigger; nothing while a data Job exists (a run's name is taken until it goes)."""
    schedule = parsed.ref.schedule
    now = timestamp(observed.now)
    if parsed.cron is not None:
        nxt = cron.next_after(parsed.cron, observed.now, parsed.zone)
        plan.status["nextScheduleTime"] = timestamp(nxt) if nxt else None
        if nxt:
            plan.wake(nxt)
    if schedule.suspend:
        plan.status["conditions"] = _condition(
            observed.status, True, Reason.SUSPENDED, "suspended: no new runs", now
        )
        return
    capture_problem = _capture_problem(observed, schedule)
    if capture_problem:
        plan.status.update(message=capture_problem[:256])
        plan.status["conditions"] = _condition(
            observed.status, False, Reason.CAPTURE_UNAVAILABLE, capture_problem, now
        )
        return
    plan.status["conditions"] = _condition(observed.status, True, Reason.SCHEDULED, "scheduled", now)
    if observed.data_jobs or plan.create:
        plan.status["active"] = [d.name for d in observed.data_jobs] + [
            r.name for r in _active_runs(observed)
        ]
        return
    plan.status["active"] = [r.name for r in _active_runs(observed)] or None
    if parsed.cron is not None and _cron_run(observed, parsed, plan, last_run + 1):
        return
    if schedule.trigger is not None:
        _trigger_check(observed, parsed, plan, last_run + 1)


def _capture_problem(observed: ScheduleObserved, schedule: FineTuneScheduleSpec) -> str | None:
    source = schedule.dataset.from_capture
    if source is None:
        return None
    if observed.server is None:
        return f"waiting: ModelServer {source.model_server} (dataset.fromCapture.modelServer) does not exist"
    capture = (observed.server.get("spec") or {}).get("capture") or {}
    if not capture.get("destination"):
        return f"waiting: ModelServer {source.model_server} has no spec.capture (dataset.fromCapture)"
    return None


def _assembly(observed: ScheduleObserved, run: int, purpose: str, min_new: int) -> Assembly:
    since = observed.status.get("cutoff")
    return Assembly(run, purpose, str(since) if since else None, timestamp(observed.now), min_new)


def _cron_run(observed: ScheduleObserved, parsed: _Parsed, plan: SchedulePlan, run: int) -> bool:
    """A due scheduled time starts run `run` (True), like CronJob: only the newest missed time runs, and
    not when it was missed by more than startingDeadlineSeconds."""
    assert parsed.cron is not None
    schedule = parsed.ref.schedule
    earliest = parse_time(observed.status.get("lastScheduleTime")) or observed.created
    count, newest = cron.fire_times(parsed.cron, earliest, observed.now, parsed.zone, MAX_MISSED)
    if newest is None:
        return False
    missed = int(observed.status.get("missedRuns") or 0)
    deadline = schedule.starting_deadline_seconds
    if deadline is not None and newest < observed.now - timedelta(seconds=deadline):
        plan.status.update(missedRuns=missed + count, lastScheduleTime=timestamp(newest))
        plan.event(
            Reason.MISSED_SCHEDULE,
            f"{count} scheduled run(s) missed, the newest at {timestamp(newest)}: more than "
            f"startingDeadlineSeconds {deadline} ago",
            warning=True,
        )
        return False
    active = _active_runs(observed)
    if active and schedule.concurrency_policy == "Forbid":
        message = (
            f"run due at {timestamp(newest)} waits: {active[0].name} is active (concurrencyPolicy Forbid)"
        )
        plan.status["message"] = message
        return True
    _replace(observed, parsed, plan, builders.run_name(parsed.ref, run))
    plan.create.append(
        builders.data_job(parsed.ref, parsed.config, observed.server, _assembly(observed, run, "cron", 0))
    )
    plan.status.update(lastScheduleTime=timestamp(newest), missedRuns=missed + count - 1)
    if count > 1:
        plan.event(
            Reason.MISSED_SCHEDULE,
            f"{count - 1} older scheduled run(s) skipped: only the newest runs",
            warning=True,
        )
    plan.status["message"] = f"run {run} due at {timestamp(newest)}: assembling data"
    return True


def _trigger_check(observed: ScheduleObserved, parsed: _Parsed, plan: SchedulePlan, run: int) -> None:
    """Every checkSeconds a data Job counts the new examples; it assembles run `run` when there are enough."""
    trigger = parsed.ref.schedule.trigger
    assert trigger is not None
    last = parse_time(observed.status.get("lastTriggerCheck"))
    due = observed.now if last is None else last + timedelta(seconds=trigger.check_seconds)
    if due > observed.now:
        plan.wake(due)
        return
    active = _active_runs(observed)
    if active and parsed.ref.schedule.concurrency_policy == "Forbid":
        plan.status["message"] = f"trigger check waits: {active[0].name} is active (concurrencyPolicy Forbid)"
        return  # the run's end (its FineTuneJob's event) wakes the schedule
    assembly = _assembly(observed, run, "trigger", trigger.new_examples)
    plan.create.append(builders.data_job(parsed.ref, parsed.config, observed.server, assembly))
    plan.status["lastTriggerCheck"] = timestamp(observed.now)
    plan.wake(observed.now + timedelta(seconds=trigger.check_seconds))
