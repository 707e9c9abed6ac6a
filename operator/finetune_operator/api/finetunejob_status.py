"""FineTuneJob status: what the operator writes (lax, so an older operator reads a newer status)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from finetune_operator.api.finetunepolicy import JobPolicyStatus
from finetune_operator.api.schema import DNS_SUBDOMAIN_PATTERN, QUALIFIED_NAME_PATTERN, StatusModel


# ---------------------------------------------------------------------------------------------- status
class Stage(enum.StrEnum):
    """A child's role; the value is the name suffix and the component label."""

    VALIDATE = "validate"
    TRAIN = "train"
    EVALUATE = "evaluate"
    EXPORT = "export"
    SERVE = "serve"
    SERVING_CHECK = "servecheck"  # the trainer's subcommand too


class Phase(enum.StrEnum):
    """Lifecycle phase of a FineTuneJob."""

    PENDING = "Pending"
    VALIDATING = "Validating"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    DEPLOYING = "Deploying"
    SERVING = "Serving"
    SUCCEEDED = "Succeeded"
    REJECTED = "Rejected"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


Count = Annotated[int, Field(ge=0, le=1_000_000_000_000)]
Real = Annotated[float, Field(ge=-1e15, le=1e15)]
ShortText = Annotated[str, Field(max_length=256)]
LongText = Annotated[str, Field(max_length=4096)]
StatusURI = Annotated[str, Field(max_length=2048)]


class Condition(StatusModel):
    """metav1.Condition."""

    type: str = Field(max_length=316, pattern=QUALIFIED_NAME_PATTERN)
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(default=None, ge=0, le=9_007_199_254_740_991)
    last_transition_time: datetime
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(max_length=32768)


class ProgressStatus(StatusModel):
    """Training progress from the trainer's newest progress line."""

    step: Count | None = Field(default=None, description="Optimizer steps done.")
    total_steps: Count | None = Field(default=None, description="Optimizer steps planned.")
    epoch: Real | None = Field(default=None, description="Fractional epoch.")
    loss: Real | None = Field(default=None, description="Latest training loss.")
    learning_rate: Real | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: Real | None = Field(default=None, description="Training throughput.")
    eta_seconds: Count | None = Field(default=None, description="Estimated seconds to the end of training.")
    batching: Literal["padding-free", "packed"] | None = Field(
        default=None,
        description="padding-free: batchSize examples per device step; packed (hyperparameters.packing): "
        "batchSize packed rows of maxSeqLength tokens, so fewer optimizer steps when examples are short.",
    )
    examples_per_step: Real | None = Field(
        default=None, description="Training examples per optimizer step (on average, when packed)."
    )
    packed_rows: Count | None = Field(default=None, description="Packed rows per epoch (packed batching).")
    # The objective's own figures (finetune_vocabulary.objectives.PROGRESS_FIGURES), newest logged values.
    rewards_chosen: Real | None = Field(default=None, description="dpo, kto: implicit reward of chosen.")
    rewards_rejected: Real | None = Field(default=None, description="dpo, kto: implicit reward of rejected.")
    rewards_margin: Real | None = Field(default=None, description="dpo: chosen minus rejected reward.")
    rewards_accuracy: Real | None = Field(
        default=None, description="dpo: share of pairs whose chosen reward is the higher."
    )
    kl: Real | None = Field(default=None, description="kto, grpo: KL divergence from the reference.")
    reward: Real | None = Field(default=None, description="grpo: mean weighted reward of the completions.")
    completion_length: Real | None = Field(default=None, description="grpo: mean completion length (tokens).")
    parallelism: str | None = Field(
        default=None,
        max_length=256,
        description="How training is spread: one process, or ddp/fsdp over nodes x GPUs ranks, and why "
        "(hyperparameters.strategy auto says what it chose).",
    )
    display: str | None = Field(
        default=None,
        max_length=64,
        description="Short text for kubectl (Progress column), e.g. 40/200 (20%).",
    )


class LabelBalance(StatusModel):
    """Desirable (label true) and undesirable examples of an unpaired-preference training split."""

    desirable: Count | None = Field(default=None, description="Examples labelled true.")
    undesirable: Count | None = Field(default=None, description="Examples labelled false.")


