"""The ModelServer's status, built through its typed models (api/modelserver.py) and written as a merge patch:
the replicas, the version registry, the conditions (api/modelserver_conditions.py) and a one-line message.
Pure; the planner (planner.py) gathers what it saw and calls `build_status`.

Conditions keep their lastTransitionTime while their status stays the same. `Ready` says whether the pool
serves as asked; `PolicyAllowed` is written once a FineTunePolicy applies; `PinsResolved` and
`AdaptersAllowed` name a user's mistake that the pool works around (the promoted version serves; the
adapter is not loaded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from finetune_operator.api.conditions import short, timestamp
from finetune_operator.api.finetunejob_status import Condition
from finetune_operator.api.modelserver import CaptureCounters, ModelServerStatus, ModelStatus, ReplicaStatus
from finetune_operator.api.modelserver_conditions import PoolConditionType, PoolReason
from finetune_operator.k8s.observe import PodProblem


def find(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def condition(
    old: Sequence[Mapping[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> Condition:
    """A condition, keeping the old lastTransitionTime while its status does not change."""
    previous = find(old, type_)
    kept = previous.get("lastTransitionTime") if previous and previous.get("status") == status else None
    return Condition.model_validate(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": short(message),
            "lastTransitionTime": kept or timestamp(now),
            "observedGeneration": generation or None,
        }
    )


@dataclass(frozen=True)
class PoolFindings:
    """What one planner pass found, for the status."""

    generation: int
    now: datetime
    wanted: int  # spec.replicas
    rows: Sequence[Mapping[str, Any]]  # per reachable pod: pod, loaded, routes, ready, inSync
    models: Mapping[str, Mapping[str, Any]]  # the version registry
    routes: Mapping[str, str]  # stable name → versioned name served
    endpoint: str
    policy: Condition | None  # PolicyAllowed, when a FineTunePolicy applies (or did)
    pin_problems: Sequence[str] = ()
    outside_sources: Sequence[str] = ()  # versioned names whose adapter is not under adapterSources
    # Why the newest pod does not start (kubelet's reason and message), while replicas are missing: what
    # the jobs it serves report (serving_contract.PoolReport.message).
    pod_problem: PodProblem | None = None  # fatal: kubelet gave up retrying, Ready says ImagePullFailed
    capture: Mapping[str, int] | None = None  # capture counters summed over the replicas (capture on)


CAPTURE_COUNTERS = ("records", "feedback", "failures", "dropped")


def capture_counters(reports: Mapping[str, Mapping[str, Any] | None]) -> dict[str, int]:
    """status.capture: the routers' capture counters summed over the replicas that report them."""
    found = [(r or {}).get("capture") or {} for r in reports.values()]
    return {
        key: sum(int(c.get(key) or 0) for c in found if isinstance(c, Mapping)) for key in CAPTURE_COUNTERS
    }


def _ready(old: Sequence[Mapping[str, Any]], found: PoolFindings, ready: int) -> Condition:
    counted = f"{ready}/{found.wanted} replicas ready with every adapter loaded"
    previous = find(old, PoolConditionType.READY) or {}
    same_generation = previous.get("observedGeneration") == (found.generation or None)
    was_serving = previous.get("status") == "True" or previous.get("reason") == PoolReason.DEGRADED
    if found.policy is not None and found.policy.status == "False":
        status, reason, message = "False", PoolReason.REFUSED_BY_POLICY, found.policy.message
    elif found.wanted == 0:
        status, reason, message = "False", PoolReason.SCALED_TO_ZERO, "spec.replicas is 0: no replica serves"
    elif ready < found.wanted and found.pod_problem is not None and found.pod_problem.fatal:
        status, reason, message = "False", PoolReason.IMAGE_PULL_FAILED, found.pod_problem.message
    elif ready >= found.wanted:
        status, reason, message = "True", PoolReason.AVAILABLE, counted
    elif was_serving and same_generation:
        status, reason, message = "False", PoolReason.DEGRADED, f"{counted}: replicas were lost"
    else:
        status, reason, message = "False", PoolReason.PROGRESSING, f"{counted}: starting or loading"
    return condition(old, PoolConditionType.READY, status, reason, message, found.now, found.generation)


