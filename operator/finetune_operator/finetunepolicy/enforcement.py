"""FineTunePolicy enforcement by the operator: pure steps, no API calls (k8s/client.py and the wiring
feed them).

- `applicable`: the policies whose namespaceSelector selects a job's namespace (all of them must allow it).
- `violation`: the static rules, the same as the chart's ValidatingAdmissionPolicy
  (finetunepolicy/admission.py) with the same message, re-checked at reconcile for jobs admitted before a
  policy existed or on a cluster without the admission policy. The job fails with reason PolicyViolation
  before any pod runs.
- `estimate_violation`: maxGpuHoursPerJob, on status.gpuHoursEstimate (known after validation).
- `wait`: the stateful limits (gpuHoursPerMonth, maxConcurrentJobs) on the namespace's use this month; the
  job waits (Suspended, BudgetExceeded / ConcurrencyLimit) before its training Job is created.
- `filled_defaults` / `with_defaults`: a policy's defaults for what a job leaves out, recorded in the job's
  status.policy and applied to the spec the operator builds from, never to the stored spec.
- `usage` / `policy_status`: a namespace's GPU-hours this month (the policy's ledger,
  finetunepolicy/ledger.py, plus what its existing jobs spent since it last recorded them, or the estimate
  of a running job when larger) and its active jobs; what `kubectl get ftp` shows.
- serving (`ServingAsk`, `serving_refusal`): allowedBaseModels and allowedGpuTypes for ModelServers and a
  job's own ModelServer, and maxServingGpus, per object at admission and summed over the namespace here.

A job is counted in the month its creationTimestamp falls in (UTC); its hours stay counted after it is
deleted (the ledger in the policy's status).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_operator.api.finetunejob import FineTuneJobSpec, ResourcesSpec
from finetune_operator.api.finetunepolicy import FineTunePolicy, uri_allowed
from finetune_operator.api.modelserver import ModelServerSpec
from finetune_operator.config import OperatorConfig
from finetune_operator.finetunepolicy.evaluation import evaluation_violations
from finetune_operator.finetunepolicy.ledger import ledger_entry, month_of, recorded
from finetune_operator.k8s.observe import deployment_gpus, finite, gpu_resources, parse_time

# The API's default spec.resources.gpuType: a policy's defaults.gpuType replaces it when the policy does not
# allow it (the API server fills the default in, so "left out" cannot be told apart from it).
API_DEFAULT_GPU_TYPE = str(ResourcesSpec.model_fields["gpu_type"].default)
# Phases of a job that holds (or is about to hold) GPUs: counted by maxConcurrentJobs.
ACTIVE_PHASES = frozenset({"Training", "Evaluating", "Deploying"})
POLICY_WAIT_REASONS = frozenset({"BudgetExceeded", "ConcurrencyLimit"})
# The GPU table's CPU row: serving on it holds no GPU, whatever `gpus` says (the admission policy agrees).
CPU_GPU_TYPE = "cpu"


def denied(policy: str, message: str) -> str:
    return f"denied by FineTunePolicy {policy}: {message}"


@dataclass(frozen=True)
class Usage:
    """One namespace's use this month, without the job being decided."""

    gpu_hours: float = 0.0
    active_jobs: int = 0


@dataclass(frozen=True)
class PolicyView:
    """What the planner needs to know about policies for one job."""

    policies: tuple[FineTunePolicy, ...] = ()
    usage: Usage = field(default_factory=Usage)
    filled: Mapping[str, str] = field(default_factory=dict)  # filled_defaults: camelCase field → value
    # GPU-hours each policy's ledger counts for the namespace this month (by policy name; absent: `usage`).
    spent: Mapping[str, float] = field(default_factory=dict)
    serving_gpus: int = 0  # GPUs the namespace's other serving Deployments hold now

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.policies]


def applicable(policies: Iterable[FineTunePolicy], labels: Mapping[str, str]) -> tuple[FineTunePolicy, ...]:
    """The policies selecting a namespace with these labels, by name."""
    return tuple(
        sorted((p for p in policies if p.spec.namespace_selector.matches(dict(labels))), key=lambda p: p.name)
    )