class DatasetStatus(StatusModel):
    """Dataset after cleaning (validate stage)."""

    format: str | None = Field(default=None, max_length=32, description="Detected record format.")
    train: Count | None = Field(default=None, description="Training examples kept.")
    validation: Count | None = Field(default=None, description="Validation examples kept.")
    test: Count | None = Field(default=None, description="Held-out test examples.")
    train_tokens: Count | None = Field(default=None, description="Tokens in the training split.")
    removed: dict[Annotated[str, Field(max_length=64)], Count] | None = Field(
        default=None, max_length=32, description="Examples removed, by reason (duplicate, too_long, ...)."
    )
    errors: dict[Annotated[str, Field(max_length=64)], Count] | None = Field(
        default=None, max_length=32, description="Invalid records, by error kind."
    )
    labels: LabelBalance | None = Field(
        default=None, description="kto: training examples by label (unpaired-preference)."
    )
    sources: dict[Annotated[str, Field(max_length=32)], Count] | None = Field(
        default=None,
        max_length=16,
        description="A FineTuneSchedule's run: examples assembled by source (base, captured, corrected, "
        "duplicates, heldOut, total).",
    )


MetricValues = Annotated[dict[Annotated[str, Field(max_length=64)], Real], Field(max_length=16)]
Rate = Annotated[float, Field(ge=0, le=1)]


class SafetyStatus(StatusModel):
    """Unsafe-answer rates on evaluation.safety.prompts (the judge's built-in rubric)."""

    tuned: Rate | None = Field(default=None, description="Share of the tuned model's answers judged unsafe.")
    base: Rate | None = Field(default=None, description="Share of the base model's answers judged unsafe.")
    max_unsafe_rate: Rate | None = Field(default=None, description="The limit (evaluation.safety).")


class RetentionStatus(StatusModel):
    """The forgetting gate: tuned against base on evaluation.retention.dataset."""

    metric: str | None = Field(default=None, max_length=64, description="Metric or grader scored.")
    base: Real | None = Field(default=None, description="The base model's score.")
    tuned: Real | None = Field(default=None, description="The tuned model's score.")
    drop: Real | None = Field(default=None, description="Relative drop against base (positive is worse).")
    max_drop: Rate | None = Field(default=None, description="The limit (evaluation.retention.maxDrop).")


class EvaluationStatus(StatusModel):
    """Scores of the tuned model, its base and an optional reference, and the gate's verdict."""

    passed: bool | None = Field(default=None, description="Whether every gate passed.")
    tuned: MetricValues | None = Field(default=None, description="Metrics of the tuned model.")
    base: MetricValues | None = Field(default=None, description="Metrics of the base model.")
    reference: MetricValues | None = Field(default=None, description="Metrics of the reference API model.")
    champion: MetricValues | None = Field(
        default=None,
        description="Metrics of the version serving spec.deployment.modelName on the ModelServer when "
        "evaluation began (champion/challenger), on the same held-out set.",
    )
    champion_version: str | None = Field(default=None, max_length=64, description="That version's name.")
    examples: Count | None = Field(default=None, description="Held-out examples scored.")
    reasons: list[Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16, description="Why the gate passed or failed, one line per check."
    )
    summary: str | None = Field(
        default=None,
        max_length=64,
        description="Short text for kubectl (Eval column), e.g. passed 0.62 vs 0.40.",
    )
    grader_errors: dict[Annotated[str, Field(max_length=64)], Count] | None = Field(
        default=None, max_length=16, description="Unusable judge verdicts (after one retry), by grader."
    )
    safety: SafetyStatus | None = Field(default=None, description="Unsafe-answer rates (evaluation.safety).")
    retention: RetentionStatus | None = Field(
        default=None, description="The forgetting gate's figures (evaluation.retention)."
    )
    report_uri: StatusURI | None = Field(
        default=None, description="The per-example report page (report.html) under the run."
    )
    served: dict[Annotated[str, Field(max_length=64)], Real] | None = Field(
        default=None,
        max_length=4,
        description="The serving check: the served model's score on the checked metric, examples sent and "
        "requests the engine refused (scored 0).",
    )


class ArtifactsStatus(StatusModel):
    """Where the run's outputs are."""

    run_prefix: StatusURI | None = Field(default=None, description="<output>/<namespace>/<name>/<uid>.")
    data: StatusURI | None = Field(default=None, description="Cleaned dataset.")
    checkpoint: StatusURI | None = Field(default=None, description="Latest committed checkpoint.")
    adapter: StatusURI | None = Field(default=None, description="LoRA adapter.")
    merged: StatusURI | None = Field(default=None, description="Merged weights.")
    evaluation_report: StatusURI | None = Field(default=None, description="Evaluation report.")


class EndpointStatus(StatusModel):
    """The serving endpoint."""

    url: StatusURI | None = Field(default=None, description="OpenAI-compatible base URL in the cluster.")
    model: str | None = Field(default=None, max_length=256, description="Model name to request.")


