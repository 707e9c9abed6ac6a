"""FineTuneJob v1alpha1: the pydantic models that are the single source of the API.

The CRD (`crdgen.py`) is generated from these models, and the operator validates every spec it acts on with
`parse_spec` (reconcile, once per generation), so the API server and the operator accept exactly the same
specs. The building blocks (patterns, types, rule messages) are in schema.py, the spec sections in
sections.py, the status in api/finetunejob_status.py.

Cross-field rules live twice, on purpose: as CEL (`x-kubernetes-validations`, enforced by the API server)
and as model validators here (enforced by the operator), with the same messages.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from finetune_vocabulary.labels import API_GROUP
from finetune_vocabulary.objectives import (
    ALL_OBJECTIVE_METRICS,
    DEFAULT_OBJECTIVE,
    OBJECTIVE_FORMATS,
    Objective,
    formats_for,
    metrics_for,
    objective_of_metric,
)
from pydantic import ConfigDict, Field, ValidationError, model_validator

from finetune_operator.api.evaluation import (
    ALL_METRICS,
    EvaluationSpec,
    GraderSpec,
    JsonSchemaSpec,
    JudgeEndpointSpec,
    JudgeSpec,
    ReferenceSpec,
    RetentionSpec,
    SafetySpec,
    ScaleSpec,
    SecretKeyRef,
    StringCheckSpec,
    Threshold,
)
from finetune_operator.api.finetunejob_status import FineTuneJobStatus, ObjectMeta
from finetune_operator.api.schema import (
    ADAPTER_NEEDS_PEFT,
    BETA_NEEDS_PREFERENCE,
    CANCEL_FINAL,
    FORMAT_NOT_FOR_OBJECTIVE,
    GRPO_GRADER_NAMED_REWARD,
    GRPO_NEEDS_EVALUATION,
    GRPO_NEEDS_REWARDS,
    GRPO_ONLY_HYPERPARAMETERS,
    IMMUTABLE,
    IMMUTABLE_FIELDS,
    LORA_RANK_UNSERVABLE,
    NODES_NEED_GPUS,
    OUTPUT_OVERLAPS_DATA,
    OUTPUT_OVERLAPS_MODEL,
    PACKING_NEEDS_SFT,
    PRIMARY_NOT_MEASURED,
    QLORA_NEEDS_GPU,
    QLORA_NO_FSDP,
    REWARD_GRADER_UNKNOWN,
    REWARDS_NEED_GRPO,
    SERVER_NEEDS_ADAPTER,
    SERVER_NEEDS_ADAPTER_MODE,
    SERVER_NEEDS_EVALUATION,
    SERVER_NEEDS_MODEL_NAME,
    SERVING_GPUS_ON_CPU,
    THRESHOLD_NOT_MEASURED,
    VLLM_MAX_LORA_RANK,
    ObjectModel,
    SpecError,
    SpecModel,
    default_gpus,
    field_errors,
    rule,
    validations,
)
from finetune_operator.api.sections import (
    CPU_GPU_TYPE,
    BaseModelSpec,
    CheckpointSpec,
    DatasetFormat,
    DatasetSpec,
    DeploymentMode,
    DeploymentResources,
    DeploymentSpec,
    HyperparametersSpec,
    LabelValue,
    LoraSpec,
    Method,
    NodeSelector,
    ResourcesSpec,
    RewardSpec,
    ServingCheckSpec,
    StorageSpec,
    Toleration,
    TrackingSpec,
    serving_gpus_default,
)

GROUP = API_GROUP
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("finetune",)
# On a FineTuneSchedule's run: JSON of its assembled training set's example counts by source (issue 24);
# copied into status.dataset.sources and FTJ_CONFIG dataset.sources.
ANNOTATION_DATASET_SOURCES = f"{GROUP}/dataset-sources"

# The spec sections (sections.py, evaluation.py) are re-exported: `models` stays the one import for the
# API types.
__all__ = [
    "ALL_METRICS",
    "BaseModelSpec",
    "CheckpointSpec",
    "DatasetFormat",
    "DatasetSpec",
    "DeploymentMode",
    "DeploymentResources",
    "DeploymentSpec",
    "EvaluationSpec",
    "GraderSpec",
    "HyperparametersSpec",
    "JsonSchemaSpec",
    "JudgeEndpointSpec",
    "JudgeSpec",
    "LabelValue",
    "LoraSpec",
    "Method",
    "NodeSelector",
    "ReferenceSpec",
    "ResourcesSpec",
    "RetentionSpec",
    "RewardSpec",
    "SafetySpec",
    "ScaleSpec",
    "SecretKeyRef",
    "ServingCheckSpec",
    "StorageSpec",
    "StringCheckSpec",
    "Threshold",
    "Toleration",
    "TrackingSpec",
]


# A job served on a ModelServer (issue 11): the checks that need only the job itself. Those that need the
# ModelServer (same base model, rank <= maxLoraRank) run in the operator (pooljob.py), before any GPU.
_SERVER_RULES = (
    rule(
        "!has(self.deployment) || has(self.deployment.server) == has(self.deployment.modelName)",
        SERVER_NEEDS_MODEL_NAME,
    ),
    rule(
        "!has(self.deployment) || !has(self.deployment.server) || !has(self.method) || self.method != 'full'",
        SERVER_NEEDS_ADAPTER,
    ),
    rule(
        "!has(self.deployment) || !has(self.deployment.server) || !has(self.deployment.mode) "
        "|| self.deployment.mode != 'merged'",
        SERVER_NEEDS_ADAPTER_MODE,
    ),
    rule(
        "!has(self.deployment) || !has(self.deployment.server) || !has(self.evaluation) "
        "|| !has(self.evaluation.enabled) || self.evaluation.enabled",
        SERVER_NEEDS_EVALUATION,
    ),
)

_SPEC_RULES = (
    rule(
        "!has(self.method) || self.method != 'qlora' || !has(self.resources) || !has(self.resources.gpus) "
        "|| self.resources.gpus >= 1",
        QLORA_NEEDS_GPU,
    ),
    rule(
        "!has(self.resources) || !has(self.resources.nodes) || self.resources.nodes <= 1 "
        "|| ((!has(self.resources.gpus) || self.resources.gpus >= 1) "
        "&& (!has(self.resources.gpuType) || self.resources.gpuType != 'cpu'))",
        NODES_NEED_GPUS,
    ),
    rule(
        "!has(self.method) || self.method != 'qlora' || !has(self.hyperparameters) "
        "|| !has(self.hyperparameters.strategy) || self.hyperparameters.strategy != 'fsdp'",
        QLORA_NO_FSDP,
    ),
    rule(
        "!has(self.deployment) || !has(self.deployment.mode) || self.deployment.mode != 'adapter' "
        "|| !has(self.method) || self.method != 'full'",
        ADAPTER_NEEDS_PEFT,
    ),
    rule(
        "!has(self.lora) || !has(self.lora.rank) || self.lora.rank <= 512 || (has(self.deployment) && ("
        "(has(self.deployment.enabled) && !self.deployment.enabled) "
        "|| (has(self.deployment.mode) && self.deployment.mode == 'merged') "
        "|| ((!has(self.deployment.mode) || self.deployment.mode == 'auto') "
        "&& has(self.method) && self.method == 'full')))",
        LORA_RANK_UNSERVABLE,
    ),
    *_SERVER_RULES,
    rule(
        "!has(self.deployment) || !has(self.deployment.gpus) || self.deployment.gpus == 0 || "
        "(has(self.deployment.gpuType) ? self.deployment.gpuType : "
        "(has(self.resources) && has(self.resources.gpuType) ? self.resources.gpuType : '')) "
        f"!= '{CPU_GPU_TYPE}'",
        SERVING_GPUS_ON_CPU,
    ),
    rule(
        "!has(self.storage) || !has(self.storage.output) || !has(self.baseModel) "
        "|| !has(self.baseModel.uri) || !(self.storage.output + '/').startsWith("
        "self.baseModel.uri.endsWith('/') ? self.baseModel.uri : self.baseModel.uri + '/')",
        OUTPUT_OVERLAPS_MODEL,
    ),
    rule(
        "!has(self.storage) || !has(self.storage.output) || !has(self.dataset) || "
        "[has(self.dataset.train) ? self.dataset.train : '', "
        "has(self.dataset.validation) ? self.dataset.validation : '', "
        "has(self.dataset.test) ? self.dataset.test : ''].all(d, d == '' || "
        "!(self.storage.output + '/').startsWith(d.endsWith('/') ? d : d + '/'))",
        OUTPUT_OVERLAPS_DATA,
    ),
)


# Issue 23: what each objective trains on and measures (finetune_vocabulary.objectives), twice as usual.
_O = f"(has(self.objective) ? self.objective : '{DEFAULT_OBJECTIVE}')"
_GRADERS = "has(self.evaluation) && has(self.evaluation.graders)"


def _cel_list(names: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"


def _measured(metric: str) -> str:
    """CEL: `metric` is no objective figure, or one the spec's objective measures, or a grader's name."""
    measured = " || ".join(
        f"({metric} == '{m}' && {_O} in {_cel_list(objective_of_metric(m))})" for m in ALL_OBJECTIVE_METRICS
    )
    grader = f"({_GRADERS} && self.evaluation.graders.exists(g, g.name == {metric}))"
    return f"!({metric} in {_cel_list(ALL_OBJECTIVE_METRICS)}) || {measured} || {grader}"


_FORMAT_FITS = " || ".join(
    f"({_O} == '{o}' && self.dataset.format in {_cel_list(f)})" for o, f in OBJECTIVE_FORMATS.items()
)
_OBJECTIVE_RULES = (
    rule(f"!has(self.rewards) || size(self.rewards) == 0 || {_O} == 'grpo'", REWARDS_NEED_GRPO),
    rule(f"{_O} != 'grpo' || (has(self.rewards) && size(self.rewards) > 0)", GRPO_NEEDS_REWARDS),
    rule(
        f"!has(self.rewards) || self.rewards.all(r, {_GRADERS} && "
        "self.evaluation.graders.exists(g, g.name == r.grader))",
        REWARD_GRADER_UNKNOWN,
    ),
    rule(
        f"{_O} != 'grpo' || !has(self.evaluation) || !has(self.evaluation.enabled) "
        "|| self.evaluation.enabled",
        GRPO_NEEDS_EVALUATION,
    ),
    rule(
        f"{_O} != 'grpo' || !({_GRADERS}) || !self.evaluation.graders.exists(g, g.name == 'reward')",
        GRPO_GRADER_NAMED_REWARD,
    ),
    rule(
        "!has(self.dataset) || !has(self.dataset.format) || self.dataset.format == 'auto' || " + _FORMAT_FITS,
        FORMAT_NOT_FOR_OBJECTIVE,
    ),
    rule(
        f"{_O} == 'grpo' || !has(self.hyperparameters) || (!has(self.hyperparameters.numGenerations) "
        "&& !has(self.hyperparameters.maxCompletionLength))",
        GRPO_ONLY_HYPERPARAMETERS,
    ),
    rule(
        f"{_O} != 'sft' || !has(self.hyperparameters) || !has(self.hyperparameters.beta)",
        BETA_NEEDS_PREFERENCE,
    ),
    rule(
        f"{_O} == 'sft' || !has(self.hyperparameters) || !has(self.hyperparameters.packing) "
        "|| !self.hyperparameters.packing",
        PACKING_NEEDS_SFT,
    ),
    rule(
        "!has(self.evaluation) || !has(self.evaluation.thresholds) || "
        f"self.evaluation.thresholds.all(t, {_measured('t.metric')})",
        THRESHOLD_NOT_MEASURED,
    ),
    rule(
        "!has(self.evaluation) || !has(self.evaluation.primaryMetric) || "
        f"{_measured('self.evaluation.primaryMetric')}",
        PRIMARY_NOT_MEASURED,
    ),
)


def objective_problem(spec: FineTuneJobSpec) -> str | None:
    """The first objective rule `spec` breaks (the same rules as _OBJECTIVE_RULES' CEL), or None."""
    objective, rewards, hyper, evaluation = (
        spec.objective,
        spec.rewards or [],
        spec.hyperparameters,
        spec.evaluation,
    )
    graders = evaluation.grader_names()

    def unmeasured(metric: str) -> bool:
        return (
            metric in ALL_OBJECTIVE_METRICS and metric not in metrics_for(objective) and metric not in graders
        )

    checks = (
        (bool(rewards) and objective != "grpo", REWARDS_NEED_GRPO),
        (objective == "grpo" and not rewards, GRPO_NEEDS_REWARDS),
        (any(r.grader not in graders for r in rewards), REWARD_GRADER_UNKNOWN),
        (objective == "grpo" and not evaluation.enabled, GRPO_NEEDS_EVALUATION),
        (objective == "grpo" and "reward" in graders, GRPO_GRADER_NAMED_REWARD),
        (spec.dataset.format not in ("auto", *formats_for(objective)), FORMAT_NOT_FOR_OBJECTIVE),
        (
            objective != "grpo" and (hyper.num_generations, hyper.max_completion_length) != (None, None),
            GRPO_ONLY_HYPERPARAMETERS,
        ),
        (objective == "sft" and hyper.beta is not None, BETA_NEEDS_PREFERENCE),
        (objective != "sft" and hyper.packing, PACKING_NEEDS_SFT),
        (any(unmeasured(t.metric) for t in evaluation.thresholds or ()), THRESHOLD_NOT_MEASURED),
        (
            evaluation.primary_metric is not None and unmeasured(evaluation.primary_metric),
            PRIMARY_NOT_MEASURED,
        ),
    )
    return next((message for broken, message in checks if broken), None)


def _under(output: str, location: str) -> bool:
    base = location if location.endswith("/") else location + "/"
    return (output + "/").startswith(base)


class FineTuneJobSpec(SpecModel):
    """What to fine-tune, on what data, how, and where to serve it."""

    model_config = ConfigDict(json_schema_extra=validations(*_SPEC_RULES, *_OBJECTIVE_RULES))

    base_model: BaseModelSpec = Field(
        description="The model to fine-tune (immutable).",
        json_schema_extra=validations(rule("self == oldSelf", IMMUTABLE.format(field="baseModel"))),
    )
    dataset: DatasetSpec = Field(
        description="Training data (immutable).",
        json_schema_extra=validations(rule("self == oldSelf", IMMUTABLE.format(field="dataset"))),
    )
    objective: Objective = Field(
        default=DEFAULT_OBJECTIVE,
        description="sft (supervised, default), dpo or kto (preference tuning) or grpo (reinforcement "
        "fine-tuning rewarded by evaluation graders: spec.rewards); immutable. Each trains on its dataset "
        "format (dataset.format) and adds its own figures to evaluation and progress (docs/objectives.md).",
        json_schema_extra=validations(rule("self == oldSelf", IMMUTABLE.format(field="objective"))),
    )
    method: Method = Field(
        default="lora",
        description="lora, qlora (4-bit base) or full fine-tuning (immutable).",
        json_schema_extra=validations(rule("self == oldSelf", IMMUTABLE.format(field="method"))),
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec,
        description="Adapter settings (immutable).",
        json_schema_extra={
            "default": {},
            **validations(rule("self == oldSelf", IMMUTABLE.format(field="lora"))),
        },
    )
    hyperparameters: HyperparametersSpec = Field(
        default_factory=HyperparametersSpec,
        description="Training hyperparameters (immutable).",
        json_schema_extra={
            "default": {},
            **validations(rule("self == oldSelf", IMMUTABLE.format(field="hyperparameters"))),
        },
    )
    rewards: list[RewardSpec] | None = Field(
        default=None,
        max_length=8,
        description="grpo only (and required there): evaluation graders that score each sampled completion, "
        "weighted; the same graders score the held-out set, so what is optimised is what is gated "
        "(immutable).",
        json_schema_extra=validations(rule("self == oldSelf", IMMUTABLE.format(field="rewards"))),
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec,
        json_schema_extra={"default": {}},
        description="Checkpointing during training.",
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, json_schema_extra={"default": {}}, description="Compute for training."
    )
    storage: StorageSpec = Field(
        description="Artifact storage and credentials (output is immutable: the run's artifacts live there).",
        # from creation on: a transition rule cannot see status, and validate writes there first
        json_schema_extra=validations(
            {
                **rule("self.output == oldSelf.output", IMMUTABLE.format(field="storage.output")),
                "fieldPath": ".output",
            }
        ),
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec,
        json_schema_extra={"default": {}},
        description="Evaluation and gating.",
    )
    deployment: DeploymentSpec = Field(
        default_factory=DeploymentSpec, json_schema_extra={"default": {}}, description="Serving on vLLM."
    )
    tracking: TrackingSpec | None = Field(
        default=None, description="Experiment tracking and model registry (MLflow)."
    )
    suspend: bool = Field(
        default=False, description="Pause: running pods are stopped, resumed from checkpoint."
    )
    cancel: bool = Field(
        default=False,
        description="Stop the job for good: running stage pods are deleted and serving is withdrawn; the "
        "phase becomes Failed with reason Cancelled. Cannot be undone.",
        # a transition rule: true may not go back to false (the deleted pods and serving are not restored)
        json_schema_extra=validations(rule("self || !oldSelf", CANCEL_FINAL)),
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=60, le=2_592_000, description="Fail the job after this many seconds."
    )
    max_retries: int = Field(default=3, ge=0, le=20, description="Retries of transient stage failures.")

    @model_validator(mode="before")
    @classmethod
    def _serving_gpus_follow_type(cls, data: Any) -> Any:
        """Unset deployment.gpus follows the serving GPU type (sections.serving_gpus_default)."""
        if not isinstance(data, dict) or not isinstance(data.get("deployment", {}), (dict, DeploymentSpec)):
            return data  # not a spec: the field checks name what is wrong
        return {**data, "deployment": default_gpus(data.get("deployment", {}), serving_gpus_default(data))}

    @model_validator(mode="after")
    def _cross_field(self) -> FineTuneJobSpec:
        if self.method == "qlora" and self.resources.gpus < 1:
            raise ValueError(QLORA_NEEDS_GPU)
        if self.resources.nodes > 1 and (self.resources.gpus < 1 or self.resources.gpu_type == "cpu"):
            raise ValueError(NODES_NEED_GPUS)
        if self.method == "qlora" and self.hyperparameters.strategy == "fsdp":
            raise ValueError(QLORA_NO_FSDP)
        if self.deployment.mode == "adapter" and self.method == "full":
            raise ValueError(ADAPTER_NEEDS_PEFT)
        if self.lora.rank > VLLM_MAX_LORA_RANK and self.deployment.serves_adapter(self.method):
            raise ValueError(LORA_RANK_UNSERVABLE)
        deployment = self.deployment
        if deployment.gpus > 0 and (deployment.gpu_type or self.resources.gpu_type) == CPU_GPU_TYPE:
            raise ValueError(SERVING_GPUS_ON_CPU)
        if (deployment.server is None) != (deployment.model_name is None):
            raise ValueError(SERVER_NEEDS_MODEL_NAME)
        if deployment.server is not None and self.method == "full":
            raise ValueError(SERVER_NEEDS_ADAPTER)
        if deployment.server is not None and deployment.mode == "merged":
            raise ValueError(SERVER_NEEDS_ADAPTER_MODE)
        if deployment.server is not None and not self.evaluation.enabled:
            raise ValueError(SERVER_NEEDS_EVALUATION)
        if _under(self.storage.output, self.base_model.uri):
            raise ValueError(OUTPUT_OVERLAPS_MODEL)
        data = [self.dataset.train, self.dataset.validation, self.dataset.test]
        if any(d and _under(self.storage.output, d) for d in data):
            raise ValueError(OUTPUT_OVERLAPS_DATA)
        return self

    @model_validator(mode="after")
    def _objective_fits(self) -> FineTuneJobSpec:
        problem = objective_problem(self)
        if problem:
            raise ValueError(problem)
        return self


# ---------------------------------------------------------------------------------------------- object
class FineTuneJob(ObjectModel):
    """A FineTuneJob object as stored by the API server."""

    api_version: Literal["finetune.dev/v1alpha1"] = "finetune.dev/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


def parse_finetunejob(obj: dict[str, Any]) -> FineTuneJob:
    """Parse a FineTuneJob object (as from the API server); raise SpecError naming each bad field."""
    try:
        return FineTuneJob.model_validate(obj)
    except ValidationError as exc:
        raise SpecError(field_errors(exc)) from None


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    """Parse a FineTuneJob .spec; errors are reported under `spec.`."""
    try:
        return FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(field_errors(exc, ("spec",))) from None


def check_update(old: FineTuneJobSpec, new: FineTuneJobSpec) -> None:
    """Raise SpecError when an update changes a field that is immutable once set, or undoes spec.cancel (as
    the CRD's rules)."""
    errors = [
        (f"spec.{field}", IMMUTABLE.format(field=field))
        for field in IMMUTABLE_FIELDS
        if _field(old, field) != _field(new, field)
    ]
    if old.cancel and not new.cancel:
        errors.append(("spec.cancel", CANCEL_FINAL))
    if errors:
        raise SpecError(errors)


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _field(spec: FineTuneJobSpec, path: str) -> Any:
    value: Any = spec
    for part in path.split("."):
        value = getattr(value, _snake(part))
    return value


def spec_to_dict(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The spec as the API server stores it: camelCase, defaults applied, unset optionals omitted."""
    out: dict[str, Any] = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return out
