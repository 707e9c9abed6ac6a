"""The pieces every child shares: labels, owner reference, security contexts, placement, resources, volumes.

Pure functions of the job (its parsed spec) and the operator config; the builders assemble them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_vocabulary.labels import (
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_JOB_UID,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PART_OF,
    MANAGER,
)

from finetune_operator.api.finetunejob import API_VERSION, KIND, ResourcesSpec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.config import GpuType, OperatorConfig
from finetune_operator.finetunejob.ref import JobRef
from finetune_operator.k8s.naming import child_name, label_safe

WORKDIR = "/workspace"
PVC_ROOT = "/mnt/pvc"  # the trainer's default FTJ_PVC_ROOT (CONTRACT.md)


def labels(job: JobRef, stage: Stage) -> dict[str, str]:
    return {
        LABEL_NAME: "finetunejob",
        LABEL_INSTANCE: label_safe(job.name),
        LABEL_COMPONENT: stage.value,
        LABEL_PART_OF: MANAGER,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_JOB_UID: job.uid,
    }


def selector_labels(job: JobRef, stage: Stage) -> dict[str, str]:
    return {
        LABEL_INSTANCE: label_safe(job.name),
        LABEL_COMPONENT: stage.value,
        LABEL_JOB_UID: job.uid,
    }


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(job: JobRef, stage: Stage, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": child_name(job.name, stage),
        "namespace": job.namespace,
        "labels": labels(job, stage),
        "ownerReferences": [owner_reference(job)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def spec_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def pod_security_context(config: OperatorConfig) -> dict[str, Any]:
    uid = config.defaults.run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def credentials_env_from(job: JobRef) -> list[dict[str, Any]]:
    """Storage credentials by reference only: the operator never reads the Secret."""
    secret = job.spec.storage.credentials_secret
    return [{"secretRef": {"name": secret}}] if secret else []


def service_account(job: JobRef) -> dict[str, Any]:
    account = job.spec.storage.service_account_name
    # No API token in pods unless a workload-identity service account is asked for.
    if account:
        return {"serviceAccountName": account}
    return {"automountServiceAccountToken": False}


def priority_class(job: JobRef) -> dict[str, Any]:
    """resources.priorityClassName on every pod that asks for accelerators or serves (not validation)."""
    name = job.spec.resources.priority_class_name
    return {"priorityClassName": name} if name else {}


def merge_tolerations(*groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    for group in groups:
        for toleration in group:
            item = dict(toleration)
            if item not in merged:
                merged.append(item)
    return merged


def gpu_placement(gpu_type: GpuType, gpus: int, user: ResourcesSpec | None = None) -> dict[str, Any]:
    """nodeSelector + tolerations: the GPU type's, then the user's (the user's keys win)."""
    selector: dict[str, str] = dict(gpu_type.node_selector) if gpus > 0 else {}
    user_tolerations: list[dict[str, Any]] = []
    if user is not None:
        selector.update(user.node_selector or {})
        user_tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in user.tolerations or ()]
    gpu_tolerations = [t.manifest() for t in gpu_type.tolerations] if gpus > 0 else []
    tolerations = merge_tolerations(gpu_tolerations, user_tolerations)
    placement: dict[str, Any] = {}
    if selector:
        placement["nodeSelector"] = selector
    if tolerations:
        placement["tolerations"] = tolerations
    return placement


def resource_block(
    cpu: int | str | None, memory: int | str | None, gpus: int, gpu_type: GpuType
) -> dict[str, dict[str, str]]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu:
        requests["cpu"] = str(cpu)
    if memory:
        requests["memory"] = limits["memory"] = str(memory)
    if gpus > 0 and gpu_type.resource_name:
        requests[gpu_type.resource_name] = limits[gpu_type.resource_name] = str(gpus)
    block: dict[str, dict[str, str]] = {}
    if requests:
        block["requests"] = requests
    if limits:
        block["limits"] = limits
    return block


def scratch_volumes(shm: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The writable emptyDirs (workspace, /tmp, optionally /dev/shm) of a read-only-root container."""
    volumes: list[dict[str, Any]] = [
        {"name": "workspace", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "workspace", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def pvc_claims(job: JobRef) -> list[str]:
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


def pvc_volumes(job: JobRef) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes, read-only mounts at /mnt/pvc/<claim> and FTJ_PVC_<CLAIM> variables for the spec's claims."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    env: list[dict[str, Any]] = []
    for index, claim in enumerate(pvc_claims(job)):
        name, path = f"pvc-{index}", f"{PVC_ROOT}/{claim}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
        env.append({"name": pvc_env_name(claim), "value": path})
    return volumes, mounts, env
