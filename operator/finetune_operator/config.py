"""Operator configuration: images, the GPU-type table and defaults.

Read from YAML (`--config PATH`, mounted from a ConfigMap at /etc/finetune-operator/config.yaml),
merged over built-in defaults, then overridden by `FTO_*` environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from finetune_vocabulary.images import TRAINER_IMAGE, VLLM_IMAGE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG_PATH = Path("/etc/finetune-operator/config.yaml")


class ConfigError(ValueError):
    """The operator config is unusable; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Images(_Model):
    trainer: str = Field(f"{TRAINER_IMAGE}:0.1.0", min_length=1)
    vllm: str = Field(f"{VLLM_IMAGE}:v0.32.0", min_length=1)
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", alias="pullPolicy")


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, alias="tolerationSeconds")

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class GpuType(_Model):
    resource_name: str = Field("nvidia.com/gpu", alias="resourceName")
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: tuple[Toleration, ...] = ()
    memory_gib: int = Field(0, ge=0, alias="memoryGiB")
    tokens_per_second: float = Field(gt=0, alias="tokensPerSecond")


class Defaults(_Model):
    # /dev/shm for NCCL and data loaders; memory-backed, counted against the pod's memory limit.
    shm_size: str = Field("8Gi", alias="shmSize")
    validate_cpu: str = Field("1", alias="validateCpu")
    validate_memory: str = Field("2Gi", alias="validateMemory")
    validate_backoff_limit: int = Field(2, ge=0, le=10, alias="validateBackoffLimit")
    init_cpu: str = Field("500m", alias="initCpu")
    init_memory: str = Field("1Gi", alias="initMemory")
    # Older clusters reject podReplacementPolicy (k8s < 1.29); switch off there.
    pod_replacement_policy: bool = Field(True, alias="podReplacementPolicy")
    run_as_user: int = Field(1000, ge=1, alias="runAsUser")
    vllm_port: int = Field(8000, alias="vllmPort")
    # No effect since issue 21 (pools: the router's readiness waits for vLLM); accepted for old values.
    vllm_startup_seconds: int = Field(1800, ge=60, alias="vllmStartupSeconds")
    # Safety-net resync of non-terminal jobs, and the pods/log poll while training.
    resync_seconds: float = Field(60, gt=0, alias="resyncSeconds")
    progress_seconds: float = Field(10, gt=0, alias="progressSeconds")
    progress_tail_lines: int = Field(50, ge=1, le=10000, alias="progressTailLines")


