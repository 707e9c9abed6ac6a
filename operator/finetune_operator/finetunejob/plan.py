"""The planner's input, its working state and its output: what the operator observed of one FineTuneJob
(`Observed`), the status one pass is building (`Draft`, `JobDraft`), the stage table's row type
(`StageRow`), and what to do (`Plan`).

The planner (planner.py) owns the draft of a pass and hands it to the stage readers (stages.py, pooljob.py):
they write the status, conditions, Events and children into the draft and never see the planner, so the
package has no import circle: plan <- stages, pooljob <- planner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from finetune_operator.api.conditions import ConditionType, Reason, short, timestamp
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunejob_status import Phase, Stage
from finetune_operator.api.modelserver import KIND as MODELSERVER_KIND
from finetune_operator.config import OperatorConfig
from finetune_operator.containers.termination import JobOutcome
from finetune_operator.finetunejob.ref import Artifacts, JobRef, ObjectRef
from finetune_operator.finetunepolicy.enforcement import PolicyView
from finetune_operator.k8s.actions import ChildDelete, ChildPatch, Event
from finetune_operator.k8s.naming import child_name
from finetune_operator.k8s.ownership import is_controlled_by, is_recorded, records_of


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
    # The ModelServer named by spec.deployment.server, else the job's own, as last seen (None: not found).
    server: Mapping[str, Any] | None = None
    # The job's own ModelServer when spec.deployment.server names another one (it is retired then).
    own_server: Mapping[str, Any] | None = None


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


@dataclass(kw_only=True)
class Draft:
    """One pass: what it read (`o`, `config`; never written) and what it has decided so far: the status
    being built, its conditions by type, the Ready reason, and the actions (`out`: children to create, patch
    or delete, Events). `Planner.finish` turns it into the Plan's status patch."""

    o: Observed
    config: OperatorConfig
    out: Plan = field(default_factory=Plan)
    status: dict[str, Any] = field(init=False)
    conditions: dict[str, dict[str, Any]] = field(init=False)
    old_phase: str = field(init=False)
    ready_reason: Reason = Reason.PENDING
    ready_message: str = ""

    def __post_init__(self) -> None:
        current = self.o.status
        self.old_phase = str(current.get("phase") or "")
        self.status = {k: v for k, v in current.items() if k != "kopf"}
        self.conditions = {
            str(c["type"]): dict(c) for c in current.get("conditions") or [] if isinstance(c, Mapping)
        }

    def condition(self, kind: ConditionType, status: str, reason: Reason, message: str = "") -> None:
        old = self.conditions.get(kind.value)
        kept = old.get("lastTransitionTime") if old is not None and old.get("status") == status else None
        self.conditions[kind.value] = {
            "type": kind.value,
            "status": status,
            "observedGeneration": self.o.generation,
            "lastTransitionTime": kept or timestamp(self.o.now),
            "reason": reason.value,
            "message": short(message),
        }

    def done(self, kind: ConditionType) -> bool:
        return (self.conditions.get(kind.value) or {}).get("status") == "True"

    def phase(self, phase: Phase, reason: Reason, message: str = "") -> None:
        self.status["phase"] = phase.value
        self.ready_reason = reason
        self.ready_message = short(message)
        self.status["message"] = self.ready_message or None

    def complete(self, phase: Phase, reason: Reason, message: str) -> None:
        self.phase(phase, reason, message)
        if self.old_phase != phase.value or not self.status.get("completionTime"):
            self.status["completionTime"] = self.status.get("completionTime") or timestamp(self.o.now)


