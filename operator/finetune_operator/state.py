"""The pure state machine: what the operator observed → what to do next and how the status changes.

`plan(observed, config)` never talks to the API. Stage completion is recorded in the status conditions
(`Validated`, `Trained`, `Evaluated`, `Deployed`), so a finished stage is never re-run, and everything else
is derived from the children as they are now — which is what makes the reconcile idempotent and safe to
repeat after an operator restart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from . import builders
from .builders import Artifacts, JobRef
from .config import ConfigError, OperatorConfig
from .gate import evaluate_gate
from .models import Phase
from .naming import Stage

# Phases after which nothing more happens (Succeeded is not among them: enabling deployment later serves it).
TERMINAL_PHASES = frozenset({Phase.FAILED, Phase.REJECTED})
IDLE_PHASES = frozenset({Phase.FAILED, Phase.REJECTED, Phase.SUCCEEDED, Phase.SERVING})


class ConditionType(StrEnum):
    VALIDATED = "Validated"
    TRAINED = "Trained"
    EVALUATED = "Evaluated"
    DEPLOYED = "Deployed"
    READY = "Ready"


class Reason(StrEnum):
    """The closed set of condition reasons (and Event reasons)."""

    PENDING = "Pending"
    VALIDATING = "Validating"
    DATASET_VALID = "DatasetValid"
    INVALID_DATASET = "InvalidDataset"
    INVALID_CONFIG = "InvalidConfig"
    OUT_OF_MEMORY = "OutOfMemory"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    STAGE_FAILED = "StageFailed"
    UNSCHEDULABLE = "Unschedulable"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    TRAINING = "Training"
    RETRYING = "Retrying"
    TRAINING_SUCCEEDED = "TrainingSucceeded"
    EVALUATING = "Evaluating"
    GATE_PASSED = "GatePassed"
    GATE_FAILED = "GateFailed"
    EVALUATION_DISABLED = "EvaluationDisabled"
    EXPORTING = "Exporting"
    DEPLOYING = "Deploying"
    DEPLOYMENT_NOT_READY = "DeploymentNotReady"
    DEPLOYMENT_AVAILABLE = "DeploymentAvailable"
    DEPLOYMENT_DISABLED = "DeploymentDisabled"
    SERVING = "Serving"
    SUCCEEDED = "Succeeded"
    # A child's name is taken by an object this job does not control: Pending until the user deletes it.
    CHILD_CONFLICT = "ChildConflict"


EXIT_REASONS = {10: Reason.INVALID_DATASET, 11: Reason.INVALID_CONFIG, 12: Reason.OUT_OF_MEMORY}
OOM_HINT = (
    "lower hyperparameters.batchSize or maxSeqLength, enable gradientCheckpointing, "
    "use method qlora or a larger gpuType"
)
IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
STAGE_PHASE = {
    Stage.VALIDATE: Phase.VALIDATING,
    Stage.TRAIN: Phase.TRAINING,
    Stage.EVALUATE: Phase.EVALUATING,
    Stage.EXPORT: Phase.DEPLOYING,
    Stage.SERVE: Phase.DEPLOYING,
}
STAGE_CONDITION = {
    Stage.VALIDATE: ConditionType.VALIDATED,
    Stage.TRAIN: ConditionType.TRAINED,
    Stage.EVALUATE: ConditionType.EVALUATED,
    Stage.EXPORT: ConditionType.DEPLOYED,
    Stage.SERVE: ConditionType.DEPLOYED,
}
STAGE_RUNNING_REASON = {
    Stage.VALIDATE: Reason.VALIDATING,
    Stage.TRAIN: Reason.TRAINING,
    Stage.EVALUATE: Reason.EVALUATING,
    Stage.EXPORT: Reason.EXPORTING,
    Stage.SERVE: Reason.DEPLOYING,
}
JOB_STAGES = (Stage.VALIDATE, Stage.TRAIN, Stage.EVALUATE, Stage.EXPORT)
MAX_MESSAGE = 1024
METRICS = ("loss", "perplexity", "exact_match", "token_f1", "rouge_l")


# --- inputs and outputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """Everything the operator saw for one FineTuneJob, read in one pass."""

    job: JobRef
    generation: int
    status: Mapping[str, Any]
    children: Mapping[Stage, Mapping[str, Any]]  # Jobs by stage; the Deployment under SERVE
    service: Mapping[str, Any] | None = None
    pods: Mapping[Stage, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    progress: Mapping[str, Any] | None = None  # the trainer's newest progress line
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    spec_error: str | None = None  # the spec failed the operator's own validation
    # Evicted/preempted stage pods this process has seen fail (they are deleted soon after); None: use `pods`.
    disrupted: frozenset[str] | None = None
    # (kind, name) → message: children this pass could not create because an object the job does not
    # control has the name (kube.NotOwnedError). The job waits, with that message, instead of creating.
    conflicts: Mapping[tuple[str, str], str] = field(default_factory=dict)


@dataclass(frozen=True)
class ChildPatch:
    kind: str  # "Job" | "Deployment"
    name: str
    patch: Any
    patch_type: str = "merge"  # "merge" | "json"


@dataclass(frozen=True)
class ChildDelete:
    kind: str  # "Deployment" | "Service"
    name: str


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


@dataclass
class Plan:
    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[ChildPatch] = field(default_factory=list)
    delete: list[ChildDelete] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # JSON merge patch of .status
    events: list[Event] = field(default_factory=list)

    @property
    def writes(self) -> int:
        return len(self.create) + len(self.patch) + len(self.delete) + len(self.events) + bool(self.status)


# --- reading children --------------------------------------------------------------------------


@dataclass(frozen=True)
class Termination:
    exit_code: int | None
    reason: str  # kubelet's reason, e.g. Error, OOMKilled, Completed
    message: str  # the trainer's message (or the log tail kubelet fell back to)
    summary: Mapping[str, Any]


@dataclass(frozen=True)
class JobOutcome:
    state: str  # "running" | "succeeded" | "failed" | "suspended"
    job_reason: str = ""
    job_message: str = ""
    termination: Termination | None = None


def _conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    items = (obj.get("status") or {}).get("conditions") or []
    return {str(c.get("type")): c for c in items if isinstance(c, Mapping)}


def _is_true(conditions: Mapping[str, Mapping[str, Any]], kind: str) -> bool:
    return str((conditions.get(kind) or {}).get("status")) == "True"


def _created(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


def termination_of(pod: Mapping[str, Any], container: str = builders.TRAINER_CONTAINER) -> Termination | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != container:
            continue
        state = status.get("state") or {}
        terminated = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
        if not terminated:
            return None
        raw = str(terminated.get("message") or "")
        exit_code = terminated.get("exitCode")
        message, summary = raw.strip(), {}  # type: tuple[str, Any]
        try:
            document = json.loads(raw)
        except ValueError:
            document = None
        if isinstance(document, Mapping):
            message = str(document.get("message") or "")
            summary = document.get("summary") or {}
            if exit_code is None and isinstance(document.get("exitCode"), int):
                exit_code = document["exitCode"]
        return Termination(
            exit_code=int(exit_code) if exit_code is not None else None,
            reason=str(terminated.get("reason") or ""),
            message=message,
            summary=summary if isinstance(summary, Mapping) else {},
        )
    return None


def job_outcome(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> JobOutcome:
    conditions = _conditions(job)
    newest = sorted(pods, key=_created, reverse=True)
    if _is_true(conditions, "Complete") or _is_true(conditions, "SuccessCriteriaMet"):
        succeeded = [p for p in newest if (p.get("status") or {}).get("phase") == "Succeeded"]
        termination = next((t for p in succeeded if (t := termination_of(p)) is not None), None)
        return JobOutcome("succeeded", termination=termination)
    for kind in ("Failed", "FailureTarget"):
        if _is_true(conditions, kind):
            failed = [p for p in newest if (p.get("status") or {}).get("phase") == "Failed"]
            # A permanent exit code decides the reason even if an older pod failed differently.
            terminations = [t for p in failed if (t := termination_of(p)) is not None]
            chosen = next((t for t in terminations if t.exit_code in EXIT_REASONS), None)
            chosen = chosen or (terminations[0] if terminations else None)
            return JobOutcome(
                "failed",
                job_reason=str(conditions[kind].get("reason") or ""),
                job_message=str(conditions[kind].get("message") or ""),
                termination=chosen,
            )
    if (job.get("spec") or {}).get("suspend"):
        return JobOutcome("suspended")
    return JobOutcome("running")


def failure_reason(outcome: JobOutcome) -> tuple[Reason, str]:
    """Map a failed Job to a reason and a message the user can act on."""
    term = outcome.termination
    if term is not None and term.exit_code in EXIT_REASONS:
        reason = EXIT_REASONS[term.exit_code]
        message = term.message or f"the trainer exited with code {term.exit_code}"
        if reason is Reason.OUT_OF_MEMORY and "hint" not in message.lower() and OOM_HINT not in message:
            message = f"{message}; hint: {OOM_HINT}"
        return reason, message
    if term is not None and term.reason == "OOMKilled":
        return (
            Reason.OUT_OF_MEMORY,
            f"the container was killed for exceeding its memory limit; hint: {OOM_HINT}",
        )
    if outcome.job_reason == "DeadlineExceeded":
        return Reason.DEADLINE_EXCEEDED, outcome.job_message or "activeDeadlineSeconds was exceeded"
    detail = ""
    if term is not None:
        detail = (
            f" (last exit code {term.exit_code}: {term.message})"
            if term.message
            else (f" (last exit code {term.exit_code})")
        )
    if outcome.job_reason == "BackoffLimitExceeded":
        return Reason.RETRIES_EXHAUSTED, f"retries exhausted{detail}"
    return Reason.STAGE_FAILED, f"{outcome.job_reason or 'failed'}: {outcome.job_message}{detail}".strip()


@dataclass(frozen=True)
class PodProblem:
    reason: Reason
    message: str
    fatal: bool = False


def pod_problem(pods: Sequence[Mapping[str, Any]]) -> PodProblem | None:
    """Why the newest live pod of a stage is not running: unschedulable, image pull, bad config, crashing."""
    live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")]
    for pod in sorted(live, key=_created, reverse=True):
        status = pod.get("status") or {}
        all_statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        for container in all_statuses:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = str(waiting.get("reason") or "")
            detail = f"container {container.get('name')}: {reason}: {waiting.get('message') or ''}".rstrip(
                ": "
            )
            if reason in IMAGE_PULL_REASONS:
                return PodProblem(Reason.IMAGE_PULL_FAILED, detail, fatal=True)
            if reason in ("CreateContainerConfigError", "CreateContainerError"):
                return PodProblem(Reason.CONTAINER_CONFIG_ERROR, detail)
            if reason == "CrashLoopBackOff":
                return PodProblem(Reason.DEPLOYMENT_NOT_READY, detail)
        scheduled = _conditions(pod).get("PodScheduled") or {}
        if str(scheduled.get("status")) == "False" and scheduled.get("reason") == "Unschedulable":
            return PodProblem(
                Reason.UNSCHEDULABLE, f"waiting for resources: {scheduled.get('message') or ''}"
            )
    return None


def disrupted_pods(pods: Sequence[Mapping[str, Any]]) -> set[str]:
    """Failed pods that were evicted or preempted, which the Job's `failed` counter ignores."""
    return {
        str((p.get("metadata") or {}).get("uid") or (p.get("metadata") or {}).get("name"))
        for p in pods
        if (p.get("status") or {}).get("phase") == "Failed" and _is_true(_conditions(p), "DisruptionTarget")
    }


