"""ModelServer v1alpha1: a shared vLLM pool of one base model that FineTuneJobs hot-load their adapters into.

Generated into a CRD like FineTuneJob (crdgen.KINDS). A FineTuneJob names a pool with
`spec.deployment.server` and a stable model name with `spec.deployment.modelName`; the pool serves each
accepted adapter under an immutable versioned name `<modelName>-v<n>` and routes `<modelName>` to the
promoted (or pinned) version. docs/serving.md says how.
"""

from __future__ import annotations

import itertools
import re
from typing import Annotated, Any, Literal

from finetune_vocabulary.capture import REDACTOR_NAMES
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune_operator.api.extra_args import EXTRA_ARGS_RULE, MAX_EXTRA_ARGS, check_extra_args
from finetune_operator.api.finetunejob_status import Condition, PendingEvent, StatusURI
from finetune_operator.api.modelnames import (
    BASE_SERVED_NAME,
    MODEL_NAME_MAX,
    MODEL_NAME_PATTERN,
    MODEL_NAME_RESERVED,
    model_name_problem,
)
from finetune_operator.api.schema import (
    CAPTURE_OUTSIDE,
    POOL_GPUS_ON_CPU,
    SERVED_NAME_PATTERN,
    DNSLabel,
    DNSSubdomain,
    OutputURI,
    SourceURI,
    SpecError,
    SpecModel,
    StatusModel,
    default_gpus,
    field_errors,
    no_schema_default,
    rule,
    validations,
)
from finetune_operator.api.sections import (
    CPU_GPU_TYPE,
    DEFAULT_GPU_TYPE,
    DeploymentResources,
    NodeSelector,
    Toleration,
)

KIND = "ModelServer"
PLURAL = "modelservers"
SINGULAR = "modelserver"
SHORT_NAMES = ("ms",)

# Adapter ranks a pool accepts: vLLM's --max-lora-rank values.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
MAX_LORA_RANK_RULE = rule(
    "self in [8, 16, 32, 64, 128, 256, 320, 512]",
    "maxLoraRank must be one of vLLM's ranks 8, 16, 32, 64, 128, 256, 320, 512",
)


class PoolBaseModel(SpecModel):
    """The base model every replica loads."""

    uri: SourceURI = Field(description="s3://bucket/prefix, hf://org/name or pvc://claim/path.")
    revision: str | None = Field(
        default=None,
        max_length=255,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$",
        description="Revision (branch, tag or commit) for hf:// models.",
    )


MAX_ROLLOUT_STEPS = 10
STEPS_INCREASING = "steps must be strictly increasing percents of 1 to 99"
# Strictly increasing without list indices in a macro: one comparison per neighbouring pair (constant cost).
STEPS_RULE = {
    **rule(
        " && ".join(
            f"(self.steps.size() <= {i + 1} || self.steps[{i}] < self.steps[{i + 1}])"
            for i in range(MAX_ROLLOUT_STEPS - 1)
        ),
        STEPS_INCREASING,
    ),
    "fieldPath": ".steps",
}


class RolloutSpec(SpecModel):
    """A canary rollout of each newly promoted version (docs/serving.md, Canary rollouts)."""

    model_config = ConfigDict(json_schema_extra=validations(STEPS_RULE))

    steps: list[Annotated[int, Field(ge=1, le=99)]] = Field(
        min_length=1,
        max_length=MAX_ROLLOUT_STEPS,
        description="The challenger's share of the stable name's requests (percent) at each step, strictly "
        "increasing; after the last step it takes 100%.",
    )
    step_seconds: int = Field(default=300, ge=1, le=86400, description="How long each step lasts at least.")
    max_error_rate: float = Field(
        default=0.02, ge=0, le=1, description="The challenger's error rate beyond which it is rolled back."
    )
    max_latency_increase: float = Field(
        default=0.5,
        ge=0,
        le=100,
        description="Relative p95 latency increase over the champion beyond which it is rolled back.",
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        description="Challenger requests a step needs before it may advance (and before latency is judged).",
    )

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[int]) -> list[int]:
        if any(a >= b for a, b in itertools.pairwise(steps)):
            raise ValueError(STEPS_INCREASING)
        return steps


