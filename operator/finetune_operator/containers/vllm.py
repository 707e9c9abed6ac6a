"""The vLLM serving container's parts, from plain values: what a replica runs on (GPUs, CPU KV cache,
resources, placement) and the init container that fetches a model into the pod."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from finetune_vocabulary.images import TRAINER_ENTRYPOINT

from finetune_operator.api.sections import DeploymentResources, ResourcesSpec
from finetune_operator.config import GpuType, OperatorConfig
from finetune_operator.k8s.manifests import (
    Container,
    ContainerPort,
    DeploymentStrategy,
    EnvFromSource,
    EnvVar,
    ResourceRequirements,
    VolumeMount,
)
from finetune_operator.k8s.pods import (
    WORKDIR,
    Placement,
    container_security_context,
    gpu_placement,
    resource_block,
)

VLLM_CONTAINER = "vllm"
# Never ask for an extra GPU during a rollout: one replica stops before its successor starts.
ROLLOUT_STRATEGY: DeploymentStrategy = {
    "type": "RollingUpdate",
    "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
}


MODELS_DIR = "/models"


# LoRA ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


# On CPU, vLLM sizes its KV cache from --gpu-memory-utilization as a fraction of HOST memory, which a pod's
# limit knows nothing about (and which the model's weights alone may exceed), and refuses to start unless
# that fraction of the host (0.92) is free now, page cache and other pods counted as used. An explicit KV
# cache size skips that check (vllm/v1/worker/cpu_worker.py, 0.32.0), so the pod's memory decides instead:
# a quarter goes to the KV cache, the rest to the weights (float32 on CPU) and the runtime.
CPU_KV_CACHE_SHARE = 4


CPU_KV_CACHE_MAX_GIB = 64


_QUANTITY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that is ≥ the adapter's rank."""
    for accepted in VLLM_LORA_RANKS:
        if accepted >= rank:
            return accepted
    raise ValueError(f"LoRA rank {rank} exceeds the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")


def memory_bytes(quantity: int | str | None) -> int | None:
    """Bytes in a Kubernetes memory quantity ("8Gi", "512M", "1e9"); None when unset or unreadable."""
    if not quantity:
        return None
    text, scale = str(quantity).strip(), 1
    for suffix, factor in _QUANTITY_SUFFIXES.items():
        if text.endswith(suffix):
            text, scale = text[: -len(suffix)], factor
            break
    try:
        return int(float(text) * scale)
    except ValueError:
        return None


def cpu_kv_cache_gib(memory: int | str | None) -> int:
    """VLLM_CPU_KVCACHE_SPACE (whole GiB) for a CPU replica with this memory limit: a quarter, at least 1."""
    total = memory_bytes(memory)
    if total is None:
        return 1
    return max(1, min(CPU_KV_CACHE_MAX_GIB, total // CPU_KV_CACHE_SHARE // 2**30))


@dataclass(frozen=True)
class VllmCompute:
    """What one vLLM replica runs on; the same for a job's Deployment and a ModelServer pool."""

    gpus: int  # GPUs it gets: 0 on a GPU type without GPUs, whatever was asked
    env: list[dict[str, str]]  # on CPU: the KV cache size, from the replica's own memory limit
    args: list[str]  # --tensor-parallel-size across the replica's GPUs
    resources: ResourceRequirements
    placement: Placement  # the GPU type's nodeSelector and tolerations (none on CPU), then the user's
    note: str | None  # why GPUs that were asked for are not used


def vllm_compute(
    gpus: int,
    gpu_type_name: str,
    gpu_type: GpuType,
    replica: DeploymentResources | None,
    extra_args: Sequence[str] | None,
    user_placement: ResourcesSpec | None,
) -> VllmCompute:
    """Resources, placement, CPU settings and parallelism of a vLLM replica with `gpus` of `gpu_type`."""
    # A type without a device resource (the operator's GPU table decides, at run time) has no GPUs to give.
    granted = gpus if gpu_type.resource_name else 0
    note = None
    if granted < gpus:
        note = f"gpuType {gpu_type_name} has no GPUs in the operator's table: serving on CPU, not {gpus} GPUs"
    memory = replica.memory if replica else None
    env = []
    if granted == 0 and not any(str(arg).startswith("--kv-cache-memory") for arg in extra_args or ()):
        env.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(cpu_kv_cache_gib(memory))})
    return VllmCompute(
        gpus=granted,
        env=env,
        args=["--tensor-parallel-size", str(granted)] if granted > 1 else [],
        resources=resource_block(replica.cpu if replica else None, memory, granted, gpu_type),
        placement=gpu_placement(gpu_type, granted, user_placement),
        note=note,
    )


def fetch_container(
    config: OperatorConfig, name: str, source: str, dest: str, env_from: list[EnvFromSource]
) -> dict[str, Any]:
    """An init container that fetches a model into the pod (per-job Deployments and ModelServer pools)."""
    container: dict[str, Any] = {
        "name": name,
        "image": config.images.trainer,
        "imagePullPolicy": config.images.pull_policy,
        # Paths go in args (command names the program): runtimes that remap volume paths rewrite args only.
        "command": list(TRAINER_ENTRYPOINT),
        "args": ["fetch", source, dest],
        "env": [
            {"name": "HOME", "value": WORKDIR},
            {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
        ],
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR},
            {"name": "workspace", "mountPath": WORKDIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "resources": {
            "requests": {"cpu": config.defaults.init_cpu, "memory": config.defaults.init_memory},
            "limits": {"memory": config.defaults.init_memory},
        },
        "securityContext": container_security_context(),
    }
    if env_from:
        container["envFrom"] = env_from
    return container


def vllm_container(
    config: OperatorConfig,
    compute: VllmCompute,
    args: Sequence[str],
    mounts: Sequence[VolumeMount],
    port: ContainerPort,
    extra_env: Sequence[EnvVar] = (),
    env_from: Sequence[EnvFromSource] = (),
) -> Container:
    """The one vLLM serving container: image, cache env, `args`, the replica's compute, read-only root.
    No probes of its own: a pool's readiness is its adapter router's (vLLM healthy, adapters loaded)."""
    container: Container = {
        "name": VLLM_CONTAINER,
        "image": config.images.vllm,
        "imagePullPolicy": config.images.pull_policy,
        "args": list(args),
        "env": [
            {"name": "HOME", "value": WORKDIR},
            {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
            {"name": "XDG_CACHE_HOME", "value": f"{WORKDIR}/.cache"},
            {"name": "VLLM_CACHE_ROOT", "value": f"{WORKDIR}/.cache/vllm"},
            *extra_env,
            *cast(list[EnvVar], compute.env),
        ],
        "ports": [port],
        "volumeMounts": list(mounts),
        "securityContext": container_security_context(),
        # A vLLM that exits at start-up (bad args, too little memory) says why in the pod's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env_from:
        container["envFrom"] = list(env_from)
    if compute.resources:
        container["resources"] = compute.resources
    return container