def _gpu_type_allowed(spec: FineTuneJobSpec, policy: FineTunePolicy) -> bool:
    allowed = policy.spec.allowed_gpu_types
    gpu_type = spec.resources.gpu_type
    if allowed is None or spec.resources.gpus == 0 or gpu_type in allowed:
        return True
    return gpu_type == API_DEFAULT_GPU_TYPE and policy.spec.defaults.gpu_type is not None


def violations(spec: FineTuneJobSpec, policy: FineTunePolicy) -> list[str]:
    """The static rules one policy's spec refuses for this job, as the admission policy words them."""
    p = policy.spec
    out: list[str] = []
    if p.allowed_base_models is not None and not uri_allowed(spec.base_model.uri, p.allowed_base_models):
        out.append(f"spec.baseModel.uri {spec.base_model.uri} is not in allowedBaseModels")
    if p.allowed_datasets is not None:
        for key in ("train", "validation", "test"):
            uri = getattr(spec.dataset, key)
            if uri is not None and not uri_allowed(uri, p.allowed_datasets):
                out.append(f"spec.dataset.{key} {uri} is not in allowedDatasets")
    if p.allowed_outputs is not None and not uri_allowed(spec.storage.output, p.allowed_outputs):
        out.append(f"spec.storage.output {spec.storage.output} is not in allowedOutputs")
    if not _gpu_type_allowed(spec, policy):
        out.append(f"spec.resources.gpuType {spec.resources.gpu_type} is not in allowedGpuTypes")
    gpus, nodes = spec.resources.gpus, spec.resources.nodes
    if p.max_gpus_per_job is not None and gpus * nodes > p.max_gpus_per_job:
        asked = f"spec.resources.gpus {gpus}"
        if nodes > 1:  # a multi-node job holds gpus on every node
            asked += f" x spec.resources.nodes {nodes} = {gpus * nodes} GPUs"
        out.append(f"{asked} is more than maxGpusPerJob {p.max_gpus_per_job}")
    if p.allowed_methods is not None and spec.method not in p.allowed_methods:
        out.append(f"spec.method {spec.method} is not in allowedMethods")
    if p.allowed_objectives is not None and spec.objective not in p.allowed_objectives:
        out.append(f"spec.objective {spec.objective} is not in allowedObjectives")
    if p.max_lora_rank is not None and spec.method != "full" and spec.lora.rank > p.max_lora_rank:
        out.append(f"spec.lora.rank {spec.lora.rank} is more than maxLoraRank {p.max_lora_rank}")
    out += evaluation_violations(spec.evaluation, p)  # reference and judge egress, safety/retention data
    if p.require_thresholds and not (spec.evaluation.enabled and spec.evaluation.thresholds):
        out.append("spec.evaluation.thresholds must gate on at least one metric (requireThresholds)")
    ask = job_serving(spec)
    return out + (serving_violations(ask, policy) if ask else [])


# --- serving -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingAsk:
    """What one serving Deployment asks for, and the fields that say so (for the messages)."""

    prefix: str  # "spec." (a ModelServer) or "spec.deployment." (a FineTuneJob's own Deployment)
    replicas: int
    gpus: int
    gpu_type: str
    type_field: str  # where gpu_type comes from
    # the type is the API's default resources.gpuType, which a policy's defaults.gpuType replaces
    api_default_type: bool = False

    @property
    def held(self) -> int:
        return 0 if self.gpu_type == CPU_GPU_TYPE else self.replicas * self.gpus

    def text(self) -> str:
        p = self.prefix
        return f"{p}replicas {self.replicas} x {p}gpus {self.gpus} = {self.held} GPUs"


