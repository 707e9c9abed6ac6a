"""The status vocabulary: condition types, the closed set of reasons, and the phases that end a job."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from finetune_vocabulary.exitcodes import ExitCode

from finetune_operator.api.finetunejob_status import Phase, Stage

# Phases after which nothing more happens (Succeeded is not among them: enabling deployment later serves it).
TERMINAL_PHASES = frozenset({Phase.FAILED, Phase.REJECTED})
# Phases the resync loop leaves alone: nothing changes in them without a watch event.
IDLE_PHASES = frozenset({Phase.FAILED, Phase.REJECTED, Phase.SUCCEEDED, Phase.SERVING})
MAX_MESSAGE = 1024


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
    SAFETY_FAILED = "SafetyFailed"  # evaluation.safety: unsafe rate above maxUnsafeRate
    RETENTION_FAILED = "RetentionFailed"  # evaluation.retention: a drop beyond maxDrop
    EVALUATION_DISABLED = "EvaluationDisabled"
    EXPORTING = "Exporting"
    DEPLOYING = "Deploying"
    DEPLOYMENT_NOT_READY = "DeploymentNotReady"
    DEPLOYMENT_AVAILABLE = "DeploymentAvailable"
    DEPLOYMENT_DISABLED = "DeploymentDisabled"
    SERVING = "Serving"
    SUCCEEDED = "Succeeded"
    DATASET_WARNING = "DatasetWarning"
    # A child's name is taken by an object this job does not control: Pending until the user deletes it.
    CHILD_CONFLICT = "ChildConflict"
    # FineTunePolicy (finetunepolicy/enforcement.py): a static rule refuses the job; its namespace's
    # budget or concurrency is used up.
    POLICY_VIOLATION = "PolicyViolation"
    BUDGET_EXCEEDED = "BudgetExceeded"
    CONCURRENCY_LIMIT = "ConcurrencyLimit"
    SERVING_GPU_LIMIT = "ServingGpuLimit"  # maxServingGpus: the namespace's serving would hold more GPUs
    # Serving on a ModelServer (issue 11).
    NOT_BETTER_THAN_SERVING = "NotBetterThanServing"
    SERVER_NOT_FOUND = "ServerNotFound"
    LOADING_ADAPTER = "LoadingAdapter"
    ADAPTER_LOADED = "AdapterLoaded"
    ADAPTER_UNLOADED = "AdapterUnloaded"
    # The serving check (issue 22): the served model scored against the evaluated one before traffic.
    CHECKING_SERVING = "CheckingServing"
    SERVING_MISMATCH = "ServingMismatch"
    # Canary rollouts on a ModelServer (issue 24): the version takes a growing share, or was rolled back.
    ROLLING_OUT = "RollingOut"
    ROLLOUT_FAILED = "RolloutFailed"
    CANCELLED = "Cancelled"  # spec.cancel: stopped for good (issue 25)


# The trainer's permanent exit codes and the reason each one reports.
EXIT_REASONS: dict[int, Reason] = {
    ExitCode.INVALID_DATA: Reason.INVALID_DATASET,
    ExitCode.INVALID_CONFIG: Reason.INVALID_CONFIG,
    ExitCode.OUT_OF_MEMORY: Reason.OUT_OF_MEMORY,
}
OOM_HINT = (
    "lower hyperparameters.batchSize or maxSeqLength, enable gradientCheckpointing, "
    "use method qlora or a larger gpuType"
)
# Validation reads the dataset line by line, so running out of memory there is about the data, not training.
VALIDATE_OOM_HINT = (
    "the dataset could not be checked within the validation pod's memory limit (operator setting "
    "defaults.validateMemory); lines over dataset.maxLineBytes are reported as invalid lines, so look for a "
    "very large file, or ask the platform team to raise validateMemory"
)


def oom_hint(stage: Stage) -> str:
    return VALIDATE_OOM_HINT if stage is Stage.VALIDATE else OOM_HINT


def timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short(message: str, limit: int = MAX_MESSAGE) -> str:
    """One line of at most `limit` characters, for condition messages, Events and the status."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"