class ModelPolicy(SpecModel):
    """Per stable model name: an optional pin (rollback) and canary rollout."""

    pin: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        default=None,
        description="Serve this version (the n of <modelName>-v<n>) under the stable name instead of the "
        "promoted one; remove it to return to the promoted version.",
    )
    rollout: RolloutSpec | None = Field(
        default=None,
        description="Canary a newly checked version against the promoted one before it takes all traffic; "
        "unset: promoted at once.",
    )


Redactor = Literal[
    "email", "phone", "creditCard"
]  # finetune_vocabulary.capture.REDACTOR_NAMES (a test holds it)


class CaptureSpec(SpecModel):
    """Traffic capture by the pool's routers (docs/serving.md)."""

    destination: OutputURI = Field(
        description="s3:// prefix under spec.adapterSources or spec.captureDestinations; the routers write "
        "under <destination>/<namespace>/<modelserver>."
    )
    sample_rate: float = Field(default=0.1, ge=0, le=1, description="Fraction of requests per model name.")
    redact: list[Redactor] = Field(
        default_factory=lambda: list(REDACTOR_NAMES),  # type: ignore[arg-type]
        max_length=3,
        description="Built-in redactors applied before anything is written ([] = none).",
    )
    flush_seconds: int = Field(default=60, ge=1, le=3600, description="One object per pod per interval.")


_UNDER = "(self.capture.destination + '/').startsWith(p.endsWith('/') ? p : p + '/')"
CAPTURE_RULE = rule(
    f"!has(self.capture) || self.adapterSources.exists(p, {_UNDER}) || "
    f"(has(self.captureDestinations) && self.captureDestinations.exists(p, {_UNDER}))",
    CAPTURE_OUTSIDE,
)


