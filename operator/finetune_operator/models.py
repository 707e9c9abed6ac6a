"""FineTuneJob v1alpha1: the pydantic models that are the single source of the API.

The CRD (`crdgen.py`) is generated from these models, and the operator parses every object with
`parse_finetunejob`, so the API server and the operator accept exactly the same specs. Patterns are written
in the regex subset shared by Go's RE2 (kube-apiserver, CEL `matches`), Rust's regex (pydantic-core) and
Python's `re`: no look-around, no back-references.

Cross-field rules live twice, on purpose: as CEL (`x-kubernetes-validations`, enforced by the API server)
and as model validators here (enforced by the operator), with the same messages.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("finetune",)

# ---------------------------------------------------------------------------------------------- patterns
# One path segment of an object key or volume path: never empty, never "." or ".." (no traversal).
_SEG_CHAR = r"[A-Za-z0-9._~=+-]"
_SEG_START = r"[A-Za-z0-9_~=+-]"
SEGMENT = rf"(?:{_SEG_START}{_SEG_CHAR}*|\.{_SEG_START}{_SEG_CHAR}*|\.\.{_SEG_CHAR}+)"
# S3 bucket naming rules: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit
# on each dot-separated label (so no "..", ".-", "-."); the 3..63 length is checked by BUCKET_LENGTH.
BUCKET = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
BUCKET_LENGTH = r"^s3://[a-z0-9.-]{3,63}(?:/|$)"
DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = rf"{DNS_LABEL}(?:\.{DNS_LABEL})*"
HF_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*"

S3_OBJECT = rf"s3://{BUCKET}(?:/{SEGMENT})+/?"
S3_PREFIX = rf"s3://{BUCKET}(?:/{SEGMENT})*/?"
HF_REPO = rf"hf://{HF_NAME}/{HF_NAME}"
PVC_PATH = rf"pvc://{DNS_SUBDOMAIN}(?:/{SEGMENT})*/?"

SOURCE_URI_PATTERN = rf"^(?:{S3_OBJECT}|{HF_REPO}|{PVC_PATH})$"
OUTPUT_URI_PATTERN = rf"^{S3_PREFIX}$"
DNS_LABEL_PATTERN = rf"^{DNS_LABEL}$"
DNS_SUBDOMAIN_PATTERN = rf"^{DNS_SUBDOMAIN}$"
HTTP_URL_PATTERN = r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?$"
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)"
    r"|(\.[0-9]+))))?$"
)
LABEL_VALUE_PATTERN = r"^(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?)?$"
QUALIFIED_NAME_PATTERN = rf"^(?:{DNS_SUBDOMAIN}/)?[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$"  # no "." or ".." segment
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$"
MODULE_NAME_PATTERN = r"^[A-Za-z0-9_.*-]+$"

PATTERN_HINTS = {
    SOURCE_URI_PATTERN: "s3://bucket/key, hf://org/name or pvc://claim/path (no empty, '.' or '..' segments)",
    OUTPUT_URI_PATTERN: "an s3://bucket/prefix URI (no empty, '.' or '..' segments)",
    DNS_LABEL_PATTERN: "a DNS-1123 label (lowercase letters, digits and '-')",
    DNS_SUBDOMAIN_PATTERN: "a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')",
    HTTP_URL_PATTERN: "an http:// or https:// URL",
    QUANTITY_PATTERN: "a Kubernetes quantity such as 4, 500m or 16Gi",
}

BUCKET_LENGTH_RULE = {
    "rule": f"!self.startsWith('s3://') || self.matches('{BUCKET_LENGTH}')",
    "message": "S3 bucket names must be 3 to 63 characters long",
}
BUCKET_LENGTH_MESSAGE = BUCKET_LENGTH_RULE["message"]

# Cross-field rule messages (the same text from CEL and from the model validators).
QLORA_NEEDS_GPU = "method qlora needs resources.gpus >= 1 (4-bit quantisation runs on GPUs only)"
ADAPTER_NEEDS_PEFT = "deployment.mode adapter needs method lora or qlora"
THRESHOLD_METRIC_UNKNOWN = "every threshold metric must be listed in evaluation.metrics"
PRIMARY_METRIC_UNKNOWN = "evaluation.primaryMetric must be listed in evaluation.metrics"
THRESHOLD_ONE_BOUND = "a threshold sets exactly one of min or max"
OUTPUT_OVERLAPS_MODEL = "storage.output must not be the base model's location or under it"
OUTPUT_OVERLAPS_DATA = "storage.output must not be a dataset file's location or under it"
IMMUTABLE = "{field} is immutable once set"
IMMUTABLE_FIELDS = ("baseModel", "dataset", "method", "lora", "hyperparameters")


class SpecError(ValueError):
    """A FineTuneJob that does not satisfy the API; each line names a field path."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors))


