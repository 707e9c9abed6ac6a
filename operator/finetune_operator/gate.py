"""The evaluation gate: thresholds on the tuned model and, optionally, a relative improvement over base."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary import metrics as vocabulary
from finetune_vocabulary.metrics import relative_improvement


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]
    improvement: float | None = None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def primary_metric(evaluation_spec: Mapping[str, Any]) -> str:
    """The metric that decides the run, by the shared rule (finetune_vocabulary.metrics.primary_metric)."""
    return vocabulary.primary_metric(
        [str(m) for m in evaluation_spec.get("metrics") or ()],
        [str(t["metric"]) for t in evaluation_spec.get("thresholds") or ()],
        evaluation_spec.get("primaryMetric"),
    )


def evaluate_gate(
    evaluation_spec: Mapping[str, Any], tuned: Mapping[str, float], base: Mapping[str, float] | None
) -> GateResult:
    """Every threshold must hold; with compareToBase the primary metric must beat base by minImprovement.

    Reasons name the metric and both numbers, for `status.evaluation.reasons` and the Event.
    """
    reasons: list[str] = []
    passed = True
    thresholds: Sequence[Mapping[str, Any]] = evaluation_spec.get("thresholds") or []
    for threshold in thresholds:
        metric = str(threshold["metric"])
        value = tuned.get(metric)
        if value is None:
            passed = False
            reasons.append(f"{metric}: not reported by the evaluation")
            continue
        if threshold.get("min") is not None and value < float(threshold["min"]):
            passed = False
            reasons.append(f"{metric} {_fmt(value)} is below the minimum {_fmt(float(threshold['min']))}")
        elif threshold.get("max") is not None and value > float(threshold["max"]):
            passed = False
            reasons.append(f"{metric} {_fmt(value)} is above the maximum {_fmt(float(threshold['max']))}")
        else:
            kind = "min" if threshold.get("min") is not None else "max"
            reasons.append(f"{metric} {_fmt(value)} meets {kind} {_fmt(float(threshold[kind]))}")

    improvement: float | None = None
    if evaluation_spec.get("compareToBase", True):
        primary = primary_metric(evaluation_spec)
        minimum = evaluation_spec.get("minImprovement")
        tuned_value, base_value = tuned.get(primary), (base or {}).get(primary)
        if tuned_value is None or base_value is None:
            passed = False
            reasons.append(f"{primary}: cannot compare with base (tuned {tuned_value}, base {base_value})")
        else:
            improvement = relative_improvement(primary, tuned_value, base_value)
            needed = float(minimum) if minimum is not None else 0.0
            # Without minImprovement the tuned model must still be strictly better than its base;
            # the tolerance keeps 0.6 vs 0.5 at exactly +20% from failing on float rounding.
            beats = improvement >= needed - 1e-9 if minimum is not None else improvement > 0
            direction = vocabulary.direction(primary)
            change = f"{improvement:+.1%}" if math.isfinite(improvement) else "base is 0"
            summary = (
                f"{primary} tuned {_fmt(tuned_value)} vs base {_fmt(base_value)} "
                f"({change}, {direction} is better; needed "
                f"{'> 0%' if minimum is None else f'>= {needed:+.1%}'})"
            )
            if not beats:
                passed = False
                reasons.append(f"{summary}: not enough improvement")
            else:
                reasons.append(summary)
    return GateResult(passed=passed, reasons=tuple(reasons), improvement=improvement)
