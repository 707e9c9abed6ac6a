"""Pure manifest builders for a FineTuneJob's children: one Job per pipeline stage, the vLLM Deployment and
its Service. Each takes the job (its parsed spec) and the operator config and returns a plain dict; nothing
here talks to the API. Shared pieces (labels, placement, volumes) are in podspec.py.
"""

from __future__ import annotations

import json
from typing import Any

from finetune_vocabulary.exitcodes import PERMANENT_EXIT_CODES
from finetune_vocabulary.images import TRAINER_ENTRYPOINT
from finetune_vocabulary.labels import ANNOTATION_SPEC_HASH, LABEL_QUEUE

from .config import GpuType, OperatorConfig
from .models import FineTuneJobSpec, spec_to_dict
from .naming import Stage, child_name
from .podspec import (
    WORKDIR,
    container_security_context,
    credentials_env_from,
    gpu_placement,
    labels,
    metadata,
    pod_security_context,
    priority_class,
    pvc_volumes,
    resource_block,
    scratch_volumes,
    selector_labels,
    service_account,
    spec_hash,
)
from .ref import Artifacts, JobRef

TRAINER_CONTAINER = "trainer"
VLLM_CONTAINER = "vllm"
TERMINATION_LOG = "/dev/termination-log"
MODELS_DIR = "/models"
# What a container killed by the kernel's OOM killer (SIGKILL) exits with; kubelet reports reason OOMKilled,
# but a podFailurePolicy can match only exit codes and pod conditions, so the rule matches 137.
OOM_KILLED_EXIT_CODE = 137
# LoRA ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def trainer_config(job: JobRef) -> dict[str, Any]:
    """The FTJ_CONFIG document (CONTRACT.md): the spec as the API server stores it, defaults applied."""
    return {
        "runPrefix": job.run_prefix,
        "job": {"namespace": job.namespace, "name": job.name, "uid": job.uid},
        "spec": spec_to_dict(job.spec),
    }


