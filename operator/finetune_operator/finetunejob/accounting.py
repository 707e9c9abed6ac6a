"""GPU-hours: the estimate before training and what the GPU stages have used so far; retries counted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_vocabulary import objectives, steps

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.config import ConfigError, OperatorConfig
from finetune_operator.finetunejob.plan import Observed
from finetune_operator.k8s.observe import conditions_of, disrupted_pods, finite, parse_time

JOB_STAGES = (Stage.VALIDATE, Stage.TRAIN, Stage.EVALUATE, Stage.EXPORT, Stage.SERVING_CHECK)
GPU_STAGES = (Stage.TRAIN, Stage.EVALUATE, Stage.EXPORT)


def gpu_hours_estimate(spec: FineTuneJobSpec, dataset: Mapping[str, Any], config: OperatorConfig) -> float:
    """Train tokens x epochs x the objective's compute factor / the GPU type's tokens per second, in GPU-hours
    (0 for CPU-only runs)."""
    gpus = spec.resources.gpus
    if gpus == 0:
        return 0.0
    try:
        tokens_per_second = config.gpu_type(spec.resources.gpu_type).tokens_per_second
    except ConfigError:
        return 0.0
    hyper = spec.hyperparameters
    tokens = float(dataset.get("trainTokens") or 0) * float(hyper.epochs)
    if hyper.max_steps:
        per_step = (
            steps.examples_per_step(
                hyper.batch_size, hyper.gradient_accumulation_steps, gpus * spec.resources.nodes
            )
            * hyper.max_seq_length
        )
        tokens = min(tokens, float(hyper.max_steps) * per_step)
    tokens *= objectives.compute_factor(spec.objective, hyper.num_generations)
    # Data parallel: each GPU processes tokensPerSecond, so GPU-hours do not depend on the GPU count (nodes x
    # gpus GPUs finish that many times sooner).
    return round(tokens / tokens_per_second / 3600, 3)


def _stage_hours(job: Mapping[str, Any], observed: Observed) -> float:
    status = job.get("status") or {}
    start = parse_time(status.get("startTime"))
    if start is None:
        return 0.0
    end = parse_time(status.get("completionTime"))
    if end is None:
        failed = conditions_of(job).get("Failed") or {}
        end = parse_time(failed.get("lastTransitionTime")) if failed else None
    if end is None:
        end = observed.now if status.get("active") else start
    return max(0.0, (end - start).total_seconds()) / 3600


def gpu_hours_spent(observed: Observed, spec: FineTuneJobSpec) -> float:
    """GPU-hours of the GPU stages so far; never decreases (a resumed Job restarts its startTime)."""
    gpus = spec.resources.gpus
    total = 0.0
    for stage in GPU_STAGES:
        job = observed.children.get(stage)
        if job and gpus:
            # training holds nodes x gpus GPUs; evaluation and export one
            held = gpus * spec.resources.nodes if stage is Stage.TRAIN else min(gpus, 1)
            total += _stage_hours(job, observed) * held
    previous = finite(observed.status.get("gpuHours")) or 0.0
    return max(previous, round(total, 2))


def restarts(observed: Observed) -> int:
    """Stage pods that failed and were replaced: the Jobs' counters plus disruptions seen."""
    counted = sum(
        int(((observed.children.get(s) or {}).get("status") or {}).get("failed") or 0) for s in JOB_STAGES
    )
    disrupted = observed.disrupted
    if disrupted is None:
        disrupted = frozenset().union(*(disrupted_pods(observed.pods.get(s, ())) for s in JOB_STAGES))
    return counted + len(disrupted)
