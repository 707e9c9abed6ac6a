"""Which watched objects are a FineTuneJob's children: the operator's own record decides, never labels alone.

The watch caches are keyed by the `finetune.dev/job-uid` label because that routes events cheaply, but
anyone who may create a Job or a pod in any namespace can copy labels. So a Job, Deployment or Service
counts only when it is in the FineTuneJob's namespace and its controller ownerReference (controller: true)
carries the FineTuneJob's uid. A pod counts only when it is in that namespace and its controller is a Job
or Deployment that counts, or a ReplicaSet of a Deployment that counts (on a real cluster the Deployment
controller names them `<deployment>-<pod-template-hash>`; the operator does not watch ReplicaSets, so
their uid is not checked, only that name within the namespace), and it carries the operator's labels
(managed-by, the job's uid): anyone may set a controller ownerReference to a genuine Job, so only pods the
chart's pod admission policy covers (those labels) are read. Everything else is ignored.

The ownerReference is not enough on its own: anyone who may create Jobs in the namespace can set one naming
the FineTuneJob's uid. So a Job, Deployment or Service also counts only when the FineTuneJob's status (which
only the operator may write) records it, in `status.children["<kind>/<name>"]`:
- before creating a child the operator records an intent, the sha256 of a random nonce (`nonceHashes`), and
  puts the nonce itself in the child's annotation `finetune.dev/child-nonce`;
- after creating it, it records the child's `uid` (and drops the hashes).
A child counts when its uid is the recorded one or, while the create is not confirmed (the operator was
killed in between), when its nonce hashes to a recorded intent. Nobody else can know the nonce before the
child exists, so a pre-created look-alike never counts; it is a ChildConflict. Jobs reconciled by an operator
from before status.children (conditions but no record) keep the ownerReference rule until their children
are recorded.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from finetune_vocabulary.labels import LABEL_JOB_UID, LABEL_MANAGED_BY, MANAGER

POD_TEMPLATE_HASH = "pod-template-hash"
ANNOTATION_CHILD_NONCE = "finetune.dev/child-nonce"
# Intents kept per child until its uid is recorded: creates repeated after restarts with a stale cache.
MAX_INTENTS = 8


class _ChildLists(Protocol):
    jobs: list[dict[str, Any]]
    deployments: list[dict[str, Any]]
    services: list[dict[str, Any]]
    pods: list[dict[str, Any]]


C = TypeVar("C", bound=_ChildLists)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference with `controller: true` (Kubernetes allows at most one)."""
    for ref in _meta(obj).get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller") is True:
            return ref
    return None


def describe(obj: Mapping[str, Any], kind: str | None = None) -> str:
    """`Job team-a/demo-train` for logs and messages."""
    meta = _meta(obj)
    return f"{kind or obj.get('kind') or 'object'} {meta.get('namespace')}/{meta.get('name')}"


def is_controlled_by(obj: Mapping[str, Any], namespace: str, owner_uid: str) -> bool:
    """In `namespace`, with a controller ownerReference carrying `owner_uid`."""
    controller = controller_of(obj)
    return (
        _meta(obj).get("namespace") == namespace
        and controller is not None
        and bool(owner_uid)
        and controller.get("uid") == owner_uid
    )


def pod_is_owned(
    pod: Mapping[str, Any],
    namespace: str,
    jobs: Iterable[Mapping[str, Any]],
    deployments: Iterable[Mapping[str, Any]],
) -> bool:
    """The pod's controller is one of `jobs`/`deployments` (already known to count), or a ReplicaSet of one
    of the deployments, in the same namespace."""
    controller = controller_of(pod)
    if _meta(pod).get("namespace") != namespace or controller is None:
        return False
    uid, kind = controller.get("uid"), controller.get("kind")
    if kind == "Job":
        return any(_meta(j).get("uid") == uid for j in jobs if uid)
    if kind == "Deployment":
        return any(_meta(d).get("uid") == uid for d in deployments if uid)
    if kind == "ReplicaSet":
        template_hash = (_meta(pod).get("labels") or {}).get(POD_TEMPLATE_HASH)
        return bool(template_hash) and any(
            controller.get("name") == f"{_meta(d).get('name')}-{template_hash}" for d in deployments
        )
    return False


def has_job_labels(pod: Mapping[str, Any], owner_uid: str) -> bool:
    """The pod carries the labels the operator puts in its Jobs' pod templates (managed-by and the job's
    uid). Only such pods are read: the chart's pod admission policy lets nobody but the Job and ReplicaSet
    controllers create or relabel them, and it cannot see pods without them (docs/security.md "Pods")."""
    labels = _meta(pod).get("labels") or {}
    managed = labels.get(LABEL_MANAGED_BY) == MANAGER
    return bool(owner_uid) and managed and labels.get(LABEL_JOB_UID) == owner_uid