def job_serving(spec: FineTuneJobSpec) -> ServingAsk | None:
    """A job's own serving Deployment; None when it serves none (disabled, or on a ModelServer)."""
    d = spec.deployment
    if not d.enabled or d.server:
        return None
    if d.gpu_type:
        return ServingAsk("spec.deployment.", d.replicas, d.gpus, d.gpu_type, "spec.deployment.gpuType")
    gpu_type = spec.resources.gpu_type
    default = gpu_type == API_DEFAULT_GPU_TYPE
    return ServingAsk("spec.deployment.", d.replicas, d.gpus, gpu_type, "spec.resources.gpuType", default)


def server_serving(spec: ModelServerSpec) -> ServingAsk:
    return ServingAsk("spec.", spec.replicas, spec.gpus, spec.gpu_type, "spec.gpuType")


def serving_violations(ask: ServingAsk, policy: FineTunePolicy) -> list[str]:
    """allowedGpuTypes and maxServingGpus for one serving object alone (what admission can see)."""
    p, out = policy.spec, []
    allowed = p.allowed_gpu_types
    exempt = ask.api_default_type and p.defaults.gpu_type is not None
    if allowed is not None and ask.held > 0 and ask.gpu_type not in allowed and not exempt:
        out.append(f"{ask.type_field} {ask.gpu_type} is not in allowedGpuTypes")
    if p.max_serving_gpus is not None and ask.held > p.max_serving_gpus:
        out.append(f"{ask.text()} is more than maxServingGpus {p.max_serving_gpus}")
    return out


def server_violations(spec: ModelServerSpec, policy: FineTunePolicy) -> list[str]:
    """The static rules one policy's spec refuses for a ModelServer, as the admission policy words them."""
    out: list[str] = []
    allowed = policy.spec.allowed_base_models
    if allowed is not None and not uri_allowed(spec.base_model.uri, allowed):
        out.append(f"spec.baseModel.uri {spec.base_model.uri} is not in allowedBaseModels")
    return out + serving_violations(server_serving(spec), policy)


def serving_refusal(
    ask: ServingAsk, static: Sequence[tuple[str, list[str]]], others: int, view: PolicyView | None
) -> tuple[str, str] | None:
    """(reason, message) when a serving Deployment may not be created or grow: the first static rule
    (`static`: policy name → its violations), else maxServingGpus over the namespace's sum."""
    for name, found in static:
        if found:
            return "PolicyViolation", denied(name, found[0])
    for policy in view.policies if view else ():
        limit = policy.spec.max_serving_gpus
        if limit is not None and ask.held > 0 and others + ask.held > limit:
            return "ServingGpuLimit", denied(
                policy.name,
                f"{ask.text()}, with {others} held by the namespace's other servers, is more than "
                f"maxServingGpus {limit}",
            )
    return None


def _growth_refused(
    ask: ServingAsk,
    static: Sequence[tuple[str, list[str]]],
    existing: Mapping[str, Any] | None,
    view: PolicyView,
    config: OperatorConfig,
) -> tuple[str, str] | None:
    """A Deployment is refused only where it is created or would hold more GPUs than it does now."""
    if existing is not None and ask.held <= deployment_gpus(existing, gpu_resources(config)):
        return None
    return serving_refusal(ask, static, view.serving_gpus, view)


def job_serving_wait(
    spec: FineTuneJobSpec, existing: Mapping[str, Any] | None, view: PolicyView | None, config: OperatorConfig
) -> tuple[str, str] | None:
    """(reason, message) when a job's own serving Deployment may not be created or grow now."""
    ask = job_serving(spec)
    if ask is None or view is None:
        return None
    static = [(p.name, serving_violations(ask, p)) for p in view.policies]
    return _growth_refused(ask, static, existing, view, config)


def server_refusal(
    spec: ModelServerSpec, existing: Mapping[str, Any] | None, view: PolicyView | None, config: OperatorConfig
) -> tuple[str, str] | None:
    """(reason, message) when a ModelServer's Deployment may not be created or grow now."""
    if view is None:
        return None
    static = [(p.name, server_violations(spec, p)) for p in view.policies]
    return _growth_refused(server_serving(spec), static, existing, view, config)


