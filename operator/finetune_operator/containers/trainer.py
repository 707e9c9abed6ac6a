"""The trainer container from plain values (image, stage, env, mounts, resources): its fixed facts (name,
termination message, what an OOM-killed trainer exits with) and the pod failure policy of a stage Job.
builders.py decides the values for a FineTuneJob's stage and assembles the Job around this container."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from finetune_vocabulary.exitcodes import PERMANENT_EXIT_CODES, ExitCode
from finetune_vocabulary.images import TRAINER_ENTRYPOINT

from finetune_operator.k8s.manifests import (
    Container,
    ContainerPort,
    EnvFromSource,
    EnvVar,
    PodFailurePolicy,
    PodFailurePolicyRule,
    ResourceRequirements,
    VolumeMount,
)
from finetune_operator.k8s.pods import container_security_context

TRAINER_CONTAINER = "trainer"


TERMINATION_LOG = "/dev/termination-log"


# What a container killed by the kernel's OOM killer (SIGKILL) exits with; kubelet reports reason OOMKilled,
# but a podFailurePolicy can match only exit codes and pod conditions, so the rule matches 137.
OOM_KILLED_EXIT_CODE = 137


@dataclass(frozen=True)
class TrainerContainer:
    """What one stage's trainer container runs: `stage` is the CLI's subcommand."""

    image: str
    pull_policy: str
    stage: str
    env: Sequence[EnvVar]
    mounts: Sequence[VolumeMount]
    resources: ResourceRequirements
    env_from: Sequence[EnvFromSource] = ()
    ports: Sequence[ContainerPort] = ()


def trainer_container(parts: TrainerContainer) -> Container:
    container: Container = {
        "name": TRAINER_CONTAINER,
        "image": parts.image,
        "imagePullPolicy": parts.pull_policy,
        # Also with several GPUs: the CLI relaunches `train` under torch.distributed.run itself and exits with
        # rank 0's contract code; a torchrun wrapper would turn OUT_OF_MEMORY/PREEMPTED into exit 1.
        "command": [*TRAINER_ENTRYPOINT, parts.stage],
        "env": list(parts.env),
        "volumeMounts": list(parts.mounts),
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        # The trainer writes its JSON summary there; if it dies before, the log tail explains why.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if parts.env_from:
        container["envFrom"] = list(parts.env_from)
    if parts.resources:
        container["resources"] = parts.resources
    if parts.ports:
        container["ports"] = list(parts.ports)
    return container


def pod_failure_policy(*, gang: bool = False) -> PodFailurePolicy:
    """Every stage: evictions and preemptions do not spend the retry budget; bad data, bad config and OOM
    (the trainer's own code 12, or the kernel's OOM kill, exit 137) fail the Job at once.

    `gang` (several pods train together): a pod that stopped because its gang was disrupted (SIGTERM agreed
    by every rank: checkpoint committed, exit PREEMPTED) does not spend the retry budget either: only the
    disruption itself is the event (the evicted pod, ignored by the DisruptionTarget rule), so one eviction
    counts as one retry."""
    # First, so a pod killed (137) after a preemption's grace period is still only a disruption.
    rules: list[PodFailurePolicyRule] = [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]
    if gang:
        rules.append(_on_exit("Ignore", [int(ExitCode.PREEMPTED)]))
    rules.append(_on_exit("FailJob", [*(int(code) for code in PERMANENT_EXIT_CODES), OOM_KILLED_EXIT_CODE]))
    return {"rules": rules}


def _on_exit(action: Literal["Ignore", "FailJob"], codes: list[int]) -> PodFailurePolicyRule:
    return {
        "action": action,
        "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": codes},
    }
