"""The trainer container's outcome as a finished Job and its pods show it: the termination message's JSON
summary (trainer-image/CONTRACT.md). Shared by every kind that runs the trainer (FineTuneJob stages, a
FineTuneSchedule's data Job). Pure functions of the watch caches' snapshots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary.distributed import COMPLETION_INDEX_ANNOTATION

from finetune_operator.api.conditions import EXIT_REASONS
from finetune_operator.containers.trainer import TRAINER_CONTAINER
from finetune_operator.k8s.observe import conditions_of, created, is_true


@dataclass(frozen=True)
class Termination:
    exit_code: int | None
    reason: str  # kubelet's reason, e.g. Error, OOMKilled, Completed
    message: str  # the trainer's message (or the log tail kubelet fell back to)
    summary: Mapping[str, Any]


@dataclass(frozen=True)
class JobOutcome:
    state: str  # "running" | "succeeded" | "failed" | "suspended"
    job_reason: str = ""
    job_message: str = ""
    termination: Termination | None = None

    @property
    def summary(self) -> Mapping[str, Any]:
        """The trainer's termination summary (empty when it left none)."""
        return self.termination.summary if self.termination else {}


def termination_of(pod: Mapping[str, Any], container: str = TRAINER_CONTAINER) -> Termination | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != container:
            continue
        state = status.get("state") or {}
        terminated = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
        if not terminated:
            return None
        raw = str(terminated.get("message") or "")
        exit_code = terminated.get("exitCode")
        message, summary = raw.strip(), {}  # type: tuple[str, Any]
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):  # 4 KiB of "[" is deeper than Python parses
            document = None
        if isinstance(document, Mapping):
            message = str(document.get("message") or "")
            summary = document.get("summary") or {}
            if exit_code is None and isinstance(document.get("exitCode"), int):
                exit_code = document["exitCode"]
        return Termination(
            exit_code=int(exit_code) if exit_code is not None else None,
            reason=str(terminated.get("reason") or ""),
            message=message,
            summary=summary if isinstance(summary, Mapping) else {},
        )
    return None


def _not_rank_zero(pod: Mapping[str, Any]) -> bool:
    index = ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
    return index is not None and index != "0"


def _not_ended(pod: Mapping[str, Any]) -> bool:
    metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
    return not metadata.get("deletionTimestamp") and status.get("phase") not in ("Succeeded", "Failed")


def _terminations(pods: Sequence[Mapping[str, Any]], phase: str) -> list[Termination]:
    # newest first, and index 0 (global rank 0) of a multi-node Job before its other pods
    newest = sorted(sorted(pods, key=created, reverse=True), key=_not_rank_zero)
    ended = [p for p in newest if (p.get("status") or {}).get("phase") == phase]
    return [t for p in ended if (t := termination_of(p)) is not None]


def job_outcome(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> JobOutcome:
    conditions = conditions_of(job)
    if is_true(conditions, "Complete") or is_true(conditions, "SuccessCriteriaMet"):
        if any(_not_ended(p) for p in pods):
            # The Job's watch ran ahead of its pods': rank 0's summary may be in a pod status not seen yet
            # (another rank's pod seen Succeeded carries none).
            return JobOutcome("running")
        return JobOutcome("succeeded", termination=next(iter(_terminations(pods, "Succeeded")), None))
    for kind in ("Failed", "FailureTarget"):
        if is_true(conditions, kind):
            terminations = _terminations(pods, "Failed")
            # A permanent exit code decides the reason even if an older pod failed differently.
            chosen = next((t for t in terminations if t.exit_code in EXIT_REASONS), None)
            return JobOutcome(
                "failed",
                job_reason=str(conditions[kind].get("reason") or ""),
                job_message=str(conditions[kind].get("message") or ""),
                termination=chosen or next(iter(terminations), None),
            )
    if (job.get("spec") or {}).get("suspend"):
        return JobOutcome("suspended")
    return JobOutcome("running")