# Where each cross-field rule points (CEL `fieldPath`, relative to the object carrying the rule).
RULE_FIELD = {
    QLORA_NEEDS_GPU: ".resources.gpus",
    ADAPTER_NEEDS_PEFT: ".deployment.mode",
    OUTPUT_OVERLAPS_MODEL: ".storage.output",
    OUTPUT_OVERLAPS_DATA: ".storage.output",
    THRESHOLD_METRIC_UNKNOWN: ".thresholds",
    PRIMARY_METRIC_UNKNOWN: ".primaryMetric",
}


def _rule(rule: str, message: str) -> dict[str, str]:
    out = {"rule": rule, "message": message}
    if message in RULE_FIELD:
        out["fieldPath"] = RULE_FIELD[message]
    return out


def _validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


# ---------------------------------------------------------------------------------------------- base types
class _Spec(BaseModel):
    """Base of spec models: camelCase, strict types (as the API server's schema), unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        strict=True,
        frozen=True,
    )


class _Status(BaseModel):
    """Base of status models: camelCase, lax so that an older operator reads a newer status."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="ignore",
    )


def _check_bucket(uri: str) -> str:
    if uri.startswith("s3://") and not re.match(BUCKET_LENGTH, uri):
        raise ValueError(BUCKET_LENGTH_MESSAGE)
    return uri


def _str(value: Any, max_length: int, pattern: str | None) -> str:
    """Strict string check used by PlainValidator types (same rules and messages as pydantic's)."""
    if not isinstance(value, str):
        raise ValueError("Input should be a valid string")
    if len(value) > max_length:
        raise ValueError(f"String should have at most {max_length} characters")
    if not value:
        raise ValueError("String should have at least 1 character")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise ValueError(
            f"must be {PATTERN_HINTS[pattern]}"
            if pattern in PATTERN_HINTS
            else f"String should match pattern '{pattern}'"
        )
    return value


SourceURI = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        pattern=SOURCE_URI_PATTERN,
        json_schema_extra=_validations(BUCKET_LENGTH_RULE),
    ),
    AfterValidator(_check_bucket),
]
OutputURI = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        pattern=OUTPUT_URI_PATTERN,
        json_schema_extra=_validations(BUCKET_LENGTH_RULE),
    ),
    AfterValidator(_check_bucket),
]
DNSLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
DNSSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]


def _quantity(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("Input should be an integer or a Kubernetes quantity string")
    if isinstance(value, int):
        if not 0 <= value <= 1_000_000_000_000_000:
            raise ValueError("Input should be between 0 and 10^15")
        return value
    return _str(value, 64, QUANTITY_PATTERN)


Quantity = Annotated[
    int | str,
    PlainValidator(_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "maxLength": 64,
            "minimum": 0,
            "maximum": 1_000_000_000_000_000,
        }
    ),
]


class Metric(enum.StrEnum):
    """Evaluation metrics the trainer computes."""

    LOSS = "loss"
    PERPLEXITY = "perplexity"
    EXACT_MATCH = "exact_match"
    TOKEN_F1 = "token_f1"
    ROUGE_L = "rouge_l"


MetricName = Literal["loss", "perplexity", "exact_match", "token_f1", "rouge_l"]
ALL_METRICS: tuple[MetricName, ...] = ("loss", "perplexity", "exact_match", "token_f1", "rouge_l")
Method = Literal["lora", "qlora", "full"]
DatasetFormat = Literal["auto", "chat", "completion", "instruction"]
DeploymentMode = Literal["auto", "adapter", "merged"]


# ---------------------------------------------------------------------------------------------- spec
class BaseModelSpec(_Spec):
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


