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
from finetune_operator.containers.termination import JobOutcome, job_outcome
from finetune_operator.finetunejob import distributed, ownedserver, pooljob, tracking
from finetune_operator.finetunejob.accounting import gpu_hours_spent, restarts
from finetune_operator.finetunejob.outcome import failure_reason
from finetune_operator.finetunejob.plan import Draft, JobDraft, Observed, Plan, StageRow
from finetune_operator.finetunejob.ref import Artifacts, JobRef
from finetune_operator.finetunejob.stages import ROWS, STAGES
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
ENDED = ("succeeded", "failed")  # a stage Job's outcome once it finished (its pods and logs are kept)
# Waits that need someone to act: a Warning Event even when the phase does not fail.
WARNING_WAITS = (Reason.CHILD_CONFLICT, Reason.SERVING_GPU_LIMIT, Reason.POLICY_VIOLATION)


class Planner:
    """Conditions, phase, Events and the status patch of one pass; the spec-independent part. It owns the
    pass's draft (plan.Draft) and turns it into the Plan; stage readers get the draft, never the planner."""

    def __init__(self, draft: Draft) -> None:
        self.d = draft

    def run(self) -> Plan:
        if not self.d.conditions:  # first visit
            for kind in ConditionType:
                self.d.condition(kind, "Unknown", Reason.PENDING, "not started")
            self.d.status.setdefault("startTime", timestamp(self.d.o.now))
            # the operator's record of the children it creates (ownership.py): present from the start
            self.d.status.setdefault("children", {})
        self.d.status["observedGeneration"] = self.d.o.generation
        if self.ended():
            return self.finish(keep_phase=True)
        self.advance()
        return self.finish()

    def ended(self) -> bool:
        return self.d.old_phase in TERMINAL_PHASES

    def advance(self) -> None:
        """Without a valid spec there is nothing to run: the job fails naming the field."""
        self.d.phase(Phase.FAILED, Reason.INVALID_CONFIG, f"invalid spec: {self.d.o.spec_error}")

    def finish(self, keep_phase: bool = False) -> Plan:
        d = self.d
        if not keep_phase:
            phase = str(d.status.get("phase") or Phase.PENDING.value)
            ready = phase in (Phase.SERVING.value, Phase.SUCCEEDED.value)
            d.condition(
                ConditionType.READY, "True" if ready else "False", d.ready_reason, d.ready_message or phase
            )
            if phase in (Phase.FAILED.value, Phase.REJECTED.value):
                d.status["completionTime"] = d.status.get("completionTime") or timestamp(d.o.now)
            self.events(phase)
        d.status["conditions"] = [d.conditions[k] for k in sorted(d.conditions)]
        d.out.status = diff_status(d.o.status, d.status)
        return d.out

    def events(self, phase: str) -> None:
        d = self.d
        # a cancel is what the user asked for: a Normal Event, not a Warning
        cancelled = d.ready_reason is Reason.CANCELLED
        warning = phase in (Phase.FAILED.value, Phase.REJECTED.value) and not cancelled
        if phase != d.old_phase:
            text = d.ready_message or f"phase {d.old_phase or 'new'} → {phase}"
            kind = "Warning" if warning or d.ready_reason in WARNING_WAITS else "Normal"
            d.out.events.append(Event(kind, d.ready_reason.value, short(f"{phase}: {text}")))
        elif d.ready_reason in REPEATED_WARNINGS and d.ready_message != (d.o.status.get("message") or ""):
            d.out.events.append(Event("Warning", d.ready_reason.value, d.ready_message))
        new_retries = int(d.status.get("retries") or 0)
        if new_retries > int(d.o.status.get("retries") or 0) and not warning:
            message = self.retry_message(phase, new_retries)
            d.out.events.append(Event("Normal", Reason.RETRYING.value, message))

    def retry_message(self, phase: str, retries: int) -> str:
        return f"a pod failed or was evicted (retry {retries})"


