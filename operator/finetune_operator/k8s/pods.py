"""The pieces every child shares: labels, owner reference, security contexts, placement, resources, volumes.

Kind-neutral: an `Owner` is anything with a namespace, name, uid and `owner_kind` (a FineTuneJob's JobRef, a
ModelServer's PoolRef), so both kinds' children get one label set, one owner reference and one name scheme.
Pure functions returning typed manifests (k8s/manifests.py); the builders assemble them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict, cast

from finetune_vocabulary.labels import (
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PART_OF,
    MANAGER,
)

from finetune_operator.api.finetunejob import FineTuneJobSpec, ResourcesSpec
from finetune_operator.config import GpuType, OperatorConfig
from finetune_operator.k8s.manifests import (
    EnvFromSource,
    EnvVar,
    ObjectMeta,
    OwnerReference,
    PodSecurityContext,
    ResourceRequirements,
    SecurityContext,
    Toleration,
    Volume,
    VolumeMount,
)
from finetune_operator.k8s.naming import child_name, label_safe

WORKDIR = "/workspace"
PVC_ROOT = "/mnt/pvc"  # the trainer's default FTJ_PVC_ROOT (CONTRACT.md)


@dataclass(frozen=True)
class OwnerKind:
    """What one kind's children share: the owner reference's apiVersion and kind, the app.kubernetes.io/name
    label, the label that carries the owner's uid (the watch caches' key), and the letter a hashed child
    name starts with when the owner's name does not (naming.child_name's `lead`)."""

    api_version: str
    kind: str
    app: str
    uid_label: str
    name_lead: str


class Owner(Protocol):
    """Who owns a child. FineTuneJob's JobRef and ModelServer's PoolRef satisfy it structurally."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def uid(self) -> str: ...
    @property
    def owner_kind(self) -> OwnerKind: ...


class JobOwner(Owner, Protocol):
    """An owner with a parsed FineTuneJob spec (the job's storage, placement and priority settings)."""

    @property
    def spec(self) -> FineTuneJobSpec: ...


class PodAccount(TypedDict, total=False):
    """The PodSpec fields naming the pod's service account (or turning its API token off)."""

    serviceAccountName: str
    automountServiceAccountToken: bool


class PodPriority(TypedDict, total=False):
    priorityClassName: str


class Placement(TypedDict, total=False):
    """The PodSpec fields that place a pod: nodeSelector and tolerations."""

    nodeSelector: dict[str, str]
    tolerations: list[Toleration]


def child_name_of(owner: Owner, component: str) -> str:
    return child_name(owner.name, component, lead=owner.owner_kind.name_lead)


def selector_labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        LABEL_INSTANCE: label_safe(owner.name),
        LABEL_COMPONENT: str(component),
        owner.owner_kind.uid_label: owner.uid,
    }


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: owner.owner_kind.app,
        LABEL_PART_OF: MANAGER,
        LABEL_MANAGED_BY: MANAGER,
        **selector_labels(owner, component),
    }


