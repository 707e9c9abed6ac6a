"""What the operator keeps between reconciles: one record per FineTuneJob and the children as the watch
caches have them. Lives in Kopf's memo (`memo["ctx"]`), created by `__main__` and shared by the handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_vocabulary.labels import LABEL_COMPONENT, LABEL_JOB_UID

from finetune_operator.api.finetunejob import FineTuneJobSpec, parse_spec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.api.finetunepolicy import FineTunePolicy
from finetune_operator.api.schema import SpecError
from finetune_operator.config import OperatorConfig
from finetune_operator.finetunepolicy import enforcement as policy
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import observe, ownership
from finetune_operator.metrics import Metrics
from finetune_operator.modelserver.queue import PoolController

log = logging.getLogger(__name__)

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
    """The parts of a child the planner reads; keeps the watch caches small."""
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


def stage_of(obj: Mapping[str, Any]) -> Stage | None:
    value = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_COMPONENT)
    try:
        return Stage(str(value))
    except ValueError:
        return None


def resource_version(body: Mapping[str, Any]) -> int:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


@dataclass
class Children:
    """Snapshots of one job's children, as the watch caches have them."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)

    def by_stage(
        self,
    ) -> tuple[dict[Stage, dict[str, Any]], dict[Stage, list[dict[str, Any]]], dict[str, Any] | None]:
        children: dict[Stage, dict[str, Any]] = {}
        for obj in self.jobs + self.deployments:
            stage = stage_of(obj)
            if stage is not None:
                children[stage] = obj
        pods: dict[Stage, list[dict[str, Any]]] = {}
        for pod in self.pods:
            stage = stage_of(pod)
            if stage is not None:
                pods.setdefault(stage, []).append(pod)
        # the serving Service (a multi-node training Job's headless Service is not it)
        service = next((s for s in self.services if stage_of(s) is not Stage.TRAIN), None)
        return children, pods, service


ChildSource = Callable[[str], Children]


@dataclass
class ParsedSpec:
    """The operator's validation of one generation's spec (pydantic is most of a pass's cost)."""

    generation: int
    spec: FineTuneJobSpec | None
    error: str | None


@dataclass
class JobRecord:
    """Everything the operator remembers about one FineTuneJob between reconciles."""

    body: dict[str, Any]  # the newest version seen (a watch event can be older than our own status patch)
    dirty: bool = False  # the last reconcile failed: the resync loop runs it again
    last_run: float | None = None  # time.monotonic() of the last reconcile
    # Children this process created that the watch cache may not show yet, by "<name>/<kind>".
    created: dict[str, dict[str, Any]] = field(default_factory=dict)
    disrupted: set[str] = field(default_factory=set)  # evicted pods seen failing (soon deleted)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    parsed: ParsedSpec | None = None
    built: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)  # Observed.built
    # Objects carrying the job's labels that are not its children, and name conflicts, already logged.
    ignored: set[str] = field(default_factory=set)
    # The nonce of each child this process is creating, by "<kind>/<name>" (ownership.py: status.children).
    nonces: dict[str, str] = field(default_factory=dict)

    def spec(self) -> ParsedSpec:
        """The parsed spec of the current generation, parsed once per generation."""
        generation = int(self.body["metadata"].get("generation") or 1)
        if self.parsed is None or self.parsed.generation != generation:
            try:
                self.parsed = ParsedSpec(generation, parse_spec(dict(self.body.get("spec") or {})), None)
            except SpecError as exc:
                self.parsed = ParsedSpec(generation, None, str(exc))
        return self.parsed


def _essentials(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": dict(body["metadata"]),
        "spec": body.get("spec") or {},
        "status": dict(body.get("status") or {}),
    }