def restarts(observed: Observed) -> int:
    """Stage pods that failed and were replaced: the Jobs' counters plus disruptions seen."""
    counted = sum(
        int(((observed.children.get(s) or {}).get("status") or {}).get("failed") or 0) for s in JOB_STAGES
    )
    disrupted = observed.disrupted
    if disrupted is None:
        disrupted = frozenset().union(*(disrupted_pods(observed.pods.get(s, ())) for s in JOB_STAGES))
    return counted + len(disrupted)


# --- status helpers ----------------------------------------------------------------------------


def _timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _short(message: str, limit: int = MAX_MESSAGE) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _metrics(values: Any) -> dict[str, float] | None:
    if not isinstance(values, Mapping):
        return None
    out = {k: v for k in METRICS if (v := _finite(values.get(k))) is not None}
    return out or None


def dataset_status(summary: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("format", "train", "validation", "test", "trainTokens", "removed", "errors"):
        if summary.get(key) is not None:
            out[key] = summary[key]
    return out


def gpu_hours_estimate(spec: Mapping[str, Any], dataset: Mapping[str, Any], config: OperatorConfig) -> float:
    """Train tokens x epochs / the GPU type's tokens per second, in GPU-hours (0 for CPU-only runs)."""
    resources = spec.get("resources") or {}
    gpus = int(resources.get("gpus", 1))
    if gpus == 0:
        return 0.0
    try:
        tokens_per_second = config.gpu_type(str(resources.get("gpuType", "a100-80gb"))).tokens_per_second
    except ConfigError:
        return 0.0
    hyper = spec.get("hyperparameters") or {}
    tokens = float(dataset.get("trainTokens") or 0) * float(hyper.get("epochs", 3))
    if hyper.get("maxSteps"):
        per_step = (
            int(hyper.get("batchSize", 4))
            * int(hyper.get("gradientAccumulationSteps", 4))
            * gpus
            * int(hyper.get("maxSeqLength", 2048))
        )
        tokens = min(tokens, float(hyper["maxSteps"]) * per_step)
    # Data parallel: each GPU processes tokensPerSecond, so GPU-hours do not depend on the GPU count.
    return round(tokens / tokens_per_second / 3600, 3)


def gpu_hours_spent(observed: Observed) -> float:
    """GPU-hours of the GPU stages so far; never decreases (a resumed Job restarts its startTime)."""
    spec = observed.job.spec
    gpus = int((spec.get("resources") or {}).get("gpus", 1))
    total = 0.0
    for stage in (Stage.TRAIN, Stage.EVALUATE, Stage.EXPORT):
        job = observed.children.get(stage)
        if not job or gpus == 0:
            continue
        stage_gpus = gpus if stage is Stage.TRAIN else min(gpus, 1)
        status = job.get("status") or {}
        start = parse_time(status.get("startTime"))
        if start is None:
            continue
        end = parse_time(status.get("completionTime"))
        if end is None:
            failed = _conditions(job).get("Failed") or {}
            end = parse_time(failed.get("lastTransitionTime")) if failed else None
        if end is None:
            end = observed.now if status.get("active") else start
        total += max(0.0, (end - start).total_seconds()) / 3600 * stage_gpus
    previous = _finite(observed.status.get("gpuHours")) or 0.0
    return max(previous, round(total, 2))


# --- the planner -------------------------------------------------------------------------------


class _Planner:
    def __init__(self, observed: Observed, config: OperatorConfig) -> None:
        self.o = observed
        self.config = config
        self.spec = observed.job.spec
        self.out = Plan()
        current = observed.status
        self.old_phase = str(current.get("phase") or "")
        self.status: dict[str, Any] = {k: v for k, v in current.items() if k != "kopf"}
        self.conditions: dict[str, dict[str, Any]] = {
            str(c["type"]): dict(c) for c in current.get("conditions") or [] if isinstance(c, Mapping)
        }
        self.ready_reason = Reason.PENDING
        self.ready_message = ""

    # conditions and phase
    def condition(self, kind: ConditionType, status: str, reason: Reason, message: str = "") -> None:
        now = _timestamp(self.o.now)
        old = self.conditions.get(kind.value)
        kept = old.get("lastTransitionTime") if old is not None and old.get("status") == status else None
        self.conditions[kind.value] = {
            "type": kind.value,
            "status": status,
            "observedGeneration": self.o.generation,
            "lastTransitionTime": kept or now,
            "reason": reason.value,
            "message": _short(message),
        }

    def done(self, kind: ConditionType) -> bool:
        return (self.conditions.get(kind.value) or {}).get("status") == "True"

    def phase(self, phase: Phase, reason: Reason, message: str = "") -> None:
        self.status["phase"] = phase.value
        self.ready_reason = reason
        self.ready_message = _short(message)
        self.status["message"] = self.ready_message or None

    def fail(self, stage: Stage, reason: Reason, message: str) -> None:
        self.condition(STAGE_CONDITION[stage], "False", reason, message)
        self.phase(Phase.FAILED, reason, message)

    def blocked(self, stage: Stage, manifest: Mapping[str, Any]) -> bool:
        """Wait (Pending, reason ChildConflict) when the child's name is taken by a foreign object."""
        message = self.o.conflicts.get((str(manifest["kind"]), str(manifest["metadata"]["name"])))
        if message is None:
            return False
        self.condition(STAGE_CONDITION[stage], "Unknown", Reason.CHILD_CONFLICT, message)
        self.phase(Phase.PENDING, Reason.CHILD_CONFLICT, message)
        return True

    # stage helpers
    def run_job_stage(self, stage: Stage, manifest: dict[str, Any]) -> JobOutcome | None:
        """Create, suspend/resume or read one Job stage; None while it is not finished."""
        job = self.o.children.get(stage)
        pods = self.o.pods.get(stage, ())
        suspend = bool(self.spec.get("suspend"))
        queued = stage is Stage.TRAIN and bool((self.spec.get("resources") or {}).get("queueName"))
        cond = STAGE_CONDITION[stage]
        running = STAGE_RUNNING_REASON[stage]
        if job is None:
            if self.blocked(stage, manifest):
                return None
            if suspend:
                manifest = {**manifest, "spec": {**manifest["spec"], "suspend": True}}
            self.out.create.append(manifest)
            if suspend:
                self.condition(cond, "Unknown", Reason.SUSPENDED, "suspended by spec.suspend")
                self.phase(Phase.SUSPENDED, Reason.SUSPENDED, f"{stage.value} is suspended (spec.suspend)")
            else:
                self.condition(cond, "Unknown", running, f"Job {manifest['metadata']['name']} is running")
                self.phase(STAGE_PHASE[stage], running)
            return None
        outcome = job_outcome(job, pods)
        name = str((job.get("metadata") or {}).get("name"))
        if outcome.state in ("running", "suspended"):
            job_suspended = bool((job.get("spec") or {}).get("suspend"))
            if suspend:
                if not job_suspended:
                    # The Job controller stops the pods; the trainer checkpoints on SIGTERM.
                    self.out.patch.append(ChildPatch("Job", name, {"spec": {"suspend": True}}))
                self.condition(cond, "Unknown", Reason.SUSPENDED, "suspended by spec.suspend")
                self.phase(Phase.SUSPENDED, Reason.SUSPENDED, f"{stage.value} is suspended (spec.suspend)")
                return None
            if job_suspended and queued:
                queue = (self.spec.get("resources") or {}).get("queueName")
                message = f"waiting for Kueue to admit the Job in queue {queue}"
                self.condition(cond, "Unknown", Reason.QUEUED, message)
                self.phase(STAGE_PHASE[stage], Reason.QUEUED, message)
                return None
            if job_suspended:
                self.out.patch.append(ChildPatch("Job", name, {"spec": {"suspend": False}}))
                self.condition(cond, "Unknown", running, "resumed; continuing from the last checkpoint")
                self.phase(STAGE_PHASE[stage], running, "resumed")
                return None
            problem = pod_problem(pods)
            if problem is not None and problem.fatal:
                self.out.patch.append(ChildPatch("Job", name, {"spec": {"suspend": True}}))
                self.fail(stage, problem.reason, problem.message)
                return None
            if problem is not None:
                self.condition(cond, "Unknown", problem.reason, problem.message)
                self.phase(STAGE_PHASE[stage], problem.reason, problem.message)
                return None
            self.condition(cond, "Unknown", running, f"Job {name} is running")
            self.phase(STAGE_PHASE[stage], running)
            return None
        if outcome.state == "failed":
            reason, message = failure_reason(outcome)
            self.fail(stage, reason, f"{stage.value}: {message}")
            return None
        return outcome

    # the pipeline
    def run(self) -> Plan:
        first_visit = not self.conditions
        if first_visit:
            for kind in ConditionType:
                self.condition(kind, "Unknown", Reason.PENDING, "not started")
            self.status.setdefault("startTime", _timestamp(self.o.now))
        self.status["observedGeneration"] = self.o.generation
        if self.old_phase in TERMINAL_PHASES:
            return self.finish(keep_phase=True)
        if self.o.spec_error is not None:
            self.phase(Phase.FAILED, Reason.INVALID_CONFIG, f"invalid spec: {self.o.spec_error}")
            return self.finish()
        try:
            self.pipeline()
        except (ConfigError, ValueError) as exc:
            self.fail(
                Stage.TRAIN if self.done(ConditionType.VALIDATED) else Stage.VALIDATE,
                Reason.INVALID_CONFIG,
                str(exc),
            )
        return self.finish()

    def pipeline(self) -> None:
        job, config = self.o.job, self.config
        self.status["retries"] = max(int(self.status.get("retries") or 0), restarts(self.o)) or None
        artifacts = dict(self.status.get("artifacts") or {})
        artifacts.setdefault("runPrefix", job.run_prefix)
        self.status["artifacts"] = artifacts

        # 1. Validating: CPU only; nothing asks for a GPU before the data is known to be good.
        if not self.done(ConditionType.VALIDATED):
            outcome = self.run_job_stage(Stage.VALIDATE, builders.validation_job(job, config))
            if outcome is None:
                return
            summary = outcome.termination.summary if outcome.termination else {}
            dataset = dataset_status(summary)
            self.status["dataset"] = dataset
            self.status["gpuHoursEstimate"] = gpu_hours_estimate(self.spec, dataset, config)
            artifacts["data"] = f"{job.run_prefix}/data/"
            self.condition(
                ConditionType.VALIDATED,
                "True",
                Reason.DATASET_VALID,
                f"{dataset.get('train', '?')} training examples, {dataset.get('test', '?')} held out, "
                f"{dataset.get('trainTokens', '?')} tokens",
            )

        # 2. Training
        if not self.done(ConditionType.TRAINED):
            outcome = self.run_job_stage(Stage.TRAIN, builders.training_job(job, config))
            if outcome is None:
                self.record_progress()
                self.status["gpuHours"] = gpu_hours_spent(self.o)
                return
            summary = outcome.termination.summary if outcome.termination else {}
            for key in ("adapter", "merged"):
                if summary.get(key):
                    artifacts[key] = summary[key]
            artifacts["checkpoint"] = f"{job.run_prefix}/checkpoints/"
            progress = dict(self.status.get("progress") or {})
            for key in ("step", "totalSteps", "loss"):
                if _finite(summary.get(key)) is not None:
                    progress[key] = summary[key]
            if progress.get("step") is not None and progress.get("totalSteps"):
                progress["display"] = f"{progress['step']}/{progress['totalSteps']}"
            progress["etaSeconds"] = 0
            self.status["progress"] = progress or None
            self.status["gpuHours"] = gpu_hours_spent(self.o)
            self.condition(
                ConditionType.TRAINED,
                "True",
                Reason.TRAINING_SUCCEEDED,
                f"trained {progress.get('step', '?')} steps, final loss {progress.get('loss', '?')}",
            )

        # 3. Evaluating and the gate
        evaluation_spec = self.spec.get("evaluation") or {}
        if not evaluation_spec.get("enabled", True):
            if not self.done(ConditionType.EVALUATED):
                self.condition(
                    ConditionType.EVALUATED,
                    "True",
                    Reason.EVALUATION_DISABLED,
                    "evaluation.enabled is false; no gate",
                )
        elif not self.done(ConditionType.EVALUATED):
            outcome = self.run_job_stage(Stage.EVALUATE, builders.evaluation_job(job, config))
            if outcome is None:
                self.status["gpuHours"] = gpu_hours_spent(self.o)
                return
            self.status["gpuHours"] = gpu_hours_spent(self.o)
            if not self.record_evaluation(outcome):
                return
        elif (self.status.get("evaluation") or {}).get("passed") is False:
            self.phase(Phase.REJECTED, Reason.GATE_FAILED, "the evaluation gate failed")
            return

        # 4. Deploying → Serving (or Succeeded without a deployment)
        self.deploy(Artifacts(adapter=artifacts.get("adapter"), merged=artifacts.get("merged")))

    def record_progress(self) -> None:
        line = self.o.progress
        if not line or self.status.get("phase") != Phase.TRAINING.value:
            return
        progress: dict[str, Any] = {}
        for key in ("step", "totalSteps", "etaSeconds"):
            value = _finite(line.get(key))
            if value is not None and value >= 0:
                progress[key] = int(value)
        for key in ("epoch", "loss", "learningRate", "tokensPerSecond"):
            value = _finite(line.get(key))
            if value is not None:
                progress[key] = round(value, 6)
        if "step" in progress and progress.get("totalSteps"):
            progress["display"] = f"{progress['step']}/{progress['totalSteps']}"
        if progress:
            self.status["progress"] = progress

    def record_evaluation(self, outcome: JobOutcome) -> bool:
        summary = outcome.termination.summary if outcome.termination else {}
        tuned = _metrics(summary.get("tuned")) or {}
        base = _metrics(summary.get("base"))
        evaluation_spec = self.spec.get("evaluation") or {}
        result = evaluate_gate(evaluation_spec, tuned, base)
        metrics = list(evaluation_spec.get("metrics") or ["loss"])
        primary = str(evaluation_spec.get("primaryMetric") or metrics[0])
        brief = f"{primary} {tuned.get(primary, float('nan')):.3g}"
        if base and primary in base:
            brief += f" vs {base[primary]:.3g}"
        self.status["evaluation"] = {
            "passed": result.passed,
            "tuned": tuned or None,
            "base": base,
            "reference": _metrics(summary.get("reference")),
            "examples": summary.get("n") if isinstance(summary.get("n"), int) else None,
            "reasons": [_short(r, 512) for r in result.reasons][:16],
            "summary": _short(("passed: " if result.passed else "rejected: ") + brief, 64),
        }
        self.status["artifacts"]["evaluationReport"] = f"{self.o.job.run_prefix}/evaluation/report.json"
        if result.passed:
            self.condition(ConditionType.EVALUATED, "True", Reason.GATE_PASSED, "; ".join(result.reasons))
            return True
        message = "; ".join(r for r in result.reasons if "below" in r or "above" in r or "not" in r)
        self.condition(ConditionType.EVALUATED, "True", Reason.GATE_FAILED, message)
        self.phase(Phase.REJECTED, Reason.GATE_FAILED, f"evaluation gate failed: {message}")
        return False

    def deploy(self, artifacts: Artifacts) -> None:
        job, config = self.o.job, self.config
        deployment_spec = self.spec.get("deployment") or {}
        existing = self.o.children.get(Stage.SERVE)
        name = builders.service_name(job)
        if not deployment_spec.get("enabled", True):
            if existing is not None:
                self.out.delete.append(ChildDelete("Deployment", name))
            if self.o.service is not None:
                self.out.delete.append(ChildDelete("Service", name))
            self.status["endpoint"] = None
            self.condition(
                ConditionType.DEPLOYED, "False", Reason.DEPLOYMENT_DISABLED, "deployment.enabled is false"
            )
            self.complete(
                Phase.SUCCEEDED, Reason.SUCCEEDED, "the model passed evaluation; deployment is disabled"
            )
            return
        if builders.needs_export(self.spec, artifacts):
            outcome = self.run_job_stage(Stage.EXPORT, builders.export_job(job, config))
            if outcome is None:
                if self.status.get("phase") == Phase.DEPLOYING.value:
                    self.condition(ConditionType.DEPLOYED, "Unknown", Reason.EXPORTING, "merging the adapter")
                    self.phase(Phase.DEPLOYING, Reason.EXPORTING, "merging the adapter into the base model")
                return
            summary = outcome.termination.summary if outcome.termination else {}
            if not summary.get("merged"):
                self.fail(Stage.EXPORT, Reason.STAGE_FAILED, "export finished without a merged model URI")
                return
            self.status["artifacts"]["merged"] = summary["merged"]
            artifacts = Artifacts(adapter=artifacts.adapter, merged=str(summary["merged"]))

        desired = builders.serving_deployment(job, config, artifacts)
        if self.o.service is None:
            service = builders.serving_service(job, config)
            if self.blocked(Stage.SERVE, service):
                return
            self.out.create.append(service)
        if existing is None:
            if self.blocked(Stage.SERVE, desired):
                self.out.create.clear()  # nothing serves until the name is free
                return
            self.out.create.append(desired)
            self.condition(ConditionType.DEPLOYED, "Unknown", Reason.DEPLOYING, f"created Deployment {name}")
            self.phase(Phase.DEPLOYING, Reason.DEPLOYING)
            return
        wanted_hash = desired["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH]
        current_hash = ((existing.get("metadata") or {}).get("annotations") or {}).get(
            builders.ANNOTATION_SPEC_HASH
        )
        if current_hash != wanted_hash:
            key = builders.ANNOTATION_SPEC_HASH.replace("~", "~0").replace("/", "~1")
            self.out.patch.append(
                ChildPatch(
                    "Deployment",
                    name,
                    [
                        {"op": "add", "path": f"/metadata/annotations/{key}", "value": wanted_hash},
                        {"op": "replace", "path": "/spec/replicas", "value": desired["spec"]["replicas"]},
                        {"op": "replace", "path": "/spec/strategy", "value": desired["spec"]["strategy"]},
                        {"op": "replace", "path": "/spec/template", "value": desired["spec"]["template"]},
                    ],
                    patch_type="json",
                )
            )
            self.condition(
                ConditionType.DEPLOYED, "Unknown", Reason.DEPLOYING, "rolling out the changed deployment"
            )
            self.phase(Phase.DEPLOYING, Reason.DEPLOYING, "applying the changed deployment section")
            return
        if deployment_available(existing):
            model = builders.served_model_name(job)
            self.status["endpoint"] = {"url": builders.endpoint_url(job, config), "model": model}
            self.condition(
                ConditionType.DEPLOYED,
                "True",
                Reason.DEPLOYMENT_AVAILABLE,
                f"{model} is served by Deployment {name}",
            )
            self.complete(
                Phase.SERVING, Reason.SERVING, f"serving {model} at {builders.endpoint_url(job, config)}"
            )
            return
        problem = pod_problem(self.o.pods.get(Stage.SERVE, ()))
        if problem is not None and problem.fatal:
            self.fail(Stage.SERVE, problem.reason, problem.message)
            return
        reason = problem.reason if problem else Reason.DEPLOYING
        message = problem.message if problem else "waiting for vLLM to become ready"
        self.condition(ConditionType.DEPLOYED, "Unknown", reason, message)
        self.phase(Phase.DEPLOYING, reason, message)

    def complete(self, phase: Phase, reason: Reason, message: str) -> None:
        self.phase(phase, reason, message)
        if self.old_phase != phase.value or not self.status.get("completionTime"):
            self.status["completionTime"] = self.status.get("completionTime") or _timestamp(self.o.now)

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
                self.status["completionTime"] = self.status.get("completionTime") or _timestamp(self.o.now)
            self.events(phase)
        self.status["conditions"] = [self.conditions[k] for k in sorted(self.conditions)]
        self.out.status = diff_status(self.o.status, self.status)
        return self.out

    def events(self, phase: str) -> None:
        warning = phase in (Phase.FAILED.value, Phase.REJECTED.value)
        if phase != self.old_phase:
            text = self.ready_message or f"phase {self.old_phase or 'new'} → {phase}"
            kind = "Warning" if warning or self.ready_reason is Reason.CHILD_CONFLICT else "Normal"
            self.out.events.append(Event(kind, self.ready_reason.value, _short(f"{phase}: {text}")))
        elif self.ready_reason in (
            Reason.UNSCHEDULABLE,
            Reason.CONTAINER_CONFIG_ERROR,
            Reason.CHILD_CONFLICT,
        ) and self.ready_message != (self.o.status.get("message") or ""):
            self.out.events.append(Event("Warning", self.ready_reason.value, self.ready_message))
        old_retries = int(self.o.status.get("retries") or 0)
        new_retries = int(self.status.get("retries") or 0)
        if new_retries > old_retries and not warning:
            self.out.events.append(
                Event(
                    "Normal",
                    Reason.RETRYING.value,
                    f"a pod failed or was evicted; resuming from the last checkpoint (retry {new_retries}, "
                    f"maxRetries {self.spec.get('maxRetries', 3)} counts non-disruption failures)",
                )
            )


def deployment_available(deployment: Mapping[str, Any]) -> bool:
    status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and int(observed) < int(generation):
        return False
    ready = int(status.get("availableReplicas") or status.get("readyReplicas") or 0)
    return _is_true(_conditions(deployment), "Available") and ready >= 1


def diff_status(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new` (top-level keys; None deletes)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if key == "kopf":
            continue
        if old.get(key) != value and not (value is None and key not in old):
            patch[key] = value
    return patch


def plan(observed: Observed, config: OperatorConfig) -> Plan:
    """Next actions, status patch and Events for one FineTuneJob."""
    return _Planner(observed, config).run()
