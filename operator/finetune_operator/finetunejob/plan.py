"""The planner's input and output: what the operator observed of one FineTuneJob, and what to do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.finetunejob.ref import ObjectRef
from finetune_operator.finetunepolicy.enforcement import PolicyView
from finetune_operator.k8s.actions import ChildDelete, ChildPatch, Event


@dataclass(frozen=True)
class Observed:
    """Everything the operator saw for one FineTuneJob, read in one pass."""

    job: ObjectRef  # a JobRef (with the parsed spec) unless the spec failed validation
    generation: int
    status: Mapping[str, Any]
    children: Mapping[Stage, Mapping[str, Any]]  # Jobs by stage; the Deployment under SERVE
    service: Mapping[str, Any] | None = None
    pods: Mapping[Stage, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    progress: Mapping[str, Any] | None = None  # the trainer's newest progress line
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    spec_error: str | None = None  # the spec failed the operator's own validation
    # Evicted/preempted stage pods this process has seen fail (they are deleted soon after); None: use `pods`.
    disrupted: frozenset[str] | None = None
    # The desired Deployment from an earlier pass, by (stage, generation, adapter, merged): a memo the caller
    # keeps per job so an unchanged job is not rebuilt to be compared (the planner stays deterministic).
    built: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    # (kind, name) → message: children this pass could not create because an object the job does not
    # control has the name (kube.NotOwnedError). The job waits, with that message, instead of creating.
    conflicts: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # The FineTunePolicies selecting the job's namespace and that namespace's use (None: no policy applies).
    policy: PolicyView | None = None
    # The ModelServer named by spec.deployment.server, as last seen (None: none, or not found).
    server: Mapping[str, Any] | None = None








@dataclass
class Plan:
    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[ChildPatch] = field(default_factory=list)
    delete: list[ChildDelete] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # JSON merge patch of .status
    events: list[Event] = field(default_factory=list)

    @property
    def writes(self) -> int:
        return len(self.create) + len(self.patch) + len(self.delete) + len(self.events) + bool(self.status)