def _trainer_env(job: JobRef, stage: Stage) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {
            "name": "FTJ_CONFIG",
            "value": json.dumps(trainer_config(job), sort_keys=True, separators=(",", ":")),
        },
        {"name": "FTJ_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "FTJ_WORKDIR", "value": WORKDIR},
        {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
        {"name": "HOME", "value": WORKDIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    reference = job.spec.evaluation.reference
    if stage is Stage.EVALUATE and reference is not None and reference.api_key_secret is not None:
        secret = reference.api_key_secret
        env.append(
            {
                "name": "FTJ_REFERENCE_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}},
            }
        )
    return env


# --- Jobs --------------------------------------------------------------------------------------


def pod_failure_policy() -> dict[str, Any]:
    """Every stage: evictions and preemptions do not spend the retry budget; bad data, bad config and OOM
    (the trainer's own code 12, or the kernel's OOM kill, exit 137) fail the Job at once."""
    return {
        "rules": [
            # First, so a pod killed (137) after a preemption's grace period is still only a disruption.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": TRAINER_CONTAINER,
                    "operator": "In",
                    "values": [*(int(code) for code in PERMANENT_EXIT_CODES), OOM_KILLED_EXIT_CODE],
                },
            },
        ]
    }


def _trainer_container(
    job: JobRef, config: OperatorConfig, stage: Stage, resources: dict[str, dict[str, str]], shm: str | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    volumes, mounts = scratch_volumes(shm)
    claim_volumes, claim_mounts, claim_env = pvc_volumes(job)
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": config.images.trainer,
        "imagePullPolicy": config.images.pull_policy,
        # Also with several GPUs: the CLI relaunches `train` under torch.distributed.run itself and exits with
        # rank 0's contract code; a torchrun wrapper would turn OUT_OF_MEMORY/PREEMPTED into exit 1.
        "command": [*TRAINER_ENTRYPOINT, stage.value],
        "env": _trainer_env(job, stage) + claim_env,
        "volumeMounts": mounts + claim_mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        # The trainer writes its JSON summary there; if it dies before, the log tail explains why.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    env_from = credentials_env_from(job)
    if env_from:
        container["envFrom"] = env_from
    if resources:
        container["resources"] = resources
    return container, volumes + claim_volumes


def _stage_job(
    job: JobRef,
    config: OperatorConfig,
    stage: Stage,
    *,
    resources: dict[str, dict[str, str]],
    placement: dict[str, Any],
    backoff_limit: int,
    shm: str | None,
    extra_spec: dict[str, Any] | None = None,
    extra_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    container, volumes = _trainer_container(job, config, stage, resources, shm)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(config),
        "containers": [container],
        "volumes": volumes,
        **service_account(job),
        **placement,
        **(priority_class(job) if stage is not Stage.VALIDATE else {}),
    }
    job_spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": {"labels": labels(job, stage) | (extra_labels or {})}, "spec": pod_spec},
        **(extra_spec or {}),
    }
    if config.defaults.pod_replacement_policy:
        # A replacement starts only once the old pod is gone, so two trainers never write one checkpoint.
        job_spec["podReplacementPolicy"] = "Failed"
    manifest_meta = metadata(job, stage)
    manifest_meta["labels"] = manifest_meta["labels"] | (extra_labels or {})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": manifest_meta, "spec": job_spec}


def _gpu_type(config: OperatorConfig, name: str | None, spec: FineTuneJobSpec) -> GpuType:
    return config.gpu_type(name or spec.resources.gpu_type)


def validation_job(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """CPU-only: it never requests a GPU, whatever the spec asks for training."""
    cpu_only = config.gpu_types.get("cpu") or _gpu_type(config, None, job.spec)
    return _stage_job(
        job,
        config,
        Stage.VALIDATE,
        resources=resource_block(config.defaults.validate_cpu, config.defaults.validate_memory, 0, cpu_only),
        placement={},
        backoff_limit=config.defaults.validate_backoff_limit,
        shm=None,
    )


def training_job(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    resources = job.spec.resources
    gpu_type = _gpu_type(config, None, job.spec)
    extra_spec: dict[str, Any] = {}
    if job.spec.active_deadline_seconds:
        extra_spec["activeDeadlineSeconds"] = job.spec.active_deadline_seconds
    if resources.queue_name:
        extra_spec["suspend"] = True  # Kueue admits a queued Job by unsuspending it.
    return _stage_job(
        job,
        config,
        Stage.TRAIN,
        resources=resource_block(resources.cpu, resources.memory, resources.gpus, gpu_type),
        placement=gpu_placement(gpu_type, resources.gpus, resources),
        backoff_limit=job.spec.max_retries,
        shm=config.defaults.shm_size,
        extra_spec=extra_spec,
        extra_labels={LABEL_QUEUE: resources.queue_name} if resources.queue_name else None,
    )


def evaluation_job(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """One GPU of the training type when training had GPUs (generation for tuned and base)."""
    resources = job.spec.resources
    gpus = min(resources.gpus, 1)
    gpu_type = _gpu_type(config, None, job.spec)
    return _stage_job(
        job,
        config,
        Stage.EVALUATE,
        resources=resource_block(resources.cpu, resources.memory, gpus, gpu_type),
        placement=gpu_placement(gpu_type, gpus, resources),
        backoff_limit=job.spec.max_retries,
        shm=config.defaults.shm_size if gpus else None,
    )


def export_job(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """Merge the adapter into the base weights (for merged serving of a LoRA/QLoRA run)."""
    resources = job.spec.resources
    gpus = min(resources.gpus, 1)
    gpu_type = _gpu_type(config, None, job.spec)
    return _stage_job(
        job,
        config,
        Stage.EXPORT,
        resources=resource_block(resources.cpu, resources.memory, gpus, gpu_type),
        placement=gpu_placement(gpu_type, gpus, resources),
        backoff_limit=job.spec.max_retries,
        shm=None,
    )


# --- Serving -----------------------------------------------------------------------------------


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


def served_model_name(job: JobRef) -> str:
    return job.spec.deployment.served_model_name or job.name


def service_name(job: JobRef) -> str:
    return child_name(job.name, Stage.SERVE)


def endpoint_url(job: JobRef, config: OperatorConfig) -> str:
    return f"http://{service_name(job)}.{job.namespace}.svc:{config.defaults.vllm_port}/v1"


def _fetch_container(
    job: JobRef, config: OperatorConfig, name: str, source: str, dest: str
) -> dict[str, Any]:
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
    env_from = credentials_env_from(job)
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
    job: JobRef, config: OperatorConfig, args: list[str], mounts: list[dict[str, Any]], gpu_type: GpuType
) -> dict[str, Any]:
    deployment = job.spec.deployment
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
        ],
        "ports": [{"name": "http", "containerPort": config.defaults.vllm_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
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
    replica = deployment.resources
    resources = resource_block(
        replica.cpu if replica else None, replica.memory if replica else None, deployment.gpus, gpu_type
    )
    if resources:
        container["resources"] = resources
    return container


def serving_deployment(job: JobRef, config: OperatorConfig, artifacts: Artifacts) -> dict[str, Any]:
    """vLLM serving the tuned model: base + LoRA adapter, or the merged weights."""
    deployment = job.spec.deployment
    gpu_type = _gpu_type(config, deployment.gpu_type, job.spec)
    source = _ModelSource()
    if serving_mode(job.spec) == "merged":
        source.merged(job, artifacts)
    else:
        source.adapter(job, artifacts)
    args = ["--host", "0.0.0.0", "--port", str(config.defaults.vllm_port), *source.args]
    if deployment.max_model_len:
        args += ["--max-model-len", str(deployment.max_model_len)]
    if deployment.gpus > 1:
        args += ["--tensor-parallel-size", str(deployment.gpus)]
    args += list(deployment.extra_args or [])

    volumes, mounts = scratch_volumes(config.defaults.shm_size)
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(config),
        "initContainers": [_fetch_container(job, config, *fetch) for fetch in source.fetches],
        "containers": [_vllm_container(job, config, args, mounts + source.mounts, gpu_type)],
        "volumes": volumes + source.volumes,
        **service_account(job),
        **gpu_placement(gpu_type, deployment.gpus, job.spec.resources),
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