class DatasetSpec(_Spec):
    """Training data: JSONL files (chat, completion or instruction records)."""

    train: SourceURI = Field(description="URI of the training JSONL file.")
    validation: SourceURI | None = Field(default=None, description="URI of a validation JSONL file.")
    test: SourceURI | None = Field(
        default=None,
        description="URI of the held-out JSONL file for evaluation; else testSize examples are "
        "held out from train.",
    )
    format: DatasetFormat = Field(default="auto", description="Record format; auto detects it.")
    test_size: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Examples held out from train when no test file is given "
        "(unset: 10% of train, 1 to 200).",
    )
    max_error_rate: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Fail validation when more than this fraction of lines is malformed or over-length.",
    )


class LoraSpec(_Spec):
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


class HyperparametersSpec(_Spec):
    """Training hyperparameters."""

    epochs: int = Field(default=3, ge=1, le=100, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Stop after this many optimizer steps (overrides epochs).",
    )
    learning_rate: float = Field(default=0.0002, gt=0, lt=1, description="Peak learning rate.")
    batch_size: int = Field(default=4, ge=1, le=1024, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(
        default=4, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    max_seq_length: int = Field(default=2048, ge=16, le=131072, description="Tokens per example (truncated).")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps for LR warm-up.")
    packing: bool = Field(
        default=True,
        description="Pack examples into full sequences (no attention across examples).",
    )
    gradient_checkpointing: bool = Field(default=True, description="Trade compute for activation memory.")
    seed: int = Field(default=42, ge=0, le=2_147_483_647, description="Random seed.")


class Toleration(_Spec):
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
        json_schema_extra=_validations(
            _rule("self.all(k, k.size() <= 316)", "node selector keys must be at most 316 characters")
        ),
    ),
]


class CheckpointSpec(_Spec):
    """How often training commits a checkpoint to storage (a preempted run resumes from the newest)."""

    every_steps: int = Field(default=100, ge=1, le=1_000_000, description="Commit every N optimizer steps.")
    every_minutes: float = Field(default=15, gt=0, le=1440, description="... and at least every M minutes.")
    keep: int = Field(default=2, ge=1, le=20, description="Committed checkpoints kept.")


class ResourcesSpec(_Spec):
    """Compute for the training pod."""

    gpus: int = Field(default=1, ge=0, le=16, description="GPUs on one node; 0 trains on CPU.")
    gpu_type: DNSLabel = Field(default="a100-80gb", description="A key of the operator's GPU table.")
    cpu: Quantity | None = Field(default=None, description="CPU request and limit.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit.")
    node_selector: NodeSelector | None = Field(default=None, description="Extra node labels to require.")
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=16, description="Extra tolerations."
    )
    priority_class_name: DNSSubdomain | None = Field(default=None, description="PriorityClass of the pods.")
    queue_name: DNSSubdomain | None = Field(default=None, description="Kueue LocalQueue to submit to.")


class StorageSpec(_Spec):
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


class Threshold(_Spec):
    """A gate on one metric of the tuned model."""

    model_config = ConfigDict(
        json_schema_extra=_validations(_rule("has(self.min) != has(self.max)", THRESHOLD_ONE_BOUND))
    )

    metric: MetricName = Field(description="Metric to gate on.")
    min: float | None = Field(default=None, ge=-1e9, le=1e9, description="Lowest acceptable value.")
    max: float | None = Field(default=None, ge=-1e9, le=1e9, description="Highest acceptable value.")

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if (self.min is None) == (self.max is None):
            raise ValueError(THRESHOLD_ONE_BOUND)
        return self


class SecretKeyRef(_Spec):
    """A key of a Secret in the job's namespace."""

    name: DNSSubdomain = Field(description="Secret name.")
    key: str = Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the Secret.")


class ReferenceSpec(_Spec):
    """An OpenAI-compatible model scored on the same prompts, for comparison only."""

    url: str = Field(max_length=2048, pattern=HTTP_URL_PATTERN, description="Base URL, e.g. https://host/v1.")
    model: str = Field(
        min_length=1, max_length=256, pattern=r"^[^\s]+$", description="Model name to request."
    )
    api_key_secret: SecretKeyRef | None = Field(default=None, description="Secret key holding the API key.")


