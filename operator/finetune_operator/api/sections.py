"""The sections of a FineTuneJob spec (baseModel, dataset, lora, hyperparameters, resources, storage,
evaluation, deployment): typed, bounded, with their defaults. api/finetunejob.py assembles them into the
spec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from finetune_vocabulary.distributed import MAX_NODES
from pydantic import Field, field_validator

from finetune_operator.api.evaluation import GraderName
from finetune_operator.api.extra_args import EXTRA_ARGS_RULE, MAX_EXTRA_ARGS, check_extra_args
from finetune_operator.api.modelnames import ModelName, model_name_problem
from finetune_operator.api.schema import (
    LABEL_VALUE_PATTERN,
    MODULE_NAME_PATTERN,
    QUALIFIED_NAME_PATTERN,
    REVISION_PATTERN,
    SERVED_NAME_PATTERN,
    DNSLabel,
    DNSSubdomain,
    EgressURL,
    OutputURI,
    Quantity,
    SourceURI,
    SpecModel,
    no_schema_default,
    raw_field,
    rule,
    validations,
)

Method = Literal["lora", "qlora", "full"]
DatasetFormat = Literal[
    "auto", "chat", "completion", "instruction", "preference", "unpaired-preference", "prompt-only"
]
DeploymentMode = Literal["auto", "adapter", "merged"]
ParallelStrategy = Literal["auto", "ddp", "fsdp"]
# The GPU-table key of CPU nodes: it has no GPUs, so serving on it means 0 GPUs per replica.
CPU_GPU_TYPE = "cpu"
DEFAULT_GPU_TYPE = "a100-80gb"


# ---------------------------------------------------------------------------------------------- spec
class BaseModelSpec(SpecModel):
    """The model to fine-tune."""

    uri: SourceURI = Field(
        description="Where the base model lives: s3://bucket/prefix, hf://org/name or pvc://claim/path."
    )
    revision: str | None = Field(
        default=None,
        max_length=255,
        pattern=REVISION_PATTERN,
        description="Revision (branch, tag or commit) for hf:// models.",
    )


class DatasetSpec(SpecModel):
    """Training data: JSONL files (chat, completion or instruction records; preference pairs for dpo,
    unpaired-preference examples for kto, prompts for grpo)."""

    train: SourceURI = Field(description="URI of the training JSONL file.")
    validation: SourceURI | None = Field(default=None, description="URI of a validation JSONL file.")
    test: SourceURI | None = Field(
        default=None,
        description="URI of the held-out JSONL file for evaluation; else testSize examples are "
        "held out from train.",
    )
    format: DatasetFormat = Field(
        default="auto",
        description="Record format; auto detects it. sft: chat, completion or instruction; dpo: preference "
        '({"prompt"|"messages", "chosen", "rejected"}); kto: unpaired-preference ({"prompt"|"messages", '
        '"completion", "label": true|false}); grpo: prompt-only ({"prompt"|"messages", "expected"?}).',
    )
    test_size: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Examples held out from train when no test file is given "
        "(unset: 10% of train, 1 to 200).",
    )
    max_error_rate: float = Field(
        default=0,
        ge=0,
        le=1,
        description="Fail validation when more than this fraction of non-blank lines is invalid (default 0: "
        "any invalid line fails, and the first ones are listed by line number).",
    )
    max_line_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=67_108_864,
        description="A line longer than this many bytes is an invalid line (read without loading it whole).",
    )
    min_train_examples: int = Field(
        default=20,
        ge=1,
        le=10_000_000,
        description="Fail validation when fewer training examples remain after cleaning and the split.",
    )
    recommended_train_examples: int = Field(
        default=500,
        ge=0,
        le=10_000_000,
        description="Fewer training examples than this is a warning (condition and Event), not a failure; "
        "0 turns the warning off.",
    )
    max_test_fraction: float = Field(
        default=0.2,
        gt=0,
        le=0.5,
        description="A testSize above this fraction of the valid examples is reduced to it, with a warning, "
        "so training never has fewer examples than the held-out set.",
    )


class LoraSpec(SpecModel):
    """LoRA adapter settings (method lora and qlora)."""

    rank: int = Field(default=16, ge=1, le=1024, description="Adapter rank r.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling alpha.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on adapter inputs.")
    target_modules: list[Annotated[str, Field(max_length=128, pattern=MODULE_NAME_PATTERN)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        json_schema_extra={"default": ["all-linear"]},
        description="Modules to adapt (names or all-linear).",
    )


class HyperparametersSpec(SpecModel):
    """Training hyperparameters."""

    epochs: int = Field(default=3, ge=1, le=100, description="Passes over the training examples.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Stop after this many optimizer steps (overrides epochs).",
    )
    learning_rate: float = Field(default=0.0002, gt=0, lt=1, description="Peak learning rate.")
    batch_size: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="Training examples (grpo: prompts) per device per forward/backward pass. Examples per "
        "optimizer step = "
        "batchSize * gradientAccumulationSteps * GPUs * nodes; optimizer steps = ceil(training examples / "
        "examples per step) * epochs (or maxSteps), shown in status.progress.totalSteps.",
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    max_seq_length: int = Field(default=2048, ge=16, le=131072, description="Tokens per example (truncated).")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps for LR warm-up.")
    packing: bool = Field(
        default=False,
        description="Opt-in concatenation packing: several examples share each row of maxSeqLength tokens "
        "(no attention across examples), and batchSize counts packed rows, so a run of short examples makes "
        "FEWER optimizer steps (ceil(packed rows / rows per step) * epochs; the trainer's progress reports "
        "the packed row count). Off (default): padding-free batching, which removes padding without changing "
        "examples per step or the step count. Objective sft only.",
    )
    gradient_checkpointing: bool = Field(default=True, description="Trade compute for activation memory.")
    seed: int = Field(default=42, ge=0, le=2_147_483_647, description="Random seed.")
    beta: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="dpo, kto, grpo: strength of the KL term that keeps the policy near the reference "
        "(unset: TRL's default, 0.1 for dpo and kto, 0.0 for grpo); refused with sft.",
    )
    num_generations: int | None = Field(
        default=None,
        ge=2,
        le=64,
        description="grpo: completions sampled per prompt (unset: TRL's default, 8); batchSize counts "
        "prompts, each with numGenerations completions.",
    )
    max_completion_length: int | None = Field(
        default=None,
        ge=1,
        le=32768,
        description="grpo: longest sampled completion in tokens (unset: TRL's default, 256).",
    )
    strategy: ParallelStrategy = Field(
        default="auto",
        description="With several GPUs or nodes: ddp (every rank holds the model) or fsdp (full-shard, "
        "CPU offload off); auto picks ddp for lora/qlora and for full fine-tuning that fits one GPU of "
        "resources.gpuType, else fsdp, and says why in status.progress.parallelism.",
    )


class RewardSpec(SpecModel):
    """grpo: an evaluation grader that scores each sampled completion; rewards are summed with weights."""

    grader: GraderName = Field(description="The name of one of evaluation.graders.")
    weight: float = Field(default=1.0, ge=-100, le=100, description="Its weight in the sum of rewards.")


class Toleration(SpecModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=316, pattern=QUALIFIED_NAME_PATTERN)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE_PATTERN)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0, le=31_536_000)


LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
NodeSelector = Annotated[
    dict[Annotated[str, Field(max_length=316)], LabelValue],
    Field(
        max_length=32,
        json_schema_extra=validations(
            rule("self.all(k, k.size() <= 316)", "node selector keys must be at most 316 characters")
        ),
    ),
]


class CheckpointSpec(SpecModel):
    """How often training commits a checkpoint to storage (a preempted run resumes from the newest)."""

    every_steps: int = Field(default=100, ge=1, le=1_000_000, description="Commit every N optimizer steps.")
    every_minutes: float = Field(default=15, gt=0, le=1440, description="... and at least every M minutes.")
    keep: int = Field(default=2, ge=1, le=20, description="Committed checkpoints kept.")


class ResourcesSpec(SpecModel):
    """Compute for the training pod."""

    gpus: int = Field(default=1, ge=0, le=16, description="GPUs on one node; 0 trains on CPU.")
    nodes: int = Field(
        default=1,
        ge=1,
        le=MAX_NODES,
        description="Pods (nodes) training together, each with `gpus` GPUs: an Indexed Job and a headless "
        "Service; GPU-hours count nodes x gpus.",
    )
    gpu_type: DNSLabel = Field(default=DEFAULT_GPU_TYPE, description="A key of the operator's GPU table.")
    cpu: Quantity | None = Field(default=None, description="CPU request and limit.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit.")
    node_selector: NodeSelector | None = Field(default=None, description="Extra node labels to require.")
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=16, description="Extra tolerations."
    )
    priority_class_name: DNSSubdomain | None = Field(default=None, description="PriorityClass of the pods.")
    queue_name: DNSSubdomain | None = Field(default=None, description="Kueue LocalQueue to submit to.")


class StorageSpec(SpecModel):
    """Where the run's artifacts go and how pods reach storage."""

    output: OutputURI = Field(
        description="s3:// prefix; the run writes under <output>/<namespace>/<name>/<uid>/."
    )
    credentials_secret: DNSSubdomain | None = Field(
        default=None, description="Secret in the job's namespace with AWS_* (and optional HF_TOKEN) keys."
    )
    service_account_name: DNSSubdomain | None = Field(
        default=None, description="ServiceAccount for the pods (IRSA / workload identity)."
    )


