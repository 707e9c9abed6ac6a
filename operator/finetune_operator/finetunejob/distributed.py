"""Multi-GPU and multi-node training: the strategy ``auto`` resolves to, the Indexed Job and its headless
Service, and which pod speaks for the run. Pure functions over the parsed spec and the GPU table.

- ``resources.gpus`` > 1 on one node: one pod; the trainer relaunches itself under torchrun with ``gpus``
  processes (finetune_trainer.cli).
- ``resources.nodes`` > 1: an Indexed Job (completionMode Indexed, completions = parallelism = nodes) whose
  pods get the stable hostnames ``<job>-<index>.<service>`` through ``subdomain`` and a headless Service
  (``publishNotReadyAddresses``: ranks must find rank 0 before anything is Ready). The node rank is
  ``JOB_COMPLETION_INDEX``; rank 0 (index 0) hosts the c10d store at ``FTJ_MASTER_ADDR:FTJ_MASTER_PORT``.
- Gang start: with ``resources.queueName`` Kueue admits the whole Job as one Workload (all pods or none).
  Without Kueue the Job is created at once and pods the scheduler cannot place stay Pending while the
  placed ones wait at the rendezvous; status names how many pods are placed and why the others are not
  (``gang_message``). The operator does not reserve nodes itself (docs/distributed.md).
- Failures: any pod's failure ends the attempt for every pod (a lost peer breaks the collectives, a
  SIGTERM is agreed on by all ranks, which checkpoint and exit), the Job replaces the pods, and every rank
  resumes from the last checkpoint rank 0 committed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary import distributed as vocab
from finetune_vocabulary.labels import LABEL_QUEUE

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.config import GpuType
from finetune_operator.finetunejob.ref import JobRef
from finetune_operator.k8s.manifests import ContainerPort, EnvVar, Service
from finetune_operator.k8s.naming import MAX_LABEL, child_name
from finetune_operator.k8s.pods import metadata, selector_labels

# Full fine-tuning with AdamW in mixed precision holds ~16 bytes per parameter (bf16 weights and gradients,
# fp32 master weights, two fp32 moments) plus activations; 20 % headroom for the latter.
FULL_FT_BYTES_PER_PARAMETER = 16
# dpo and kto (and grpo with a KL term) compare with a frozen reference: full fine-tuning keeps a bf16 copy
# of the weights; LoRA/QLoRA use the base with the adapter disabled (no copy).
REFERENCE_BYTES_PER_PARAMETER = 2
ACTIVATION_HEADROOM = 1.2
_SIZE_IN_NAME = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Parallelism:
    """What the training pods run: ``strategy`` over ``nodes`` x ``procs`` ranks, and why."""

    strategy: str  # "none" (one process), "ddp" or "fsdp"
    nodes: int
    procs: int
    reason: str

    @property
    def ranks(self) -> int:
        return self.nodes * self.procs

    def describe(self) -> str:
        if self.ranks == 1:
            return "one process"
        where = f"{self.nodes} nodes x {self.procs}" if self.nodes > 1 else f"{self.procs}"
        return f"{self.strategy} over {where} ranks: {self.reason}"


def model_parameters(uri: str) -> float | None:
    """Parameters of the base model as its name states them (``...-7B``, ``SmolLM2-135M``), else None."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    found = _SIZE_IN_NAME.findall(name)
    if not found:
        return None
    value, unit = found[-1]
    return float(value) * (1e9 if unit.lower() == "b" else 1e6)


def holds_reference_copy(spec: FineTuneJobSpec) -> bool:
    """Full fine-tuning with an objective that compares with a frozen reference model (dpo, kto; grpo with
    hyperparameters.beta > 0 - TRL's grpo default beta 0 loads no reference)."""
    objective, beta = spec.objective, spec.hyperparameters.beta
    return spec.method == "full" and (objective in ("dpo", "kto") or (objective == "grpo" and bool(beta)))


def training_bytes_per_parameter(spec: FineTuneJobSpec) -> int:
    """What full fine-tuning of `spec` holds per parameter, the frozen reference copy included."""
    reference = REFERENCE_BYTES_PER_PARAMETER if holds_reference_copy(spec) else 0
    return FULL_FT_BYTES_PER_PARAMETER + reference


