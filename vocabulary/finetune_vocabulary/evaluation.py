"""What operator and trainer share about evaluation beyond the built-in metrics: graders (their types, names
and limits), where judge keys reach the evaluate pod, and the metric the serving check compares.

A grader's name is usable wherever a metric name is; its scores are in [0, 1], higher is better.
"""

from __future__ import annotations

from collections.abc import Collection

from finetune_vocabulary.metrics import METRICS, TEXT_METRICS

BUILTIN_METRICS = METRICS  # re-export
GRADER_TYPES = ("stringCheck", "jsonSchema", "judge")
GRADER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"
MAX_GRADERS = 8
SAFETY_JUDGE_KEY_ENV = "FTJ_SAFETY_JUDGE_API_KEY"
JUDGE_KEY_ENV_PREFIX = "FTJ_JUDGE_API_KEY_"
MAX_GRADER_ERROR_RATE = 0.10  # more errors than this fails the evaluate stage


def judge_key_env(grader: str) -> str:
    """The env var carrying the API key of the judge of grader `grader`."""
    return JUDGE_KEY_ENV_PREFIX + grader.upper().replace("-", "_")


def serving_check_metric(primary: str, deterministic_graders: Collection[str]) -> str:
    """primary when it is exact_match/token_f1/rouge_l or a deterministic grader; else "token_f1".

    The serving check scores the served model's greedy answers by the same code as evaluate, so it needs a
    metric computed from generated text without a judge (loss needs the weights, a judge costs calls)."""
    if primary in TEXT_METRICS or primary in deterministic_graders:
        return primary
    return "token_f1"
