"""Graders, safety and retention: the names and rules the operator (spec, status, gate) and the trainer (the
evaluate and servecheck stages) share about evaluation beyond the built-in metrics."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .metrics import METRICS, TEXT_METRICS
from .objectives import REWARD_METRIC

BUILTIN_METRICS = METRICS  # re-export: a grader's name must not be one of these
GRADER_TYPES = ("stringCheck", "jsonSchema", "judge")
# Deterministic graders score by rule, without a model; the serving check can reuse them.
DETERMINISTIC_GRADER_TYPES = ("stringCheck", "jsonSchema")
GRADER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"
MAX_GRADERS = 8
# The safety judge's key; a grader's judge key is judge_key_env(<grader name>).
SAFETY_JUDGE_KEY_ENV = "FTJ_SAFETY_JUDGE_API_KEY"
JUDGE_KEY_ENV_PREFIX = "FTJ_JUDGE_API_KEY_"
# More unusable judge verdicts than this fraction fails the evaluate stage (INVALID_CONFIG naming the grader).
MAX_GRADER_ERROR_RATE = 0.10


def judge_key_env(grader: str) -> str:
    """The env var carrying grader ``grader``'s judge API key into the evaluate pod."""
    return JUDGE_KEY_ENV_PREFIX + grader.upper().replace("-", "_")


def serving_check_metric(
    primary: str, deterministic_graders: Collection[str], reward_graders: Sequence[str] = ()
) -> str:
    """The figure the serving check compares: the primary metric when it is computed from generated text
    alone (exact_match, token_f1, rouge_l or a deterministic grader); grpo's `reward`: its first
    deterministic reward grader (`reward_graders`: spec.rewards' graders, in order); else token_f1 (loss
    and the preference figures need the weights, a judge needs a judge)."""
    if primary in TEXT_METRICS or primary in deterministic_graders:
        return primary
    if primary == REWARD_METRIC:
        return next((g for g in reward_graders if g in deterministic_graders), "token_f1")
    return "token_f1"
