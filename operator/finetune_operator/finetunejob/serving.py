"""Pure builders of the serving children: the vLLM Deployment (base + LoRA adapter, or merged weights) and
its Service. Like builders.py, each returns a plain dict and talks to nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary.images import TRAINER_ENTRYPOINT
from finetune_vocabulary.labels import ANNOTATION_SPEC_HASH

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.api.sections import DeploymentResources, ResourcesSpec
from finetune_operator.config import GpuType, OperatorConfig
from finetune_operator.finetunejob.ref import Artifacts, JobRef
from finetune_operator.k8s.naming import child_name
from finetune_operator.k8s.pods import (
    WORKDIR,
    container_security_context,
    credentials_env_from,
    gpu_placement,
    labels,
    metadata,
    pod_security_context,
    priority_class,
    resource_block,
    scratch_volumes,
    selector_labels,
    service_account,
    spec_hash,
)

VLLM_CONTAINER = "vllm"
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


def serving_mode(spec: FineTuneJobSpec) -> str:
    """adapter or merged; auto serves adapters for lora/qlora and the merged model for full."""
    if spec.deployment.mode != "auto":
        return spec.deployment.mode
    return "merged" if spec.method == "full" else "adapter"


def needs_export(spec: FineTuneJobSpec, artifacts: Artifacts) -> bool:
    return spec.deployment.enabled and serving_mode(spec) == "merged" and not artifacts.merged


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
    resources: dict[str, dict[str, str]]
    placement: dict[str, Any]  # the GPU type's nodeSelector and tolerations (none on CPU), then the user's
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


def job_vllm_compute(job: JobRef, config: OperatorConfig) -> VllmCompute:
    deployment = job.spec.deployment
    type_name = deployment.gpu_type or job.spec.resources.gpu_type
    return vllm_compute(
        deployment.gpus,
        type_name,
        config.gpu_type(type_name),
        deployment.resources,
        deployment.extra_args,
        job.spec.resources,
    )


def served_model_name(job: JobRef) -> str:
    return job.spec.deployment.served_model_name or job.name


def service_name(job: JobRef) -> str:
    return child_name(job.name, Stage.SERVE)


def endpoint_url(job: JobRef, config: OperatorConfig) -> str:
    return f"http://{service_name(job)}.{job.namespace}.svc:{config.defaults.vllm_port}/v1"


def fetch_container(
    config: OperatorConfig, name: str, source: str, dest: str, env_from: list[dict[str, Any]]
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


class _ModelSource:
    """Where vLLM reads the weights: init-container fetches, extra volumes and the model arguments."""

    def __init__(self) -> None:
        self.fetches: list[tuple[str, str, str]] = []
        self.volumes: list[dict[str, Any]] = [{"name": "models", "emptyDir": {}}]
        self.mounts: list[dict[str, Any]] = [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True}]
        self.args: list[str] = []

    def merged(self, job: JobRef, artifacts: Artifacts) -> None:
        if not artifacts.merged:
            raise ValueError("merged serving needs a merged model; run export first")
        self.fetches.append(("fetch-model", artifacts.merged.rstrip("/"), f"{MODELS_DIR}/merged"))
        self.args += ["--model", f"{MODELS_DIR}/merged", "--served-model-name", served_model_name(job)]

    def adapter(self, job: JobRef, artifacts: Artifacts) -> None:
        if not artifacts.adapter:
            raise ValueError("adapter serving needs the trained adapter")
        base, served = job.spec.base_model, served_model_name(job)
        if base.uri.startswith("hf://"):
            self.args += ["--model", base.uri.removeprefix("hf://")]
            if base.revision:
                self.args += ["--revision", base.revision]
        elif base.uri.startswith("pvc://"):
            claim, _, path = base.uri.removeprefix("pvc://").partition("/")
            self.volumes.append(
                {"name": "base-model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
            )
            self.mounts.append({"name": "base-model", "mountPath": f"{MODELS_DIR}-pvc", "readOnly": True})
            self.args += ["--model", f"{MODELS_DIR}-pvc/{path}".rstrip("/")]
        else:
            self.fetches.append(("fetch-base", base.uri.rstrip("/"), f"{MODELS_DIR}/base"))
            self.args += ["--model", f"{MODELS_DIR}/base"]
        self.fetches.append(("fetch-adapter", artifacts.adapter.rstrip("/"), f"{MODELS_DIR}/adapter"))
        # The base is reachable as "<served>-base"; the tuned adapter answers to the served name.
        self.args += [
            "--served-model-name",
            f"{served}-base",
            "--enable-lora",
            "--lora-modules",
            f"{served}={MODELS_DIR}/adapter",
            "--max-lora-rank",
            str(vllm_lora_rank(job.spec.lora.rank)),
        ]


def _vllm_container(
    job: JobRef, config: OperatorConfig, args: list[str], mounts: list[dict[str, Any]], compute: VllmCompute
) -> dict[str, Any]:
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container: dict[str, Any] = {
        "name": VLLM_CONTAINER,
        "image": config.images.vllm,
        "imagePullPolicy": config.images.pull_policy,
        "args": args,
        "env": [
            {"name": "HOME", "value": WORKDIR},
            {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
            {"name": "XDG_CACHE_HOME", "value": f"{WORKDIR}/.cache"},
            {"name": "VLLM_CACHE_ROOT", "value": f"{WORKDIR}/.cache/vllm"},
            *compute.env,
        ],
        "ports": [{"name": "http", "containerPort": config.defaults.vllm_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # A vLLM that exits at start-up (bad args, too little memory) says why in the pod's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # Loading weights can take long; the startup probe holds readiness and liveness until /health answers.
        "startupProbe": {
            **health,
            "periodSeconds": 10,
            "failureThreshold": max(1, config.defaults.vllm_startup_seconds // 10),
        },
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 15, "failureThreshold": 4},
    }
    env_from = credentials_env_from(job)
    if env_from and job.spec.base_model.uri.startswith("hf://"):
        container["envFrom"] = env_from  # HF_TOKEN for a gated base model
    if compute.resources:
        container["resources"] = compute.resources
    return container


def serving_deployment(job: JobRef, config: OperatorConfig, artifacts: Artifacts) -> dict[str, Any]:
    """vLLM serving the tuned model: base + LoRA adapter, or the merged weights."""
    deployment = job.spec.deployment
    compute = job_vllm_compute(job, config)
    source = _ModelSource()
    if serving_mode(job.spec) == "merged":
        source.merged(job, artifacts)
    else:
        source.adapter(job, artifacts)
    args = ["--host", "0.0.0.0", "--port", str(config.defaults.vllm_port), *source.args]
    if deployment.max_model_len:
        args += ["--max-model-len", str(deployment.max_model_len)]
    args += [*compute.args, *(deployment.extra_args or [])]

    volumes, mounts = scratch_volumes(config.defaults.shm_size)
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(config),
        "initContainers": [
            fetch_container(config, *fetch, credentials_env_from(job)) for fetch in source.fetches
        ],
        "containers": [_vllm_container(job, config, args, mounts + source.mounts, compute)],
        "volumes": volumes + source.volumes,
        **service_account(job),
        **compute.placement,
        **priority_class(job),
    }
    spec: dict[str, Any] = {
        "replicas": deployment.replicas,
        "selector": {"matchLabels": selector_labels(job, Stage.SERVE)},
        # Never ask for an extra GPU during a rollout.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        "template": {"metadata": {"labels": labels(job, Stage.SERVE)}, "spec": pod_spec},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(job, Stage.SERVE, {ANNOTATION_SPEC_HASH: spec_hash(spec)}),
        "spec": spec,
    }


def serving_service(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    port = config.defaults.vllm_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, Stage.SERVE),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(job, Stage.SERVE),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