class EvaluationSpec(_Spec):
    """Evaluate the tuned model against its base on held-out data, then gate."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _rule(
                "!has(self.thresholds) || self.thresholds.all(t, !has(t.metric) || t.metric in self.metrics)",
                THRESHOLD_METRIC_UNKNOWN,
            ),
            _rule("!has(self.primaryMetric) || self.primaryMetric in self.metrics", PRIMARY_METRIC_UNKNOWN),
        )
    )

    enabled: bool = Field(default=True, description="Run the evaluation stage.")
    metrics: list[MetricName] = Field(
        default_factory=lambda: list[MetricName](list(ALL_METRICS)),
        min_length=1,
        max_length=5,
        json_schema_extra={"default": list(ALL_METRICS), "x-kubernetes-list-type": "set"},
        description="Metrics to compute.",
    )
    thresholds: list[Threshold] | None = Field(
        default=None, max_length=10, description="Gates; a failed gate rejects the model."
    )
    compare_to_base: bool = Field(default=True, description="Also score the base model and compare.")
    min_improvement: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="Least relative improvement of primaryMetric over the base model (0.05 = 5%).",
    )
    primary_metric: MetricName | None = Field(
        default=None,
        description="Metric that decides improvement (unset: exact_match if computed, else the "
        "first of metrics).",
    )
    max_new_tokens: int = Field(default=128, ge=1, le=8192, description="Generation budget per prompt.")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Prompts generated per batch.")
    reference: ReferenceSpec | None = Field(default=None, description="Optional API model to compare with.")

    @field_validator("metrics")
    @classmethod
    def _metrics_unique(cls, metrics: list[MetricName]) -> list[MetricName]:
        for i, metric in enumerate(metrics):
            if metric in metrics[:i]:
                raise ValueError(f"duplicate metric {metric!r}")
        return metrics

    @model_validator(mode="after")
    def _metrics_known(self) -> EvaluationSpec:
        if self.thresholds and any(t.metric not in self.metrics for t in self.thresholds):
            raise ValueError(THRESHOLD_METRIC_UNKNOWN)
        if self.primary_metric is not None and self.primary_metric not in self.metrics:
            raise ValueError(PRIMARY_METRIC_UNKNOWN)
        return self


class DeploymentResources(_Spec):
    """CPU and memory of each vLLM replica."""

    cpu: Quantity | None = Field(default=None, description="CPU request and limit.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit.")


class DeploymentSpec(_Spec):
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
    gpus: int = Field(default=1, ge=0, le=8, description="GPUs per replica; 0 serves on CPU.")
    gpu_type: DNSLabel | None = Field(default=None, description="GPU table key; default: resources.gpuType.")
    max_model_len: int | None = Field(default=None, ge=128, le=1_048_576, description="vLLM --max-model-len.")
    extra_args: list[Annotated[str, Field(max_length=256)]] | None = Field(
        default=None, max_length=32, description="Extra vLLM server arguments."
    )
    resources: DeploymentResources | None = Field(default=None, description="CPU and memory per replica.")


_SPEC_RULES = (
    _rule(
        "!has(self.method) || self.method != 'qlora' || !has(self.resources) || !has(self.resources.gpus) "
        "|| self.resources.gpus >= 1",
        QLORA_NEEDS_GPU,
    ),
    _rule(
        "!has(self.deployment) || !has(self.deployment.mode) || self.deployment.mode != 'adapter' "
        "|| !has(self.method) || self.method != 'full'",
        ADAPTER_NEEDS_PEFT,
    ),
    _rule(
        "!has(self.storage) || !has(self.storage.output) || !has(self.baseModel) "
        "|| !has(self.baseModel.uri) || !(self.storage.output + '/').startsWith("
        "self.baseModel.uri.endsWith('/') ? self.baseModel.uri : self.baseModel.uri + '/')",
        OUTPUT_OVERLAPS_MODEL,
    ),
    _rule(
        "!has(self.storage) || !has(self.storage.output) || !has(self.dataset) || "
        "[has(self.dataset.train) ? self.dataset.train : '', "
        "has(self.dataset.validation) ? self.dataset.validation : '', "
        "has(self.dataset.test) ? self.dataset.test : ''].all(d, d == '' || "
        "!(self.storage.output + '/').startsWith(d.endsWith('/') ? d : d + '/'))",
        OUTPUT_OVERLAPS_DATA,
    ),
)


def _under(output: str, location: str) -> bool:
    base = location if location.endswith("/") else location + "/"
    return (output + "/").startswith(base)


class FineTuneJobSpec(_Spec):
    """What to fine-tune, on what data, how, and where to serve it."""

    model_config = ConfigDict(json_schema_extra=_validations(*_SPEC_RULES))

    base_model: BaseModelSpec = Field(
        description="The model to fine-tune (immutable).",
        json_schema_extra=_validations(_rule("self == oldSelf", IMMUTABLE.format(field="baseModel"))),
    )
    dataset: DatasetSpec = Field(
        description="Training data (immutable).",
        json_schema_extra=_validations(_rule("self == oldSelf", IMMUTABLE.format(field="dataset"))),
    )
    method: Method = Field(
        default="lora",
        description="lora, qlora (4-bit base) or full fine-tuning (immutable).",
        json_schema_extra=_validations(_rule("self == oldSelf", IMMUTABLE.format(field="method"))),
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec,
        description="Adapter settings (immutable).",
        json_schema_extra={
            "default": {},
            **_validations(_rule("self == oldSelf", IMMUTABLE.format(field="lora"))),
        },
    )
    hyperparameters: HyperparametersSpec = Field(
        default_factory=HyperparametersSpec,
        description="Training hyperparameters (immutable).",
        json_schema_extra={
            "default": {},
            **_validations(_rule("self == oldSelf", IMMUTABLE.format(field="hyperparameters"))),
        },
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec,
        json_schema_extra={"default": {}},
        description="Checkpointing during training.",
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, json_schema_extra={"default": {}}, description="Compute for training."
    )
    storage: StorageSpec = Field(description="Artifact storage and credentials.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec,
        json_schema_extra={"default": {}},
        description="Evaluation and gating.",
    )
    deployment: DeploymentSpec = Field(
        default_factory=DeploymentSpec, json_schema_extra={"default": {}}, description="Serving on vLLM."
    )
    suspend: bool = Field(
        default=False, description="Pause: running pods are stopped, resumed from checkpoint."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=60, le=2_592_000, description="Fail the job after this many seconds."
    )
    max_retries: int = Field(default=3, ge=0, le=20, description="Retries of transient stage failures.")

    @model_validator(mode="after")
    def _cross_field(self) -> FineTuneJobSpec:
        if self.method == "qlora" and self.resources.gpus < 1:
            raise ValueError(QLORA_NEEDS_GPU)
        if self.deployment.mode == "adapter" and self.method == "full":
            raise ValueError(ADAPTER_NEEDS_PEFT)
        if _under(self.storage.output, self.base_model.uri):
            raise ValueError(OUTPUT_OVERLAPS_MODEL)
        data = [self.dataset.train, self.dataset.validation, self.dataset.test]
        if any(d and _under(self.storage.output, d) for d in data):
            raise ValueError(OUTPUT_OVERLAPS_DATA)
        return self


# ---------------------------------------------------------------------------------------------- status
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


class Condition(_Status):
    """metav1.Condition."""

    type: str = Field(max_length=316, pattern=QUALIFIED_NAME_PATTERN)
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(default=None, ge=0, le=9_007_199_254_740_991)
    last_transition_time: datetime
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(max_length=32768)


class ProgressStatus(_Status):
    """Training progress from the trainer's newest progress line."""

    step: Count | None = Field(default=None, description="Optimizer steps done.")
    total_steps: Count | None = Field(default=None, description="Optimizer steps planned.")
    epoch: Real | None = Field(default=None, description="Fractional epoch.")
    loss: Real | None = Field(default=None, description="Latest training loss.")
    learning_rate: Real | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: Real | None = Field(default=None, description="Training throughput.")
    eta_seconds: Count | None = Field(default=None, description="Estimated seconds to the end of training.")
    display: str | None = Field(
        default=None,
        max_length=64,
        description="Short text for kubectl (Progress column), e.g. 40/200 (20%).",
    )


