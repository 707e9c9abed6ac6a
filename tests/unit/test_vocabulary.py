"""The shared vocabulary: the primary-metric rule and the metric directions operator and trainer both use."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from finetune_vocabulary import steps
from finetune_vocabulary.exitcodes import PERMANENT_EXIT_CODES, ExitCode
from finetune_vocabulary.layout import RunLayout, run_prefix
from finetune_vocabulary.metrics import (
    METRICS,
    direction,
    lower_is_better,
    primary_metric,
    relative_improvement,
)

VOCABULARY = Path(__file__).resolve().parents[2] / "vocabulary" / "finetune_vocabulary"


@pytest.mark.parametrize(
    ("metrics", "thresholds", "explicit", "want"),
    [
        (["loss", "exact_match"], [], None, "loss"),  # no threshold: the first listed metric
        (["token_f1", "loss"], [], None, "token_f1"),
        (["loss", "rouge_l", "exact_match"], ["rouge_l", "loss"], None, "rouge_l"),  # the first threshold's
        (["loss", "rouge_l"], ["rouge_l"], "loss", "loss"),  # primaryMetric wins
        ([], [], None, "loss"),
    ],
)
def test_primary_metric_rule(
    metrics: list[str], thresholds: list[str], explicit: str | None, want: str
) -> None:
    assert primary_metric(metrics, thresholds, explicit) == want


def test_directions() -> None:
    assert METRICS == ("loss", "perplexity", "exact_match", "token_f1", "rouge_l")
    assert [m for m in METRICS if lower_is_better(m)] == ["loss", "perplexity"]
    assert direction("loss") == "lower" and direction("exact_match") == "higher"
    assert relative_improvement("loss", 1.5, 2.0) == pytest.approx(0.25)
    assert relative_improvement("exact_match", 0.6, 0.5) == pytest.approx(0.2)
    assert relative_improvement("exact_match", 0.6, 0.0) == float("inf")


def test_exit_codes_and_layout() -> None:
    assert [int(c) for c in PERMANENT_EXIT_CODES] == [10, 11, 12]
    assert ExitCode.PREEMPTED == 21
    prefix = run_prefix("s3://b/out/", "ns", "job", "u-1")
    layout = RunLayout(prefix)
    assert prefix == "s3://b/out/ns/job/u-1"
    assert layout.checkpoint(40) == f"{prefix}/checkpoints/step-00000040"
    assert layout.evaluation_report == f"{prefix}/evaluation/report.json"
    assert (layout.adapter, layout.merged) == (f"{prefix}/model/adapter", f"{prefix}/model/merged")


def test_the_vocabulary_imports_nothing_outside_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__", "finetune_vocabulary"}
    for path in VOCABULARY.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            assert {n.split(".")[0] for n in names} <= allowed, f"{path.name} imports {names}"


@pytest.mark.parametrize(
    ("examples", "batch", "epochs", "accumulation", "ranks", "max_steps", "expected"),
    [
        (600, 16, 4, 1, 1, None, 152),  # the classification job: ceil(600 / 16) * 4
        (600, 16, 4, 2, 1, None, 76),  # accumulation: 32 examples per optimizer step
        (600, 8, 4, 1, 2, None, 152),  # two data-parallel ranks of 8 = 16 per step
        (40, 16, 1, 1, 1, None, 3),  # the last step is short, not dropped
        (600, 16, 4, 1, 1, 10, 10),  # maxSteps wins
        (5, 16, 0.5, 1, 1, None, 1),  # never zero
    ],
)
def test_optimizer_steps_follow_the_trl_arithmetic(
    examples: int,
    batch: int,
    epochs: float,
    accumulation: int,
    ranks: int,
    max_steps: int | None,
    expected: int,
) -> None:
    assert steps.total_steps(examples, batch, epochs, accumulation, ranks, max_steps) == expected


def test_grader_vocabulary_names_keys_and_the_serving_check_metric() -> None:
    import re

    from finetune_vocabulary import evaluation

    assert evaluation.judge_key_env("relevance") == "FTJ_JUDGE_API_KEY_RELEVANCE"
    assert evaluation.judge_key_env("valid-json-2") == "FTJ_JUDGE_API_KEY_VALID_JSON_2"
    assert evaluation.judge_key_env("x").startswith(evaluation.JUDGE_KEY_ENV_PREFIX)
    pattern = re.compile(evaluation.GRADER_NAME_PATTERN)
    assert pattern.match("label-only") and pattern.match("a" * 32)
    for bad in ("a" * 33, "-a", "a-", "Label", "a_b", ""):
        assert not pattern.match(bad), bad
    assert evaluation.BUILTIN_METRICS == METRICS and evaluation.MAX_GRADERS == 8
    # Text metrics and deterministic graders are served-checkable as they are; loss and judges fall back.
    assert evaluation.serving_check_metric("rouge_l", ()) == "rouge_l"
    assert evaluation.serving_check_metric("label-only", {"label-only"}) == "label-only"
    assert evaluation.serving_check_metric("relevance", {"label-only"}) == "token_f1"
    assert evaluation.serving_check_metric("loss", ()) == "token_f1"
