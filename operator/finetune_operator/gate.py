"""The evaluation gate: thresholds on the tuned model and, optionally, a relative improvement over base."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from finetune_vocabulary import metrics as vocabulary
from finetune_vocabulary.metrics import relative_improvement

from .models import EvaluationSpec, Threshold

__all__ = ["GateResult", "evaluate_gate", "primary_metric", "relative_improvement"]


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]
    improvement: float | None = None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def primary_metric(evaluation: EvaluationSpec) -> str:
    """The metric that decides the run, by the shared rule (finetune_vocabulary.metrics.primary_metric)."""
    return vocabulary.primary_metric(
        evaluation.metrics, [t.metric for t in evaluation.thresholds or ()], evaluation.primary_metric
    )


def _threshold(threshold: Threshold, tuned: Mapping[str, float]) -> tuple[bool, str]:
    metric, value = threshold.metric, tuned.get(threshold.metric)
    if value is None:
        return False, f"{metric}: not reported by the evaluation"
    if threshold.min is not None and value < threshold.min:
        return False, f"{metric} {_fmt(value)} is below the minimum {_fmt(threshold.min)}"
    if threshold.max is not None and value > threshold.max:
        return False, f"{metric} {_fmt(value)} is above the maximum {_fmt(threshold.max)}"
    kind, bound = ("min", threshold.min) if threshold.min is not None else ("max", threshold.max)
    return True, f"{metric} {_fmt(value)} meets {kind} {_fmt(float(bound or 0))}"


def _against_base(
    evaluation: EvaluationSpec, tuned: Mapping[str, float], base: Mapping[str, float] | None
) -> tuple[bool, str, float | None]:
    primary, minimum = primary_metric(evaluation), evaluation.min_improvement
    tuned_value, base_value = tuned.get(primary), (base or {}).get(primary)
    if tuned_value is None or base_value is None:
        return False, f"{primary}: cannot compare with base (tuned {tuned_value}, base {base_value})", None
    improvement = relative_improvement(primary, tuned_value, base_value)
    needed = minimum if minimum is not None else 0.0
    # Without minImprovement the tuned model must still be strictly better than its base;
    # the tolerance keeps 0.6 vs 0.5 at exactly +20% from failing on float rounding.
    beats = improvement >= needed - 1e-9 if minimum is not None else improvement > 0
    change = f"{improvement:+.1%}" if math.isfinite(improvement) else "base is 0"
    summary = (
        f"{primary} tuned {_fmt(tuned_value)} vs base {_fmt(base_value)} "
        f"({change}, {vocabulary.direction(primary)} is better; needed "
        f"{'> 0%' if minimum is None else f'>= {needed:+.1%}'})"
    )
    return beats, summary if beats else f"{summary}: not enough improvement", improvement


def evaluate_gate(
    evaluation: EvaluationSpec, tuned: Mapping[str, float], base: Mapping[str, float] | None
) -> GateResult:
    """Every threshold must hold; with compareToBase the primary metric must beat base by minImprovement.

    Reasons name the metric and both numbers, for `status.evaluation.reasons` and the Event.
    """
    checks = [_threshold(threshold, tuned) for threshold in evaluation.thresholds or ()]
    improvement: float | None = None
    if evaluation.compare_to_base:
        beats, reason, improvement = _against_base(evaluation, tuned, base)
        checks.append((beats, reason))
    return GateResult(
        passed=all(ok for ok, _ in checks), reasons=tuple(r for _, r in checks), improvement=improvement
    )
