"""FineTunePolicy v1alpha1 (cluster-scoped): what FineTuneJobs in the namespaces a policy selects may use
and spend. The CRD is generated from these models (crdgen.KINDS); the chart's ValidatingAdmissionPolicy
(finetunepolicy/admission.py) enforces the static rules at admission and the operator
(finetunepolicy/enforcement.py) re-checks them and enforces the stateful limits (monthly GPU-hours,
concurrency).

Every list and map is bounded (maxItems, maxLength, maxProperties) so that kube-apiserver's CEL cost
estimates for the admission policy, which iterate over them, stay far below its limits.

URI patterns are globs of one form only: an exact URI, or a prefix ending in a single `*`
(`s3://models-approved/*`, `hf://meta-llama/*`). That is a `startsWith` in CEL: no regex is built from user
text (RE2 and cost limits hold), and the operator matches the same way (`uri_allowed`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from finetune_vocabulary.objectives import OBJECTIVES, Objective
from pydantic import Field, ValidationError

from finetune_operator.api.schema import (
    DNS_LABEL_PATTERN,
    LABEL_VALUE_PATTERN,
    QUALIFIED_NAME_PATTERN,
    DNSLabel,
    DNSSubdomain,
    ObjectModel,
    SpecError,
    SpecModel,
    StatusModel,
    field_errors,
)
from finetune_operator.api.sections import Method

KIND = "FineTunePolicy"
PLURAL = "finetunepolicies"
SINGULAR = "finetunepolicy"
SHORT_NAMES = ("ftp",)

MAX_PATTERNS = 32  # URI patterns per list
MAX_PATTERN_LENGTH = 256
MAX_SELECTOR_LABELS = 16
MAX_SELECTOR_EXPRESSIONS = 8
MAX_SELECTOR_VALUES = 16
MAX_NAMESPACES_IN_STATUS = 64
# The GPU-hour ledger: the last LEDGER_MONTHS months of each selected namespace, and per entry the jobs it
# has recorded hours of that still exist (a deleted job's hours stay in the entry's total).
LEDGER_MONTHS = 3
MAX_LEDGER_ENTRIES = 3000
MAX_LEDGER_JOBS = 1000

# An exact URI or a prefix with one trailing `*`; no other wildcard anywhere.
URI_GLOB_PATTERN = r"^(s3|hf|pvc)://[^*\s]*\*?$"
# A host name or `*.suffix` (any subdomain of suffix), as in the operator's reference host lists.
HOST_PATTERN = r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$"

UriGlob = Annotated[str, Field(min_length=6, max_length=MAX_PATTERN_LENGTH, pattern=URI_GLOB_PATTERN)]
UriGlobs = Annotated[list[UriGlob], Field(max_length=MAX_PATTERNS)]
LabelKey = Annotated[str, Field(min_length=1, max_length=316, pattern=QUALIFIED_NAME_PATTERN)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
Host = Annotated[str, Field(min_length=1, max_length=253, pattern=HOST_PATTERN)]


def uri_allowed(uri: str, patterns: list[str]) -> bool:
    """Whether `uri` matches one of `patterns` (exact, or prefix before a trailing `*`): the CEL's rule."""
    return any(uri.startswith(p[:-1]) if p.endswith("*") else uri == p for p in patterns)


def host_allowed(host: str, hosts: list[str]) -> bool:
    """`host` is listed, or is a subdomain of a listed `*.suffix`."""
    return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in hosts)


class SelectorRequirement(SpecModel):
    """metav1.LabelSelectorRequirement."""

    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] | None = Field(default=None, max_length=MAX_SELECTOR_VALUES)


