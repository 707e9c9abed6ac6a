"""Pure builders of the serving children: the vLLM Deployment (base + LoRA adapter, or merged weights) and
its Service. Like builders.py, each returns a plain dict and talks to nothing."""

from __future__ import annotations

from typing import Any, cast

from finetune_vocabulary.labels import ANNOTATION_SPEC_HASH

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.config import OperatorConfig
from finetune_operator.containers.vllm import (
    MODELS_DIR,
    ROLLOUT_STRATEGY,
    VllmCompute,
    fetch_container,
    vllm_compute,
    vllm_container,
    vllm_lora_rank,
)
from finetune_operator.finetunejob.ref import Artifacts, JobRef
from finetune_operator.k8s.manifests import ContainerPort, EnvFromSource, VolumeMount
from finetune_operator.k8s.naming import child_name
from finetune_operator.k8s.pods import (
    credentials_env_from,
    labels,
    metadata,
    pod_security_context,
    priority_class,
    scratch_volumes,
    selector_labels,
    service_account,
    spec_hash,
)


def serving_mode(spec: FineTuneJobSpec) -> str:
    """adapter or merged; auto serves adapters for lora/qlora and the merged model for full."""
    if spec.deployment.mode != "auto":
        return spec.deployment.mode
    return "merged" if spec.method == "full" else "adapter"


def needs_export(spec: FineTuneJobSpec, artifacts: Artifacts) -> bool:
    return spec.deployment.enabled and serving_mode(spec) == "merged" and not artifacts.merged












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
    env_from = credentials_env_from(job)
    gated = bool(env_from) and job.spec.base_model.uri.startswith("hf://")  # HF_TOKEN for a gated base
    port: ContainerPort = {"name": "http", "containerPort": config.defaults.vllm_port, "protocol": "TCP"}
    return dict(
        vllm_container(
            config,
            compute,
            args,
            cast(list[VolumeMount], mounts),
            port,
            env_from=cast(list[EnvFromSource], env_from) if gated else (),
            probed=True,
        )
    )


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
        "strategy": ROLLOUT_STRATEGY,
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
