"""Reading any kind's children: conditions, times and numbers, why a pod is stuck, which pods were
disrupted, whether a Deployment serves and the GPUs it holds. Pure functions of the watch caches' snapshots
(what a stage Job's outcome means is finetunejob/outcome.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from finetune_vocabulary.redaction import redact_patterns

from finetune_operator.api.conditions import Reason
from finetune_operator.config import OperatorConfig

# kubelet's waiting reasons. A pull that failed once is retried (ErrImagePull); in back-off it is fatal.
IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONTAINER_ERROR_REASONS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreStartHookError"}
)
# What a pod says (kubelet's message, a container's log tail) is not ours: it is masked and capped, both
# together within a condition message (conditions.MAX_MESSAGE).
WAITING_TEXT_LIMIT = 500
TERMINATION_TEXT_LIMIT = 400


@dataclass(frozen=True)
class PodProblem:
    reason: Reason
    message: str
    fatal: bool = False


def conditions_of(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    items = (obj.get("status") or {}).get("conditions") or []
    return {str(c.get("type")): c for c in items if isinstance(c, Mapping)}


def is_true(conditions: Mapping[str, Mapping[str, Any]], kind: str) -> bool:
    return str((conditions.get(kind) or {}).get("status")) == "True"


def created(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("creationTimestamp") or "")


def parse_time(value: Any) -> datetime | None:
    """A status or metadata timestamp; one without a zone is UTC (so it compares with aware times)."""
    if not value:
        return None
    try:
        found = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return found if found.tzinfo else found.replace(tzinfo=UTC)


def finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def pod_text(text: str, limit: int, *, tail: bool = False) -> str:
    """A message written by kubelet or a container, fit for our status: one line, credential-shaped values
    masked, at most `limit` characters (the end of a log tail, which says why, when `tail`)."""
    text = " ".join(redact_patterns(text).split())
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1) :] if tail else text[: limit - 1] + "…"


def _last_termination(container: Mapping[str, Any]) -> str:
    """Why the container last ended, as `; last terminated: Error (exit code 1): <message>`."""
    last = (container.get("lastState") or {}).get("terminated") or {}
    if not last:
        return ""
    message = pod_text(str(last.get("message") or ""), TERMINATION_TEXT_LIMIT, tail=True)
    text = f"; last terminated: {last.get('reason') or 'unknown'} (exit code {last.get('exitCode')})"
    return f"{text}: {message}" if message else text


def _waiting_problem(container: Mapping[str, Any]) -> PodProblem | None:
    """kubelet's waiting reason and message as they read on the pod (e.g. `container vllm: ErrImagePull:
    …`); a crash loop says how the last run ended rather than kubelet's back-off delay."""
    waiting = (container.get("state") or {}).get("waiting") or {}
    reason = str(waiting.get("reason") or "")
    message = pod_text(str(waiting.get("message") or ""), WAITING_TEXT_LIMIT)
    last = _last_termination(container)
    if reason == "CrashLoopBackOff" and last:
        message = ""
    detail = f"container {container.get('name')}: {reason}: {message}".rstrip(": ") + last
    if reason in IMAGE_PULL_REASONS:
        return PodProblem(Reason.IMAGE_PULL_FAILED, detail, fatal=True)
    if reason == "ErrImagePull":
        return PodProblem(Reason.IMAGE_PULL_FAILED, detail)
    if reason in CONTAINER_ERROR_REASONS:
        return PodProblem(Reason.CONTAINER_CONFIG_ERROR, detail)
    if reason == "CrashLoopBackOff":
        return PodProblem(Reason.DEPLOYMENT_NOT_READY, detail)
    return None


def pod_problem(pods: Sequence[Mapping[str, Any]]) -> PodProblem | None:
    """Why the newest live pod of a stage is not running: unschedulable, image pull, bad config, crashing."""
    live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")]
    for pod in sorted(live, key=created, reverse=True):
        status = pod.get("status") or {}
        for container in (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        ):
            problem = _waiting_problem(container)
            if problem is not None:
                return problem
        scheduled = conditions_of(pod).get("PodScheduled") or {}
        if str(scheduled.get("status")) == "False" and scheduled.get("reason") == "Unschedulable":
            return PodProblem(
                Reason.UNSCHEDULABLE, f"waiting for resources: {scheduled.get('message') or ''}"
            )
    return None


def disrupted_pods(pods: Sequence[Mapping[str, Any]]) -> set[str]:
    """Failed pods that were evicted or preempted, which the Job's `failed` counter ignores."""
    return {
        str((p.get("metadata") or {}).get("uid") or (p.get("metadata") or {}).get("name"))
        for p in pods
        if (p.get("status") or {}).get("phase") == "Failed" and is_true(conditions_of(p), "DisruptionTarget")
    }


def deployment_available(deployment: Mapping[str, Any]) -> bool:
    status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and int(observed) < int(generation):
        return False
    ready = int(status.get("availableReplicas") or status.get("readyReplicas") or 0)
    return is_true(conditions_of(deployment), "Available") and ready >= 1


def gpu_resources(config: OperatorConfig) -> list[str]:
    """The extended resources the GPU table requests (nvidia.com/gpu, ...)."""
    return sorted({t.resource_name for t in config.gpu_types.values() if t.resource_name})


def deployment_gpus(deployment: Mapping[str, Any], resource_names: Iterable[str]) -> int:
    """GPUs a Deployment holds: spec.replicas x its containers' GPU limits (any of `resource_names`)."""
    spec = deployment.get("spec") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    names = set(resource_names)
    per_pod = 0
    for container in containers:
        limits = (container.get("resources") or {}).get("limits") or {}
        per_pod += sum(int(str(v)) for k, v in limits.items() if k in names and str(v).isdigit())
    replicas = spec.get("replicas")
    return (1 if replicas is None else int(replicas)) * per_pod