class DatasetStatus(_Status):
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


MetricValues = Annotated[dict[Annotated[str, Field(max_length=64)], Real], Field(max_length=16)]


class EvaluationStatus(_Status):
    """Scores of the tuned model, its base and an optional reference, and the gate's verdict."""

    passed: bool | None = Field(default=None, description="Whether every gate passed.")
    tuned: MetricValues | None = Field(default=None, description="Metrics of the tuned model.")
    base: MetricValues | None = Field(default=None, description="Metrics of the base model.")
    reference: MetricValues | None = Field(default=None, description="Metrics of the reference API model.")
    examples: Count | None = Field(default=None, description="Held-out examples scored.")
    reasons: list[Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16, description="Why the gate passed or failed, one line per check."
    )
    summary: str | None = Field(
        default=None,
        max_length=64,
        description="Short text for kubectl (Eval column), e.g. passed 0.62 vs 0.40.",
    )


class ArtifactsStatus(_Status):
    """Where the run's outputs are."""

    run_prefix: StatusURI | None = Field(default=None, description="<output>/<namespace>/<name>/<uid>.")
    data: StatusURI | None = Field(default=None, description="Cleaned dataset.")
    checkpoint: StatusURI | None = Field(default=None, description="Latest committed checkpoint.")
    adapter: StatusURI | None = Field(default=None, description="LoRA adapter.")
    merged: StatusURI | None = Field(default=None, description="Merged weights.")
    evaluation_report: StatusURI | None = Field(default=None, description="Evaluation report.")


