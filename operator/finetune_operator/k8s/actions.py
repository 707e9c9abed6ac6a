"""What a planner asks the controller to do to the API: patch or delete a child, post an Event, and the
status merge patch; the same for every kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary.labels import ANNOTATION_SPEC_HASH


@dataclass(frozen=True)
class ChildPatch:
    kind: str  # "Job" | "Deployment"
    name: str
    patch: Any
    patch_type: str = "merge"  # "merge" | "json"


@dataclass(frozen=True)
class ChildDelete:
    kind: str  # "Deployment" | "Service"
    name: str


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


def diff_status(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new` (top-level keys; None deletes)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if key == "kopf":
            continue
        if old.get(key) != value and not (value is None and key not in old):
            patch[key] = value
    return patch



def spec_hash_of(manifest: Mapping[str, Any]) -> Any:
    """The spec hash a built (or observed) child carries in its annotations."""
    return ((manifest.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)


def rollout(kind: str, name: str, desired: Mapping[str, Any]) -> ChildPatch:
    """A JSON patch replacing what the spec hash of a Deployment covers (and the hash itself): replicas,
    strategy and the pod template; the one rollout of every serving Deployment."""
    key = ANNOTATION_SPEC_HASH.replace("~", "~0").replace("/", "~1")
    spec = desired["spec"]
    operations = [
        {"op": "add", "path": f"/metadata/annotations/{key}", "value": spec_hash_of(desired)},
        {"op": "replace", "path": "/spec/replicas", "value": spec["replicas"]},
        {"op": "replace", "path": "/spec/strategy", "value": spec["strategy"]},
        {"op": "replace", "path": "/spec/template", "value": spec["template"]},
    ]
    return ChildPatch(kind, name, operations, patch_type="json")
