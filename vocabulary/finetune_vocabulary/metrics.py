"""Evaluation metrics, their direction, and the rule that picks the metric deciding a run.

The primary metric is the one the gate compares with the base model, the one `status.evaluation.summary`
(kubectl's EVAL column) shows and the one the trainer's report names: `evaluation.primaryMetric` when set,
else the metric of the first threshold, else the first of `evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, get_args

from finetune_vocabulary.objectives import default_primary

MetricName = Literal["loss", "perplexity", "exact_match", "token_f1", "rouge_l"]
# In the order the API lists them (the default of `evaluation.metrics`).
METRICS: tuple[MetricName, ...] = get_args(MetricName)
# Teacher-forced on the reference answers; lower is better (a threshold on them is usually a `max`).
LOSS_METRICS: tuple[MetricName, ...] = ("loss", "perplexity")
# Computed on generated answers against the references; in [0, 1], higher is better.
TEXT_METRICS: tuple[MetricName, ...] = ("exact_match", "token_f1", "rouge_l")
LOWER_IS_BETTER: frozenset[str] = frozenset(LOSS_METRICS)


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def direction(metric: str) -> Literal["lower", "higher"]:
    """Which way is better for `metric`, as the gate's messages say it."""
    return "lower" if lower_is_better(metric) else "higher"


def relative_improvement(metric: str, tuned: float, base: float) -> float:
    """How much better tuned is than base, relative to |base| (0.05 = 5% better); positive is better."""
    gain = base - tuned if lower_is_better(metric) else tuned - base
    if base == 0:
        return float("inf") if gain > 0 else (0.0 if gain == 0 else float("-inf"))
    return gain / abs(base)


def primary_metric(
    metrics: Sequence[str],
    thresholds: Iterable[str] = (),
    explicit: str | None = None,
    objective: str = "sft",
) -> str:
    """The metric that decides a run: `explicit` (primaryMetric), else the first threshold's, else the
    objective's own figure (dpo/kto: preference_accuracy, grpo: reward), else metrics[0].

    `thresholds` are the metrics of `evaluation.thresholds`, in order. An empty `metrics` (not valid in the
    API) falls back to loss, the one metric every evaluation can compute.
    """
    if explicit:
        return explicit
    for metric in thresholds:
        return metric
    return default_primary(objective) or (metrics[0] if metrics else "loss")
