"""A FineTuneJob with deployment enabled and no `deployment.server` is served by a ModelServer of its own:
a child of the job named `<job>-serve` (naming.child_name), built here from the job's spec, then served as a
job on a shared pool is (pooljob.py): its adapter is hot-loaded under the job's served name. Merged weights
(full fine-tuning, deployment.mode merged) are the pool's base model instead, answering to the served name,
with no adapter. The job's status.endpoint is the pool's endpoint; docs/serving.md says it.

The upgrade from a per-job vLLM Deployment (before issue 21): its Deployment and Service are deleted once
and the ModelServer is created in their place (plan.JobDraft.retire_serving).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from finetune_vocabulary.labels import ANNOTATION_SPEC_HASH

from finetune_operator.api.conditions import ConditionType, Reason
from finetune_operator.api.finetunejob import API_VERSION
from finetune_operator.api.finetunejob_status import Phase, Stage
from finetune_operator.api.modelnames import MODEL_NAME_MAX, MODEL_NAME_PATTERN, model_name_problem
from finetune_operator.api.modelserver import KIND, parse_modelserver_spec
from finetune_operator.api.sections import CPU_GPU_TYPE
from finetune_operator.config import OperatorConfig
from finetune_operator.containers.vllm import vllm_lora_rank
from finetune_operator.finetunejob import pooljob, servingcheck
from finetune_operator.finetunejob.plan import JobDraft, StageRow
from finetune_operator.finetunejob.ref import Artifacts, JobRef
from finetune_operator.finetunejob.serving import job_vllm_compute, served_model_name, serving_mode
from finetune_operator.finetunepolicy import enforcement as policy
from finetune_operator.k8s.actions import ChildPatch, spec_hash_of
from finetune_operator.k8s.manifests import CustomObject
from finetune_operator.k8s.naming import child_name, short_hash
from finetune_operator.k8s.ownership import (
    child_key,
    conflict_message,
    records_of,
)
from finetune_operator.k8s.pods import metadata, spec_hash
from finetune_operator.serving_contract import ACCEPTED, pool_report


def server_name(job: JobRef) -> str:
    return child_name(job.name, Stage.SERVE)


def stable_name(job: JobRef) -> str:
    """The name the hot-loaded adapter answers to: the served name when it is a pool model name (a DNS
    label of at most 48 characters, not `base` nor `-v<n>`), else a label made from it plus a hash of it,
    so that every job stays servable (status.endpoint.model says which)."""
    name = served_model_name(job)
    fits = len(name) <= MODEL_NAME_MAX and re.fullmatch(MODEL_NAME_PATTERN, name)
    if fits and model_name_problem(name) is None:
        return name
    suffix = f"-{short_hash(name, 8)}"
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", name.lower())).strip("-")
    return (cleaned[: MODEL_NAME_MAX - len(suffix)].rstrip("-") or "m") + suffix


def _base(job: JobRef, artifacts: Artifacts) -> dict[str, Any]:
    if serving_mode(job.spec) == "merged":
        if not artifacts.merged:
            raise ValueError("merged serving needs a merged model; run export first")
        return {"uri": artifacts.merged.rstrip("/")}
    base = job.spec.base_model
    return {"uri": base.uri, **({"revision": base.revision} if base.revision else {})}


def server_spec(job: JobRef, artifacts: Artifacts) -> dict[str, Any]:
    """The ModelServer spec from the job's: base (or merged) model, replicas, compute, vLLM settings; the
    job's storage credentials and service account fetch the weights (the pool reads only its output)."""
    deployment, resources, storage = job.spec.deployment, job.spec.resources, job.spec.storage
    merged = serving_mode(job.spec) == "merged"
    gpu_type = deployment.gpu_type or resources.gpu_type
    raw: dict[str, Any] = {
        "baseModel": _base(job, artifacts),
        "replicas": deployment.replicas,
        "gpus": 0 if gpu_type == CPU_GPU_TYPE else deployment.gpus,
        "gpuType": gpu_type,
        "resources": deployment.resources.model_dump(by_alias=True, exclude_none=True)
        if deployment.resources
        else None,
        "nodeSelector": resources.node_selector,
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in resources.tolerations or []]
        or None,
        "priorityClassName": resources.priority_class_name,
        "maxModelLen": deployment.max_model_len,
        "extraArgs": deployment.extra_args,
        "adapterSources": [storage.output],
        "credentialsSecret": storage.credentials_secret,
        "serviceAccountName": storage.service_account_name,
        "maxLoraRank": 8 if merged else vllm_lora_rank(job.spec.lora.rank),
        "servedModelName": served_model_name(job) if merged else None,
    }
    parsed = parse_modelserver_spec({k: v for k, v in raw.items() if v is not None})
    spec: dict[str, Any] = parsed.model_dump(mode="json", by_alias=True, exclude_none=True)
    return spec


