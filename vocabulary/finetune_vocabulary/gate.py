"""The evaluation gate's rule, on plain values: every threshold must hold and, with compareToBase, the primary
metric must beat the base model by minImprovement (strictly better when unset).

One rule for both sides: the operator decides the job with it (finetune_operator.finetunejob.gate) and the
evaluator decides with it whether to register the model in MLflow (finetune_trainer.tracking).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .metrics import direction, relative_improvement


@dataclass(frozen=True)
class Bound:
    """One threshold: a metric with a min or a max."""

    metric: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]
    improvement: float | None = None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _threshold(bound: Bound, tuned: Mapping[str, float]) -> tuple[bool, str]:
    metric, value = bound.metric, tuned.get(bound.metric)
    if value is None:
        return False, f"{metric}: not reported by the evaluation"
    if bound.min is not None and value < bound.min:
        return False, f"{metric} {_fmt(value)} is below the minimum {_fmt(bound.min)}"
    if bound.max is not None and value > bound.max:
        return False, f"{metric} {_fmt(value)} is above the maximum {_fmt(bound.max)}"
    kind, limit = ("min", bound.min) if bound.min is not None else ("max", bound.max)
    return True, f"{metric} {_fmt(value)} meets {kind} {_fmt(float(limit or 0))}"


def _against_base(
    primary: str, minimum: float | None, tuned: Mapping[str, float], base: Mapping[str, float] | None
) -> tuple[bool, str, float | None]:
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
        f"({change}, {direction(primary)} is better; needed "
        f"{'> 0%' if minimum is None else f'>= {needed:+.1%}'})"
    )
    return beats, summary if beats else f"{summary}: not enough improvement", improvement


def decide(
    thresholds: Sequence[Bound],
    tuned: Mapping[str, float],
    base: Mapping[str, float] | None,
    *,
    compare_to_base: bool,
    primary: str,
    min_improvement: float | None,
) -> GateResult:
    """Reasons name the metric and both numbers (status.evaluation.reasons, Events, the MLflow run)."""
    checks = [_threshold(bound, tuned) for bound in thresholds]
    improvement: float | None = None
    if compare_to_base:
        beats, reason, improvement = _against_base(primary, min_improvement, tuned, base)
        checks.append((beats, reason))
    return GateResult(
        passed=all(ok for ok, _ in checks), reasons=tuple(r for _, r in checks), improvement=improvement
    )
