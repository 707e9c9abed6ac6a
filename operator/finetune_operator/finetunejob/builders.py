"""Pure manifest builders for a FineTuneJob's Jobs, one per pipeline stage (validate, train, evaluate,
export). Each takes the job (its parsed spec), the operator config and what was decided before the Job is
built (the training's spread, the evaluation's champion), and returns a typed Job (k8s/manifests.py);
nothing here talks to the API. Shared pieces (labels, placement, volumes) are in k8s/pods.py, the trainer
container in containers/trainer.py, serving in finetunejob/serving.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Required, TypedDict

from finetune_vocabulary.evaluation import SAFETY_JUDGE_KEY_ENV, judge_key_env
from finetune_vocabulary.labels import LABEL_QUEUE
from finetune_vocabulary.objectives import DEFAULT_OBJECTIVE

from finetune_operator.api.finetunejob import EvaluationSpec, SecretKeyRef, spec_to_dict
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.config import GpuType, OperatorConfig
from finetune_operator.containers.trainer import (
    TERMINATION_LOG,
    TrainerContainer,
    pod_failure_policy,
    trainer_container,
)
from finetune_operator.finetunejob import distributed
from finetune_operator.finetunejob.ref import JobRef
from finetune_operator.finetunejob.tracking import credentials_env, resolved
from finetune_operator.k8s.manifests import EnvVar, Job, JobSpec, PodSpec, ResourceRequirements
from finetune_operator.k8s.pods import (
    WORKDIR,
    Placement,
    PodPriority,
    credentials_env_from,
    gpu_placement,
    labels,
    metadata,
    pod_security_context,
    priority_class,
    pvc_volumes,
    resource_block,
    scratch_volumes,
    service_account,
)
from finetune_operator.serving_contract import pool_url


class TrainerConfig(TypedDict, total=False):
    """The FTJ_CONFIG document (CONTRACT.md); `spec` is the API's own spelling of the parsed spec."""

    runPrefix: Required[str]
    job: Required[dict[str, str]]
    spec: Required[dict[str, Any]]
    referencePolicy: Required[dict[str, list[str]]]
    tracking: dict[str, Any]
    champion: dict[str, str]
    modelServerUrls: dict[str, str]
    servingCheck: dict[str, Any]
    dataset: dict[str, Any]


def trainer_config(
    job: JobRef,
    config: OperatorConfig,
    *,
    strategy: str | None = None,
    champion: tuple[str, str] | None = None,
    serving_check: Mapping[str, Any] | None = None,
) -> TrainerConfig:
    """The FTJ_CONFIG document (CONTRACT.md): the spec as the API server stores it, defaults applied, plus
    the platform's policy the spec cannot change. `strategy`: the resolved hyperparameters.strategy of a
    training over several ranks (distributed.Spread); `champion`: (name, adapter) of the version serving the
    job's model name, which the evaluation scores beside tuned and base."""
    spec = spec_to_dict(job.spec)
    if spec.get("objective") == DEFAULT_OBJECTIVE:
        # The trainer's default too: an sft job's FTJ_CONFIG (and its stage Jobs) stay as before objectives.
        del spec["objective"]
    spec.pop("cancel", None)  # the trainer's business ends with the cancel: no stage Job runs after it
    if strategy is not None:
        spec.setdefault("hyperparameters", {})["strategy"] = strategy
    document: TrainerConfig = {
        "runPrefix": job.run_prefix,
        "job": {"namespace": job.namespace, "name": job.name, "uid": job.uid},
        "spec": spec,
        "referencePolicy": {"allowPlainHttpHosts": list(config.reference.allow_plain_http_hosts)},
    }
    tracking = resolved(job, config)
    if tracking is not None:
        document["tracking"] = tracking
    if champion is not None:
        document["champion"] = {"name": champion[0], "adapter": champion[1]}
    if serving_check is not None:
        document["servingCheck"] = dict(serving_check)
    if job.sources:
        document["dataset"] = {"sources": dict(job.sources)}  # a scheduled run's counts (MLflow params)
    return document


