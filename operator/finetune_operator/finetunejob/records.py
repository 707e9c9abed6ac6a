"""The FineTuneJob controller's own queue and state: one record per job (what the operator remembers between
reconciles), the job's children as the watch caches and its status.children confirm them, and the stage a
child belongs to. The wiring's Context (context.py) composes `JobRecords` and provides `ControllerContext`;
the controller sees only these, never the wiring."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from finetune_vocabulary.labels import LABEL_COMPONENT

from finetune_operator.api.finetunejob import FineTuneJobSpec, parse_spec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.api.schema import SpecError
from finetune_operator.config import OperatorConfig
from finetune_operator.finetunepolicy.enforcement import PolicyView
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import ownership
from finetune_operator.k8s.watchcache import Children, ChildSource, resource_version, snapshot
from finetune_operator.metrics import Metrics

log = logging.getLogger(__name__)


def stage_of(obj: Mapping[str, Any]) -> Stage | None:
    value = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_COMPONENT)
    try:
        return Stage(str(value))
    except ValueError:
        return None


def by_stage(
    found: Children,
) -> tuple[dict[Stage, dict[str, Any]], dict[Stage, list[dict[str, Any]]], dict[str, Any] | None]:
    """A job's children by the stage that made them: its Jobs and Deployment, its pods, its Service."""
    children: dict[Stage, dict[str, Any]] = {}
    for obj in found.jobs + found.deployments:
        stage = stage_of(obj)
        if stage is not None:
            children[stage] = obj
    pods: dict[Stage, list[dict[str, Any]]] = {}
    for pod in found.pods:
        stage = stage_of(pod)
        if stage is not None:
            pods.setdefault(stage, []).append(pod)
    # the serving Service (a multi-node training Job's headless Service is not it)
    service = next((s for s in found.services if stage_of(s) is not Stage.TRAIN), None)
    return children, pods, service


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


@dataclass(kw_only=True)
class JobRecords:
    """The records of every FineTuneJob this process knows (by uid) and the view of their children."""

    children_of: ChildSource = field(default=lambda uid: Children())
    records: dict[str, JobRecord] = field(default_factory=dict)  # by FineTuneJob uid
    # The uids whose training Job this process is creating (active before their status says so).
    starting: set[str] = field(default_factory=set)

    def remember(self, body: Mapping[str, Any]) -> JobRecord:
        """The job's record, holding the newest version of it seen so far."""
        uid = str(body["metadata"]["uid"])
        record = self.records.get(uid)
        if record is None:
            record = self.records[uid] = JobRecord(_essentials(body))
        elif resource_version(body) >= resource_version(record.body) or not resource_version(body):
            record.body = _essentials(body)
        return record

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
        found, ignored = ownership.owned_children(self.labelled(uid), namespace, uid, records)
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

    def labelled(self, uid: str) -> Children:
        """Watch-cache objects labelled with the uid, plus the children this process just created."""
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


class ControllerContext(Protocol):
    """What the FineTuneJob controller needs of the operator's state (the wiring's Context provides it)."""

    config: OperatorConfig
    metrics: Metrics
    api: kube.Api | None
    records: dict[str, JobRecord]
    starting: set[str]

    def remember(self, body: Mapping[str, Any]) -> JobRecord: ...

    def children(self, uid: str, namespace: str) -> Children: ...

    def policy_view(self, spec: FineTuneJobSpec, namespace: str, uid: str) -> PolicyView | None: ...

    def model_server(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...
