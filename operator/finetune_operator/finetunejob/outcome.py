"""What a finished stage Job says happened: its outcome, the trainer's termination summary and metrics,
and the reason a failure is reported with. Pure functions of the watch caches' snapshots."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary.distributed import COMPLETION_INDEX_ANNOTATION
from finetune_vocabulary.metrics import METRICS
from finetune_vocabulary.objectives import PROGRESS_FIGURE_KEYS

from finetune_operator.api.conditions import EXIT_REASONS, Reason, oom_hint
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.containers.trainer import OOM_KILLED_EXIT_CODE, TRAINER_CONTAINER
from finetune_operator.k8s.observe import conditions_of, created, finite, is_true

MAX_STATUS_NUMBER = 1e15  # the status schema's bound on a real number (finetunejob_status.Real)


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


def metric_values(values: Any, graders: Iterable[str] = ()) -> dict[str, float] | None:
    """The known, finite metrics (and scores of `graders`: the spec's graders and its objective's figures,
    e.g. preference_accuracy) of a summary's score table."""
    if not isinstance(values, Mapping):
        return None
    names = (*METRICS, *graders)
    out: dict[str, float] = {k: v for k in names if (v := finite(values.get(k))) is not None}
    return out or None


def progress_figures(values: Any) -> dict[str, float]:
    """The objective's training figures (PROGRESS_FIGURE_KEYS: rewardsChosen, kl, reward ...) of a progress
    line or of the train summary's `figures` map: finite numbers in the status's range only."""
    if not isinstance(values, Mapping):
        return {}
    found = ((key, finite(values.get(key))) for key in PROGRESS_FIGURE_KEYS)
    return {key: round(v, 6) for key, v in found if v is not None and abs(v) <= MAX_STATUS_NUMBER}


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


def failure_reason(outcome: JobOutcome, stage: Stage = Stage.TRAIN) -> tuple[Reason, str]:
    """Map a failed Job to a reason and a message the user can act on."""
    term = outcome.termination
    if term is not None and term.exit_code in EXIT_REASONS:
        reason = EXIT_REASONS[term.exit_code]
        message = term.message or f"the trainer exited with code {term.exit_code}"
        hint = oom_hint(stage)
        if reason is Reason.OUT_OF_MEMORY and "hint" not in message.lower() and hint not in message:
            message = f"{message}; hint: {hint}"
        return reason, message
    if term is not None and (term.reason == "OOMKilled" or term.exit_code == OOM_KILLED_EXIT_CODE):
        killed = "killed (exit 137)"
        if term.reason == "OOMKilled":
            killed = "killed for exceeding its memory limit"
        return Reason.OUT_OF_MEMORY, f"the {stage.value} container was {killed}; hint: {oom_hint(stage)}"
    if outcome.job_reason == "DeadlineExceeded":
        return Reason.DEADLINE_EXCEEDED, outcome.job_message or "activeDeadlineSeconds was exceeded"
    detail = ""
    if term is not None:
        detail = (
            f" (last exit code {term.exit_code}: {term.message})"
            if term.message
            else (f" (last exit code {term.exit_code})")
        )
    if outcome.job_reason == "BackoffLimitExceeded":
        return Reason.RETRIES_EXHAUSTED, f"retries exhausted{detail}"
    return Reason.STAGE_FAILED, f"{outcome.job_reason or 'failed'}: {outcome.job_message}{detail}".strip()
