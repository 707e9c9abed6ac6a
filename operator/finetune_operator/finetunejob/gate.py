"""The evaluation gate: thresholds on the tuned model and, optionally, a relative improvement over base.

The rule itself is finetune_vocabulary.gate (the evaluator applies the same one before it registers a model in
MLflow); this module applies it to the typed spec.
"""

from __future__ import annotations

from collections.abc import Mapping

from finetune_vocabulary import metrics as vocabulary
from finetune_vocabulary.gate import Bound, GateResult, decide
from finetune_vocabulary.metrics import relative_improvement

from finetune_operator.api.finetunejob import EvaluationSpec

__all__ = ["GateResult", "evaluate_gate", "primary_metric", "relative_improvement"]


def primary_metric(evaluation: EvaluationSpec) -> str:
    """The metric that decides the run, by the shared rule (finetune_vocabulary.metrics.primary_metric)."""
    return vocabulary.primary_metric(
        evaluation.metrics, [t.metric for t in evaluation.thresholds or ()], evaluation.primary_metric
    )


def evaluate_gate(
    evaluation: EvaluationSpec, tuned: Mapping[str, float], base: Mapping[str, float] | None
) -> GateResult:
    """Every threshold must hold; with compareToBase the primary metric must beat base by minImprovement.

    Reasons name the metric and both numbers, for `status.evaluation.reasons` and the Event.
    """
    return decide(
        [Bound(t.metric, t.min, t.max) for t in evaluation.thresholds or ()],
        tuned,
        base,
        compare_to_base=evaluation.compare_to_base,
        primary=primary_metric(evaluation),
        min_improvement=evaluation.min_improvement,
    )
