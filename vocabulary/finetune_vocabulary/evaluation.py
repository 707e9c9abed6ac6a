"""What the operator and the trainer share about graders, safety and retention (issue 22)."""

from __future__ import annotations

from collections.abc import Collection

from .metrics import METRICS, TEXT_METRICS

BUILTIN_METRICS = METRICS  # re-export
GRADER_TYPES = ("stringCheck", "jsonSchema", "judge")
GRADER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"
MAX_GRADERS = 8
SAFETY_JUDGE_KEY_ENV = "FTJ_SAFETY_JUDGE_API_KEY"


def judge_key_env(grader: str) -> str:
    """The env var a judge grader's API key reaches the evaluate pod in."""
    return JUDGE_KEY_ENV_PREFIX + grader.upper().replace("-", "_")


JUDGE_KEY_ENV_PREFIX = "FTJ_JUDGE_API_KEY_"
MAX_GRADER_ERROR_RATE = 0.10  # more errors than this fails the evaluate stage


def serving_check_metric(primary: str, deterministic_graders: Collection[str]) -> str:
    """primary when it is exact_match/token_f1/rouge_l or a deterministic grader; else "token_f1"."""
    return primary if primary in TEXT_METRICS or primary in deterministic_graders else "token_f1"
