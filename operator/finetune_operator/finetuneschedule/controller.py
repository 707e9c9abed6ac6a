"""The FineTuneSchedule controller: observe one schedule, plan (planner.py), act.

How schedules are queued (the one place that says it): the queue pattern of ModelServers
(modelserver/controller.py), not a Kopf timer. A timer fires at a fixed interval per object and Kopf keeps its
state on the object; a cron schedule must wake at its own next fire time (minutes or months away) and a
trigger every `checkSeconds`, and the project keeps Kopf writing nothing of its own (lifecycle.configure).
So Kopf `on.event` handlers (FineTuneSchedules, their data Jobs, their FineTuneJobs) only `kick` a schedule;
one asyncio task (`run`) runs kicked schedules at once and each schedule again when its plan asks
(`requeue_at`: the next fire time, the next trigger check, at the latest planner.RESYNC). Schedules are few,
so a pass reads what it needs from the API (its data Jobs and their pods, its FineTuneJobs, the ModelServer).
A failed pass is logged and retried at the next kick or `RETRY_SECONDS`; passes of one schedule never overlap.
The controller knows nothing of the FineTuneJob or ModelServer controllers (.importlinter).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_operator.api.finetunejob import KIND as JOB_KIND
from finetune_operator.api.finetuneschedule import KIND
from finetune_operator.config import OperatorConfig
from finetune_operator.containers.termination import job_outcome
from finetune_operator.finetuneschedule import builders
from finetune_operator.finetuneschedule.planner import (
    DataJobView,
    Reason,
    RunView,
    ScheduleObserved,
    SchedulePlan,
    plan_schedule,
)
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import ownership
from finetune_operator.k8s.observe import parse_time

log = logging.getLogger(__name__)

RETRY_SECONDS = 10.0
Key = tuple[str, str]


@dataclass
class ScheduleQueue:
    """Kicked schedules, the FineTuneSchedules seen and when each is due again (lives in the Context)."""

    schedules: dict[Key, dict[str, Any]] = field(default_factory=dict)
    by_uid: dict[str, Key] = field(default_factory=dict)
    kicked: set[Key] = field(default_factory=set)
    due: dict[Key, float] = field(default_factory=dict)  # time.monotonic() of the next pass
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def kick(self, key: Key) -> None:
        self.kicked.add(key)
        self.wake.set()

    def seen(self, body: Mapping[str, Any], deleted: bool) -> None:
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        if deleted:
            self.schedules.pop(key, None)
            self.by_uid.pop(str(meta.get("uid")), None)
            self.due.pop(key, None)
            return
        self.schedules[key] = {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec", "status")}
        self.by_uid[str(meta.get("uid"))] = key
        self.kick(key)

    def kick_child(self, body: Mapping[str, Any]) -> None:
        """A data Job, its pod or a run's FineTuneJob changed: kick its schedule (by the uid label)."""
        uid = ((body.get("metadata") or {}).get("labels") or {}).get(builders.LABEL_SCHEDULE_UID)
        key = self.by_uid.get(str(uid)) if uid else None
        if key is not None:
            self.kick(key)


@dataclass(frozen=True)
class ScheduleWiring:
    config: OperatorConfig
    queue: ScheduleQueue
    current_api: Callable[[], kube.KubeApi | None]


def _controlled(objects: Sequence[Mapping[str, Any]], namespace: str, uid: str) -> list[Mapping[str, Any]]:
    return [o for o in objects if ownership.is_controlled_by(o, namespace, uid)]


def _annotation(obj: Mapping[str, Any], key: str) -> str | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(key)
    return str(value) if value is not None else None


def _run_of(obj: Mapping[str, Any]) -> int | None:
    value = _annotation(obj, builders.ANNOTATION_RUN) or ""
    return int(value) if value.isdigit() else None


def data_view(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> DataJobView | None:
    """A data Job as the planner sees it: the stage outcome read as for FineTuneJob stages (termination
    message summary)."""
    run = _run_of(job)
    if run is None:
        return None
    uid = str((job.get("metadata") or {}).get("uid"))
    owned = [
        p
        for p in pods
        if any(o.get("uid") == uid for o in (p.get("metadata") or {}).get("ownerReferences") or [])
    ]
    outcome = job_outcome(job, owned)
    message = outcome.termination.message if outcome.termination else outcome.job_message
    return DataJobView(
        name=str(job["metadata"]["name"]),
        run=run,
        purpose=_annotation(job, builders.ANNOTATION_PURPOSE) or "cron",
        since=_annotation(job, builders.ANNOTATION_SINCE),
        until=_annotation(job, builders.ANNOTATION_UNTIL) or "",
        state=outcome.state if outcome.state in ("succeeded", "failed") else "running",
        summary=outcome.summary,
        message=message,
        deleting=bool(job["metadata"].get("deletionTimestamp")),
    )


def run_view(job: Mapping[str, Any]) -> RunView | None:
    run = _run_of(job)
    if run is None:
        return None
    meta, status = job["metadata"], job.get("status") or {}
    ready: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
    )
    try:
        sources = json.loads(_annotation(job, builders.ANNOTATION_SOURCES) or "{}")
    except ValueError:
        sources = {}
    total = sources.get("total") if isinstance(sources, dict) else None
    return RunView(
        name=str(meta["name"]),
        run=run,
        uid=str(meta.get("uid")),
        created=meta.get("creationTimestamp"),
        phase=status.get("phase"),
        reason=status.get("reason") or ready.get("reason"),
        examples=total if isinstance(total, int) else None,
        deleting=bool(meta.get("deletionTimestamp")),
    )


