"""A FineTuneJob's history in OpenAI's shapes: `fine_tuning.job.event` (its Kubernetes Events and the
trainer's progress lines) and `fine_tuning.job.checkpoint`. Pure: the service reads the objects and logs,
and pages the lists (jobs.page)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_api.jobs import condition, dig, epoch, fine_tuned_model, openai_error

EVENT_LEVELS = {"Normal": "info", "Warning": "warn"}


def _stable_id(prefix: str, ftj: Mapping[str, Any], *key: object) -> str:
    """`<prefix>-<hash>` of the job and `key`: the same on every call."""
    owner = dig(ftj, "metadata", "uid") or dig(ftj, "metadata", "name")
    digest = hashlib.sha256(json.dumps([owner, *key], default=str).encode()).hexdigest()
    return f"{prefix}-{digest[:24]}"


def _k8s_event(ftj: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    """An Event of the job: Normal → info, Warning → warn, the Warning that failed the job → error."""
    reason = str(event.get("reason") or "")
    level = EVENT_LEVELS.get(str(event.get("type")), "info")
    if level == "warn" and openai_error(ftj) and reason == condition(ftj, "Ready").get("reason"):
        level = "error"
    # core/v1 Events, and events.k8s.io/v1 ones (series.lastObservedTime, note, deprecated* fields)
    times = (
        event.get("lastTimestamp"),
        dig(event, "series", "lastObservedTime"),
        event.get("eventTime"),
        event.get("deprecatedLastTimestamp"),
        event.get("firstTimestamp"),
        dig(event, "metadata", "creationTimestamp"),
    )
    created = next((t for t in map(epoch, times) if t is not None), 0)
    key = dig(event, "metadata", "uid") or dig(event, "metadata", "name") or [reason, event.get("message")]
    return {
        "id": _stable_id("ftevent", ftj, "event", key),
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
    created = epoch(line.get("time")) or epoch(dig(ftj, "status", "startTime")) or 0
    return {
        "id": _stable_id("ftevent", ftj, "progress", step),
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
    progress = dig(ftj, "status", "progress") or {}
    metrics: dict[str, Any] = {"step": step}
    if progress.get("step") == step and isinstance(progress.get("loss"), int | float):
        metrics["train_loss"] = progress["loss"]
    return {
        "id": _stable_id("ftckpt", ftj, "checkpoint", step),
        "object": "fine_tuning.job.checkpoint",
        "created_at": created,
        "fine_tuned_model_checkpoint": name,
        "fine_tuning_job_id": dig(ftj, "metadata", "name"),
        "metrics": metrics,
        "step_number": step,
    }


def to_checkpoints(ftj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The newest committed checkpoint (status.artifacts.checkpoint) and, once trained, the final model;
    newest first. Named `<fine_tuned_model or job id>:ckpt-step-<n>`, never by storage URI."""
    job = str(dig(ftj, "metadata", "name") or "")
    served = fine_tuned_model(ftj)
    base = served or job
    trained = condition(ftj, "Trained")
    created = epoch(trained.get("lastTransitionTime")) or epoch(dig(ftj, "status", "startTime")) or 0
    out: dict[int, dict[str, Any]] = {}
    match = re.search(r"step-0*(\d+)/*$", str(dig(ftj, "status", "artifacts", "checkpoint") or ""))
    if match:
        step = int(match.group(1))
        out[step] = _checkpoint(ftj, step, f"{base}:ckpt-step-{step}", created)
    progress = dig(ftj, "status", "progress") or {}
    final = progress.get("totalSteps") or progress.get("step")
    if trained.get("status") == "True" and isinstance(final, int):
        out[final] = _checkpoint(ftj, final, served or f"{job}:ckpt-step-{final}", created)
    return [out[step] for step in sorted(out, reverse=True)]