def job_modelserver(job: JobRef, config: OperatorConfig, artifacts: Artifacts) -> CustomObject:
    """The job's own ModelServer: controlled by the job, with its spec hash (a changed spec is patched)."""
    spec = server_spec(job, artifacts)
    meta = metadata(job, Stage.SERVE, {ANNOTATION_SPEC_HASH: spec_hash(spec)})
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}


def _spec_patch(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch to the desired spec (a field no longer wanted is removed); baseModel is immutable: a
    job's base model or merged weights never change once served."""
    old, new = dict(existing.get("spec") or {}), dict(desired["spec"])
    spec = {k: new.get(k) for k in {*old, *new} if k != "baseModel" and old.get(k) != new.get(k)}
    hashed = {"annotations": {ANNOTATION_SPEC_HASH: spec_hash_of(desired)}}
    return {"metadata": hashed, "spec": spec}


def own(p: JobDraft, server: Mapping[str, Any] | None, name: str) -> bool:
    """The observed ModelServer is the job's (controlled by it, recorded in status.children): its uid is
    recorded; else the name is taken and the job waits naming the object (ChildConflict)."""
    if server is None:
        return True
    records = records_of(p.status)
    if p.owns_server(server):
        uid = server["metadata"].get("uid")
        key = child_key(KIND, name)
        if uid and records is not None and (records.get(key) or {}).get("uid") != uid:
            p.status["children"] = {**records, key: {"uid": uid, "nonceHashes": None}}
        return True
    message = conflict_message(KIND, server, p.job.uid)
    p.condition(ConditionType.DEPLOYED, "Unknown", Reason.CHILD_CONFLICT, message)
    p.phase(Phase.PENDING, Reason.CHILD_CONFLICT, message)
    return False


def serve(p: JobDraft, row: StageRow, desired: Mapping[str, Any]) -> bool:
    """Create (or update) the job's ModelServer `desired`, then report as a job on a shared pool does
    (True: loaded, the serving check is to run)."""
    p.retire_serving()  # a per-job Deployment and Service from before issue 21: replaced once
    name, server = server_name(p.job), p.o.server
    if not own(p, server, name):
        return False
    if server is None:
        refused = policy.job_serving_wait(p.job.spec, None, p.o.policy, p.config)
        if refused is not None:  # FineTunePolicy: nothing is created until the policy allows it
            p.waiting(row, Reason(refused[0]), refused[1])
            return False
        if p.blocked(row.stage, desired):
            return False
        p.out.create.append(dict(desired))
        note = job_vllm_compute(p.job, p.config).note  # a GPU type without GPUs: served on CPU, said once
        created = f"created ModelServer {name}" + (f"; {note}" if note else "")
        p.condition(row.condition, "Unknown", row.running, created)
        p.phase(row.phase, row.running, note or "")
        return False
    if spec_hash_of(server) != spec_hash_of(desired):
        p.out.patch.append(ChildPatch(KIND, name, _spec_patch(server, desired)))
    failure = pool_report(server).start_failure
    if failure is not None:  # its only pool cannot start: the job fails naming kubelet's cause (issue 20)
        p.status["endpoint"] = None
        p.fail(row.stage, Reason(failure[0]), failure[1])
        return False
    if serving_mode(p.job.spec) == "merged":
        return _report_merged(p, row, server)
    model = stable_name(p.job)
    serving = {**(p.status.get("serving") or {}), "server": name, "modelName": model, "state": ACCEPTED}
    p.status["serving"] = serving
    servingcheck.accept(p)
    return pooljob.report(p, row, pool_report(server), model)


def _report_merged(p: JobDraft, row: StageRow, server: Mapping[str, Any]) -> bool:
    report, model = pool_report(server), served_model_name(p.job)
    # no version: the merged weights are the pool's base
    checked = (p.status.get("serving") or {}).get("checked")
    p.status["serving"] = {"server": report.name, **({"checked": True} if checked else {})}
    if report.ready_replicas < 1:
        p.status["endpoint"] = None
        p.waiting(row, row.running, report.message or f"waiting for ModelServer {report.name}")
        return False
    if servingcheck.pending(p, report.endpoint, model):
        return True
    servingcheck.serve_merged(p, report.endpoint, model, servingcheck.note(p))
    return False


def retire(p: JobDraft) -> None:
    """Deployment disabled: the job's own ModelServer goes (and a per-job Deployment from before issue 21)."""
    p.retire_serving()
    p.retire_own_server(p.o.server)