class EndpointStatus(_Status):
    """The serving endpoint."""

    url: StatusURI | None = Field(default=None, description="OpenAI-compatible base URL in the cluster.")
    model: str | None = Field(default=None, max_length=256, description="Model name to request.")


class PendingEvent(_Status):
    """An Event the operator still owes (the API refused it for now); posted under this name exactly once."""

    name: str = Field(max_length=253, description="The Event's deterministic name.")
    type: Literal["Normal", "Warning"]
    reason: str = Field(max_length=128)
    message: str = Field(max_length=1024)


class FineTuneJobStatus(_Status):
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
    retries: int | None = Field(default=None, ge=0, le=1000, description="Transient failures retried so far.")
    start_time: datetime | None = Field(default=None, description="When the first stage started.")
    completion_time: datetime | None = Field(default=None, description="When the job reached a final phase.")
    gpu_hours_estimate: float | None = Field(
        default=None, ge=0, le=1e9, description="Estimated GPU hours before training."
    )
    gpu_hours: float | None = Field(default=None, ge=0, le=1e9, description="GPU hours used so far.")
    pending_events: list[PendingEvent] | None = Field(
        default=None,
        max_length=32,
        description="Transition Events the API refused for now; the operator posts them when it recovers.",
    )


# ---------------------------------------------------------------------------------------------- object
class ObjectMeta(_Status):
    """The metadata fields the operator reads (the rest is kept by the API server, not here)."""

    model_config = ConfigDict(extra="allow")

    name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    namespace: str | None = Field(default=None, max_length=63)
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class FineTuneJob(BaseModel):
    """A FineTuneJob object as stored by the API server."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="ignore",
    )

    api_version: Literal["finetune.dev/v1alpha1"] = "finetune.dev/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


def _path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts[-1] += f"[{part}]"
        elif part == "[key]":
            parts.pop()  # a bad map key: report the map, as the API server does
        elif part.startswith(("function-", "lax-", "strict-")) or part in {"str", "int"}:
            continue  # pydantic's union/function branch labels are not field names
        else:
            parts.append(part)
    return ".".join(parts)


def _errors(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        message = str(err["msg"])
        if err["type"] == "value_error" and message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        if err["type"] == "string_pattern_mismatch":
            pattern = str((err.get("ctx") or {}).get("pattern", ""))
            message = f"must be {PATTERN_HINTS[pattern]}" if pattern in PATTERN_HINTS else message
        path = _path(prefix + tuple(err["loc"]))
        if message in RULE_FIELD:
            path += RULE_FIELD[message]
        errors.append((path, message))
    return errors


def parse_finetunejob(obj: dict[str, Any]) -> FineTuneJob:
    """Parse a FineTuneJob object (as from the API server); raise SpecError naming each bad field."""
    try:
        return FineTuneJob.model_validate(obj)
    except ValidationError as exc:
        raise SpecError(_errors(exc)) from None


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    """Parse a FineTuneJob .spec; errors are reported under `spec.`."""
    try:
        return FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(_errors(exc, ("spec",))) from None


def check_update(old: FineTuneJobSpec, new: FineTuneJobSpec) -> None:
    """Raise SpecError when an update changes a field that is immutable once set (as the CRD's rules)."""
    errors = [
        (f"spec.{field}", IMMUTABLE.format(field=field))
        for field in IMMUTABLE_FIELDS
        if getattr(old, _snake(field)) != getattr(new, _snake(field))
    ]
    if errors:
        raise SpecError(errors)


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def spec_to_dict(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The spec as the API server stores it: camelCase, defaults applied, unset optionals omitted."""
    out: dict[str, Any] = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return out