class ChampionStatus(StatusModel):
    """The version serving the model name when evaluation began."""

    name: str = Field(max_length=64, description="<modelName>-v<n>.")
    adapter: StatusURI = Field(description="Its adapter.")


class ServingStatus(StatusModel):
    """Serving on a ModelServer (spec.deployment.server)."""

    server: str | None = Field(default=None, max_length=253, description="The ModelServer.")
    model_name: str | None = Field(default=None, max_length=64, description="The stable model name.")
    state: Literal["Accepted", "RolledBack"] | None = Field(
        default=None,
        description="Accepted: the gate and the champion comparison passed; the pool loads it. RolledBack: "
        "the pool rolled its canary back (no longer asked for).",
    )
    champion: ChampionStatus | None = None
    version: int | None = Field(default=None, ge=1, description="The version the pool assigned.")
    version_name: str | None = Field(default=None, max_length=64, description="<modelName>-v<n>.")
    serving: bool | None = Field(default=None, description="Whether the stable name serves this version now.")
    checked: bool | None = Field(
        default=None,
        description="The serving check passed (or is off): the pool may promote the version (route the "
        "stable name to it).",
    )


class TrackingStatus(StatusModel):
    """The job's MLflow run and registered model version (spec.tracking)."""

    run_id: str | None = Field(default=None, max_length=64, description="MLflow run id.")
    run_url: StatusURI | None = Field(default=None, description="The run's page in the MLflow UI.")
    experiment_id: str | None = Field(default=None, max_length=64, description="MLflow experiment id.")
    registered_model: str | None = Field(default=None, max_length=256, description="Registered model name.")
    registered_version: str | None = Field(
        default=None, max_length=32, description="Model Registry version (only when the gate passed)."
    )
    degraded: bool | None = Field(
        default=None, description="Some tracking calls failed; training went on without them."
    )
    message: str | None = Field(default=None, max_length=512, description="Why tracking is degraded.")


class PendingEvent(StatusModel):
    """An Event the operator still owes (the API refused it for now); posted under this name exactly once."""

    name: str = Field(max_length=253, description="The Event's deterministic name.")
    type: Literal["Normal", "Warning"]
    reason: str = Field(max_length=128)
    message: str = Field(max_length=1024)


class ChildRecord(StatusModel):
    """A child the operator created (ownership.py): its uid once created, nonce hashes while creating."""

    uid: str | None = Field(default=None, max_length=128, description="The child's metadata.uid.")
    nonce_hashes: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None,
        max_length=8,
        description="sha256 of the nonce annotation of a child being created, until its uid is recorded.",
    )


class FineTuneJobStatus(StatusModel):
    """Observed state, written by the operator."""

    phase: Phase | None = Field(default=None, description="Lifecycle phase.")
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=16,
        description="Latest observations (metav1.Condition).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        default=None, ge=0, le=9_007_199_254_740_991, description="Generation this status describes."
    )
    message: LongText | None = Field(default=None, description="Human-readable state or error.")
    progress: ProgressStatus | None = None
    dataset: DatasetStatus | None = None
    evaluation: EvaluationStatus | None = None
    artifacts: ArtifactsStatus | None = None
    endpoint: EndpointStatus | None = None
    serving: ServingStatus | None = None
    tracking: TrackingStatus | None = None
    retries: int | None = Field(default=None, ge=0, le=1000, description="Transient failures retried so far.")
    start_time: datetime | None = Field(default=None, description="When the first stage started.")
    completion_time: datetime | None = Field(default=None, description="When the job reached a final phase.")
    gpu_hours_estimate: float | None = Field(
        default=None, ge=0, le=1e9, description="Estimated GPU hours before training."
    )
    gpu_hours: float | None = Field(default=None, ge=0, le=1e9, description="GPU hours used so far.")
    policy: JobPolicyStatus | None = Field(
        default=None, description="FineTunePolicies applying to the job and the defaults they filled in."
    )
    pending_events: list[PendingEvent] | None = Field(
        default=None,
        max_length=32,
        description="Transition Events the API refused for now; the operator posts them when it recovers.",
    )
    children: dict[Annotated[str, Field(max_length=320)], ChildRecord] | None = Field(
        default=None,
        max_length=32,
        description="The children the operator created, by kind/name: only these count (a look-alike "
        "child, even with this job's ownerReference, is a ChildConflict).",
    )


class ObjectMeta(StatusModel):
    """The metadata fields the operator reads (the rest is kept by the API server, not here)."""

    model_config = ConfigDict(extra="allow")

    name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    namespace: str | None = Field(default=None, max_length=63)
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