@dataclass
class Context:
    """Operator-wide state shared by handlers (Kopf's memo)."""

    config: OperatorConfig
    metrics: Metrics = field(default_factory=Metrics)
    api: kube.Api | None = None
    children_of: ChildSource = field(default=lambda uid: Children())
    records: dict[str, JobRecord] = field(default_factory=dict)  # by FineTuneJob uid
    connection: Any = None
    resync: asyncio.Task[None] | None = None  # the resync loop (lifecycle.py), started by Kopf's startup
    # FineTunePolicies and namespace labels as the watches have them (policy.py), the uids whose training
    # Job this process is creating (active before their status says so), and each policy's last status.
    policies: dict[str, FineTunePolicy] = field(default_factory=dict)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    starting: set[str] = field(default_factory=set)
    policy_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Each policy's GPU-hour ledger (policy_ledger.py) as last read or written, with its resourceVersion.
    ledgers: dict[str, tuple[int, list[dict[str, Any]]]] = field(default_factory=dict)

    def policy_view(self, spec: FineTuneJobSpec, namespace: str, uid: str) -> policy.PolicyView | None:
        """The policies selecting the job's namespace and the namespace's use; None without policies."""
        if not self.policies:
            return None
        limited = any(p.spec.max_serving_gpus is not None for p in self.policies.values())
        return policy.view_for(
            spec,
            self.policies.values(),
            self.namespace_labels.get(namespace, {}),
            (record.body for record in self.records.values()),
            namespace,
            uid,
            datetime.now(UTC),
            self.starting,
            {name: ledger for name, (_, ledger) in self.ledgers.items()},
            self.serving_gpus(namespace, uid) if limited else 0,
        )

    def serving_gpus(self, namespace: str, exclude_uid: str) -> int:
        """GPUs the serving Deployments of the namespace's jobs and ModelServers hold, but `exclude_uid`'s
        (from the watch cache: what runs, not what specs ask for)."""
        names = observe.gpu_resources(self.config)
        jobs = [uid for uid, r in self.records.items() if r.body["metadata"].get("namespace") == namespace]
        held = [d for uid in jobs if uid != exclude_uid for d in self.children(uid, namespace).deployments]
        for uid, key in self.pools.by_uid.items():
            if key[0] == namespace and uid != exclude_uid:  # a pool's children: its controller reference
                held += ownership.owned_children(self._labelled(uid), namespace, uid)[0].deployments
        return sum(observe.deployment_gpus(d, names) for d in held)

    pools: PoolController = field(default_factory=PoolController)  # ModelServers (pool.py)

    def remember(self, body: Mapping[str, Any]) -> JobRecord:
        """The job's record, holding the newest version of it seen so far."""
        uid = str(body["metadata"]["uid"])
        record = self.records.get(uid)
        if record is None:
            record = self.records[uid] = JobRecord(_essentials(body))
        elif resource_version(body) >= resource_version(record.body) or not resource_version(body):
            record.body = _essentials(body)
        return record

    def forget(self, uid: str) -> None:
        self.records.pop(uid, None)
        self.starting.discard(uid)
        self.metrics.forget(uid)

    def is_echo_of_created(self, uid: str, body: Mapping[str, Any]) -> bool:
        """A watch event for a child this process just created, showing nothing it does not know."""
        record = self.records.get(uid)
        created = record.created.get(f"{body['metadata']['name']}/{body.get('kind')}") if record else None
        return created is not None and snapshot(body)["status"] == created["status"]

    def children(self, uid: str, namespace: str) -> Children:
        """The job's children: watch-cache objects with its label that its controller ownerReference and
        its status.children confirm (ownership.py), plus the ones this process created that the cache has
        not shown yet."""
        record = self.records.get(uid)
        records = ownership.records_of((record.body.get("status") or {}) if record else {})
        found, ignored = ownership.owned_children(self._labelled(uid), namespace, uid, records)
        self._log_ignored(uid, ignored)
        return found

    def _log_ignored(self, uid: str, ignored: Iterable[Mapping[str, Any]]) -> None:
        record = self.records.get(uid)
        seen = record.ignored if record is not None else set()
        for obj in ignored:
            key = str((obj.get("metadata") or {}).get("uid") or ownership.describe(obj))
            if key not in seen:
                seen.add(key)
                log.warning(
                    "ignoring %s: it carries the labels of FineTuneJob uid %s but is not its child (no "
                    "controller reference in its namespace, or not created by the operator)",
                    ownership.describe(obj),
                    uid,
                )

    def _labelled(self, uid: str) -> Children:
        """Watch-cache objects labelled with the job's uid, plus the children this process just created."""
        found = self.children_of(uid)
        record = self.records.get(uid)
        if record is not None and record.created:
            lists = {"Job": found.jobs, "Deployment": found.deployments, "Service": found.services}
            for key, obj in list(record.created.items()):
                listed = lists.get(obj["kind"])
                if listed is None:  # a job's own ModelServer: read from the pools' cache, not a child list
                    del record.created[key]
                    continue
                # Watch events may omit `kind`; the list a snapshot sits in says what it is.
                if any(c["metadata"]["name"] == obj["metadata"]["name"] for c in listed):
                    del record.created[key]
                else:
                    listed.append(obj)
        return found
