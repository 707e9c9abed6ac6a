"""What a job's spec says about serving: adapter or merged weights, the served name, the vLLM compute of a
replica. The job's ModelServer is built in ownedserver.py."""

from __future__ import annotations

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.config import OperatorConfig
from finetune_operator.containers.vllm import VllmCompute, vllm_compute
from finetune_operator.finetunejob.ref import Artifacts, JobRef


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