def owner_reference(owner: Owner) -> OwnerReference:
    return {
        "apiVersion": owner.owner_kind.api_version,
        "kind": owner.owner_kind.kind,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(owner: Owner, component: str, annotations: Mapping[str, str] | None = None) -> ObjectMeta:
    meta: ObjectMeta = {
        "name": child_name_of(owner, component),
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def spec_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def pod_security_context(config: OperatorConfig) -> PodSecurityContext:
    uid = config.defaults.run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> SecurityContext:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def credentials_env_from(job: JobOwner) -> list[EnvFromSource]:
    """Storage credentials by reference only: the operator never reads the Secret."""
    secret = job.spec.storage.credentials_secret
    return [{"secretRef": {"name": secret}}] if secret else []


def service_account(job: JobOwner) -> PodAccount:
    account = job.spec.storage.service_account_name
    # No API token in pods unless a workload-identity service account is asked for.
    if account:
        return {"serviceAccountName": account}
    return {"automountServiceAccountToken": False}


def priority_class(job: JobOwner) -> PodPriority:
    """resources.priorityClassName on every pod that asks for accelerators or serves (not validation)."""
    name = job.spec.resources.priority_class_name
    return {"priorityClassName": name} if name else {}


def merge_tolerations(*groups: Sequence[Toleration]) -> list[Toleration]:
    merged: list[Toleration] = []
    for group in groups:
        for toleration in group:
            item: Toleration = {**toleration}
            if item not in merged:
                merged.append(item)
    return merged


def gpu_placement(gpu_type: GpuType, gpus: int, user: ResourcesSpec | None = None) -> Placement:
    """nodeSelector + tolerations: the GPU type's, then the user's (the user's keys win)."""
    selector: dict[str, str] = dict(gpu_type.node_selector) if gpus > 0 else {}
    user_tolerations: list[Toleration] = []
    if user is not None:
        selector.update(user.node_selector or {})
        user_tolerations = [
            _toleration(t.model_dump(by_alias=True, exclude_none=True)) for t in user.tolerations or ()
        ]
    gpu_tolerations = [_toleration(t.manifest()) for t in gpu_type.tolerations] if gpus > 0 else []
    tolerations = merge_tolerations(gpu_tolerations, user_tolerations)
    placement: Placement = {}
    if selector:
        placement["nodeSelector"] = selector
    if tolerations:
        placement["tolerations"] = tolerations
    return placement


def _toleration(validated: Mapping[str, Any]) -> Toleration:
    """A toleration the spec's (or the GPU table's) model already validated, as its manifest."""
    return cast(Toleration, dict(validated))


def resource_block(
    cpu: int | str | None, memory: int | str | None, gpus: int, gpu_type: GpuType
) -> ResourceRequirements:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu:
        requests["cpu"] = str(cpu)
    if memory:
        requests["memory"] = limits["memory"] = str(memory)
    if gpus > 0 and gpu_type.resource_name:
        requests[gpu_type.resource_name] = limits[gpu_type.resource_name] = str(gpus)
    block: ResourceRequirements = {}
    if requests:
        block["requests"] = requests
    if limits:
        block["limits"] = limits
    return block


def scratch_volumes(shm: str | None) -> tuple[list[Volume], list[VolumeMount]]:
    """The writable emptyDirs (workspace, /tmp, optionally /dev/shm) of a read-only-root container."""
    volumes: list[Volume] = [
        {"name": "workspace", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[VolumeMount] = [
        {"name": "workspace", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def pvc_claims(job: JobOwner) -> list[str]:
    """The claims the spec's pvc:// sources name, in first-seen order (storage.output is s3:// only)."""
    spec = job.spec
    claims: list[str] = []
    for uri in (spec.base_model.uri, spec.dataset.train, spec.dataset.validation, spec.dataset.test):
        if uri is not None and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").partition("/")[0]
            if claim and claim not in claims:
                claims.append(claim)
    return claims


def pvc_env_name(claim: str) -> str:
    """`my-models` → `FTJ_PVC_MY_MODELS`, as the trainer's storage.pvc_mount() looks it up."""
    return "FTJ_PVC_" + re.sub(r"[^A-Za-z0-9]", "_", claim).upper()


def pvc_volumes(job: JobOwner) -> tuple[list[Volume], list[VolumeMount], list[EnvVar]]:
    """Volumes, read-only mounts at /mnt/pvc/<claim> and FTJ_PVC_<CLAIM> variables for the spec's claims."""
    volumes: list[Volume] = []
    mounts: list[VolumeMount] = []
    env: list[EnvVar] = []
    for index, claim in enumerate(pvc_claims(job)):
        name, path = f"pvc-{index}", f"{PVC_ROOT}/{claim}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
        env.append({"name": pvc_env_name(claim), "value": path})
    return volumes, mounts, env