class NamespaceSelector(SpecModel):
    """metav1.LabelSelector over namespace labels; empty selects every namespace."""

    match_labels: dict[Annotated[str, Field(max_length=316)], LabelValue] | None = Field(
        default=None, max_length=MAX_SELECTOR_LABELS, description="Labels a namespace must carry."
    )
    match_expressions: list[SelectorRequirement] | None = Field(
        default=None, max_length=MAX_SELECTOR_EXPRESSIONS, description="Requirements on namespace labels."
    )

    def matches(self, labels: dict[str, str]) -> bool:
        for key, value in (self.match_labels or {}).items():
            if labels.get(key) != value:
                return False
        for req in self.match_expressions or []:
            present, values = req.key in labels, req.values or []
            ok = {
                "In": present and labels.get(req.key) in values,
                "NotIn": not present or labels.get(req.key) not in values,
                "Exists": present,
                "DoesNotExist": not present,
            }[req.operator]
            if not ok:
                return False
        return True

    def display(self) -> str:
        """kubectl's selector text, e.g. `tier=team,env in (dev,prod)`; empty: `<all>`."""
        parts = [f"{k}={v}" for k, v in sorted((self.match_labels or {}).items())]
        for req in self.match_expressions or []:
            values = ",".join(req.values or [])
            parts.append(
                {
                    "In": f"{req.key} in ({values})",
                    "NotIn": f"{req.key} notin ({values})",
                    "Exists": req.key,
                    "DoesNotExist": f"!{req.key}",
                }[req.operator]
            )
        return ",".join(parts) or "<all>"


class PolicyDefaults(SpecModel):
    """Filled in by the operator when a job leaves them out (recorded in the job's status.policy, the
    job's spec is never changed)."""

    queue_name: DNSSubdomain | None = Field(default=None, description="Kueue LocalQueue of jobs without one.")
    gpu_type: DNSLabel | None = Field(
        default=None,
        description="GPU type of jobs left on the API's default (a100-80gb) when the policy does not allow "
        "that type.",
    )
    priority_class_name: DNSSubdomain | None = Field(
        default=None, description="PriorityClass of jobs without one."
    )


class FineTunePolicySpec(SpecModel):
    """What FineTuneJobs in the selected namespaces may use and spend. Unset fields allow anything; when
    several policies select a namespace, every one of them must allow a job."""

    namespace_selector: NamespaceSelector = Field(
        default_factory=NamespaceSelector,
        json_schema_extra={"default": {}},
        description="Namespaces this policy applies to (label selector); empty: all namespaces.",
    )
    allowed_base_models: UriGlobs | None = Field(
        default=None, description="spec.baseModel.uri patterns: exact URIs or prefixes ending in '*'."
    )
    allowed_datasets: UriGlobs | None = Field(
        default=None, description="spec.dataset.train/validation/test patterns."
    )
    allowed_outputs: UriGlobs | None = Field(default=None, description="spec.storage.output patterns.")
    allowed_gpu_types: list[DNSLabel] | None = Field(
        default=None, max_length=MAX_PATTERNS, description="spec.resources.gpuType values (GPU jobs)."
    )
    max_gpus_per_job: int | None = Field(
        default=None, ge=0, le=16, description="spec.resources.gpus at most."
    )
    max_serving_gpus: int | None = Field(
        default=None,
        ge=0,
        le=100_000,
        description="GPUs serving may hold per namespace: replicas x gpus summed over its ModelServers "
        "and its FineTuneJobs' own Deployments (gpuType cpu holds none).",
    )
    max_gpu_hours_per_job: float | None = Field(
        default=None,
        ge=0,
        le=1e6,
        description="status.gpuHoursEstimate at most (checked by the operator after validation).",
    )
    gpu_hours_per_month: float | None = Field(
        default=None,
        ge=0,
        le=1e9,
        description="GPU-hours per namespace per calendar month (UTC): spent by the month's jobs plus the "
        "estimates of running ones. A job that would exceed it waits (Suspended, BudgetExceeded).",
    )
    max_concurrent_jobs: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="Jobs per namespace past validation and not finished; more wait (ConcurrencyLimit).",
    )
    allow_reference: bool = Field(default=True, description="Whether spec.evaluation.reference may be used.")
    allowed_reference_hosts: list[Host] | None = Field(
        default=None, max_length=MAX_PATTERNS, description="Hosts (or *.suffix) a reference URL may name."
    )
    require_thresholds: bool = Field(
        default=False, description="Jobs must gate on at least one evaluation threshold."
    )
    max_lora_rank: int | None = Field(default=None, ge=1, le=1024, description="spec.lora.rank at most.")
    allowed_methods: list[Method] | None = Field(
        default=None, max_length=3, description="spec.method values."
    )
    allowed_objectives: list[Objective] | None = Field(
        default=None,
        max_length=len(OBJECTIVES),
        description="spec.objective values (sft, dpo, kto, grpo); unset: all.",
    )
    defaults: PolicyDefaults = Field(
        default_factory=PolicyDefaults,
        json_schema_extra={"default": {}},
        description="Values the operator fills in for jobs that leave them out.",
    )


