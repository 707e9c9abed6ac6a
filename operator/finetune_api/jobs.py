"""OpenAI fine-tuning requests → FineTuneJob manifests, and FineTuneJobs → OpenAI's `fine_tuning.job`,
events, checkpoints and list pages (docs/openai-api.md has the tables). Pure: no I/O, the service calls these.

OpenAI's shape is followed field by field so the official SDKs parse every answer; the FineTuneJob stays the
one source of truth (annotations keep what the request said that the spec does not).
"""

from __future__ import annotations

import hashlib
import json
import re
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
EVENT_LEVELS = {"Normal": "info", "Warning": "warn"}


def _get(obj: Mapping[str, Any] | None, *path: str) -> Any:
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


def _condition(ftj: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    for condition in _get(ftj, "status", "conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == kind:
            return condition
    return {}


def paused(ftj: Mapping[str, Any]) -> bool:
    """spec.suspend is set (a pause through the API, or kubectl)."""
    return _get(ftj, "spec", "suspend") is True


def openai_status(ftj: Mapping[str, Any]) -> str:
    """validating_files, queued, running, succeeded, failed or cancelled: from the phase (docs table)."""
    phase = _get(ftj, "status", "phase") or "Pending"
    reason = _condition(ftj, "Ready").get("reason")
    if phase == "Failed" and reason == Reason.CANCELLED:  # spec.cancel: no error
        return "cancelled"
    if (_get(ftj, "spec") or {}).get("cancel") and phase not in ("Failed", "Rejected", "Succeeded"):
        return "cancelled"
    status = STATUSES.get(phase, "validating_files")
    if paused(ftj) and status not in FINISHED:  # paused, the operator not there yet: queued already
        return "queued"
    return status


def openai_error(ftj: Mapping[str, Any]) -> dict[str, Any] | None:
    """`{code, message, param}` of a failed job (ERROR_CODES by the Ready reason), else None."""
    if openai_status(ftj) != "failed":
        return None
    ready = _condition(ftj, "Ready")
    code = ERROR_CODES.get(str(ready.get("reason")), "server_error")
    message = ready.get("message") or _get(ftj, "status", "message") or "the job failed"
    return {"code": code, "message": message, "param": ERROR_PARAMS.get(code)}


def _base_rate(ftj: Mapping[str, Any]) -> float:
    try:
        return float(_get(ftj, "metadata", "annotations", ANNOTATION_BASE_RATE) or DEFAULT_LEARNING_RATE)
    except ValueError:
        return DEFAULT_LEARNING_RATE


def _hyper(ftj: Mapping[str, Any]) -> dict[str, Any]:
    return {**SPEC_DEFAULTS, **(_get(ftj, "spec", "hyperparameters") or {})}


def _method_of(ftj: Mapping[str, Any]) -> dict[str, Any]:
    hyper = _hyper(ftj)
    out: dict[str, Any] = {
        "n_epochs": hyper["epochs"],
        "batch_size": hyper["batchSize"],
        "learning_rate_multiplier": round(hyper["learningRate"] / _base_rate(ftj), 6),
    }
    objective = _get(ftj, "spec", "objective") or "sft"
    if objective == "sft":
        return {"type": "supervised", "supervised": {"hyperparameters": out}}
    out["beta"] = hyper.get("beta", "auto")  # unset: TRL's default (HyperparametersSpec.beta)
    return {"type": objective, objective: {"hyperparameters": out}}


def _trained_tokens(ftj: Mapping[str, Any]) -> int | None:
    tokens = _get(ftj, "status", "dataset", "trainTokens")
    if _condition(ftj, "Trained").get("status") != "True" or not isinstance(tokens, int):
        return None
    return int(tokens * _hyper(ftj)["epochs"])


def _metadata_of(ftj: Mapping[str, Any]) -> dict[str, str] | None:
    try:
        value = json.loads(_get(ftj, "metadata", "annotations", ANNOTATION_METADATA) or "null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _model_of(ftj: Mapping[str, Any]) -> str:
    """The request's model name; a job made with kubectl: its base model URI's last segment."""
    model = _get(ftj, "metadata", "annotations", ANNOTATION_MODEL)
    return str(model or str(_get(ftj, "spec", "baseModel", "uri") or "").rstrip("/").rsplit("/", 1)[-1])


def _fine_tuned_model(ftj: Mapping[str, Any]) -> str | None:
    model = _get(ftj, "status", "endpoint", "model")
    return str(model) if model and openai_status(ftj) == "succeeded" else None


def to_openai_job(ftj: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """The `fine_tuning.job` object of a FineTuneJob (made by this API or with kubectl)."""
    status = openai_status(ftj)
    annotations = _get(ftj, "metadata", "annotations") or {}
    method = _method_of(ftj)
    eta = _get(ftj, "status", "progress", "etaSeconds")
    finish = None
    if status == "running" and isinstance(eta, int):
        finish = int((time.time() if now is None else now) + eta)
    return {
        "id": _get(ftj, "metadata", "name"),
        "object": "fine_tuning.job",
        "created_at": epoch(_get(ftj, "metadata", "creationTimestamp")) or 0,
        "error": openai_error(ftj),
        "fine_tuned_model": _fine_tuned_model(ftj),
        "finished_at": epoch(_get(ftj, "status", "completionTime")) if status in FINISHED else None,
        "hyperparameters": method[method["type"]]["hyperparameters"],
        "model": _model_of(ftj),
        "organization_id": _get(ftj, "metadata", "namespace"),
        "result_files": [],
        "seed": _hyper(ftj)["seed"],
        "status": status,
        "trained_tokens": _trained_tokens(ftj),
        "training_file": annotations.get(ANNOTATION_TRAINING_FILE) or _get(ftj, "spec", "dataset", "train"),
        "validation_file": annotations.get(ANNOTATION_VALIDATION_FILE)
        or _get(ftj, "spec", "dataset", "validation"),
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
    name, status = _get(ftj, "metadata", "name"), openai_status(ftj)
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


# ---------------------------------------------------------------------------------------------- events
def _event_id(ftj: Mapping[str, Any], *key: object) -> str:
    owner = _get(ftj, "metadata", "uid") or _get(ftj, "metadata", "name")
    digest = hashlib.sha256(json.dumps([owner, *key], default=str).encode()).hexdigest()
    return f"ftevent-{digest[:24]}"


def _k8s_event(ftj: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    """An Event of the job: Normal → info, Warning → warn, the Warning that failed the job → error."""
    reason = str(event.get("reason") or "")
    level = EVENT_LEVELS.get(str(event.get("type")), "info")
    if level == "warn" and openai_error(ftj) and reason == _condition(ftj, "Ready").get("reason"):
        level = "error"
    # core/v1 Events, and events.k8s.io/v1 ones (series.lastObservedTime, note, deprecated* fields)
    times = (
        event.get("lastTimestamp"),
        _get(event, "series", "lastObservedTime"),
        event.get("eventTime"),
        event.get("deprecatedLastTimestamp"),
        event.get("firstTimestamp"),
        _get(event, "metadata", "creationTimestamp"),
    )
    created = next((t for t in map(epoch, times) if t is not None), 0)
    key = _get(event, "metadata", "uid") or _get(event, "metadata", "name") or [reason, event.get("message")]
    return {
        "id": _event_id(ftj, "event", key),
        "object": "fine_tuning.job.event",
        "created_at": created,
        "level": level,
        "message": str(event.get("message") or event.get("note") or reason),
        "data": {"reason": reason},
        "type": "message",
    }


def _progress_event(ftj: Mapping[str, Any], line: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer progress line as OpenAI's metrics event: "Step 12/216: training loss=0.41"."""
    step, total, loss = line["step"], line.get("totalSteps"), line["loss"]
    created = epoch(line.get("time")) or epoch(_get(ftj, "status", "startTime")) or 0
    return {
        "id": _event_id(ftj, "progress", step),
        "object": "fine_tuning.job.event",
        "created_at": created,
        "level": "info",
        "message": f"Step {step}/{total if total else '?'}: training loss={loss:.4g}",
        "data": {"step": step, "total_steps": total, "train_loss": loss},
        "type": "metrics",
    }


def _usable_progress(progress: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Progress lines with a step and a loss, one per step (the newest: heartbeats repeat a step)."""
    by_step: dict[int, Mapping[str, Any]] = {}
    for line in progress:
        if line.get("event", "progress") != "progress":
            continue
        step, loss = line.get("step"), line.get("loss")
        if isinstance(step, int) and not isinstance(step, bool) and isinstance(loss, int | float):
            by_step[step] = line
    return [by_step[s] for s in sorted(by_step)]


def to_events(
    ftj: Mapping[str, Any], k8s_events: Sequence[Mapping[str, Any]], progress: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The job's Events and the trainer's progress lines as `fine_tuning.job.event`s, newest first (ties:
    the later step or the later Event in the list first). Ids are stable across calls."""
    rows: list[tuple[int, int, dict[str, Any]]] = []
    for index, event in enumerate(k8s_events):
        rows.append((0, index, _k8s_event(ftj, event)))
    for line in _usable_progress(progress):
        rows.append((1, int(line["step"]), _progress_event(ftj, line)))
    rows.sort(key=lambda row: (row[2]["created_at"], row[0], row[1]), reverse=True)
    return [row[2] for row in rows]


# ---------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(ftj: Mapping[str, Any], step: int, name: str, created: int) -> dict[str, Any]:
    progress = _get(ftj, "status", "progress") or {}
    metrics: dict[str, Any] = {"step": step}
    if progress.get("step") == step and isinstance(progress.get("loss"), int | float):
        metrics["train_loss"] = progress["loss"]
    return {
        "id": _event_id(ftj, "checkpoint", step).replace("ftevent-", "ftckpt-"),
        "object": "fine_tuning.job.checkpoint",
        "created_at": created,
        "fine_tuned_model_checkpoint": name,
        "fine_tuning_job_id": _get(ftj, "metadata", "name"),
        "metrics": metrics,
        "step_number": step,
    }


def to_checkpoints(ftj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The newest committed checkpoint (status.artifacts.checkpoint) and, once trained, the final model;
    newest first. Named `<fine_tuned_model or job id>:ckpt-step-<n>`, never by storage URI."""
    job = str(_get(ftj, "metadata", "name") or "")
    served = _fine_tuned_model(ftj)
    base = served or job
    trained = _condition(ftj, "Trained")
    created = epoch(trained.get("lastTransitionTime")) or epoch(_get(ftj, "status", "startTime")) or 0
    out: dict[int, dict[str, Any]] = {}
    match = re.search(r"step-0*(\d+)/*$", str(_get(ftj, "status", "artifacts", "checkpoint") or ""))
    if match:
        step = int(match.group(1))
        out[step] = _checkpoint(ftj, step, f"{base}:ckpt-step-{step}", created)
    progress = _get(ftj, "status", "progress") or {}
    final = progress.get("totalSteps") or progress.get("step")
    if trained.get("status") == "True" and isinstance(final, int):
        out[final] = _checkpoint(ftj, final, served or f"{job}:ckpt-step-{final}", created)
    return [out[step] for step in sorted(out, reverse=True)]


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
