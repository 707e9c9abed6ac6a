"""Which watched objects are a FineTuneJob's children: the controller ownerReference decides, never labels.

The watch caches are keyed by the `finetune.dev/job-uid` label because that routes events cheaply, but
anyone who may create a Job or a pod in any namespace can copy labels. So a Job, Deployment or Service
counts only when it is in the FineTuneJob's namespace and its controller ownerReference (controller: true)
carries the FineTuneJob's uid. A pod counts only when it is in that namespace and its controller is a Job
or Deployment that counts, or a ReplicaSet of a Deployment that counts (on a real cluster the Deployment
controller names them `<deployment>-<pod-template-hash>`; the operator does not watch ReplicaSets, so
their uid is not checked, only that name within the namespace). Everything else is ignored.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

POD_TEMPLATE_HASH = "pod-template-hash"


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


def owned_children(children: C, namespace: str, owner_uid: str) -> tuple[C, list[dict[str, Any]]]:
    """The children that count for the FineTuneJob (namespace, uid), and the ignored ones."""
    ignored: list[dict[str, Any]] = []

    def keep(objects: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
        kept = []
        for obj in objects:
            if is_controlled_by(obj, namespace, owner_uid):
                kept.append(obj)
            else:
                ignored.append({**obj, "kind": obj.get("kind") or kind})
        return kept

    jobs = keep(children.jobs, "Job")
    deployments = keep(children.deployments, "Deployment")
    services = keep(children.services, "Service")
    pods = []
    for pod in children.pods:
        if pod_is_owned(pod, namespace, jobs, deployments):
            pods.append(pod)
        else:
            ignored.append({**pod, "kind": pod.get("kind") or "Pod"})
    owned = copy.copy(children)
    owned.jobs, owned.deployments, owned.services, owned.pods = jobs, deployments, services, pods
    return owned, ignored


def conflict_message(kind: str, existing: Mapping[str, Any]) -> str:
    """What the user reads when a child's name is taken by an object this FineTuneJob does not control."""
    meta = _meta(existing)
    namespace, name = meta.get("namespace"), meta.get("name")
    controller = controller_of(existing)
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
