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
from finetune_vocabulary.exitcodes import ExitCode

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.config import GpuType
from finetune_operator.containers.trainer import TRAINER_CONTAINER
from finetune_operator.finetunejob.ref import JobRef
from finetune_operator.k8s.naming import (
    CHILD_HASH_LEN,
    HASH_MARKER,
    MAX_LABEL,
    child_name,
    short_hash,
)

# Full fine-tuning with AdamW in mixed precision holds ~16 bytes per parameter (bf16 weights and gradients,
# fp32 master weights, two fp32 moments) plus activations; 20 % headroom for the latter.
FULL_FT_BYTES_PER_PARAMETER = 16
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
    need_gib = params * FULL_FT_BYTES_PER_PARAMETER * ACTIVATION_HEADROOM / 2**30
    size = f"~{params / 1e9:.3g}B parameters need ~{need_gib:.0f} GiB"
    if gpu_type.memory_gib and need_gib <= gpu_type.memory_gib:
        return Parallelism(
            "ddp", nodes, procs, f"full fine-tuning of {size}, within one GPU ({gpu_type.memory_gib} GiB)"
        )
    memory = f"{gpu_type.memory_gib} GiB" if gpu_type.memory_gib else "an unknown amount"
    return Parallelism("fsdp", nodes, procs, f"full fine-tuning of {size}, more than one GPU's {memory}")


# --- names ----------------------------------------------------------------------------------------------


def indexed_job_name(job: JobRef) -> str:
    """The training Job's name, short enough that ``<name>-<index>`` stays a DNS label (pod hostnames)."""
    name = child_name(job.name, Stage.TRAIN)
    room = MAX_LABEL - 1 - len(str(vocab.MAX_NODES - 1))
    if len(name) <= room:
        return name
    suffix = f"{HASH_MARKER}{short_hash(job.name, CHILD_HASH_LEN)}-{Stage.TRAIN.value}"
    return f"{name[: room - len(suffix)].rstrip('-')}{suffix}"


# --- manifests ------------------------------------------------------------------------------------------


def headless_service(job: JobRef, job_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The training pods' headless Service (same name, labels and owner as the Job): per-pod DNS records."""
    meta = job_manifest["metadata"]
    selector = {
        k: v
        for k, v in job_manifest["spec"]["template"]["metadata"]["labels"].items()
        if k in _selector_keys()
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "ownerReferences")},
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": vocab.DEFAULT_MASTER_PORT, "protocol": "TCP"}],
        },
    }


def _selector_keys() -> tuple[str, ...]:
    from finetune_vocabulary.labels import LABEL_COMPONENT, LABEL_INSTANCE, LABEL_JOB_UID

    return (LABEL_INSTANCE, LABEL_COMPONENT, LABEL_JOB_UID)


def distribute(manifest: dict[str, Any], job: JobRef, plan: Parallelism) -> dict[str, Any]:
    """Turn the single-pod training Job into what ``plan`` needs (a new dict; the input is not changed).

    Several processes in one pod: ``FTJ_NPROC_PER_NODE``. Several nodes: an Indexed Job with one pod per
    node, each told the node count and rank 0's address; its hostname comes from the index and
    ``subdomain`` (the headless Service of the same name).
    """
    if plan.ranks == 1:
        return manifest
    spec = dict(manifest["spec"])
    template = dict(spec["template"])
    pod = dict(template["spec"])
    container = dict(pod["containers"][0])
    env = [e for e in container.get("env", []) if e["name"] != "FTJ_CONFIG"]
    env.append({"name": vocab.NPROC_PER_NODE_ENV, "value": str(plan.procs)})
    config_env = next(e for e in container.get("env", []) if e["name"] == "FTJ_CONFIG")
    env.insert(0, {"name": "FTJ_CONFIG", "value": _with_strategy(config_env["value"], plan.strategy)})
    meta = dict(manifest["metadata"])
    if plan.nodes > 1:
        name = indexed_job_name(job)
        meta["name"] = name
        env += [
            {"name": vocab.NNODES_ENV, "value": str(plan.nodes)},
            {"name": vocab.MASTER_ADDR_ENV, "value": vocab.master_addr(name, name)},
            {"name": vocab.MASTER_PORT_ENV, "value": str(vocab.DEFAULT_MASTER_PORT)},
        ]
        container["ports"] = [
            {"name": "rendezvous", "containerPort": vocab.DEFAULT_MASTER_PORT, "protocol": "TCP"}
        ]
        pod["subdomain"] = name
        spec.update(completionMode="Indexed", completions=plan.nodes, parallelism=plan.nodes)
        spec["podFailurePolicy"] = _gang_failure_policy(spec["podFailurePolicy"])
    container["env"] = env
    pod["containers"] = [container, *pod["containers"][1:]]
    template["spec"] = pod
    spec["template"] = template
    return {**manifest, "metadata": meta, "spec": spec}


def _gang_failure_policy(policy: Mapping[str, Any]) -> dict[str, Any]:
    """A pod that stopped because its gang was disrupted (SIGTERM agreed by every rank: checkpoint committed,
    exit PREEMPTED) does not spend the retry budget: only the disruption itself is the event (the evicted
    pod, ignored by the DisruptionTarget rule), so one eviction counts as one retry."""
    rules = list(policy["rules"])
    preempted = {
        "action": "Ignore",
        "onExitCodes": {
            "containerName": TRAINER_CONTAINER,
            "operator": "In",
            "values": [int(ExitCode.PREEMPTED)],
        },
    }
    return {**policy, "rules": [rules[0], preempted, *rules[1:]]}


def _with_strategy(config_json: str, strategy: str) -> str:
    """FTJ_CONFIG with ``hyperparameters.strategy`` resolved (the trainer never sees ``auto``)."""
    import json

    doc = json.loads(config_json)
    doc["spec"].setdefault("hyperparameters", {})["strategy"] = strategy
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


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
