"""What a planner asks the controller to do to the API: patch or delete a child, post an Event, and the
status merge patch; the same for every kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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

