"""Builders of FineTuneJob specs, children and pods for the operator's unit tests (not a test module)."""

from __future__ import annotations

import copy
import json
from typing import Any

from finetune_operator.api.finetunejob import parse_spec, spec_to_dict
from finetune_operator.finetunejob.ref import JobRef

UID = "0b6f3c1e-1111-4222-8333-444455556666"


def spec(**overrides: Any) -> dict[str, Any]:
    """A defaulted spec (as the API server stores it), with sections deep-merged from overrides."""
    raw: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/tiny-llama"},
        "dataset": {"train": "s3://data/toy/train.jsonl"},
        "storage": {"output": "s3://runs/out", "credentialsSecret": "s3-creds"},
        "resources": {"gpus": 1, "gpuType": "a100-80gb"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {k: v for k, v in {**raw[key], **value}.items() if v is not None}
        else:
            raw[key] = value
    return spec_to_dict(parse_spec(raw))


def job(name: str = "demo", namespace: str = "team-a", **overrides: Any) -> JobRef:
    return JobRef(namespace=namespace, name=name, uid=UID, spec=parse_spec(spec(**overrides)))


def terminated_pod(
    stage: str,
    exit_code: int,
    document: dict[str, Any] | str | None = None,
    *,
    created: str = "2026-01-01T00:00:00Z",
    reason: str = "Completed",
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message = json.dumps(document) if isinstance(document, dict) else (document or "")
    return {
        "metadata": {"name": f"pod-{stage}-{created}", "creationTimestamp": created},
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": conditions or [],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}},
                }
            ],
        },
    }


def pending_pod(
    *, unschedulable: str | None = None, waiting: str | None = None, created: str = "2026-01-01T00:00:00Z"
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Pending", "conditions": []}
    if unschedulable:
        status["conditions"].append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        )
    if waiting:
        status["containerStatuses"] = [
            {"name": "trainer", "state": {"waiting": {"reason": waiting, "message": "pull failed"}}}
        ]
    return {"metadata": {"name": "pod-pending", "creationTimestamp": created}, "status": status}


def with_status(
    manifest: dict[str, Any],
    *,
    complete: bool = False,
    failed: str | None = None,
    active: int = 0,
    failed_pods: int = 0,
    start: str | None = "2026-01-01T00:00:00Z",
    end: str | None = None,
    message: str = "",
) -> dict[str, Any]:
    """A Job as the Job controller would have it: created from our manifest, with a status."""
    obj = copy.deepcopy(manifest)
    obj["metadata"]["uid"] = "child-uid"
    conditions = []
    status: dict[str, Any] = {"active": active}
    if start:
        status["startTime"] = start
    if failed_pods:
        status["failed"] = failed_pods
    if complete:
        conditions.append({"type": "Complete", "status": "True"})
        status["completionTime"] = end or "2026-01-01T01:00:00Z"
    if failed:
        conditions.append(
            {
                "type": "Failed",
                "status": "True",
                "reason": failed,
                "message": message,
                "lastTransitionTime": end or "2026-01-01T01:00:00Z",
            }
        )
    status["conditions"] = conditions
    obj["status"] = status
    return obj
