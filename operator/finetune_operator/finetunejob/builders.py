"""Pure manifest builders for a FineTuneJob's Jobs, one per pipeline stage (validate, train, evaluate,
export). Each takes the job (its parsed spec) and the operator config and returns a plain dict; nothing here
talks to the API. Shared pieces (labels, placement, volumes) are in podspec.py, serving in serving.py.
"""

from __future__ import annotations

import json
from typing import Any

from finetune_vocabulary.exitcodes import PERMANENT_EXIT_CODES
from finetune_vocabulary.images import TRAINER_ENTRYPOINT
from finetune_vocabulary.labels import LABEL_QUEUE

from finetune_operator.api.finetunejob import spec_to_dict
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.config import GpuType, OperatorConfig
from finetune_operator.containers.trainer import OOM_KILLED_EXIT_CODE, TERMINATION_LOG, TRAINER_CONTAINER
from finetune_operator.finetunejob import distributed
from finetune_operator.finetunejob.ref import JobRef
from finetune_operator.finetunejob.tracking import credentials_env, resolved
from finetune_operator.k8s.pods import (
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
    service_account,
)


def trainer_config(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """The FTJ_CONFIG document (CONTRACT.md): the spec as the API server stores it, defaults applied, plus
    the platform's policy the spec cannot change."""
    document = {
        "runPrefix": job.run_prefix,
        "job": {"namespace": job.namespace, "name": job.name, "uid": job.uid},
        "spec": spec_to_dict(job.spec),
        "referencePolicy": {"allowPlainHttpHosts": list(config.reference.allow_plain_http_hosts)},
    }
    tracking = resolved(job, config)
    if tracking is not None:
        document["tracking"] = tracking
    return document


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
    env += credentials_env(job)
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
        "env": _trainer_env(job, stage, config) + claim_env,
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


def _gpu_type(config: OperatorConfig, job: JobRef) -> GpuType:
    return config.gpu_type(job.spec.resources.gpu_type)


def validation_job(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """CPU-only: it never requests a GPU, whatever the spec asks for training."""
    cpu_only = config.gpu_types.get("cpu") or _gpu_type(config, job)
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
    gpu_type = _gpu_type(config, job)
    extra_spec: dict[str, Any] = {}
    if job.spec.active_deadline_seconds:
        extra_spec["activeDeadlineSeconds"] = job.spec.active_deadline_seconds
    if resources.queue_name:
        extra_spec["suspend"] = True  # Kueue admits a queued Job by unsuspending it.
    single = _stage_job(
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
    # several GPUs or nodes: torchrun in each pod; an Indexed Job with one pod per node (distributed.py)
    return distributed.distribute(single, job, distributed.parallelism(job.spec, gpu_type))


def evaluation_job(job: JobRef, config: OperatorConfig) -> dict[str, Any]:
    """One GPU of the training type when training had GPUs (generation for tuned and base)."""
    resources = job.spec.resources
    gpus = min(resources.gpus, 1)
    gpu_type = _gpu_type(config, job)
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
    gpu_type = _gpu_type(config, job)
    return _stage_job(
        job,
        config,
        Stage.EXPORT,
        resources=resource_block(resources.cpu, resources.memory, gpus, gpu_type),
        placement=gpu_placement(gpu_type, gpus, resources),
        backoff_limit=job.spec.max_retries,
        shm=None,
    )
