"""Watch-cache mechanics that know no kind's spec: the small snapshot of a child the caches keep, its
resourceVersion, the owning job's uid label, and a job's children as lists by kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_vocabulary.labels import LABEL_JOB_UID

SNAPSHOT_METADATA = (
    "name",
    "namespace",
    "uid",
    "labels",
    "annotations",
    "ownerReferences",
    "generation",
    "resourceVersion",
    "creationTimestamp",
)


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a child the planners read; keeps the watch caches small."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {key: meta[key] for key in SNAPSHOT_METADATA if key in meta},
        "status": dict(body.get("status") or {}),
    }
    if body.get("kind") == "Job":
        out["spec"] = {"suspend": bool((body.get("spec") or {}).get("suspend"))}
    elif body.get("kind") == "Deployment":
        out["spec"] = _serving_spec(body.get("spec") or {})
    return out


def _serving_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What FineTunePolicy's maxServingGpus reads of a Deployment (observe.deployment_gpus): replicas and
    the containers' limits."""
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    limits = [
        {"resources": {"limits": dict((c.get("resources") or {}).get("limits") or {})}} for c in containers
    ]
    return {"replicas": spec.get("replicas"), "template": {"spec": {"containers": limits}}}


def owner_uid(body: Mapping[str, Any]) -> str | None:
    labels = (body.get("metadata") or {}).get("labels") or {}
    value = labels.get(LABEL_JOB_UID)
    return str(value) if value else None


def resource_version(body: Mapping[str, Any]) -> int:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


@dataclass
class Children:
    """Snapshots of one owner's children, as the watch caches have them."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)


# The watch caches' objects labelled with an owner's uid (lifecycle.py builds it from Kopf's indexes).
ChildSource = Callable[[str], Children]
