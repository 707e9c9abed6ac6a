"""The evaluation gate: thresholds, comparison with the base model, relative minImprovement."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator.api.finetunejob import EvaluationSpec
from finetune_operator.finetunejob.gate import evaluate_gate, relative_improvement
from finetune_vocabulary.gate import Bound, decide

GATE_CASES = [
    # (name, evaluation spec, tuned, base, passed, words expected in the reasons)
    ("tuned beats base on loss", {"metrics": ["loss"]}, {"loss": 1.0}, {"loss": 2.0}, True, ["+50.0%"]),
    (
        "tuned worse on loss",
        {"metrics": ["loss"]},
        {"loss": 2.5},
        {"loss": 2.0},
        False,
        ["not enough improvement", "lower is better"],
    ),
    ("equal is not better", {"metrics": ["loss"]}, {"loss": 2.0}, {"loss": 2.0}, False, ["not enough"]),
    (
        "higher is better for exact_match",
        {"metrics": ["exact_match"], "primaryMetric": "exact_match"},
        {"exact_match": 0.6},
        {"exact_match": 0.4},
        True,
        ["+50.0%", "higher is better"],
    ),
    (
        "minImprovement is relative and met",
        {"metrics": ["exact_match"], "primaryMetric": "exact_match", "minImprovement": 0.2},
        {"exact_match": 0.6},
        {"exact_match": 0.5},
        True,
        ["+20.0%"],
    ),
    (
        "minImprovement is relative and missed",
        {"metrics": ["exact_match"], "primaryMetric": "exact_match", "minImprovement": 0.25},
        {"exact_match": 0.6},
        {"exact_match": 0.5},
        False,
        ["not enough improvement", "+25.0%"],
    ),
    (
        "threshold min fails",
        {
            "metrics": ["exact_match"],
            "primaryMetric": "exact_match",
            "thresholds": [{"metric": "exact_match", "min": 0.7}],
        },
        {"exact_match": 0.6},
        {"exact_match": 0.1},
        False,
        ["exact_match 0.6 is below the minimum 0.7"],
    ),
    (
        "threshold max fails",
        {
            "metrics": ["loss", "perplexity"],
            "compareToBase": False,
            "thresholds": [{"metric": "perplexity", "max": 5}],
        },
        {"loss": 1.0, "perplexity": 6.2},
        None,
        False,
        ["perplexity 6.2 is above the maximum 5"],
    ),
    (
        "thresholds hold, no base comparison",
        {
            "metrics": ["loss", "rouge_l"],
            "compareToBase": False,
            "thresholds": [{"metric": "rouge_l", "min": 0.3}, {"metric": "loss", "max": 2}],
        },
        {"loss": 1.5, "rouge_l": 0.35},
        None,
        True,
        ["rouge_l 0.35 meets min 0.3", "loss 1.5 meets max 2"],
    ),
    (
        "metric missing from the evaluation",
        {"metrics": ["token_f1"], "compareToBase": False, "thresholds": [{"metric": "token_f1", "min": 0.1}]},
        {},
        None,
        False,
        ["token_f1: not reported"],
    ),
    ("base missing while comparing", {"metrics": ["loss"]}, {"loss": 1.0}, None, False, ["cannot compare"]),
    (
        "primary defaults to the first threshold's metric",
        {"metrics": ["perplexity", "exact_match"], "thresholds": [{"metric": "exact_match", "min": 0.0}]},
        {"perplexity": 3.0, "exact_match": 0.0},
        {"perplexity": 9.0, "exact_match": 0.5},
        False,
        ["exact_match tuned 0 vs base 0.5", "not enough improvement"],
    ),
    (
        "primary defaults to the first metric without thresholds",
        {"metrics": ["perplexity", "exact_match"]},
        {"perplexity": 3.0, "exact_match": 0.0},
        {"perplexity": 9.0, "exact_match": 0.5},
        True,
        ["perplexity tuned 3 vs base 9"],
    ),
    (
        "a base of zero reads as such, not as an infinite percentage",
        {"metrics": ["exact_match"]},
        {"exact_match": 0.6},
        {"exact_match": 0.0},
        True,
        ["exact_match tuned 0.6 vs base 0 (base is 0"],
    ),
]


@pytest.mark.parametrize(
    ("name", "spec", "tuned", "base", "passed", "words"), GATE_CASES, ids=[c[0] for c in GATE_CASES]
)
def test_gate(
    name: str,
    spec: dict[str, Any],
    tuned: dict[str, float],
    base: dict[str, float] | None,
    passed: bool,
    words: list[str],
) -> None:
    result = evaluate_gate(EvaluationSpec.model_validate(spec), tuned, base)
    assert result.passed is passed
    text = " | ".join(result.reasons)
    for word in words:
        assert word in text


@pytest.mark.parametrize(
    ("metric", "tuned", "base", "expected"),
    [
        ("loss", 1.0, 2.0, 0.5),
        ("loss", 3.0, 2.0, -0.5),
        ("exact_match", 0.3, 0.2, 0.5),
        ("exact_match", 0.2, 0.0, float("inf")),
        ("rouge_l", 0.0, 0.0, 0.0),
    ],
)
def test_relative_improvement(metric: str, tuned: float, base: float, expected: float) -> None:
    assert relative_improvement(metric, tuned, base) == pytest.approx(expected)


# --- graders, safety and retention (issue 22) ----------------------------------------------------------
GRADED = {
    "metrics": ["loss", "token_f1"],
    "graders": [
        {
            "name": "relevance",
            "type": "judge",
            "judge": {"url": "https://j.example/v1", "model": "m", "rubric": "r"},
        }
    ],
}


def test_thresholds_and_the_primary_metric_may_name_graders() -> None:
    spec = EvaluationSpec.model_validate(
        {**GRADED, "thresholds": [{"metric": "relevance", "min": 0.7}], "primaryMetric": "relevance"}
    )
    passed = evaluate_gate(spec, {"relevance": 0.8, "loss": 9.0}, {"relevance": 0.4, "loss": 1.0})
    assert passed.passed, passed.reasons
    assert "relevance tuned 0.8 vs base 0.4 (+100.0%, higher is better" in " | ".join(passed.reasons)
    failed = evaluate_gate(spec, {"relevance": 0.6}, {"relevance": 0.4})
    assert not failed.passed and failed.failed == ("threshold",)
    assert failed.failed_reasons == ("relevance 0.6 is below the minimum 0.7",)


SAFETY = {"prompts": "s3://data/redteam.jsonl", "judge": {"url": "https://j.example/v1", "model": "m"}}


@pytest.mark.parametrize(
    ("limit", "rates", "passed", "words"),
    [
        (0.0, {"tuned": 0.0, "base": 0.2}, True, "unsafe rate tuned 0 (base 0.2) is within maxUnsafeRate 0"),
        (
            0.0,
            {"tuned": 0.05, "base": 0.0},
            False,
            "unsafe rate tuned 0.05 (base 0) is above maxUnsafeRate 0",
        ),
        (0.1, {"tuned": 0.1}, True, "tuned 0.1 (base not reported) is within maxUnsafeRate 0.1"),
        (0.1, None, False, "the evaluation reported no unsafe rate"),
    ],
)
def test_safety_limit(limit: float, rates: dict[str, float] | None, passed: bool, words: str) -> None:
    spec = EvaluationSpec.model_validate({"metrics": ["loss"], "safety": {**SAFETY, "maxUnsafeRate": limit}})
    result = evaluate_gate(spec, {"loss": 1.0}, {"loss": 2.0}, {"safety": rates} if rates else {})
    assert result.passed is passed
    assert any(r.startswith("safety: ") and words in r for r in result.reasons), result.reasons
    assert ("safety" in result.failed) is not passed


@pytest.mark.parametrize(
    ("metric", "tuned", "base", "passed", "words"),
    [
        ("loss", 1.5, 1.2, False, "loss tuned 1.5 vs base 1.2 (a drop of 25.0%) is more than maxDrop 5.0%"),
        ("loss", 1.25, 1.2, True, "loss tuned 1.25 vs base 1.2 (a drop of 4.2%) is within maxDrop 5.0%"),
        ("token_f1", 0.5, 0.6, False, "token_f1 tuned 0.5 vs base 0.6 (a drop of 16.7%) is more than"),
        ("token_f1", 0.7, 0.6, True, "a drop of -16.7%"),
        ("token_f1", 0.1, 0.0, True, "(base is 0)"),
    ],
)
def test_retention_limit_is_relative_and_direction_aware(
    metric: str, tuned: float, base: float, passed: bool, words: str
) -> None:
    spec = EvaluationSpec.model_validate(
        {"metrics": ["loss"], "retention": {"dataset": "s3://data/general.jsonl", "metric": metric}}
    )
    summary = {"retention": {"metric": metric, "tuned": tuned, "base": base}}
    result = evaluate_gate(spec, {"loss": 1.0}, {"loss": 2.0}, summary)
    assert result.passed is passed, result.reasons
    assert any(r.startswith("retention: ") and words in r for r in result.reasons), result.reasons


def test_the_trainers_call_without_safety_or_retention_still_decides() -> None:
    """finetune_trainer.tracking calls decide() with the original keywords only."""
    result = decide(
        [Bound("loss", max=2.0)],
        {"loss": 1.0},
        {"loss": 1.5},
        compare_to_base=True,
        primary="loss",
        min_improvement=None,
    )
    assert result.passed and result.failed == () and len(result.reasons) == 2
