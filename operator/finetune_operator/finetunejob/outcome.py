"""What a finished stage Job says happened: its outcome, the trainer's termination summary and metrics,
and the reason a failure is reported with. Pure functions of the watch caches' snapshots."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from finetune_vocabulary.metrics import METRICS
from finetune_vocabulary.objectives import PROGRESS_FIGURE_KEYS

from finetune_operator.api.conditions import EXIT_REASONS, Reason, oom_hint
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.containers.termination import JobOutcome
from finetune_operator.containers.trainer import OOM_KILLED_EXIT_CODE
from finetune_operator.k8s.observe import finite

MAX_STATUS_NUMBER = 1e15  # the status schema's bound on a real number (finetunejob_status.Real)


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
