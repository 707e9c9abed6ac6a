"""JSON-lines logging on stdout, with credentials scrubbed from every line.

Use ``logging.getLogger(__name__)`` for messages and :func:`log_event` for machine-read events such as
``progress`` (the operator reads the newest progress line from the pod log).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from finetune_vocabulary.evaluation import JUDGE_KEY_ENV_PREFIX, SAFETY_JUDGE_KEY_ENV
from finetune_vocabulary.redaction import REDACTED, redact_patterns

# Environment variables whose values must never reach a log line, report or termination message.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "FTJ_REFERENCE_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "OPENAI_API_KEY",
    "WANDB_API_KEY",
    SAFETY_JUDGE_KEY_ENV,
)


def _secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    source: Mapping[str, str] = os.environ if env is None else env
    # Very short values would redact ordinary words; real credentials are long.
    # Judge keys: one env var per judge grader (FTJ_JUDGE_API_KEY_<GRADER>), named at run time.
    names = [*SECRET_ENV_VARS, *(k for k in source if k.startswith(JUDGE_KEY_ENV_PREFIX))]
    return sorted({v for k in names if len(v := source.get(k, "")) >= 8}, key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """Remove credential values (from the environment and by pattern) from ``text``."""
    for value in _secret_values(env):
        text = text.replace(value, REDACTED)
    return redact_patterns(text)


def redact_obj(obj: Any) -> Any:
    """Redact strings inside JSON-like data (dicts, lists)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """Scrubs credentials from a record's final message (args are merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exception"] = record.exc_text
        return redact(json.dumps(payload, default=str, ensure_ascii=False))


_HANDLER_MARK = "_finetune_trainer_handler"


def setup_logging(level: str | int = "INFO", stream: Any = None, quiet_loggers: Iterable[str] = ()) -> None:
    """Route the root logger to JSON lines on stdout (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # Chatty libraries: keep their warnings, drop their debug noise (and botocore's request dumps).
    for name in (
        "botocore",
        "boto3",
        "s3transfer",
        "urllib3",
        "filelock",
        "httpx",
        "httpcore",
        *quiet_loggers,
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


_events = logging.getLogger("finetune_trainer.events")


def log_event(event: str, **fields: Any) -> None:
    """Emit a machine-readable event line, e.g. ``log_event("progress", step=40, totalSteps=200, ...)``.

    The line is a flat JSON object whose ``event`` key names it (plus time/level/logger/message keys).
    """
    _events.info(event, extra={"fields": {"event": event, **fields}})