def child_key(kind: str, name: str) -> str:
    """The key of a child's record in status.children."""
    return f"{kind}/{name}"


def nonce_hash(nonce: str) -> str:
    return hashlib.sha256(nonce.encode()).hexdigest()


def is_recorded(obj: Mapping[str, Any], kind: str, records: Mapping[str, Any] | None) -> bool:
    """The FineTuneJob's status records this very object: its uid, or the nonce of a pending create.
    `records` None: a job from before status.children (nothing recorded yet, see the module doc)."""
    if records is None:
        return True
    meta = _meta(obj)
    entry = records.get(child_key(kind, str(meta.get("name"))))
    if not isinstance(entry, Mapping):
        return False
    if entry.get("uid") and entry.get("uid") == meta.get("uid"):
        return True
    nonce = (meta.get("annotations") or {}).get(ANNOTATION_CHILD_NONCE)
    return isinstance(nonce, str) and nonce_hash(nonce) in (entry.get("nonceHashes") or [])


def records_of(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """status.children; None only for a job reconciled before the operator kept that record."""
    records = status.get("children")
    if isinstance(records, Mapping):
        return records
    return None if status.get("conditions") else {}


def intent(entry: Mapping[str, Any] | None, nonce: str) -> dict[str, Any]:
    """The record before a create: a new nonce hash added to those still unconfirmed (an earlier create
    may have succeeded unseen); a recorded uid stays until the new child's replaces it."""
    hashes = list((entry or {}).get("nonceHashes") or [])[-(MAX_INTENTS - 1) :]
    return {**(entry or {}), "nonceHashes": [*hashes, nonce_hash(nonce)]}


def confirmations(children: _ChildLists, records: Mapping[str, Any] | None) -> dict[str, Any]:
    """status.children patch: the uid of every counted child not yet recorded by uid (e.g. the operator was
    killed between creating it and recording it)."""
    patch: dict[str, Any] = {}
    for kind, objects in (
        ("Job", children.jobs),
        ("Deployment", children.deployments),
        ("Service", children.services),
    ):
        for obj in objects:
            meta = _meta(obj)
            key = child_key(kind, str(meta.get("name")))
            entry = (records or {}).get(key) or {}
            if meta.get("uid") and entry.get("uid") != meta.get("uid"):
                patch[key] = {"uid": meta.get("uid"), "nonceHashes": None}
    return patch


def owned_children(
    children: C, namespace: str, owner_uid: str, records: Mapping[str, Any] | None = None
) -> tuple[C, list[dict[str, Any]]]:
    """The children that count for the FineTuneJob (namespace, uid, status.children), and the ignored
    ones. `records` None: the ownerReference alone decides (a job from before status.children)."""
    ignored: list[dict[str, Any]] = []

    def keep(objects: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
        kept = []
        for obj in objects:
            if is_controlled_by(obj, namespace, owner_uid) and is_recorded(obj, kind, records):
                kept.append(obj)
            else:
                ignored.append({**obj, "kind": obj.get("kind") or kind})
        return kept

    jobs = keep(children.jobs, "Job")
    deployments = keep(children.deployments, "Deployment")
    services = keep(children.services, "Service")
    pods = []
    for pod in children.pods:
        if has_job_labels(pod, owner_uid) and pod_is_owned(pod, namespace, jobs, deployments):
            pods.append(pod)
        else:
            ignored.append({**pod, "kind": pod.get("kind") or "Pod"})
    owned = copy.copy(children)
    owned.jobs, owned.deployments, owned.services, owned.pods = jobs, deployments, services, pods
    return owned, ignored


def conflict_message(kind: str, existing: Mapping[str, Any], owner_uid: str = "") -> str:
    """What the user reads when a child's name is taken by an object this FineTuneJob does not control,
    or by one that names it as controller but that the operator did not create (not in status.children)."""
    meta = _meta(existing)
    namespace, name = meta.get("namespace"), meta.get("name")
    controller = controller_of(existing)
    if owner_uid and controller is not None and controller.get("uid") == owner_uid:
        return (
            f"{kind} {namespace}/{name} exists and was not created by the operator for this FineTuneJob: "
            "it names this FineTuneJob as its controller but is not recorded in status.children, so its "
            f"outcome is not trusted; delete it (kubectl delete {kind.lower()} -n {namespace} {name}) "
            "and the job continues, or give this FineTuneJob another name"
        )
    if controller is None:
        whose = "it has no controller (left behind by a deletion with --cascade=orphan?)"
    else:
        owner = f"{controller.get('kind')} {controller.get('name')}"
        whose = f"its controller is {owner} (uid {controller.get('uid')})"
    return (
        f"{kind} {namespace}/{name} exists and is not controlled by this FineTuneJob: {whose}; "
        f"delete it (kubectl delete {kind.lower()} -n {namespace} {name}) and the job continues, "
        "or give this FineTuneJob another name"
    )