class DeploymentResources(SpecModel):
    """CPU and memory of each vLLM replica."""

    cpu: Quantity | None = Field(default=None, description="CPU request and limit.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit.")


def serving_gpus_default(spec: Mapping[str, Any]) -> int:
    """Unset deployment.gpus of a raw FineTuneJob spec: 0 when the replicas serve on CPU (the serving gpuType
    is cpu, or it follows resources and training used no GPU), 1 otherwise."""
    deployment, resources = spec.get("deployment") or {}, spec.get("resources") or {}
    serving_type = raw_field(deployment, "gpuType", "gpu_type")
    if serving_type:
        return 0 if serving_type == CPU_GPU_TYPE else 1
    on_cpu = (
        raw_field(resources, "gpuType", "gpu_type") == CPU_GPU_TYPE
        or raw_field(resources, "gpus", "gpus") == 0
    )
    return 0 if on_cpu else 1


class ServingCheckSpec(SpecModel):
    """Before a version takes traffic, held-out prompts go through the serving engine and are scored again."""

    examples: int = Field(default=200, ge=0, le=10_000, description="Prompts sent; 0 turns the check off.")
    tolerance: float = Field(
        default=0.02, ge=0, le=1, description="How far (absolute) served may score below evaluated."
    )


class DeploymentSpec(SpecModel):
    """Serve the accepted model on vLLM."""

    enabled: bool = Field(default=True, description="Deploy once the model passes evaluation.")
    replicas: int = Field(default=1, ge=1, le=16, description="vLLM replicas.")
    served_model_name: str | None = Field(
        default=None,
        max_length=128,
        pattern=SERVED_NAME_PATTERN,
        description="Model name in the API; default: the job's name.",
    )
    mode: DeploymentMode = Field(
        default="auto", description="adapter: base + LoRA adapter; merged: merged weights; auto picks."
    )
    gpus: int = Field(
        default=1,
        ge=0,
        le=8,
        json_schema_extra=no_schema_default,
        description="GPUs per replica; 0 serves on CPU. Default: 0 when the serving gpuType is cpu (or it "
        "follows resources and training used 0 GPUs), else 1; more than 0 on a cpu gpuType is refused.",
    )
    gpu_type: DNSLabel | None = Field(default=None, description="GPU table key; default: resources.gpuType.")
    max_model_len: int | None = Field(default=None, ge=128, le=1_048_576, description="vLLM --max-model-len.")
    extra_args: list[Annotated[str, Field(max_length=256)]] | None = Field(
        default=None,
        max_length=MAX_EXTRA_ARGS,
        json_schema_extra=validations(EXTRA_ARGS_RULE),
        description="Extra vLLM server arguments: allow-listed flags only (docs/serving.md), as --flag, "
        "--flag=value or --flag value.",
    )
    resources: DeploymentResources | None = Field(default=None, description="CPU and memory per replica.")
    serving_check: ServingCheckSpec = Field(
        default_factory=ServingCheckSpec,
        json_schema_extra={"default": {}},
        description="Before the version takes traffic, score the serving engine's answers to held-out "
        "prompts with the evaluated metric; served below evaluated by more than tolerance is Rejected "
        "(ServingMismatch).",
    )
    # Issue 11: serve on a shared ModelServer pool instead of a Deployment of the job's own.
    server: DNSSubdomain | None = Field(
        default=None,
        description="A ModelServer in this namespace to hot-load the adapter into (no Deployment of the "
        "job's own); needs modelName and a LoRA/QLoRA method.",
    )
    model_name: ModelName | None = Field(
        default=None,
        description="Stable name on the ModelServer: requests for it get the promoted version "
        "<modelName>-v<n> (docs/serving.md).",
    )

    @field_validator("extra_args")
    @classmethod
    def _extra_args_allowed(cls, args: list[str] | None) -> list[str] | None:
        return check_extra_args(args)

    @field_validator("model_name")
    @classmethod
    def _model_name_free(cls, name: str | None) -> str | None:
        problem = model_name_problem(name) if name else None
        if problem:
            raise ValueError(problem)
        return name

    def serves_adapter(self, method: str) -> bool:
        """Whether vLLM will load the tuned weights as a LoRA adapter (mode auto: for lora and qlora)."""
        mode = self.mode if self.mode != "auto" else ("merged" if method == "full" else "adapter")
        return self.enabled and mode == "adapter"


# ---------------------------------------------------------------------------------------------- tracking
TRACKING_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"


class MlflowTrackingSpec(SpecModel):
    """Log the run to an MLflow tracking server and register the accepted model (docs/tracking.md)."""

    tracking_uri: EgressURL | None = Field(
        default=None,
        description="MLflow tracking server, e.g. http://mlflow.mlflow.svc:5000; default: the operator's "
        "tracking.mlflow.defaultTrackingUri.",
    )
    experiment: str | None = Field(
        default=None,
        max_length=256,
        pattern=TRACKING_NAME_PATTERN,
        description="Experiment name; default: the job's namespace.",
    )
    credentials_secret: DNSSubdomain | None = Field(
        default=None,
        description="Secret in the job's namespace with MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD keys (passed to the pods by reference only).",
    )
    register_model: str | None = Field(
        default=None,
        max_length=256,
        pattern=TRACKING_NAME_PATTERN,
        description="Registered model name for a model that passes the gate; default: "
        "deployment.modelName (ModelServer), else deployment.servedModelName, else the job's name.",
    )


class TrackingSpec(SpecModel):
    """Experiment tracking and model registry."""

    mlflow: MlflowTrackingSpec | None = Field(default=None, description="Track the run in MLflow.")