@dataclass(kw_only=True)
class JobDraft(Draft):
    """The draft of a job with a valid spec: it knows the job and the stage table, so a stage's condition
    and phase are reported by naming the stage (or its row)."""

    job: JobRef
    rows: Mapping[Stage, StageRow]
    # (pool URL, model) once this pass found the job's version loaded and its serving check still to pass
    serving_target: tuple[str, str] | None = None

    def fail(self, stage: Stage, reason: Reason, message: str) -> None:
        self.condition(self.rows[stage].condition, "False", reason, message)
        self.phase(Phase.FAILED, reason, message)

    def blocked(self, stage: Stage, manifest: Mapping[str, Any]) -> bool:
        """Wait (Pending, reason ChildConflict) when the child's name is taken by a foreign object."""
        message = self.o.conflicts.get((str(manifest["kind"]), str(manifest["metadata"]["name"])))
        if message is None:
            return False
        self.condition(self.rows[stage].condition, "Unknown", Reason.CHILD_CONFLICT, message)
        self.phase(Phase.PENDING, Reason.CHILD_CONFLICT, message)
        return True

    def running(self, row: StageRow, message: str = "", condition_message: str = "") -> None:
        if row.running_messages is not None:
            condition_message, message = row.running_messages
        self.condition(row.condition, "Unknown", row.running, condition_message)
        self.phase(row.phase, row.running, message)

    def waiting(self, row: StageRow, reason: Reason, message: str) -> None:
        self.condition(row.condition, "Unknown", reason, message)
        self.phase(row.phase, reason, message)

    def suspended(self, row: StageRow) -> None:
        self.condition(row.condition, "Unknown", Reason.SUSPENDED, "suspended by spec.suspend")
        self.phase(Phase.SUSPENDED, Reason.SUSPENDED, f"{row.stage.value} is suspended (spec.suspend)")

    def retire_serving(self) -> None:
        """Delete the per-job vLLM Deployment and Service an operator from before issue 21 created: once, on
        upgrade, the job's ModelServer (ownedserver.py) replaces them. The names are the ModelServer's."""
        name = child_name(self.job.name, Stage.SERVE)
        if self.o.children.get(Stage.SERVE) is not None:
            self.out.delete.append(ChildDelete("Deployment", name))
        if self.o.service is not None:
            self.out.delete.append(ChildDelete("Service", name))
        self.status["endpoint"] = None

    def owns_server(self, server: Mapping[str, Any]) -> bool:
        """Controlled by the job and recorded in its status.children (a forged ownerReference is not)."""
        return is_controlled_by(server, self.job.namespace, self.job.uid) and is_recorded(
            server, MODELSERVER_KIND, records_of(self.status)
        )

    def retire_own_server(self, server: Mapping[str, Any] | None) -> None:
        """Delete the job's own ModelServer (deployment disabled, or moved to a shared one: its GPUs go)."""
        if server is not None and self.owns_server(server):
            self.out.delete.append(ChildDelete(MODELSERVER_KIND, child_name(self.job.name, Stage.SERVE)))


Builder = Callable[[JobRef, OperatorConfig, Artifacts], dict[str, Any]]
# Records a finished stage in the draft; False stops the pass (the job was rejected or failed).
OutcomeReader = Callable[[JobDraft, JobOutcome], bool]
Step = Callable[[JobDraft], bool]


@dataclass(frozen=True)
class StageRow:
    """One row of the stage table (stages.STAGES): the child a stage runs and how it is reported."""

    stage: Stage
    kind: Literal["Job", "ModelServer"]
    build: Builder
    condition: ConditionType
    phase: Phase
    running: Reason  # the condition's and phase's reason while the child runs
    read: OutcomeReader | None = None  # Jobs: the finished stage's outcome → status
    # Whether the stage runs for this spec (and what is already in storage); when not, `skip` reports it.
    wanted: Callable[[FineTuneJobSpec, Artifacts], bool] = lambda spec, artifacts: True
    skip: Step | None = None
    # The stage's condition turns True when it finishes, so a finished stage never runs again;
    # `holds` then says whether its result still lets the pipeline go on.
    owns_condition: bool = True
    holds: Step | None = None
    while_running: Callable[[JobDraft], None] | None = None
    counts_gpu_hours: bool = False  # status.gpuHours is refreshed while it runs and when it ends
    # (condition message, phase message) while running, instead of "Job <name> is running".
    running_messages: tuple[str, str] | None = None