class NamespaceUsage(StatusModel):
    """One selected namespace's use this month."""

    namespace: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    gpu_hours: float = Field(ge=0, le=1e12, description="GPU-hours used (spent + running estimates).")
    active_jobs: int = Field(ge=0, le=1_000_000, description="Jobs past validation and not finished.")


class LedgerJob(StatusModel):
    """The GPU-hours a ledger entry holds of one job that still exists."""

    uid: str = Field(max_length=64)
    gpu_hours: float = Field(ge=0, le=1e12)


class LedgerEntry(StatusModel):
    """GPU-hours spent by one namespace's jobs created in one month, deleted jobs included."""

    namespace: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    month: str = Field(max_length=7, pattern=r"^[0-9]{4}-[0-9]{2}$", description="YYYY-MM (UTC).")
    gpu_hours: float = Field(ge=0, le=1e12, description="Spent by the month's jobs, deleted ones included.")
    jobs: list[LedgerJob] | None = Field(
        default=None,
        max_length=MAX_LEDGER_JOBS,
        description="What is recorded of each existing job (so a repeated pass adds only what is new).",
    )


class FineTunePolicyStatus(StatusModel):
    """Written by the operator (the status subresource: namespaces cannot edit it)."""

    selector: str | None = Field(default=None, max_length=1024, description="The namespace selector as text.")
    month: str | None = Field(default=None, max_length=7, description="The month counted (YYYY-MM, UTC).")
    used: list[NamespaceUsage] | None = Field(
        default=None, max_length=MAX_NAMESPACES_IN_STATUS, description="Use per selected namespace."
    )
    used_summary: str | None = Field(
        default=None, max_length=256, description="Short text for kubectl (Used column)."
    )
    ledger: list[LedgerEntry] | None = Field(
        default=None,
        max_length=MAX_LEDGER_ENTRIES,
        description="GPU-hours spent per namespace and month (the last 3 months), kept after jobs are "
        "deleted: what gpuHoursPerMonth counts.",
    )


class JobPolicyStatus(StatusModel):
    """On a FineTuneJob: the policies that apply to it and the defaults they filled in."""

    policies: list[Annotated[str, Field(max_length=253)]] | None = Field(
        default=None, max_length=16, description="FineTunePolicies selecting the job's namespace."
    )
    queue_name: str | None = Field(default=None, max_length=253, description="Queue filled in by a policy.")
    gpu_type: str | None = Field(default=None, max_length=63, description="GPU type filled in by a policy.")
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass filled in by a policy."
    )


class FineTunePolicy(ObjectModel):
    """A FineTunePolicy object as stored by the API server."""

    name: str = ""
    spec: FineTunePolicySpec


def parse_policy(obj: dict[str, object]) -> FineTunePolicy:
    """A stored policy object → FineTunePolicy; SpecError names the bad field."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "") if isinstance(meta, dict) else ""
    try:
        return FineTunePolicy(name=name, spec=FineTunePolicySpec.model_validate(obj.get("spec") or {}))
    except ValidationError as exc:
        raise SpecError(field_errors(exc, ("spec",))) from None