class ModelServerSpec(SpecModel):
    """One vLLM Deployment and Service with LoRA enabled; adapters are loaded at runtime."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(f"!has(self.gpus) || self.gpus == 0 || self.gpuType != '{CPU_GPU_TYPE}'", POOL_GPUS_ON_CPU),
            CAPTURE_RULE,
        )
    )

    base_model: PoolBaseModel = Field(
        description="The base model (immutable).",
        json_schema_extra=validations(rule("self == oldSelf", "baseModel is immutable once set")),
    )
    replicas: int = Field(default=1, ge=0, le=64, description="vLLM replicas.")
    gpus: int = Field(
        default=1,
        ge=0,
        le=8,
        json_schema_extra=no_schema_default,
        description="GPUs per replica; 0 serves on CPU. Default: 0 when gpuType is cpu, else 1; more than 0 "
        "on a cpu gpuType is refused.",
    )
    gpu_type: DNSLabel = Field(default=DEFAULT_GPU_TYPE, description="A key of the operator's GPU table.")
    resources: DeploymentResources | None = Field(default=None, description="CPU and memory per replica.")
    node_selector: NodeSelector | None = Field(default=None, description="Extra node labels to require.")
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=16, description="Extra tolerations."
    )
    priority_class_name: DNSSubdomain | None = Field(default=None, description="PriorityClass of the pods.")
    max_loras: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Adapter versions loaded at once per replica; beyond it the least recently promoted "
        "version that is neither promoted nor pinned is unloaded (with an Event).",
    )
    max_lora_rank: int = Field(
        default=64,
        json_schema_extra=validations(MAX_LORA_RANK_RULE),
        description="Largest LoRA rank an attached FineTuneJob may train (vLLM --max-lora-rank).",
    )
    max_model_len: int | None = Field(default=None, ge=128, le=1_048_576, description="vLLM --max-model-len.")
    extra_args: list[Annotated[str, Field(max_length=256)]] | None = Field(
        default=None,
        max_length=MAX_EXTRA_ARGS,
        json_schema_extra=validations(EXTRA_ARGS_RULE),
        description="Extra vLLM arguments: the allow-list of FineTuneJob deployment.extraArgs "
        "(docs/serving.md).",
    )
    adapter_sources: list[OutputURI] = Field(
        min_length=1,
        max_length=16,
        description="s3:// prefixes the pool may load adapters from: an attached FineTuneJob's "
        "storage.output must lie under one, and each replica's adapter router refuses any other URI "
        "(its credentials may read more than the adapters meant for it).",
    )
    credentials_secret: DNSSubdomain | None = Field(
        default=None,
        description="Secret in this namespace with AWS_* (and optional HF_TOKEN) keys, by reference only: "
        "used to fetch the base model and the adapters.",
    )
    service_account_name: DNSSubdomain | None = Field(
        default=None, description="ServiceAccount for the pods (IRSA / workload identity)."
    )
    served_model_name: str | None = Field(
        default=None,
        max_length=128,
        pattern=SERVED_NAME_PATTERN,
        description="A second name the base model answers to besides 'base': a FineTuneJob's own ModelServer "
        "serving merged weights answers to the job's served name (docs/serving.md).",
    )
    models: dict[Annotated[str, Field(max_length=MODEL_NAME_MAX)], ModelPolicy] | None = Field(
        default=None,
        max_length=64,
        json_schema_extra=validations(
            rule(
                f"self.all(k, k.matches('{MODEL_NAME_PATTERN}') && !k.matches('-v[0-9]+$') "
                f"&& k != '{BASE_SERVED_NAME}')",
                f"model names are DNS labels; {MODEL_NAME_RESERVED}",
            )
        ),
        description="Per stable model name: pin (rollback) and canary rollout.",
    )
    capture_destinations: list[OutputURI] | None = Field(
        default=None,
        max_length=16,
        description="Further s3:// prefixes capture.destination may lie under (besides adapterSources).",
    )
    capture: CaptureSpec | None = Field(
        default=None, description="Record sampled requests and answers, and feedback (off by default)."
    )

    @model_validator(mode="before")
    @classmethod
    def _gpus_follow_type(cls, data: Any) -> Any:
        """Unset gpus follows gpuType: 0 on cpu (it has no GPUs), 1 otherwise."""
        if not isinstance(data, dict):
            return data
        on_cpu = data.get("gpuType", data.get("gpu_type")) == CPU_GPU_TYPE
        return default_gpus(data, 0 if on_cpu else 1)

    @model_validator(mode="after")
    def _no_gpus_on_cpu(self) -> ModelServerSpec:
        if self.gpus > 0 and self.gpu_type == CPU_GPU_TYPE:
            raise ValueError(POOL_GPUS_ON_CPU)
        return self

    @model_validator(mode="after")
    def _capture_inside(self) -> ModelServerSpec:
        if self.capture is not None:
            allowed = [*self.adapter_sources, *(self.capture_destinations or [])]
            if not any(under_prefix(self.capture.destination, p) for p in allowed):
                raise ValueError(CAPTURE_OUTSIDE)
        return self

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_known(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            raise ValueError(MAX_LORA_RANK_RULE["message"])
        return rank

    @field_validator("extra_args")
    @classmethod
    def _extra_args_allowed(cls, args: list[str] | None) -> list[str] | None:
        return check_extra_args(args)

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelPolicy] | None) -> dict[str, ModelPolicy] | None:
        for name in models or {}:
            problem = model_name_problem(name) or (
                None if re.fullmatch(MODEL_NAME_PATTERN, name) else "model names are DNS labels"
            )
            if problem:
                raise ValueError(f"{name}: {problem}")
        return models

    def adapter_source_of(self, uri: str) -> str | None:
        """The adapterSources prefix `uri` lies under (at a path boundary), or None."""
        return next((p for p in self.adapter_sources if under_prefix(uri, p)), None)

    def pin(self, model: str) -> int | None:
        policy = (self.models or {}).get(model)
        return policy.pin if policy else None

    def rollout(self, model: str) -> RolloutSpec | None:
        policy = (self.models or {}).get(model)
        return policy.rollout if policy else None


def under_prefix(uri: str, prefix: str) -> bool:
    """`uri` is `prefix` or below it, at a path boundary (s3://b/runs does not admit s3://b/runs-x)."""
    base = prefix.rstrip("/") + "/"
    return (uri.rstrip("/") + "/").startswith(base) and ".." not in uri.split("/")


# ---------------------------------------------------------------------------------------------- status
class ModelVersionStatus(StatusModel):
    """One adapter version of a stable model name."""

    version: int = Field(ge=1, le=1_000_000, description="n of <modelName>-v<n>.")
    name: str = Field(max_length=64, description="The versioned name it is loaded under.")
    adapter: StatusURI = Field(description="Where its adapter is (the job's artifacts.adapter).")
    job: str | None = Field(default=None, max_length=253, description="The FineTuneJob that trained it.")
    job_uid: str | None = Field(default=None, max_length=64, description="That job's uid.")
    promoted_at: str | None = Field(default=None, max_length=32, description="When it was last promoted.")
    loaded: bool = Field(default=True, description="Whether replicas should hold it (false: unloaded).")
    unloaded_reason: str | None = Field(default=None, max_length=256, description="Why it was unloaded.")
    rollout_failed: str | None = Field(
        default=None, max_length=1024, description="Why its canary rollout was rolled back, with the figures."
    )


class ReplicaStatus(StatusModel):
    """What one ready pod has loaded, as its adapter-sync sidecar reports."""

    pod: str = Field(max_length=253)
    loaded: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=256)
    routes: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=64)]] | None = None
    ready: bool | None = Field(default=None, description="Pod Ready (every adapter of the ConfigMap loaded).")


