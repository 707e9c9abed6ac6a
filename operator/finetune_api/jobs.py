"""OpenAI fine-tuning requests → FineTuneJob manifests, and FineTuneJobs → OpenAI's `fine_tuning.job`, its
controls (cancel, pause, resume) and list pages (docs/openai-api.md has the tables; events and checkpoints:
history.py). Pure: no I/O, the service calls these.

OpenAI's shape is followed field by field so the official SDKs parse every answer; the FineTuneJob stays the
one source of truth (annotations keep what the request said that the spec does not).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from finetune_operator.api.conditions import Reason
from finetune_operator.api.finetunejob import API_VERSION, KIND, HyperparametersSpec, parse_spec
from finetune_operator.api.schema import SpecError
from finetune_vocabulary.labels import API_GROUP

from finetune_api.errors import ApiError
from finetune_api.mapping import (
    DEFAULT_LEARNING_RATE,
    SPEC_PARAMS,
    ModelMapping,
    bad_param,
    read_request,
    served_name,
    spec_from,
)

LABEL_API = f"{API_GROUP}/api"
ANNOTATION_MODEL = f"{API_GROUP}/openai-model"
ANNOTATION_TRAINING_FILE = f"{API_GROUP}/openai-training-file"
ANNOTATION_VALIDATION_FILE = f"{API_GROUP}/openai-validation-file"
ANNOTATION_SUFFIX = f"{API_GROUP}/openai-suffix"
ANNOTATION_METADATA = f"{API_GROUP}/openai-metadata"
# The rate learning_rate_multiplier 1 meant when the job was made (the mapping may change later).
ANNOTATION_BASE_RATE = f"{API_GROUP}/openai-base-learning-rate"


def new_job_name() -> str:
    """A fresh job id: `ftjob-` + 20 lowercase hex digits (a valid FineTuneJob name, 26 characters)."""
    return "ftjob-" + secrets.token_hex(10)


def _check_spec(spec: dict[str, Any], model: str) -> None:
    try:
        parse_spec(spec)
    except SpecError as exc:
        path, message = exc.errors[0]
        param = SPEC_PARAMS.get(path)
        where = "" if param else f" (the platform's settings for model {model!r})"
        raise ApiError(400, f"{path}: {message}{where}", param=param) from None


def build_finetunejob(
    request: Mapping[str, Any],
    model: str,
    mapping: ModelMapping,
    *,
    namespace: str,
    name: str,
    training_uri: str,
    validation_uri: str | None,
    training_objectives: tuple[str, ...],
) -> dict[str, Any]:
    """The FineTuneJob for an OpenAI `POST /v1/fine_tuning/jobs` body; ApiError 400 naming the parameter."""
    fields = read_request(request, mapping)
    objective = fields.objective
    if objective not in training_objectives:
        raise bad_param(
            "training_file",
            f"file {request.get('training_file')} holds data for "
            f"{', '.join(training_objectives) or 'no objective'}, not for objective {objective} "
            f"(method.type {'dpo' if objective == 'dpo' else 'supervised'})",
            code="invalid_training_file",
        )
    suffix, metadata = fields.suffix, fields.metadata
    spec = spec_from(
        mapping,
        training_uri=training_uri,
        validation_uri=validation_uri,
        objective=objective,
        hyperparameters=fields.hyperparameters,
        deployment=served_name(model, suffix, name, mapping),
    )
    _check_spec(spec, model)
    annotations = {
        ANNOTATION_MODEL: model,
        ANNOTATION_TRAINING_FILE: str(request.get("training_file") or ""),
        ANNOTATION_BASE_RATE: repr(mapping.base_learning_rate()),
    }
    if request.get("validation_file"):
        annotations[ANNOTATION_VALIDATION_FILE] = str(request["validation_file"])
    if suffix:
        annotations[ANNOTATION_SUFFIX] = suffix
    if metadata is not None:
        annotations[ANNOTATION_METADATA] = json.dumps(metadata, sort_keys=True)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {LABEL_API: "openai"},
            "annotations": annotations,
        },
        "spec": spec,
    }


# ---------------------------------------------------------------------------------------------- reading
# The Ready condition's failure reasons (api/conditions.py Reason) → OpenAI's error code (docs/openai-api.md).
ERROR_CODES: dict[str, str] = {  # StrEnum keys: looked up by the reason's string
    Reason.INVALID_DATASET: "invalid_training_file",
    Reason.GATE_FAILED: "evaluation_failed",
    Reason.SAFETY_FAILED: "evaluation_failed",
    Reason.RETENTION_FAILED: "evaluation_failed",
    Reason.NOT_BETTER_THAN_SERVING: "evaluation_failed",
    Reason.SERVING_MISMATCH: "evaluation_failed",
    Reason.ROLLOUT_FAILED: "evaluation_failed",
    Reason.POLICY_VIOLATION: "policy_violation",
    Reason.BUDGET_EXCEEDED: "policy_violation",
    Reason.CONCURRENCY_LIMIT: "policy_violation",
    Reason.SERVING_GPU_LIMIT: "policy_violation",
    Reason.INVALID_CONFIG: "server_error",
    Reason.OUT_OF_MEMORY: "server_error",
    Reason.DEADLINE_EXCEEDED: "server_error",
    Reason.IMAGE_PULL_FAILED: "server_error",
    Reason.RETRIES_EXHAUSTED: "server_error",
    Reason.STAGE_FAILED: "server_error",
    Reason.UNSCHEDULABLE: "server_error",
    Reason.CONTAINER_CONFIG_ERROR: "server_error",
    Reason.SERVER_NOT_FOUND: "server_error",
    Reason.CHILD_CONFLICT: "server_error",
}
ERROR_PARAMS = {"invalid_training_file": "training_file"}
STATUSES = {
    "Pending": "validating_files",
    "Validating": "validating_files",
    "Suspended": "queued",
    "Training": "running",
    "Evaluating": "running",
    "Deploying": "running",
    "Serving": "succeeded",
    "Succeeded": "succeeded",
    "Rejected": "failed",
    "Failed": "failed",
}
FINISHED = ("succeeded", "failed", "cancelled")
# What the API server fills in when a spec leaves them out (a stored job always has them).
SPEC_DEFAULTS: dict[str, Any] = HyperparametersSpec().model_dump(
    mode="json", by_alias=True, exclude_none=True
)


def dig(obj: Mapping[str, Any] | None, *path: str) -> Any:
    """obj[path[0]][path[1]]..., None where a level is missing or not a mapping."""
    value: Any = obj or {}
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def epoch(value: Any) -> int | None:
    """Seconds since 1970 of a Kubernetes timestamp (`2026-12-07T01:02:03Z`, or zone-less UTC), else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int((stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp())


def condition(ftj: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    """The status condition of type `kind`, else {}."""
    for found in dig(ftj, "status", "conditions") or ():
        if isinstance(found, Mapping) and found.get("type") == kind:
            return found
    return {}


def paused(ftj: Mapping[str, Any]) -> bool:
    """spec.suspend is set (a pause through the API, or kubectl)."""
    return dig(ftj, "spec", "suspend") is True


def openai_status(ftj: Mapping[str, Any]) -> str:
    """validating_files, queued, running, succeeded, failed or cancelled: from the phase (docs table)."""
    phase = dig(ftj, "status", "phase") or "Pending"
    reason = condition(ftj, "Ready").get("reason")
    if phase == "Failed" and reason == Reason.CANCELLED:  # spec.cancel: no error
        return "cancelled"
    if dig(ftj, "spec", "cancel") and phase not in ("Failed", "Rejected", "Succeeded"):
        return "cancelled"
    status = STATUSES.get(phase, "validating_files")
    if paused(ftj) and status not in FINISHED:  # paused, the operator not there yet: queued already
        return "queued"
    return status


def openai_error(ftj: Mapping[str, Any]) -> dict[str, Any] | None:
    """`{code, message, param}` of a failed job (ERROR_CODES by the Ready reason), else None."""
    if openai_status(ftj) != "failed":
        return None
    ready = condition(ftj, "Ready")
    code = ERROR_CODES.get(str(ready.get("reason")), "server_error")
    message = ready.get("message") or dig(ftj, "status", "message") or "the job failed"
    return {"code": code, "message": message, "param": ERROR_PARAMS.get(code)}


def _base_rate(ftj: Mapping[str, Any]) -> float:
    try:
        return float(dig(ftj, "metadata", "annotations", ANNOTATION_BASE_RATE) or DEFAULT_LEARNING_RATE)
    except ValueError:
        return DEFAULT_LEARNING_RATE


def _hyper(ftj: Mapping[str, Any]) -> dict[str, Any]:
    return {**SPEC_DEFAULTS, **(dig(ftj, "spec", "hyperparameters") or {})}


def _method_of(ftj: Mapping[str, Any]) -> dict[str, Any]:
    hyper = _hyper(ftj)
    out: dict[str, Any] = {
        "n_epochs": hyper["epochs"],
        "batch_size": hyper["batchSize"],
        "learning_rate_multiplier": round(hyper["learningRate"] / _base_rate(ftj), 6),
    }
    objective = dig(ftj, "spec", "objective") or "sft"
    if objective == "sft":
        return {"type": "supervised", "supervised": {"hyperparameters": out}}
    out["beta"] = hyper.get("beta", "auto")  # unset: TRL's default (HyperparametersSpec.beta)
    return {"type": objective, objective: {"hyperparameters": out}}


def _trained_tokens(ftj: Mapping[str, Any]) -> int | None:
    tokens = dig(ftj, "status", "dataset", "trainTokens")
    if condition(ftj, "Trained").get("status") != "True" or not isinstance(tokens, int):
        return None
    return int(tokens * _hyper(ftj)["epochs"])


def _metadata_of(ftj: Mapping[str, Any]) -> dict[str, str] | None:
    try:
        value = json.loads(dig(ftj, "metadata", "annotations", ANNOTATION_METADATA) or "null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _model_of(ftj: Mapping[str, Any]) -> str:
    """The request's model name; a job made with kubectl: its base model URI's last segment."""
    model = dig(ftj, "metadata", "annotations", ANNOTATION_MODEL)
    return str(model or str(dig(ftj, "spec", "baseModel", "uri") or "").rstrip("/").rsplit("/", 1)[-1])


def fine_tuned_model(ftj: Mapping[str, Any]) -> str | None:
    model = dig(ftj, "status", "endpoint", "model")
    return str(model) if model and openai_status(ftj) == "succeeded" else None


def to_openai_job(ftj: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """The `fine_tuning.job` object of a FineTuneJob (made by this API or with kubectl)."""
    status = openai_status(ftj)
    annotations = dig(ftj, "metadata", "annotations") or {}
    method = _method_of(ftj)
    eta = dig(ftj, "status", "progress", "etaSeconds")
    finish = None
    if status == "running" and isinstance(eta, int):
        finish = int((time.time() if now is None else now) + eta)
    return {
        "id": dig(ftj, "metadata", "name"),
        "object": "fine_tuning.job",
        "created_at": epoch(dig(ftj, "metadata", "creationTimestamp")) or 0,
        "error": openai_error(ftj),
        "fine_tuned_model": fine_tuned_model(ftj),
        "finished_at": epoch(dig(ftj, "status", "completionTime")) if status in FINISHED else None,
        "hyperparameters": method[method["type"]]["hyperparameters"],
        "model": _model_of(ftj),
        "organization_id": dig(ftj, "metadata", "namespace"),
        "result_files": [],
        "seed": _hyper(ftj)["seed"],
        "status": status,
        "trained_tokens": _trained_tokens(ftj),
        "training_file": annotations.get(ANNOTATION_TRAINING_FILE) or dig(ftj, "spec", "dataset", "train"),
        "validation_file": annotations.get(ANNOTATION_VALIDATION_FILE)
        or dig(ftj, "spec", "dataset", "validation"),
        "integrations": None,
        "estimated_finish": finish,
        "method": method,
        "metadata": _metadata_of(ftj),
        "user_provided_suffix": annotations.get(ANNOTATION_SUFFIX),
    }


# ---------------------------------------------------------------------------------------------- control
@dataclass(frozen=True)
class Control:
    """A job control of the API: the spec field it sets, to what, and how a refusal reads."""

    field: str
    value: bool
    verb: str  # "cancelled": "it cannot be cancelled"
    code: str  # OpenAI's error code of a refusal


Action = Literal["cancel", "pause", "resume"]
CONTROLS: dict[Action, Control] = {
    "cancel": Control("cancel", True, "cancelled", "job_not_cancellable"),
    "pause": Control("suspend", True, "paused", "job_not_pausable"),
    "resume": Control("suspend", False, "resumed", "job_not_resumable"),
}


def control_patch(ftj: Mapping[str, Any], action: Action) -> dict[str, Any] | None:
    """The merge patch of `POST .../{id}/<action>` (cancel, pause, resume) on the job; None when there is
    nothing to change (pausing a paused job); ApiError 400 when the job has finished, or on resuming a job
    that is not paused."""
    control = CONTROLS[action]
    name, status = dig(ftj, "metadata", "name"), openai_status(ftj)
    if status in FINISHED:
        done = "been cancelled" if status == "cancelled" else status
        raise ApiError(400, f"Job {name} has already {done}: it cannot be {control.verb}", code=control.code)
    if action == "resume" and not paused(ftj):
        raise ApiError(
            400, f"Job {name} is not paused (status {status}): it cannot be resumed", code=control.code
        )
    if action == "pause" and paused(ftj):
        return None
    return {"spec": {control.field: control.value}}


# ---------------------------------------------------------------------------------------------- lists
MAX_LIMIT = 100


def page(
    items: Sequence[dict[str, Any]], after: str | None, limit: int, max_limit: int = MAX_LIMIT
) -> dict[str, Any]:
    """OpenAI's list page of `items` (already in list order): those after the item with id `after`, at most
    `limit` (1..max_limit, else 400 param limit); an unknown `after` → 400 param after."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= max_limit:
        raise bad_param("limit", f"must be an integer between 1 and {max_limit}, not {limit!r}")
    start = 0
    if after:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise bad_param("after", f"no item with id {after!r} in this list")
        start = ids.index(after) + 1
    data = list(items[start : start + limit])
    return {
        "object": "list",
        "data": data,
        "has_more": start + limit < len(items),
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
    }