async def observe(api: kube.KubeApi, body: Mapping[str, Any], now: datetime) -> ScheduleObserved:
    meta = body["metadata"]
    namespace, uid = str(meta["namespace"]), str(meta["uid"])
    selector = f"{builders.LABEL_SCHEDULE_UID}={uid}"
    jobs = _controlled(await api.list("Job", namespace, selector), namespace, uid)
    pods = await api.list("Pod", namespace, selector) if jobs else []
    runs = _controlled(await api.list(JOB_KIND, namespace, selector), namespace, uid)
    source = ((body.get("spec") or {}).get("dataset") or {}).get("fromCapture") or {}
    template = ((body.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}
    server_name = source.get("modelServer") or (template.get("deployment") or {}).get("server")
    server = await api.get("ModelServer", namespace, str(server_name)) if server_name else None
    return ScheduleObserved(
        namespace=namespace,
        name=str(meta["name"]),
        uid=uid,
        generation=int(meta.get("generation") or 0),
        created=parse_time(meta.get("creationTimestamp")) or now,
        spec=body.get("spec") or {},
        status=body.get("status") or {},
        now=now,
        data_jobs=[v for j in jobs if (v := data_view(j, pods)) is not None],
        runs=[r for j in runs if (r := run_view(j)) is not None],
        server=server,
    )


REFUSALS = frozenset({400, 403, 422})  # the API server will refuse the same create again


async def refused(
    api: kube.KubeApi, namespace: str, manifest: Mapping[str, Any], error: kube.ApiError, plan: SchedulePlan
) -> None:
    """An admission policy (FineTunePolicy's), quota or validation refused a create: waiting will not help,
    so the run is reported (Warning Event RunRefused, status message) and its data Job deleted instead of the
    create being retried every pass; the next due time starts a new run."""
    name = str(manifest["metadata"]["name"])
    message = f"{manifest['kind']} {name} was refused: {error.body.get('message') or error}"
    created = Reason.RUN_CREATED.value
    plan.events[:] = [e for e in plan.events if not (e[1] == created and f"run {name} " in e[2])]
    plan.event(Reason.RUN_REFUSED, message, warning=True)
    plan.status["message"] = message[:256]
    plan.status.pop("latest", None)
    if name in plan.data_job_of:
        await api.delete("Job", namespace, plan.data_job_of[name])


async def act(api: kube.KubeApi, body: Mapping[str, Any], plan: SchedulePlan) -> None:
    """Deletes, creates, Events, then the status (a crash before it repeats only idempotent writes)."""
    meta = body["metadata"]
    namespace, uid = str(meta["namespace"]), str(meta["uid"])
    for kind, name in plan.delete:
        await api.delete(kind, namespace, name)
    for manifest in plan.create:
        try:
            await api.create_or_adopt(manifest, uid)
        except kube.NotOwnedError as error:
            plan.events.append(("Warning", "NameTaken", str(error)))
            plan.status["message"] = str(error)[:256]
        except kube.ApiError as error:
            if error.status not in REFUSALS:
                raise
            await refused(api, namespace, manifest, error, plan)
    for type_, reason, message in plan.events:
        await api.post_event(body, type_, reason, message, kind=KIND)
    status = body.get("status") or {}
    if any(status.get(k) != v for k, v in plan.status.items()):
        await api.patch_object_status(KIND, namespace, str(meta["name"]), plan.status, uid)


async def reconcile(wiring: ScheduleWiring, key: Key) -> float:
    """One pass of one schedule; returns the seconds until it is due again."""
    body, api = wiring.queue.schedules.get(key), wiring.current_api()
    if body is None:
        return -1.0
    if api is None or body["metadata"].get("deletionTimestamp"):
        return RETRY_SECONDS
    now = datetime.now(UTC)
    try:
        fresh = await api.get(KIND, *key)
        if fresh is None:
            return -1.0
        plan = plan_schedule(await observe(api, fresh, now), wiring.config)
        await act(api, fresh, plan)
    except (*kube.TRANSIENT_ERRORS, kube.NotOwnedError) as error:
        log.warning("pass of FineTuneSchedule %s/%s failed, will retry: %s", *key, error)
        return RETRY_SECONDS
    wait = (plan.requeue_at - now).total_seconds() if plan.requeue_at else RETRY_SECONDS
    return max(0.5, wait)


async def run(wiring: ScheduleWiring) -> None:
    """The schedule queue (module docstring)."""
    queue = wiring.queue
    while True:
        due = [k for k, at in queue.due.items() if at <= time.monotonic()]
        for key in set(due) | queue.kicked:
            queue.kicked.discard(key)
            try:
                wait = await reconcile(wiring, key)
            except Exception:  # one schedule's bug must not stop the others
                log.exception("pass of FineTuneSchedule %s/%s failed", *key)
                wait = RETRY_SECONDS
            if wait < 0:
                queue.due.pop(key, None)
            else:
                queue.due[key] = time.monotonic() + wait
        queue.wake.clear()
        if queue.kicked:
            continue
        sleep = min((at - time.monotonic() for at in queue.due.values()), default=RETRY_SECONDS * 6)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.wake.wait(), timeout=max(0.1, sleep))