def conditions(old: Sequence[Mapping[str, Any]], found: PoolFindings, ready: int) -> list[Condition]:
    """Ready, PolicyAllowed (when a policy applies), PinsResolved and AdaptersAllowed."""
    pins = (
        ("False", PoolReason.PIN_UNKNOWN, "; ".join(found.pin_problems))
        if found.pin_problems
        else ("True", PoolReason.RESOLVED, "every pin names a registered version")
    )
    outside = (
        (
            "False",
            PoolReason.ADAPTER_OUTSIDE_SOURCES,
            f"not loaded, their adapter is not under spec.adapterSources: {', '.join(found.outside_sources)}",
        )
        if found.outside_sources
        else ("True", PoolReason.ALLOWED, "every registered adapter is under spec.adapterSources")
    )
    return [
        _ready(old, found, ready),
        *([found.policy] if found.policy is not None else []),
        condition(old, PoolConditionType.PINS_RESOLVED, *pins, found.now, found.generation),
        condition(old, PoolConditionType.ADAPTERS_ALLOWED, *outside, found.now, found.generation),
    ]


def build_status(old: Mapping[str, Any], found: PoolFindings) -> ModelServerStatus:
    """The whole status of one pass (pendingEvents are the controller's: left unset here)."""
    ready = sum(1 for r in found.rows if r["ready"] and r["inSync"])
    refused = found.policy is not None and found.policy.status == "False"
    serving = ", ".join(f"{m}={r.rsplit('-', 1)[-1]}" for m, r in sorted(found.routes.items()))
    replicas = [
        ReplicaStatus.model_validate({k: r[k] for k in ("pod", "loaded", "routes", "ready")})
        for r in found.rows
    ]
    return ModelServerStatus(
        observed_generation=found.generation or None,
        ready_replicas=ready,
        replicas=replicas or None,
        models={name: ModelStatus.model_validate(m) for name, m in found.models.items()} or None,
        model_names=short(serving, 256) or None,
        endpoint=found.endpoint,
        capture=CaptureCounters.model_validate(found.capture) if found.capture is not None else None,
        conditions=conditions(old.get("conditions") or [], found, ready),
        message=found.policy.message if refused and found.policy else _message(found, ready),
    )


def _message(found: PoolFindings, ready: int) -> str:
    counted = f"{ready}/{found.wanted} replicas ready with every adapter loaded"
    problem = found.pod_problem.message if found.pod_problem is not None and ready < found.wanted else None
    return f"{counted}; {problem}" if problem else counted


def invalid_status(old: Mapping[str, Any], error: str, now: datetime, generation: int) -> ModelServerStatus:
    """A spec that does not parse: Ready=False InvalidSpec; what the pool had is left as it was."""
    message = short(f"invalid spec: {error}", 4096)
    ready = condition(
        old.get("conditions") or [],
        PoolConditionType.READY,
        "False",
        PoolReason.INVALID_SPEC,
        message,
        now,
        generation,
    )
    others = [c for c in old.get("conditions") or [] if c.get("type") != PoolConditionType.READY]
    return ModelServerStatus.model_validate(
        {**old, "conditions": [ready, *others], "message": message, "observedGeneration": generation or None}
    )


def as_fields(status: ModelServerStatus, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The status as the API stores it (camelCase, no nulls inside), with every top-level field (`keys`:
    only these), None where unset: `merge_patch` turns that into a removal."""
    dumped = status.model_dump(mode="json", exclude_none=True)
    names = [f.alias or n for n, f in ModelServerStatus.model_fields.items()]
    return {key: dumped.get(key) for key in names if keys is None or key in keys}


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) turning `old` into `new` for new's keys: maps merge key by key, so a key
    that is gone is sent as null; lists and scalars are replaced whole."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if value is None:
            if before is not None:
                patch[key] = None
        elif isinstance(value, Mapping) and isinstance(before, Mapping):
            gone = {k: None for k in before if k not in value}
            inner = {**gone, **merge_patch(before, value)}
            if inner:
                patch[key] = inner
        elif before != value:
            patch[key] = value
    return patch