def violation(spec: FineTuneJobSpec, view: PolicyView | None) -> str | None:
    """The first static rule an applicable policy refuses, with the policy's name; None: allowed."""
    for policy in view.policies if view else ():
        found = violations(spec, policy)
        if found:
            return denied(policy.name, found[0])
    return None


def estimate_violation(estimate: float | None, view: PolicyView | None) -> str | None:
    """maxGpuHoursPerJob against the operator's estimate (status.gpuHoursEstimate)."""
    if estimate is None:
        return None
    for policy in view.policies if view else ():
        limit = policy.spec.max_gpu_hours_per_job
        if limit is not None and estimate > limit:
            return denied(
                policy.name,
                f"status.gpuHoursEstimate {estimate:g} is more than maxGpuHoursPerJob {limit:g}",
            )
    return None


def wait(estimate: float | None, view: PolicyView | None) -> tuple[str, str] | None:
    """(reason, message) when the namespace's budget or concurrency does not allow starting training now."""
    if view is None:
        return None
    needed = estimate or 0.0
    used, active = view.usage.gpu_hours, view.usage.active_jobs
    for policy in view.policies:
        limit = policy.spec.max_concurrent_jobs
        if limit is not None and active >= limit:
            return (
                "ConcurrencyLimit",
                f"waiting: {active} jobs of this namespace are running, FineTunePolicy {policy.name} allows "
                f"maxConcurrentJobs {limit}; starts when one finishes or the policy allows more",
            )
    for policy in view.policies:
        budget = policy.spec.gpu_hours_per_month
        used = view.spent.get(policy.name, view.usage.gpu_hours)
        if budget is not None and needed > 0 and used + needed > budget:
            return (
                "BudgetExceeded",
                f"waiting: this namespace used {used:.2f} of {budget:g} GPU-hours this month "
                f"(FineTunePolicy {policy.name} gpuHoursPerMonth) and this job needs an estimated "
                f"{needed:.2f}; starts when the policy allows it",
            )
    return None


def filled_defaults(spec: FineTuneJobSpec, view: PolicyView | None) -> dict[str, str]:
    """camelCase field → value the policies fill in for this job (the first policy by name wins)."""
    out: dict[str, str] = {}
    resources = spec.resources
    for policy in view.policies if view else ():
        defaults = policy.spec.defaults
        if defaults.queue_name and not resources.queue_name:
            out.setdefault("queueName", defaults.queue_name)
        if defaults.priority_class_name and not resources.priority_class_name:
            out.setdefault("priorityClassName", defaults.priority_class_name)
        allowed = policy.spec.allowed_gpu_types
        if (
            defaults.gpu_type
            and resources.gpu_type == API_DEFAULT_GPU_TYPE
            and allowed is not None
            and API_DEFAULT_GPU_TYPE not in allowed
        ):
            out.setdefault("gpuType", defaults.gpu_type)
    return out


def with_defaults(spec: FineTuneJobSpec, filled: Mapping[str, str]) -> FineTuneJobSpec:
    """The spec the operator builds from: the stored one with the filled-in defaults."""
    if not filled:
        return spec
    names = {"queueName": "queue_name", "priorityClassName": "priority_class_name", "gpuType": "gpu_type"}
    resources = spec.resources.model_copy(update={names[k]: v for k, v in filled.items()})
    return spec.model_copy(update={"resources": resources})


def status_of(view: PolicyView | None) -> dict[str, Any] | None:
    """The job's status.policy: which policies apply and what they filled in."""
    if view is None or not view.policies:
        return None
    return {"policies": view.names[:16], **view.filled}


