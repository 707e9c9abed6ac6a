"""The pure planner: what the operator observed → what to do next and how the status changes.

`plan(observed, config)` never talks to the API. Stage completion is recorded in the status conditions
(`Validated`, `Trained`, `Evaluated`, `Deployed`), so a finished stage is never re-run, and everything else
is derived from the children as they are now, which makes the reconcile idempotent and safe to repeat after
an operator restart. The stages themselves are rows of `stages.STAGES`; this module walks them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.api.conditions import (
    TERMINAL_PHASES,
    ConditionType,
    Reason,
    short,
    timestamp,
)
from finetune_operator.api.finetunejob_status import Phase, Stage
from finetune_operator.config import ConfigError, OperatorConfig
from finetune_operator.finetunejob import distributed, ownedserver, pooljob, tracking
from finetune_operator.finetunejob.accounting import gpu_hours_spent, restarts
from finetune_operator.finetunejob.outcome import JobOutcome, failure_reason, job_outcome
from finetune_operator.finetunejob.plan import Observed, Plan
from finetune_operator.finetunejob.ref import Artifacts, JobRef
from finetune_operator.finetunejob.stages import ROWS, STAGES, StageRow
from finetune_operator.finetunepolicy import enforcement as policy
from finetune_operator.k8s.actions import ChildDelete, ChildPatch, Event, diff_status
from finetune_operator.k8s.observe import finite, pod_problem

# Pod problems worth a Warning Event each time their message changes (not only on a phase change).
REPEATED_WARNINGS = (
    Reason.UNSCHEDULABLE,
    Reason.CONTAINER_CONFIG_ERROR,
    Reason.IMAGE_PULL_FAILED,
    Reason.CHILD_CONFLICT,
    Reason.SERVING_GPU_LIMIT,
)
# Waits that need someone to act: a Warning Event even when the phase does not fail.
WARNING_WAITS = (Reason.CHILD_CONFLICT, Reason.SERVING_GPU_LIMIT, Reason.POLICY_VIOLATION)


class Planner:
    """Conditions, phase, Events and the status patch of one pass; the spec-independent part."""

    def __init__(self, observed: Observed, config: OperatorConfig) -> None:
        self.o = observed
        self.config = config
        self.out = Plan()
        current = observed.status
        self.old_phase = str(current.get("phase") or "")
        self.status: dict[str, Any] = {k: v for k, v in current.items() if k != "kopf"}
        self.conditions: dict[str, dict[str, Any]] = {
            str(c["type"]): dict(c) for c in current.get("conditions") or [] if isinstance(c, Mapping)
        }
        self.ready_reason = Reason.PENDING
        self.ready_message = ""

    def condition(self, kind: ConditionType, status: str, reason: Reason, message: str = "") -> None:
        old = self.conditions.get(kind.value)
        kept = old.get("lastTransitionTime") if old is not None and old.get("status") == status else None
        self.conditions[kind.value] = {
            "type": kind.value,
            "status": status,
            "observedGeneration": self.o.generation,
            "lastTransitionTime": kept or timestamp(self.o.now),
            "reason": reason.value,
            "message": short(message),
        }

    def done(self, kind: ConditionType) -> bool:
        return (self.conditions.get(kind.value) or {}).get("status") == "True"

    def phase(self, phase: Phase, reason: Reason, message: str = "") -> None:
        self.status["phase"] = phase.value
        self.ready_reason = reason
        self.ready_message = short(message)
        self.status["message"] = self.ready_message or None

    def fail(self, stage: Stage, reason: Reason, message: str) -> None:
        self.condition(ROWS[stage].condition, "False", reason, message)
        self.phase(Phase.FAILED, reason, message)

    def blocked(self, stage: Stage, manifest: Mapping[str, Any]) -> bool:
        """Wait (Pending, reason ChildConflict) when the child's name is taken by a foreign object."""
        message = self.o.conflicts.get((str(manifest["kind"]), str(manifest["metadata"]["name"])))
        if message is None:
            return False
        self.condition(ROWS[stage].condition, "Unknown", Reason.CHILD_CONFLICT, message)
        self.phase(Phase.PENDING, Reason.CHILD_CONFLICT, message)
        return True

    def complete(self, phase: Phase, reason: Reason, message: str) -> None:
        self.phase(phase, reason, message)
        if self.old_phase != phase.value or not self.status.get("completionTime"):
            self.status["completionTime"] = self.status.get("completionTime") or timestamp(self.o.now)

    def run(self) -> Plan:
        if not self.conditions:  # first visit
            for kind in ConditionType:
                self.condition(kind, "Unknown", Reason.PENDING, "not started")
            self.status.setdefault("startTime", timestamp(self.o.now))
            # the operator's record of the children it creates (ownership.py): present from the start
            self.status.setdefault("children", {})
        self.status["observedGeneration"] = self.o.generation
        if self.old_phase in TERMINAL_PHASES:
            return self.finish(keep_phase=True)
        self.advance()
        return self.finish()

    def advance(self) -> None:
        """Without a valid spec there is nothing to run: the job fails naming the field."""
        self.phase(Phase.FAILED, Reason.INVALID_CONFIG, f"invalid spec: {self.o.spec_error}")

    def finish(self, keep_phase: bool = False) -> Plan:
        if not keep_phase:
            phase = str(self.status.get("phase") or Phase.PENDING.value)
            ready = phase in (Phase.SERVING.value, Phase.SUCCEEDED.value)
            self.condition(
                ConditionType.READY,
                "True" if ready else "False",
                self.ready_reason,
                self.ready_message or phase,
            )
            if phase in (Phase.FAILED.value, Phase.REJECTED.value):
                self.status["completionTime"] = self.status.get("completionTime") or timestamp(self.o.now)
            self.events(phase)
        self.status["conditions"] = [self.conditions[k] for k in sorted(self.conditions)]
        self.out.status = diff_status(self.o.status, self.status)
        return self.out

    def events(self, phase: str) -> None:
        warning = phase in (Phase.FAILED.value, Phase.REJECTED.value)
        if phase != self.old_phase:
            text = self.ready_message or f"phase {self.old_phase or 'new'} → {phase}"
            kind = "Warning" if warning or self.ready_reason in WARNING_WAITS else "Normal"
            self.out.events.append(Event(kind, self.ready_reason.value, short(f"{phase}: {text}")))
        elif self.ready_reason in REPEATED_WARNINGS and self.ready_message != (
            self.o.status.get("message") or ""
        ):
            self.out.events.append(Event("Warning", self.ready_reason.value, self.ready_message))
        new_retries = int(self.status.get("retries") or 0)
        if new_retries > int(self.o.status.get("retries") or 0) and not warning:
            self.out.events.append(
                Event("Normal", Reason.RETRYING.value, self.retry_message(phase, new_retries))
            )

    def retry_message(self, phase: str, retries: int) -> str:
        return f"a pod failed or was evicted (retry {retries})"