class ReferencePolicy(_Model):
    """Where the evaluator may send a reference API key over plain http: host names, `*.suffix` wildcards,
    IP addresses or CIDRs (e.g. an in-cluster gateway; the embedded cluster allows loopback). Every other
    reference endpoint must be https; link-local and metadata addresses are refused whatever this says."""

    allow_plain_http_hosts: tuple[str, ...] = Field((), alias="allowPlainHttpHosts")

    @field_validator("allow_plain_http_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # FTO_REFERENCE_PLAIN_HTTP_HOSTS="127.0.0.0/8,localhost"
        return (
            [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value
        )


class MlflowDefaults(_Model):
    """MLflow defaults for every job (spec.tracking.mlflow overrides them; docs/tracking.md)."""

    default_tracking_uri: str | None = Field(
        None, alias="defaultTrackingUri", pattern=r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/\S*)?$"
    )
    # Also track jobs without spec.tracking (needs defaultTrackingUri).
    track_all_jobs: bool = Field(False, alias="trackAllJobs")


class TrackingConfig(_Model):
    mlflow: MlflowDefaults = MlflowDefaults()


class OperatorIdentity(_Model):
    """Where the operator's own pods run (the chart fills it in): a ModelServer's NetworkPolicy admits its
    pods' admin port only from these pods. Unset (an operator outside the cluster): no pod is admitted."""

    namespace: str | None = Field(None, max_length=63)
    pod_labels: dict[str, str] = Field(default_factory=dict, alias="podLabels")


class RouterConfig(_Model):
    """The pools' adapter routers. faultInjection: start them with --fault-injection (chaos testing: the admin
    port's PUT /faults makes a version answer errors); off in real installs, on in the dev cluster."""

    fault_injection: bool = Field(False, alias="faultInjection")


class OperatorConfig(_Model):
    images: Images = Images()
    gpu_types: dict[str, GpuType] = Field(alias="gpuTypes")
    defaults: Defaults = Defaults()
    reference: ReferencePolicy = ReferencePolicy()
    tracking: TrackingConfig = TrackingConfig()
    operator: OperatorIdentity = OperatorIdentity()
    router: RouterConfig = RouterConfig()

    def gpu_type(self, name: str) -> GpuType:
        try:
            return self.gpu_types[name]
        except KeyError:
            known = ", ".join(sorted(self.gpu_types))
            raise ConfigError(f"unknown gpuType {name!r}; the operator knows: {known}") from None


_NVIDIA_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

BUILTIN: dict[str, Any] = {
    "images": {},
    "gpuTypes": {
        "a100-40gb": {
            "resourceName": "nvidia.com/gpu",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"},
            "tolerations": [_NVIDIA_TOLERATION],
            "memoryGiB": 40,
            "tokensPerSecond": 2500,
        },
        "a100-80gb": {
            "resourceName": "nvidia.com/gpu",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
            "tolerations": [_NVIDIA_TOLERATION],
            "memoryGiB": 80,
            "tokensPerSecond": 3000,
        },
        "h100-80gb": {
            "resourceName": "nvidia.com/gpu",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [_NVIDIA_TOLERATION],
            "memoryGiB": 80,
            "tokensPerSecond": 6000,
        },
        "cpu": {
            "resourceName": "",
            "nodeSelector": {},
            "tolerations": [],
            "memoryGiB": 0,
            "tokensPerSecond": 200,
        },
    },
    "defaults": {},
}

# Environment overrides: variable → path in the YAML document.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "FTO_TRAINER_IMAGE": ("images", "trainer"),
    "FTO_VLLM_IMAGE": ("images", "vllm"),
    "FTO_IMAGE_PULL_POLICY": ("images", "pullPolicy"),
    "FTO_RESYNC_SECONDS": ("defaults", "resyncSeconds"),
    "FTO_PROGRESS_SECONDS": ("defaults", "progressSeconds"),
    "FTO_POD_REPLACEMENT_POLICY": ("defaults", "podReplacementPolicy"),
    "FTO_REFERENCE_PLAIN_HTTP_HOSTS": ("reference", "allowPlainHttpHosts"),
    "FTO_MLFLOW_TRACKING_URI": ("tracking", "mlflow", "defaultTrackingUri"),
    "FTO_OPERATOR_NAMESPACE": ("operator", "namespace"),
    "FTO_ROUTER_FAULT_INJECTION": ("router", "faultInjection"),
}


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; a GPU-type entry given in the file replaces the built-in one whole."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and key != "gpuTypes":
            merged[key] = _merge(merged[key], value)
        elif key == "gpuTypes" and isinstance(value, Mapping):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def _nested(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    """("a", "b", "c"), v → {"a": {"b": {"c": v}}}."""
    nested: Any = value
    for key in reversed(keys):
        nested = {key: nested}
    return dict(nested)


def _format_error(source: str, error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        parts.append(f"{path}: {item['msg']}")
    return f"{source}: " + "; ".join(parts)


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> OperatorConfig:
    """Built-in defaults ← YAML file (if given or present at the default path) ← FTO_* environment."""
    env = os.environ if env is None else env
    document: dict[str, Any] = dict(BUILTIN)
    source = "built-in defaults"
    if path is None and "FTO_CONFIG" in env:
        path = Path(env["FTO_CONFIG"])
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read operator config: {exc}") from exc
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: operator config must be a mapping, got {type(loaded).__name__}")
        document = _merge(document, loaded)
    for variable, keys in ENV_OVERRIDES.items():
        if variable in env:
            document = _merge(document, _nested(keys, env[variable]))
            source += f" + ${variable}"
    try:
        return OperatorConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from exc
