"""The evaluation gate: thresholds on the tuned model and, optionally, a relative improvement over base."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Lower is better for these; thresholds on them are usually `max`, improvements are decreases.
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]
    improvement: float | None = None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def relative_improvement(metric: str, tuned: float, base: float) -> float:
    """How much better tuned is than base, relative to |base| (0.05 = 5% better); positive is better."""
    gain = base - tuned if metric in LOWER_IS_BETTER else tuned - base
    if base == 0:
        return float("inf") if gain > 0 else (0.0 if gain == 0 else float("-inf"))
    return gain / abs(base)


def primary_metric(evaluation_spec: Mapping[str, Any], computed: Mapping[str, float]) -> str:
    """The metric that decides improvement: primaryMetric, else exact_match if computed, else the first."""
    if evaluation_spec.get("primaryMetric"):
        return str(evaluation_spec["primaryMetric"])
    metrics = [str(m) for m in evaluation_spec.get("metrics") or ["loss"]]
    return "exact_match" if "exact_match" in metrics and "exact_match" in computed else metrics[0]


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
        primary = primary_metric(evaluation_spec, tuned)
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
            direction = "lower" if primary in LOWER_IS_BETTER else "higher"
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