def view_for(
    spec: FineTuneJobSpec,
    policies: Iterable[FineTunePolicy],
    labels: Mapping[str, str],
    jobs: Iterable[Mapping[str, Any]],
    namespace: str,
    uid: str,
    now: datetime,
    starting: Iterable[str] = (),
    ledgers: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    serving_gpus: int = 0,
) -> PolicyView | None:
    """Everything the planner needs about policies for one job; None when no policy selects its namespace.
    `ledgers`: each policy's status.ledger by name; `serving_gpus`: what the namespace's other serving
    Deployments hold."""
    selected = applicable(policies, labels)
    if not selected:
        return None
    jobs, month = list(jobs), month_of(now)
    spent = {
        p.name: usage(
            jobs,
            namespace,
            now,
            uid,
            starting,
            ledger_entry((ledgers or {}).get(p.name) or (), namespace, month),
        ).gpu_hours
        for p in selected
    }
    view = PolicyView(selected, usage(jobs, namespace, now, exclude_uid=uid, starting=starting))
    return PolicyView(view.policies, view.usage, filled_defaults(spec, view), spent, serving_gpus)


def waiting_on_policy(body: Mapping[str, Any]) -> bool:
    """A job waiting for budget or concurrency (re-checked on every resync pass)."""
    status = body.get("status") or {}
    if status.get("phase") != "Suspended":
        return False
    ready: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
    )
    return ready.get("reason") in POLICY_WAIT_REASONS


# --- usage ---------------------------------------------------------------------------------------------


def job_hours(body: Mapping[str, Any]) -> float:
    """What a job counts against the budget: GPU-hours spent, or its estimate while it is active."""
    status = body.get("status") or {}
    spent = finite(status.get("gpuHours")) or 0.0
    if status.get("phase") in ACTIVE_PHASES:
        return max(spent, finite(status.get("gpuHoursEstimate")) or 0.0)
    return spent


def usage(
    jobs: Iterable[Mapping[str, Any]],
    namespace: str,
    now: datetime,
    exclude_uid: str | None = None,
    starting: Iterable[str] = (),
    entry: Mapping[str, Any] | None = None,
) -> Usage:
    """The namespace's GPU-hours this month and its active jobs; `starting`: uids whose training Job this
    process is creating (not yet Training in the status), counted as active. `entry`: a policy's ledger
    entry for the namespace and month (finetunepolicy/ledger.py): its total (deleted jobs included) plus
    what the existing jobs spent (or estimate) beyond what it recorded of them."""
    month, active = month_of(now), 0
    held = recorded(entry)
    hours = (finite((entry or {}).get("gpuHours")) or 0.0) - held.get(exclude_uid or "", 0.0)
    starting = set(starting)
    for body in jobs:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if meta.get("namespace") != namespace or uid == exclude_uid:
            continue
        created = parse_time(meta.get("creationTimestamp"))
        if created is None or month_of(created) == month:
            hours += max(0.0, job_hours(body) - held.get(uid, 0.0))
        if (body.get("status") or {}).get("phase") in ACTIVE_PHASES or uid in starting:
            active += 1
    return Usage(round(max(0.0, hours), 3), active)


def policy_status(
    policy: FineTunePolicy,
    namespaces: Mapping[str, Mapping[str, str]],
    jobs: Sequence[Mapping[str, Any]],
    now: datetime,
    ledger: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A FineTunePolicy's status: its selector as text, each selected namespace's use this month (counting
    its `ledger`, policy_ledger.record) and the ledger."""
    selected = sorted(
        n for n, labels in namespaces.items() if policy.spec.namespace_selector.matches(dict(labels))
    )
    month = month_of(now)
    used: list[dict[str, Any]] = []
    for namespace in selected:
        found = usage(jobs, namespace, now, entry=ledger_entry(ledger, namespace, month))
        if found.gpu_hours or found.active_jobs:
            used.append(
                {"namespace": namespace, "gpuHours": found.gpu_hours, "activeJobs": found.active_jobs}
            )
    used.sort(key=lambda u: (-u["gpuHours"], u["namespace"]))
    summary = ", ".join(f"{u['namespace']} {u['gpuHours']:g}h" for u in used[:4]) or "0h"
    if len(used) > 4:
        summary += f", +{len(used) - 4} more"
    return {
        "selector": policy.spec.namespace_selector.display(),
        "month": month,
        "used": used[:64],
        "usedSummary": summary[:256],
        "ledger": list(ledger) or None,
    }