@dataclass(frozen=True)
class StageInputs:
    """What a stage Job is built from besides the spec and the operator config, decided before it is built."""

    resources: ResourceRequirements
    placement: Placement
    backoff_limit: int
    shm: str | None
    spread: distributed.Spread | None = None  # training over several ranks
    champion: tuple[str, str] | None = None  # evaluation: (name, adapter) serving the model name now
    serving_check: Mapping[str, Any] | None = None  # servecheck: {url, model, metric, examples}
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    active_deadline_seconds: int | None = None
    suspend: bool = False


def _trainer_env(job: JobRef, stage: Stage, config: OperatorConfig, inputs: StageInputs) -> list[EnvVar]:
    document = trainer_config(
        job,
        config,
        strategy=inputs.spread.strategy if inputs.spread else None,
        champion=inputs.champion,
        serving_check=inputs.serving_check,
    )
    # Every stage: the trainer checks judge endpoints in each (validate reports a bad one first).
    urls = model_server_urls(job, config)
    if urls:
        document["modelServerUrls"] = urls
    env: list[EnvVar] = [
        {"name": "FTJ_CONFIG", "value": json.dumps(document, sort_keys=True, separators=(",", ":"))},
        {"name": "FTJ_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "FTJ_WORKDIR", "value": WORKDIR},
        {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
        {"name": "HOME", "value": WORKDIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += credentials_env(job)
    if stage is Stage.EVALUATE:
        env += evaluation_key_env(job.spec.evaluation)
    return env


def _secret_env(name: str, secret: SecretKeyRef) -> EnvVar:
    # By reference: the kubelet reads the Secret; the operator never does.
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}


def evaluation_key_env(evaluation: EvaluationSpec) -> list[EnvVar]:
    """The evaluate pod's API keys: the reference's and every judge's (grader or safety) that names one."""
    env: list[EnvVar] = []
    if evaluation.reference is not None and evaluation.reference.api_key_secret is not None:
        env.append(_secret_env("FTJ_REFERENCE_API_KEY", evaluation.reference.api_key_secret))
    for name, judge in evaluation.judges():
        if judge.api_key_secret is not None:
            variable = SAFETY_JUDGE_KEY_ENV if name is None else judge_key_env(name)
            env.append(_secret_env(variable, judge.api_key_secret))
    return env


def model_server_urls(job: JobRef, config: OperatorConfig) -> dict[str, str]:
    """FTJ_CONFIG modelServerUrls: the in-cluster URL of every ModelServer a judge names."""
    servers = sorted({j.model_server for _, j in job.spec.evaluation.judges() if j.model_server})
    return {s: pool_url(s, job.namespace, config.defaults.vllm_port) for s in servers}


# --- Jobs --------------------------------------------------------------------------------------


def _pod_spec(job: JobRef, config: OperatorConfig, stage: Stage, inputs: StageInputs) -> PodSpec:
    volumes, mounts = scratch_volumes(inputs.shm)
    claim_volumes, claim_mounts, claim_env = pvc_volumes(job)
    spread = inputs.spread
    container = trainer_container(
        TrainerContainer(
            image=config.images.trainer,
            pull_policy=config.images.pull_policy,
            stage=stage.value,
            env=[*_trainer_env(job, stage, config, inputs), *claim_env, *(spread.env if spread else ())],
            mounts=mounts + claim_mounts,
            resources=inputs.resources,
            env_from=credentials_env_from(job),
            ports=spread.ports if spread else (),
        )
    )
    pod: PodSpec = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(config),
        "containers": [container],
        "volumes": volumes + claim_volumes,
    }
    cpu_only = stage in (Stage.VALIDATE, Stage.SERVING_CHECK)
    priority: PodPriority = priority_class(job) if not cpu_only else {}
    pod = {**pod, **service_account(job), **inputs.placement, **priority}
    if spread is not None and spread.name is not None:
        pod["subdomain"] = spread.name  # the headless Service: stable per-pod hostnames
    return pod


def _stage_job(job: JobRef, config: OperatorConfig, stage: Stage, inputs: StageInputs) -> Job:
    spread = inputs.spread
    job_labels = labels(job, stage) | dict(inputs.extra_labels)
    job_spec: JobSpec = {
        "backoffLimit": inputs.backoff_limit,
        "podFailurePolicy": pod_failure_policy(gang=spread is not None and spread.nodes > 1),
        "template": {"metadata": {"labels": job_labels}, "spec": _pod_spec(job, config, stage, inputs)},
    }
    if inputs.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = inputs.active_deadline_seconds
    if inputs.suspend:
        job_spec["suspend"] = True  # Kueue admits a queued Job by unsuspending it.
    if config.defaults.pod_replacement_policy:
        # A replacement starts only once the old pod is gone, so two trainers never write one checkpoint.
        job_spec["podReplacementPolicy"] = "Failed"
    if spread is not None and spread.nodes > 1:
        job_spec["completionMode"] = "Indexed"
        job_spec["completions"] = job_spec["parallelism"] = spread.nodes
    meta = metadata(job, stage)
    meta["labels"] = dict(job_labels)  # a copy: one object twice in a manifest is a YAML alias
    if spread is not None and spread.name is not None:
        meta["name"] = spread.name
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def _gpu_type(config: OperatorConfig, job: JobRef) -> GpuType:
    return config.gpu_type(job.spec.resources.gpu_type)


def _cpu_inputs(
    job: JobRef, config: OperatorConfig, serving_check: Mapping[str, Any] | None = None
) -> StageInputs:
    """The validate pod's CPU, memory and retries, never a GPU."""
    cpu_only = config.gpu_types.get("cpu") or _gpu_type(config, job)
    return StageInputs(
        resources=resource_block(config.defaults.validate_cpu, config.defaults.validate_memory, 0, cpu_only),
        placement={},
        backoff_limit=config.defaults.validate_backoff_limit,
        shm=None,
        serving_check=serving_check,
    )


def validation_job(job: JobRef, config: OperatorConfig) -> Job:
    """CPU-only: it never requests a GPU, whatever the spec asks for training."""
    return _stage_job(job, config, Stage.VALIDATE, _cpu_inputs(job, config))


def serving_check_job(job: JobRef, config: OperatorConfig, target: Mapping[str, Any]) -> Job:
    """CPU-only, like validate: held-out prompts through the serving engine at `target` ({url, model,
    metric, examples}; servingcheck.py), before the version takes traffic."""
    return _stage_job(job, config, Stage.SERVING_CHECK, _cpu_inputs(job, config, target))


def training_job(job: JobRef, config: OperatorConfig) -> Job:
    """Several GPUs or nodes: torchrun in each pod; an Indexed Job with one pod per node (distributed.py)."""
    resources = job.spec.resources
    gpu_type = _gpu_type(config, job)
    inputs = StageInputs(
        resources=resource_block(resources.cpu, resources.memory, resources.gpus, gpu_type),
        placement=gpu_placement(gpu_type, resources.gpus, resources),
        backoff_limit=job.spec.max_retries,
        shm=config.defaults.shm_size,
        spread=distributed.spread(job, distributed.parallelism(job.spec, gpu_type)),
        extra_labels={LABEL_QUEUE: resources.queue_name} if resources.queue_name else {},
        active_deadline_seconds=job.spec.active_deadline_seconds,
        suspend=bool(resources.queue_name),
    )
    return _stage_job(job, config, Stage.TRAIN, inputs)


def _one_gpu_inputs(
    job: JobRef, config: OperatorConfig, *, shm: bool, champion: tuple[str, str] | None = None
) -> StageInputs:
    """One GPU of the training type when training had GPUs, the job's CPU and memory (evaluate, export)."""
    resources = job.spec.resources
    gpus = min(resources.gpus, 1)
    gpu_type = _gpu_type(config, job)
    return StageInputs(
        resources=resource_block(resources.cpu, resources.memory, gpus, gpu_type),
        placement=gpu_placement(gpu_type, gpus, resources),
        backoff_limit=job.spec.max_retries,
        shm=config.defaults.shm_size if shm and gpus else None,
        champion=champion,
    )


def evaluation_job(job: JobRef, config: OperatorConfig, champion: tuple[str, str] | None = None) -> Job:
    """Generation for tuned and base on one GPU; with a `champion` (name, adapter), its FTJ_CONFIG names the
    serving version to score too."""
    return _stage_job(job, config, Stage.EVALUATE, _one_gpu_inputs(job, config, shm=True, champion=champion))


def export_job(job: JobRef, config: OperatorConfig) -> Job:
    """Merge the adapter into the base weights (for merged serving of a LoRA/QLoRA run)."""
    return _stage_job(job, config, Stage.EXPORT, _one_gpu_inputs(job, config, shm=False))
