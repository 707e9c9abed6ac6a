"""Pure manifest builders for a FineTuneJob's children (Jobs, the vLLM Deployment and its Service).

Every function takes the job (name, namespace, uid, its defaulted camelCase spec) and the operator
config and returns a plain dict; nothing here talks to the API.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import GpuType, OperatorConfig
from .naming import Stage, child_name, label_safe

API_GROUP = "finetune.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "FineTuneJob"
MANAGER = "finetune-operator"

LABEL_JOB_UID = f"{API_GROUP}/job-uid"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SPEC_HASH = f"{API_GROUP}/spec-hash"

TRAINER_CONTAINER = "trainer"
VLLM_CONTAINER = "vllm"
WORKDIR = "/workspace"
TERMINATION_LOG = "/dev/termination-log"
MODELS_DIR = "/models"
PVC_ROOT = "/mnt/pvc"  # the trainer's default FTJ_PVC_ROOT (CONTRACT.md)
# Spec fields that may name a pvc:// source; storage.output is s3:// only, so every claim mounts read-only.
PVC_SOURCES = (("baseModel", "uri"), ("dataset", "train"), ("dataset", "validation"), ("dataset", "test"))

# Trainer exit codes that no retry can fix (CONTRACT.md): invalid data, invalid config, out of memory.
PERMANENT_EXIT_CODES = (10, 11, 12)
# LoRA ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class JobRef:
    """The parts of a FineTuneJob the builders need; `spec` is camelCase with defaults applied."""

    namespace: str
    name: str
    uid: str
    spec: Mapping[str, Any] = field(default_factory=dict)

    def section(self, key: str) -> Mapping[str, Any]:
        value = self.spec.get(key)
        return value if isinstance(value, Mapping) else {}

    @property
    def run_prefix(self) -> str:
        output = str(self.section("storage").get("output", "")).rstrip("/")
        return f"{output}/{self.namespace}/{self.name}/{self.uid}"


@dataclass(frozen=True)
class Artifacts:
    """What training (or export) left in storage, from the trainer's termination summaries."""

    adapter: str | None = None
    merged: str | None = None


# --- small helpers -----------------------------------------------------------------------------


def labels(job: JobRef, stage: Stage) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetunejob",
        "app.kubernetes.io/instance": label_safe(job.name),
        "app.kubernetes.io/component": stage.value,
        "app.kubernetes.io/part-of": "finetune-operator",
        "app.kubernetes.io/managed-by": MANAGER,
        LABEL_JOB_UID: job.uid,
    }