def parallelism(spec: FineTuneJobSpec, gpu_type: GpuType) -> Parallelism:
    """Resolve ``hyperparameters.strategy`` (auto: from the GPU table's memory and the model's size)."""
    nodes, procs = spec.resources.nodes, max(1, spec.resources.gpus)
    asked = spec.hyperparameters.strategy
    if nodes * procs == 1:
        return Parallelism("none", 1, 1, "one process")
    if asked != "auto":
        return Parallelism(asked, nodes, procs, f"hyperparameters.strategy {asked}")
    if spec.method != "full":
        adapter = f"{spec.method} trains a small adapter; every rank holds the base"
        return Parallelism("ddp", nodes, procs, adapter)
    params = model_parameters(spec.base_model.uri)
    if params is None:
        return Parallelism(
            "fsdp", nodes, procs, "full fine-tuning of a model whose size its name does not state; sharded"
        )
    need_gib = params * training_bytes_per_parameter(spec) * ACTIVATION_HEADROOM / 2**30
    size = f"~{params / 1e9:.3g}B parameters need ~{need_gib:.0f} GiB"
    if holds_reference_copy(spec):
        size += f" with {spec.objective}'s frozen reference copy"
    if gpu_type.memory_gib and need_gib <= gpu_type.memory_gib:
        return Parallelism(
            "ddp", nodes, procs, f"full fine-tuning of {size}, within one GPU ({gpu_type.memory_gib} GiB)"
        )
    memory = f"{gpu_type.memory_gib} GiB" if gpu_type.memory_gib else "an unknown amount"
    return Parallelism("fsdp", nodes, procs, f"full fine-tuning of {size}, more than one GPU's {memory}")


# --- names ---------------------------------------------------------------------------------------------


def indexed_job_name(job: JobRef) -> str:
    """The training Job's name, short enough that ``<name>-<index>`` stays a DNS label (pod hostnames)."""
    room = MAX_LABEL - 1 - len(str(vocab.MAX_NODES - 1))
    return child_name(job.name, Stage.TRAIN, lead=job.owner_kind.name_lead, max_len=room)


# --- the training Job's spread, decided before it is built ---------------------------------------------


@dataclass(frozen=True)
class Spread:
    """How the training Job spreads over ``plan.ranks`` processes (builders.training_job builds it so).

    Several processes in one pod: ``FTJ_NPROC_PER_NODE``. Several nodes: an Indexed Job named ``name`` with
    one pod per node, each told the node count and rank 0's address; its hostname comes from the index and
    ``subdomain`` (the headless Service of the same name). ``strategy`` is written into FTJ_CONFIG's
    ``hyperparameters.strategy`` (the trainer never sees ``auto``).
    """

    strategy: str
    nodes: int
    name: str | None  # the Indexed Job's (and its headless Service's) name; None on one node
    env: tuple[EnvVar, ...]
    ports: tuple[ContainerPort, ...]


def spread(job: JobRef, plan: Parallelism) -> Spread | None:
    """None for one process (the single-pod Job as it is)."""
    if plan.ranks == 1:
        return None
    env: list[EnvVar] = [{"name": vocab.NPROC_PER_NODE_ENV, "value": str(plan.procs)}]
    if plan.nodes == 1:
        return Spread(plan.strategy, 1, None, tuple(env), ())
    name = indexed_job_name(job)
    env += [
        {"name": vocab.NNODES_ENV, "value": str(plan.nodes)},
        {"name": vocab.MASTER_ADDR_ENV, "value": vocab.master_addr(name, name)},
        {"name": vocab.MASTER_PORT_ENV, "value": str(vocab.DEFAULT_MASTER_PORT)},
    ]
    port: ContainerPort = {
        "name": "rendezvous",
        "containerPort": vocab.DEFAULT_MASTER_PORT,
        "protocol": "TCP",
    }
    return Spread(plan.strategy, plan.nodes, name, tuple(env), (port,))


def headless_service(job: JobRef) -> Service:
    """The training pods' headless Service (same name, labels and owner as the Indexed Job): per-pod DNS
    records. ``publishNotReadyAddresses``: ranks must find rank 0 before anything is Ready."""
    meta = metadata(job, Stage.TRAIN)
    meta["name"] = indexed_job_name(job)
    queue = job.spec.resources.queue_name
    if queue:
        meta["labels"] = meta.get("labels", {}) | {LABEL_QUEUE: queue}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(job, Stage.TRAIN),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": vocab.DEFAULT_MASTER_PORT, "protocol": "TCP"}],
        },
    }


# --- pods -----------------------------------------------------------------------------------------------


def completion_index(pod: Mapping[str, Any]) -> int | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(vocab.COMPLETION_INDEX_ANNOTATION)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def rank_zero_first(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods with index 0 (global rank 0: progress and the summary) first; the order is kept otherwise."""
    return sorted(pods, key=lambda p: completion_index(p) not in (None, 0))


def gang_message(pods: Sequence[Mapping[str, Any]], nodes: int, unschedulable: str) -> str:
    """What a multi-node run waits for while some of its pods cannot be placed."""
    live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")]
    placed = sum(1 for p in live if (p.get("spec") or {}).get("nodeName"))
    return (
        f"gang of {nodes} pods: {placed} placed, {nodes - placed} waiting ({unschedulable}); the placed "
        "pods wait at the rendezvous (set resources.queueName for all-or-nothing admission by Kueue)"
    )
