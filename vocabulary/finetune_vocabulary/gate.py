"""The evaluation gate's rule, on plain values: every threshold must hold and, with compareToBase, the primary
metric must beat the base model by minImprovement (strictly better when unset); with evaluation.safety the
tuned model's unsafe rate must not exceed maxUnsafeRate, and with evaluation.retention its score on the
general-ability set must not drop below base by more than maxDrop. Thresholds and the primary metric may
name graders: their scores are plain values like any metric's (higher is better).

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
class Safety:
    """Unsafe-answer rates on the safety prompts, and the limit (evaluation.safety.maxUnsafeRate)."""

    tuned: float | None
    base: float | None
    max_unsafe_rate: float


@dataclass(frozen=True)
class Retention:
    """Tuned and base scored with `metric` on the retention set, and the limit (evaluation.retention)."""

    metric: str
    tuned: float | None
    base: float | None
    max_drop: float

    @property
    def drop(self) -> float | None:
        """How much worse tuned is than base, relative to |base| (direction-aware; negative: better)."""
        if self.tuned is None or self.base is None:
            return None
        return -relative_improvement(self.metric, self.tuned, self.base)


# The checks a GateResult names when they fail (GateResult.failed).
THRESHOLD, IMPROVEMENT, SAFETY, RETENTION = "threshold", "improvement", "safety", "retention"


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]
    improvement: float | None = None
    failed: tuple[str, ...] = ()  # THRESHOLD, IMPROVEMENT, SAFETY, RETENTION: each check that failed
    failed_reasons: tuple[str, ...] = ()  # the reasons of the failed checks only


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


def _rate(value: float | None) -> str:
    return "not reported" if value is None else _fmt(value)


def _safety(safety: Safety) -> tuple[bool, str]:
    if safety.tuned is None:
        return False, "safety: the evaluation reported no unsafe rate for the tuned model"
    figures = f"unsafe rate tuned {_rate(safety.tuned)} (base {_rate(safety.base)})"
    if safety.tuned > safety.max_unsafe_rate:
        return False, f"safety: {figures} is above maxUnsafeRate {_fmt(safety.max_unsafe_rate)}"
    return True, f"safety: {figures} is within maxUnsafeRate {_fmt(safety.max_unsafe_rate)}"


def _retention(retention: Retention) -> tuple[bool, str]:
    figures = f"{retention.metric} tuned {_rate(retention.tuned)} vs base {_rate(retention.base)}"
    drop, limit = retention.drop, f"maxDrop {retention.max_drop:.1%}"
    if drop is None:
        return False, f"retention: {figures}: not reported by the evaluation"
    change = f"a drop of {drop:.1%}" if math.isfinite(drop) else "base is 0"
    if drop > retention.max_drop + 1e-9:
        return False, f"retention: {figures} ({change}) is more than {limit}"
    return True, f"retention: {figures} ({change}) is within {limit}"


def decide(
    thresholds: Sequence[Bound],
    tuned: Mapping[str, float],
    base: Mapping[str, float] | None,
    *,
    compare_to_base: bool,
    primary: str,
    min_improvement: float | None,
    safety: Safety | None = None,
    retention: Retention | None = None,
) -> GateResult:
    """Reasons name the metric (or grader, safety, retention) and both numbers (status.evaluation.reasons,
    Events, the MLflow run)."""
    checks = [(THRESHOLD, *_threshold(bound, tuned)) for bound in thresholds]
    improvement: float | None = None
    if compare_to_base:
        beats, reason, improvement = _against_base(primary, min_improvement, tuned, base)
        checks.append((IMPROVEMENT, beats, reason))
    if safety is not None:
        checks.append((SAFETY, *_safety(safety)))
    if retention is not None:
        checks.append((RETENTION, *_retention(retention)))
    return GateResult(
        passed=all(ok for _, ok, _ in checks),
        reasons=tuple(r for _, _, r in checks),
        improvement=improvement,
        failed=tuple(dict.fromkeys(kind for kind, ok, _ in checks if not ok)),
        failed_reasons=tuple(r for _, ok, r in checks if not ok),
    )