class RolloutFigures(StatusModel):
    """One version's live figures during a rollout step, merged over the replicas holding the weights."""

    requests: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    error_rate: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0, alias="p95Ms")


class RolloutStatus(StatusModel):
    """A canary rollout of one version of a stable name (docs/serving.md, Canary rollouts)."""

    version: int = Field(ge=1, le=1_000_000, description="The challenger: n of <modelName>-v<n>.")
    name: str = Field(max_length=64, description="The challenger's versioned name.")
    champion: int | None = Field(default=None, description="The version it is compared against.")
    champion_name: str | None = Field(
        default=None, max_length=64, description="The champion's versioned name."
    )
    state: Literal["Progressing", "Completed", "RolledBack"]
    step: int = Field(ge=1, le=16, description="1-based index into steps; the challenger has steps[step-1]%.")
    steps: list[int] = Field(default_factory=list, max_length=16)
    weight: int = Field(default=0, ge=0, le=100, description="The challenger's share now (percent).")
    weights: dict[Annotated[str, Field(max_length=64)], int] = Field(default_factory=dict, max_length=4)
    step_started_at: str = Field(max_length=32)
    challenger: RolloutFigures | None = None
    champion_figures: RolloutFigures | None = None
    message: str = Field(default="", max_length=1024)


class ModelStatus(StatusModel):
    """One stable model name."""

    versions: list[ModelVersionStatus] = Field(default_factory=list, max_length=256)
    promoted: int | None = Field(default=None, description="The version the stable name serves unpinned.")
    pinned: int | None = Field(default=None, description="spec.models[...].pin, when it is in force.")
    serving: int | None = Field(default=None, description="The version the stable name serves now.")
    last_version: int = Field(default=0, ge=0, description="Highest version ever assigned (never reused).")
    rollout: RolloutStatus | None = Field(default=None, description="The current or last canary rollout.")


class PoolPendingEvent(PendingEvent):
    """An Event a ModelServer pass still owes (the API refused it for now), on the pool or on a job."""

    job: str | None = Field(
        default=None, max_length=253, description="Posted on this FineTuneJob (else on the ModelServer)."
    )


class CaptureCounters(StatusModel):
    """Capture counters summed over the reporting replicas (since each pod started)."""

    records: int = Field(default=0, ge=0)
    feedback: int = Field(default=0, ge=0)
    failures: int = Field(default=0, ge=0)
    dropped: int = Field(default=0, ge=0)


class ModelServerStatus(StatusModel):
    """Observed state, written by the operator."""

    ready_replicas: int | None = Field(
        default=None, ge=0, description="Pods ready with every adapter loaded."
    )
    replicas: list[ReplicaStatus] | None = Field(default=None, max_length=64, description="Per ready pod.")
    models: dict[Annotated[str, Field(max_length=64)], ModelStatus] | None = Field(
        default=None, max_length=64, description="Per stable model name."
    )
    model_names: str | None = Field(
        default=None, max_length=256, description="Short text for kubectl: model=version, ..."
    )
    endpoint: str | None = Field(default=None, max_length=2048, description="OpenAI-compatible base URL.")
    capture: CaptureCounters | None = Field(default=None, description="Traffic capture, when on.")
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, ge=0)
    message: str | None = Field(default=None, max_length=4096)
    pending_events: list[PoolPendingEvent] | None = Field(
        default=None,
        max_length=32,
        description="Events the API refused for now; the operator posts them when it recovers.",
    )


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Base model", "type": "string", "jsonPath": ".spec.baseModel.uri"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Models", "type": "string", "jsonPath": ".status.modelNames"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def parse_modelserver_spec(spec: dict[str, Any]) -> ModelServerSpec:
    """Parse a ModelServer .spec; errors are reported under `spec.`."""
    try:
        return ModelServerSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(field_errors(exc, ("spec",))) from None