class Pipeline(Planner):
    """A job with a valid spec: walk the stage rows until one is still running, failed or rejected."""

    d: JobDraft

    def __init__(self, draft: JobDraft) -> None:
        super().__init__(draft)

    def retry_message(self, phase: str, retries: int) -> str:
        """Only training resumes from a checkpoint; the other stages start again."""
        budget = f"(retry {retries}, maxRetries {self.d.job.spec.max_retries} counts non-disruption failures)"
        if phase == Phase.TRAINING.value:
            return f"a training pod failed or was evicted; resuming from the last checkpoint {budget}"
        stage = phase.lower() if phase else "a stage"
        return f"a pod failed or was evicted while {stage}; running the stage again {budget}"

    def ended(self) -> bool:
        """spec.cancel on a Succeeded job changes nothing: it keeps its phase (and stays as it is)."""
        succeeded = self.d.old_phase == Phase.SUCCEEDED.value
        return super().ended() or (self.d.job.spec.cancel and succeeded)

    def advance(self) -> None:
        if self.d.job.spec.cancel:
            self.cancel()
            return
        self.d.status["retries"] = max(int(self.d.status.get("retries") or 0), restarts(self.d.o)) or None
        if not self.output_unchanged():
            return
        artifacts = self.d.status.get("artifacts") or {}
        self.d.status["artifacts"] = {"runPrefix": self.d.job.run_prefix, **artifacts}
        if not self.policy_allows():
            return
        if not pooljob.prepare(self.d):  # a job on a ModelServer: the checks CEL cannot make
            return
        try:
            for row in STAGES:
                if not self.step(row):
                    return
        except (ConfigError, ValueError) as exc:
            stage = Stage.TRAIN if self.d.done(ConditionType.VALIDATED) else Stage.VALIDATE
            self.d.fail(stage, Reason.INVALID_CONFIG, str(exc))

    def artifacts(self) -> Artifacts:
        found = self.d.status.get("artifacts") or {}
        return Artifacts(
            adapter=found.get("adapter"),
            merged=found.get("merged"),
            champion=pooljob.champion_artifact(self.d.status),
            serving_check=self.d.serving_target,
        )

    def cancel(self) -> None:
        """spec.cancel: the unfinished stage Jobs go (their pods with them: Background propagation),
        serving is withdrawn as for a Rejected job, GPU-hours are charged up to now; it fails for good."""
        d = self.d
        for row in STAGES:
            job = d.o.children.get(row.stage)
            if row.kind == "Job" and job is not None and job_outcome(job, ()).state not in ENDED:
                d.out.delete.append(ChildDelete("Job", str(job["metadata"]["name"])))
        spent = gpu_hours_spent(d.o, d.job.spec)
        if spent:
            d.status["gpuHours"] = spent
        if d.status.get("serving"):  # the pool drops the version unless it was promoted (as on deletion)
            d.status["serving"] = {**d.status["serving"], "state": None, "checked": None}
        d.retire_serving()  # also clears status.endpoint
        d.retire_own_server(d.o.own_server if d.job.spec.deployment.server else d.o.server)
        message = f"cancelled (spec.cancel) while {d.old_phase or Phase.PENDING.value}"
        unfinished = [r for r in STAGES if r.owns_condition and not d.done(r.condition)]
        d.fail((unfinished or [d.rows[Stage.SERVE]])[0].stage, Reason.CANCELLED, message)

    # --- FineTunePolicy (finetunepolicy/enforcement.py) ---------------------------------------------

    def training_started(self) -> bool:
        return self.d.done(ConditionType.TRAINED) or self.d.o.children.get(Stage.TRAIN) is not None

    def output_unchanged(self) -> bool:
        """storage.output is immutable (CRD rule); if it changed anyway, say so, not as a missing dataset."""
        recorded = (self.d.status.get("artifacts") or {}).get("runPrefix")
        if not recorded or recorded == self.d.job.run_prefix:
            return True
        unfinished = [r for r in STAGES if r.owns_condition and not self.d.done(r.condition)]
        message = (
            f"storage.output changed after the run started: its artifacts are under {recorded}, not "
            f"{self.d.job.run_prefix}; to write elsewhere, create a new FineTuneJob"
        )
        self.d.fail((unfinished or STAGES)[0].stage, Reason.INVALID_CONFIG, message)
        return False

    def policy_allows(self) -> bool:
        """The static rules, until training starts: a violating job fails before any (more) pods run."""
        self.d.status["policy"] = policy.status_of(self.d.o.policy)
        message = None if self.training_started() else policy.violation(self.d.job.spec, self.d.o.policy)
        if message is None:
            return True
        stage = Stage.TRAIN if self.d.done(ConditionType.VALIDATED) else Stage.VALIDATE
        self.d.fail(stage, Reason.POLICY_VIOLATION, message)
        return False

    def policy_admits_training(self, row: StageRow) -> bool:
        """maxGpuHoursPerJob on the estimate; the namespace's budget and concurrency: wait, no GPU pod."""
        estimate = finite(self.d.status.get("gpuHoursEstimate"))
        message = policy.estimate_violation(estimate, self.d.o.policy)
        if message is not None:
            self.d.fail(row.stage, Reason.POLICY_VIOLATION, message)
            return False
        waiting = policy.wait(estimate, self.d.o.policy)
        if waiting is None:
            return True
        reason, message = Reason(waiting[0]), waiting[1]
        self.d.condition(row.condition, "Unknown", reason, message)
        self.d.phase(Phase.SUSPENDED, reason, message)
        return False

    def step(self, row: StageRow) -> bool:
        """Drive one stage; True when the pipeline may go on to the next row."""
        if not row.wanted(self.d.job.spec, self.artifacts()):
            return row.skip(self.d) if row.skip else True
        if row.owns_condition and self.d.done(row.condition):
            return row.holds(self.d) if row.holds else True
        if row.stage is Stage.TRAIN and not self.training_started() and not self.policy_admits_training(row):
            return False
        if row.kind == "ModelServer":  # True: loaded, and the serving check (the next row) is to run
            if self.d.job.spec.deployment.server:
                return pooljob.serve(self.d, row)  # a shared ModelServer
            return ownedserver.serve(self.d, row, self.desired(row))  # the job's own ModelServer
        outcome = self.run_job(row)
        if row.counts_gpu_hours:
            self.d.status["gpuHours"] = gpu_hours_spent(self.d.o, self.d.job.spec)
        if outcome is None:
            if row.while_running is not None:
                row.while_running(self.d)
            return False
        tracking.record(self.d.status, outcome.summary)
        return row.read(self.d, outcome) if row.read is not None else True

    # --- a Job stage ---------------------------------------------------------------------------

    def run_job(self, row: StageRow) -> JobOutcome | None:
        """Create, suspend/resume or read one Job stage; None while it is not finished."""
        job = self.d.o.children.get(row.stage)
        if job is None:
            self.create_job(row)
            return None
        outcome = job_outcome(job, self.d.o.pods.get(row.stage, ()))
        if outcome.state == "failed":
            reason, message = failure_reason(outcome, row.stage)
            self.d.fail(row.stage, reason, f"{row.stage.value}: {message}")
            return None
        if outcome.state == "succeeded":
            return outcome
        self.watch_job(row, job)
        return None

    def create_job(self, row: StageRow) -> None:
        """The builder runs only here: a Job is built when it must be created, never to compare."""
        manifest = row.build(self.d.job, self.d.config, self.artifacts())
        if self.d.blocked(row.stage, manifest):
            return
        if self.d.job.spec.suspend:
            manifest = {**manifest, "spec": {**manifest["spec"], "suspend": True}}
            self.d.suspended(row)
        else:
            self.d.running(row, condition_message=f"Job {manifest['metadata']['name']} is running")
        if row.stage is Stage.TRAIN:
            self.spread(manifest)
        self.d.out.create.append(manifest)

    def spread(self, manifest: Mapping[str, Any]) -> None:
        """Multi-GPU / multi-node training: say how it is spread; several nodes need the headless Service."""
        gpu_type = self.d.config.gpu_type(self.d.job.spec.resources.gpu_type)
        chosen = distributed.parallelism(self.d.job.spec, gpu_type)
        if chosen.ranks > 1:
            progress = self.d.status.get("progress") or {}
            self.d.status["progress"] = {**progress, "parallelism": chosen.describe()}
        if chosen.nodes > 1:
            self.d.out.create.append(dict(distributed.headless_service(self.d.job)))

    def watch_job(self, row: StageRow, job: Mapping[str, Any]) -> None:
        """A Job that has not finished: follow spec.suspend and Kueue, report pod problems."""
        name = str((job.get("metadata") or {}).get("name"))
        job_suspended = bool((job.get("spec") or {}).get("suspend"))
        queue = self.d.job.spec.resources.queue_name if row.stage is Stage.TRAIN else None
        if self.d.job.spec.suspend:
            if not job_suspended:
                # The Job controller stops the pods; the trainer checkpoints on SIGTERM.
                self.d.out.patch.append(ChildPatch("Job", name, {"spec": {"suspend": True}}))
            self.d.suspended(row)
        elif job_suspended and queue:
            self.d.waiting(row, Reason.QUEUED, f"waiting for Kueue to admit the Job in queue {queue}")
        elif job_suspended:
            self.d.out.patch.append(ChildPatch("Job", name, {"spec": {"suspend": False}}))
            self.d.running(row, "resumed", "resumed; continuing from the last checkpoint")
        else:
            self.report_pods(row, name)

    def report_pods(self, row: StageRow, name: str) -> None:
        pods = self.d.o.pods.get(row.stage, ())
        problem = pod_problem(pods)
        nodes = self.d.job.spec.resources.nodes if row.stage is Stage.TRAIN else 1
        if problem is not None and problem.fatal:
            self.d.out.patch.append(ChildPatch("Job", name, {"spec": {"suspend": True}}))
            self.d.fail(row.stage, problem.reason, problem.message)
        elif problem is not None and problem.reason is Reason.UNSCHEDULABLE and nodes > 1:
            self.d.waiting(row, problem.reason, distributed.gang_message(pods, nodes, problem.message))
        elif problem is not None and row.running_messages is None:
            self.d.waiting(row, problem.reason, problem.message)
        else:
            self.d.running(row, condition_message=f"Job {name} is running")

    # --- the serving stage ---------------------------------------------------------------------

    def desired(self, row: StageRow) -> dict[str, Any]:
        """The child as the spec wants it, built once per generation and artifacts (`Observed.built`)."""
        artifacts = self.artifacts()
        key = (row.stage.value, self.d.o.generation, artifacts.adapter, artifacts.merged)
        if key not in self.d.o.built:
            self.d.o.built.clear()
            self.d.o.built[key] = row.build(self.d.job, self.d.config, artifacts)
        return self.d.o.built[key]


def plan(observed: Observed, config: OperatorConfig) -> Plan:
    """Next actions, status patch and Events for one FineTuneJob."""
    if isinstance(observed.job, JobRef) and observed.spec_error is None:
        return Pipeline(JobDraft(o=observed, config=config, job=observed.job, rows=ROWS)).run()
    return Planner(Draft(o=observed, config=config)).run()