class Pipeline(Planner):
    """A job with a valid spec: walk the stage rows until one is still running, failed or rejected."""

    def __init__(self, observed: Observed, config: OperatorConfig, job: JobRef) -> None:
        super().__init__(observed, config)
        self.job = job

    def retry_message(self, phase: str, retries: int) -> str:
        """Only training resumes from a checkpoint; the other stages start again."""
        budget = f"(retry {retries}, maxRetries {self.job.spec.max_retries} counts non-disruption failures)"
        if phase == Phase.TRAINING.value:
            return f"a training pod failed or was evicted; resuming from the last checkpoint {budget}"
        stage = phase.lower() if phase else "a stage"
        return f"a pod failed or was evicted while {stage}; running the stage again {budget}"

    def advance(self) -> None:
        self.status["retries"] = max(int(self.status.get("retries") or 0), restarts(self.o)) or None
        if not self.output_unchanged():
            return
        self.status["artifacts"] = {"runPrefix": self.job.run_prefix, **(self.status.get("artifacts") or {})}
        if not self.policy_allows():
            return
        if not pooljob.prepare(self):  # a job on a ModelServer: the checks CEL cannot make
            return
        try:
            for row in STAGES:
                if not self.step(row):
                    return
        except (ConfigError, ValueError) as exc:
            stage = Stage.TRAIN if self.done(ConditionType.VALIDATED) else Stage.VALIDATE
            self.fail(stage, Reason.INVALID_CONFIG, str(exc))

    def artifacts(self) -> Artifacts:
        found = self.status.get("artifacts") or {}
        return Artifacts(
            adapter=found.get("adapter"),
            merged=found.get("merged"),
            champion=pooljob.champion_artifact(self.status),
        )

    # --- FineTunePolicy (policy.py) -----------------------------------------------------------

    def training_started(self) -> bool:
        return self.done(ConditionType.TRAINED) or self.o.children.get(Stage.TRAIN) is not None

    def output_unchanged(self) -> bool:
        """storage.output is immutable (CRD rule); if it changed anyway, say so, not as a missing dataset."""
        recorded = (self.status.get("artifacts") or {}).get("runPrefix")
        if not recorded or recorded == self.job.run_prefix:
            return True
        unfinished = [r for r in STAGES if r.owns_condition and not self.done(r.condition)]
        message = (
            f"storage.output changed after the run started: its artifacts are under {recorded}, not "
            f"{self.job.run_prefix}; to write elsewhere, create a new FineTuneJob"
        )
        self.fail((unfinished or STAGES)[0].stage, Reason.INVALID_CONFIG, message)
        return False

    def policy_allows(self) -> bool:
        """The static rules, until training starts: a violating job fails before any (more) pods run."""
        self.status["policy"] = policy.status_of(self.o.policy)
        message = None if self.training_started() else policy.violation(self.job.spec, self.o.policy)
        if message is None:
            return True
        stage = Stage.TRAIN if self.done(ConditionType.VALIDATED) else Stage.VALIDATE
        self.fail(stage, Reason.POLICY_VIOLATION, message)
        return False

    def policy_admits_training(self, row: StageRow) -> bool:
        """maxGpuHoursPerJob on the estimate; the namespace's budget and concurrency: wait, no GPU pod."""
        estimate = finite(self.status.get("gpuHoursEstimate"))
        message = policy.estimate_violation(estimate, self.o.policy)
        if message is not None:
            self.fail(row.stage, Reason.POLICY_VIOLATION, message)
            return False
        waiting = policy.wait(estimate, self.o.policy)
        if waiting is None:
            return True
        reason, message = Reason(waiting[0]), waiting[1]
        self.condition(row.condition, "Unknown", reason, message)
        self.phase(Phase.SUSPENDED, reason, message)
        return False

    def step(self, row: StageRow) -> bool:
        """Drive one stage; True when the pipeline may go on to the next row."""
        if not row.wanted(self.job.spec, self.artifacts()):
            return row.skip(self) if row.skip else True
        if row.owns_condition and self.done(row.condition):
            return row.holds(self) if row.holds else True
        if row.stage is Stage.TRAIN and not self.training_started() and not self.policy_admits_training(row):
            return False
        if row.kind == "ModelServer":
            if self.job.spec.deployment.server:
                pooljob.serve(self, row)  # a shared ModelServer
            else:
                ownedserver.serve(self, row)  # the job's own ModelServer
            return False
        outcome = self.run_job(row)
        if row.counts_gpu_hours:
            self.status["gpuHours"] = gpu_hours_spent(self.o, self.job.spec)
        if outcome is None:
            if row.while_running is not None:
                row.while_running(self)
            return False
        tracking.record(self.status, outcome.summary)
        return row.read(self, outcome) if row.read is not None else True

    # --- a Job stage ---------------------------------------------------------------------------

    def running(self, row: StageRow, message: str = "", condition_message: str = "") -> None:
        if row.running_messages is not None:
            condition_message, message = row.running_messages
        self.condition(row.condition, "Unknown", row.running, condition_message)
        self.phase(row.phase, row.running, message)

    def waiting(self, row: StageRow, reason: Reason, message: str) -> None:
        self.condition(row.condition, "Unknown", reason, message)
        self.phase(row.phase, reason, message)

    def suspended(self, row: StageRow) -> None:
        self.condition(row.condition, "Unknown", Reason.SUSPENDED, "suspended by spec.suspend")
        self.phase(Phase.SUSPENDED, Reason.SUSPENDED, f"{row.stage.value} is suspended (spec.suspend)")

    def run_job(self, row: StageRow) -> JobOutcome | None:
        """Create, suspend/resume or read one Job stage; None while it is not finished."""
        job = self.o.children.get(row.stage)
        if job is None:
            self.create_job(row)
            return None
        outcome = job_outcome(job, self.o.pods.get(row.stage, ()))
        if outcome.state == "failed":
            reason, message = failure_reason(outcome, row.stage)
            self.fail(row.stage, reason, f"{row.stage.value}: {message}")
            return None
        if outcome.state == "succeeded":
            return outcome
        self.watch_job(row, job)
        return None

    def create_job(self, row: StageRow) -> None:
        """The builder runs only here: a Job is built when it must be created, never to compare."""
        manifest = row.build(self.job, self.config, self.artifacts())
        if self.blocked(row.stage, manifest):
            return
        if self.job.spec.suspend:
            manifest = {**manifest, "spec": {**manifest["spec"], "suspend": True}}
            self.suspended(row)
        else:
            self.running(row, condition_message=f"Job {manifest['metadata']['name']} is running")
        if row.stage is Stage.TRAIN:
            self.spread(manifest)
        self.out.create.append(manifest)

    def spread(self, manifest: Mapping[str, Any]) -> None:
        """Multi-GPU / multi-node training: say how it is spread; several nodes need the headless Service."""
        gpu_type = self.config.gpu_type(self.job.spec.resources.gpu_type)
        chosen = distributed.parallelism(self.job.spec, gpu_type)
        if chosen.ranks > 1:
            progress = self.status.get("progress") or {}
            self.status["progress"] = {**progress, "parallelism": chosen.describe()}
        if chosen.nodes > 1:
            self.out.create.append(distributed.headless_service(self.job, manifest))

    def watch_job(self, row: StageRow, job: Mapping[str, Any]) -> None:
        """A Job that has not finished: follow spec.suspend and Kueue, report pod problems."""
        name = str((job.get("metadata") or {}).get("name"))
        job_suspended = bool((job.get("spec") or {}).get("suspend"))
        queue = self.job.spec.resources.queue_name if row.stage is Stage.TRAIN else None
        if self.job.spec.suspend:
            if not job_suspended:
                # The Job controller stops the pods; the trainer checkpoints on SIGTERM.
                self.out.patch.append(ChildPatch("Job", name, {"spec": {"suspend": True}}))
            self.suspended(row)
        elif job_suspended and queue:
            self.waiting(row, Reason.QUEUED, f"waiting for Kueue to admit the Job in queue {queue}")
        elif job_suspended:
            self.out.patch.append(ChildPatch("Job", name, {"spec": {"suspend": False}}))
            self.running(row, "resumed", "resumed; continuing from the last checkpoint")
        else:
            self.report_pods(row, name)

    def report_pods(self, row: StageRow, name: str) -> None:
        pods = self.o.pods.get(row.stage, ())
        problem = pod_problem(pods)
        nodes = self.job.spec.resources.nodes if row.stage is Stage.TRAIN else 1
        if problem is not None and problem.fatal:
            self.out.patch.append(ChildPatch("Job", name, {"spec": {"suspend": True}}))
            self.fail(row.stage, problem.reason, problem.message)
        elif problem is not None and problem.reason is Reason.UNSCHEDULABLE and nodes > 1:
            self.waiting(row, problem.reason, distributed.gang_message(pods, nodes, problem.message))
        elif problem is not None and row.running_messages is None:
            self.waiting(row, problem.reason, problem.message)
        else:
            self.running(row, condition_message=f"Job {name} is running")

    # --- the serving stage ---------------------------------------------------------------------

    def retire_serving(self) -> None:
        """Delete the per-job vLLM Deployment and Service an operator from before issue 21 created: once, on
        upgrade, its ModelServer replaces them (ownedserver.py)."""
        name = ownedserver.server_name(self.job)
        if self.o.children.get(Stage.SERVE) is not None:
            self.out.delete.append(ChildDelete("Deployment", name))
        if self.o.service is not None:
            self.out.delete.append(ChildDelete("Service", name))
        self.status["endpoint"] = None

    def retire_own_server(self) -> None:
        """Deployment disabled: the job's own ModelServer goes too."""
        self.retire_serving()
        if self.o.server is not None and ownedserver.is_own(self, self.o.server):
            self.out.delete.append(ChildDelete("ModelServer", ownedserver.server_name(self.job)))

    def desired(self, row: StageRow) -> dict[str, Any]:
        """The child as the spec wants it, built once per generation and artifacts (`Observed.built`)."""
        artifacts = self.artifacts()
        key = (row.stage.value, self.o.generation, artifacts.adapter, artifacts.merged)
        if key not in self.o.built:
            self.o.built.clear()
            self.o.built[key] = row.build(self.job, self.config, artifacts)
        return self.o.built[key]


def plan(observed: Observed, config: OperatorConfig) -> Plan:
    """Next actions, status patch and Events for one FineTuneJob."""
    if isinstance(observed.job, JobRef) and observed.spec_error is None:
        return Pipeline(observed, config, observed.job).run()
    return Planner(observed, config).run()
