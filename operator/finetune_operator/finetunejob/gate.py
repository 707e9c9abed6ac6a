"""The evaluation gate: thresholds on the tuned model (metrics or graders), optionally a relative improvement
over base, the safety limit and the forgetting (retention) limit.

The rule itself is finetune_vocabulary.gate (the evaluator applies the same one before it registers a model in
MLflow); this module applies it to the typed spec and the evaluate stage's summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_vocabulary import metrics as vocabulary
from finetune_vocabulary.gate import Bound, GateResult, Retention, Safety, decide
from finetune_vocabulary.metrics import relative_improvement
from finetune_vocabulary.objectives import DEFAULT_OBJECTIVE

from finetune_operator.api.finetunejob import EvaluationSpec
from finetune_operator.k8s.observe import finite

__all__ = ["GateResult", "evaluate_gate", "primary_metric", "relative_improvement"]


def primary_metric(evaluation: EvaluationSpec, objective: str = DEFAULT_OBJECTIVE) -> str:
    """The metric that decides the run, by the shared rule (finetune_vocabulary.metrics.primary_metric):
    unless the spec names one, the objective's own figure (dpo, kto: preference_accuracy; grpo: reward)."""
    return vocabulary.primary_metric(
        evaluation.metrics,
        [t.metric for t in evaluation.thresholds or ()],
        evaluation.primary_metric,
        objective=objective,
    )


def _section(summary: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    value = (summary or {}).get(key)
    return value if isinstance(value, Mapping) else {}


def safety_figures(evaluation: EvaluationSpec, summary: Mapping[str, Any] | None) -> Safety | None:
    """The summary's unsafe rates against evaluation.safety; None without a safety section."""
    if evaluation.safety is None:
        return None
    rates = _section(summary, "safety")
    return Safety(finite(rates.get("tuned")), finite(rates.get("base")), evaluation.safety.max_unsafe_rate)


def retention_figures(evaluation: EvaluationSpec, summary: Mapping[str, Any] | None) -> Retention | None:
    """The summary's retention scores against evaluation.retention; None without a retention section."""
    if evaluation.retention is None:
        return None
    scores = _section(summary, "retention")
    spec = evaluation.retention
    return Retention(spec.metric, finite(scores.get("tuned")), finite(scores.get("base")), spec.max_drop)


def evaluate_gate(
    evaluation: EvaluationSpec,
    tuned: Mapping[str, float],
    base: Mapping[str, float] | None,
    summary: Mapping[str, Any] | None = None,
    *,
    objective: str = DEFAULT_OBJECTIVE,
) -> GateResult:
    """Every threshold must hold; with compareToBase the primary metric must beat base by minImprovement;
    with safety and retention sections, their limits (figures from the evaluate stage's `summary`).

    Reasons name the metric (or grader, safety, retention) and both numbers, for the status and the Event.
    """
    return decide(
        [Bound(t.metric, t.min, t.max) for t in evaluation.thresholds or ()],
        tuned,
        base,
        compare_to_base=evaluation.compare_to_base,
        primary=primary_metric(evaluation, objective),
        min_improvement=evaluation.min_improvement,
        safety=safety_figures(evaluation, summary),
        retention=retention_figures(evaluation, summary),
    )