def selector_labels(job: JobRef, stage: Stage) -> dict[str, str]:
    return {
        "app.kubernetes.io/instance": label_safe(job.name),
        "app.kubernetes.io/component": stage.value,
        LABEL_JOB_UID: job.uid,
    }


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(job: JobRef, stage: Stage, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": child_name(job.name, stage),
        "namespace": job.namespace,
        "labels": labels(job, stage),
        "ownerReferences": [owner_reference(job)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def spec_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def pod_security_context(config: OperatorConfig) -> dict[str, Any]:
    uid = config.defaults.run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def credentials_env_from(job: JobRef) -> list[dict[str, Any]]:
    """Storage credentials by reference only: the operator never reads the Secret."""
    secret = job.section("storage").get("credentialsSecret")
    return [{"secretRef": {"name": secret}}] if secret else []


def service_account(job: JobRef) -> dict[str, Any]:
    account = job.section("storage").get("serviceAccountName")
    # No API token in pods unless a workload-identity service account is asked for.
    if account:
        return {"serviceAccountName": account}
    return {"automountServiceAccountToken": False}


def merge_tolerations(*groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    for group in groups:
        for toleration in group:
            item = dict(toleration)
            if item not in merged:
                merged.append(item)
    return merged


def gpu_placement(gpu_type: GpuType, gpus: int, user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """nodeSelector + tolerations: the GPU type's, then the user's (the user's keys win)."""
    user = user or {}
    selector: dict[str, str] = dict(gpu_type.node_selector) if gpus > 0 else {}
    selector.update(user.get("nodeSelector") or {})
    gpu_tolerations = [t.manifest() for t in gpu_type.tolerations] if gpus > 0 else []
    tolerations = merge_tolerations(gpu_tolerations, user.get("tolerations") or [])
    placement: dict[str, Any] = {}
    if selector:
        placement["nodeSelector"] = selector
    if tolerations:
        placement["tolerations"] = tolerations
    return placement


def resource_block(
    cpu: str | None, memory: str | None, gpus: int, gpu_type: GpuType
) -> dict[str, dict[str, str]]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu:
        requests["cpu"] = str(cpu)
    if memory:
        requests["memory"] = limits["memory"] = str(memory)
    if gpus > 0 and gpu_type.resource_name:
        requests[gpu_type.resource_name] = limits[gpu_type.resource_name] = str(gpus)
    block: dict[str, dict[str, str]] = {}
    if requests:
        block["requests"] = requests
    if limits:
        block["limits"] = limits
    return block


def _volumes(shm: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "workspace", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "workspace", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def pvc_claims(job: JobRef) -> list[str]:
    """The claims the spec's pvc:// sources name, in first-seen order."""
    claims: list[str] = []
    for section, key in PVC_SOURCES:
        uri = job.section(section).get(key)
        if isinstance(uri, str) and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").partition("/")[0]
            if claim and claim not in claims:
                claims.append(claim)
    return claims


def pvc_env_name(claim: str) -> str:
    """`my-models` → `FTJ_PVC_MY_MODELS`, as the trainer's storage.pvc_mount() looks it up."""
    return "FTJ_PVC_" + re.sub(r"[^A-Za-z0-9]", "_", claim).upper()


def _pvc_volumes(job: JobRef) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes, read-only mounts at /mnt/pvc/<claim> and FTJ_PVC_<CLAIM> variables for the spec's claims."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    env: list[dict[str, Any]] = []
    for index, claim in enumerate(pvc_claims(job)):
        name, path = f"pvc-{index}", f"{PVC_ROOT}/{claim}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
        env.append({"name": pvc_env_name(claim), "value": path})
    return volumes, mounts, env


def trainer_config(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """The FTJ_CONFIG document (CONTRACT.md): the spec, plus the platform's policy the spec cannot change."""
    return {
        "runPrefix": job.run_prefix,
        "job": {"namespace": job.namespace, "name": job.name, "uid": job.uid},
        "spec": dict(job.spec),
        "referencePolicy": {"allowPlainHttpHosts": list(config.reference.allow_plain_http_hosts)},
    }


def _trainer_env(job: JobRef, stage: Stage, config: OperatorConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {
            "name": "FTJ_CONFIG",
            "value": json.dumps(trainer_config(job, config), sort_keys=True, separators=(",", ":")),
        },
        {"name": "FTJ_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "FTJ_WORKDIR", "value": WORKDIR},
        {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
        {"name": "HOME", "value": WORKDIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    reference = job.section("evaluation").get("reference")
    if stage is Stage.EVALUATE and isinstance(reference, Mapping):
        secret = reference.get("apiKeySecret")
        if isinstance(secret, Mapping) and secret.get("name"):
            env.append(
                {
                    "name": "FTJ_REFERENCE_API_KEY",
                    "valueFrom": {
                        "secretKeyRef": {"name": secret["name"], "key": secret.get("key", "apiKey")}
                    },
                }
            )
    return env


# --- Jobs --------------------------------------------------------------------------------------


def _stage_job(
    job: JobRef,
    config: OperatorConfig,
    stage: Stage,
    *,
    command: list[str],
    resources: dict[str, dict[str, str]],
    placement: dict[str, Any],
    backoff_limit: int,
    shm: str | None,
    extra_spec: Mapping[str, Any] | None = None,
    extra_pod: Mapping[str, Any] | None = None,
    extra_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    volumes, mounts = _volumes(shm)
    pvc_volumes, pvc_mounts, pvc_env = _pvc_volumes(job)
    volumes += pvc_volumes
    mounts += pvc_mounts
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": config.images.trainer,
        "imagePullPolicy": config.images.pull_policy,
        "command": command,
        "env": _trainer_env(job, stage, config) + pvc_env,
        "volumeMounts": mounts,
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
    pod_labels = labels(job, stage) | dict(extra_labels or {})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(config),
        "containers": [container],
        "volumes": volumes,
        **service_account(job),
        **placement,
        **dict(extra_pod or {}),
    }
    job_spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "podFailurePolicy": {
            "rules": [
                # Evictions and preemptions do not spend the retry budget; training resumes from a checkpoint.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": list(PERMANENT_EXIT_CODES),
                    },
                },
            ]
        },
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        **dict(extra_spec or {}),
    }
    if config.defaults.pod_replacement_policy:
        # A replacement starts only once the old pod is gone, so two trainers never write one checkpoint.
        job_spec["podReplacementPolicy"] = "Failed"
    manifest_meta = metadata(job, stage)
    manifest_meta["labels"] = manifest_meta["labels"] | dict(extra_labels or {})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": manifest_meta, "spec": job_spec}


def _trainer_command(subcommand: str) -> list[str]:
    # Also with several GPUs: the CLI relaunches `train` under torch.distributed.run itself and exits with
    # rank 0's contract code; a torchrun wrapper would turn OUT_OF_MEMORY/PREEMPTED into exit 1 (CONTRACT.md).
    return ["python", "-m", "finetune_trainer", subcommand]


def _gpus(job: JobRef) -> int:
    return int(job.section("resources").get("gpus", 1))


def _gpu_type(job: JobRef, config: OperatorConfig, section: str = "resources") -> GpuType:
    name = job.section(section).get("gpuType") or job.section("resources").get("gpuType") or "a100-80gb"
    return config.gpu_type(str(name))


def validation_job(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """CPU-only: it never requests a GPU, whatever the spec asks for training."""
    cpu_only = config.gpu_types.get("cpu") or _gpu_type(job, config)
    return _stage_job(
        job,
        config,
        Stage.VALIDATE,
        command=_trainer_command("validate"),
        resources=resource_block(config.defaults.validate_cpu, config.defaults.validate_memory, 0, cpu_only),
        placement={},
        backoff_limit=config.defaults.validate_backoff_limit,
        shm=None,
    )


def training_job(job: JobRef, config: OperatorConfig, *, suspend: bool = False) -> dict[str, Any]:
    resources = job.section("resources")
    gpus = _gpus(job)
    gpu_type = _gpu_type(job, config)
    queue = resources.get("queueName")
    extra_spec: dict[str, Any] = {}
    deadline = job.spec.get("activeDeadlineSeconds")
    if deadline:
        extra_spec["activeDeadlineSeconds"] = int(deadline)
    if queue or suspend:
        # Kueue admits a queued Job by unsuspending it.
        extra_spec["suspend"] = True
    extra_pod: dict[str, Any] = {}
    if resources.get("priorityClassName"):
        extra_pod["priorityClassName"] = resources["priorityClassName"]
    return _stage_job(
        job,
        config,
        Stage.TRAIN,
        command=_trainer_command("train"),
        resources=resource_block(resources.get("cpu"), resources.get("memory"), gpus, gpu_type),
        placement=gpu_placement(gpu_type, gpus, resources),
        backoff_limit=int(job.spec.get("maxRetries", 3)),
        shm=config.defaults.shm_size,
        extra_spec=extra_spec,
        extra_pod=extra_pod,
        extra_labels={LABEL_QUEUE: str(queue)} if queue else None,
    )


def evaluation_job(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """One GPU of the training type when training had GPUs (generation for tuned and base)."""
    resources = job.section("resources")
    gpus = min(_gpus(job), 1)
    gpu_type = _gpu_type(job, config)
    extra_pod = (
        {"priorityClassName": resources["priorityClassName"]} if resources.get("priorityClassName") else {}
    )
    return _stage_job(
        job,
        config,
        Stage.EVALUATE,
        command=_trainer_command("evaluate"),
        resources=resource_block(resources.get("cpu"), resources.get("memory"), gpus, gpu_type),
        placement=gpu_placement(gpu_type, gpus, resources),
        backoff_limit=int(job.spec.get("maxRetries", 3)),
        shm=config.defaults.shm_size if gpus else None,
        extra_pod=extra_pod,
    )


def export_job(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """Merge the adapter into the base weights (for merged serving of a LoRA/QLoRA run)."""
    resources = job.section("resources")
    gpus = min(_gpus(job), 1)
    gpu_type = _gpu_type(job, config)
    return _stage_job(
        job,
        config,
        Stage.EXPORT,
        command=_trainer_command("export"),
        resources=resource_block(resources.get("cpu"), resources.get("memory"), gpus, gpu_type),
        placement=gpu_placement(gpu_type, gpus, resources),
        backoff_limit=int(job.spec.get("maxRetries", 3)),
        shm=None,
    )


# --- Serving -----------------------------------------------------------------------------------


def serving_mode(spec: Mapping[str, Any]) -> str:
    """adapter or merged; auto serves adapters for lora/qlora and the merged model for full."""
    deployment = spec.get("deployment") or {}
    mode = str(deployment.get("mode", "auto"))
    if mode != "auto":
        return mode
    return "merged" if spec.get("method", "lora") == "full" else "adapter"


def needs_export(spec: Mapping[str, Any], artifacts: Artifacts) -> bool:
    deployment = spec.get("deployment") or {}
    enabled = bool(deployment.get("enabled", True))
    return enabled and serving_mode(spec) == "merged" and not artifacts.merged


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that is ≥ the adapter's rank."""
    for accepted in VLLM_LORA_RANKS:
        if accepted >= rank:
            return accepted
    raise ValueError(f"LoRA rank {rank} exceeds the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")


def served_model_name(job: JobRef) -> str:
    return str(job.section("deployment").get("servedModelName") or job.name)


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
        "command": ["python", "-m", "finetune_trainer"],
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


def serving_deployment(job: JobRef, config: OperatorConfig, artifacts: Artifacts) -> dict[str, Any]:
    """vLLM serving the tuned model: base + LoRA adapter, or the merged weights."""
    deployment = job.section("deployment")
    base = job.section("baseModel")
    port = config.defaults.vllm_port
    served = served_model_name(job)
    gpus = int(deployment.get("gpus", 1))
    gpu_type = _gpu_type(job, config, "deployment")
    mode = serving_mode(job.spec)

    fetches: list[tuple[str, str, str]] = []
    volumes, mounts = _volumes(config.defaults.shm_size)
    volumes.append({"name": "models", "emptyDir": {}})
    mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    args = ["--host", "0.0.0.0", "--port", str(port)]

    if mode == "merged":
        if not artifacts.merged:
            raise ValueError("merged serving needs a merged model; run export first")
        fetches.append(("fetch-model", artifacts.merged.rstrip("/"), f"{MODELS_DIR}/merged"))
        args += ["--model", f"{MODELS_DIR}/merged", "--served-model-name", served]
    else:
        if not artifacts.adapter:
            raise ValueError("adapter serving needs the trained adapter")
        uri = str(base.get("uri", ""))
        if uri.startswith("hf://"):
            args += ["--model", uri.removeprefix("hf://")]
            if base.get("revision"):
                args += ["--revision", str(base["revision"])]
        elif uri.startswith("pvc://"):
            claim, _, path = uri.removeprefix("pvc://").partition("/")
            volumes.append(
                {"name": "base-model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
            )
            mounts.append({"name": "base-model", "mountPath": f"{MODELS_DIR}-pvc", "readOnly": True})
            args += ["--model", f"{MODELS_DIR}-pvc/{path}".rstrip("/")]
        else:
            fetches.append(("fetch-base", uri.rstrip("/"), f"{MODELS_DIR}/base"))
            args += ["--model", f"{MODELS_DIR}/base"]
        fetches.append(("fetch-adapter", artifacts.adapter.rstrip("/"), f"{MODELS_DIR}/adapter"))
        rank = int(job.section("lora").get("rank", 16))
        # The base is reachable as "<served>-base"; the tuned adapter answers to the served name.
        args += [
            "--served-model-name",
            f"{served}-base",
            "--enable-lora",
            "--lora-modules",
            f"{served}={MODELS_DIR}/adapter",
            "--max-lora-rank",
            str(vllm_lora_rank(rank)),
        ]
    if deployment.get("maxModelLen"):
        args += ["--max-model-len", str(deployment["maxModelLen"])]
    if gpus > 1:
        args += ["--tensor-parallel-size", str(gpus)]
    args += [str(a) for a in deployment.get("extraArgs") or []]

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
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
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
    if env_from and str(base.get("uri", "")).startswith("hf://"):
        container["envFrom"] = env_from  # HF_TOKEN for a gated base model
    replica = deployment.get("resources") or {}
    resources = resource_block(replica.get("cpu"), replica.get("memory"), gpus, gpu_type)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(config),
        "initContainers": [_fetch_container(job, config, *fetch) for fetch in fetches],
        "containers": [container],
        "volumes": volumes,
        **service_account(job),
        **gpu_placement(gpu_type, gpus, job.section("resources")),
    }
    if job.section("resources").get("priorityClassName"):
        pod_spec["priorityClassName"] = job.section("resources")["priorityClassName"]
    spec: dict[str, Any] = {
        "replicas": int(deployment.get("replicas", 1)),
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
