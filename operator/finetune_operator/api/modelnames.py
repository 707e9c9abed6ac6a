"""Stable model names and versioned names of a ModelServer pool: one source for the pattern, the CEL rule and
the naming, shared by ModelServer.spec.models and FineTuneJob.spec.deployment.modelName."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

from finetune_operator.api.schema import rule, validations

MODEL_NAME_PATTERN = r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$"
MODEL_NAME_MAX = 48
BASE_SERVED_NAME = "base"  # the base model's name in a pool's API
VERSION_SUFFIX = re.compile(r"-v[0-9]+$")
MODEL_NAME_RESERVED = "modelName must not end in -v<digits> (versioned names) nor be 'base'"
MODEL_NAME_RULE = rule(f"!self.matches('-v[0-9]+$') && self != '{BASE_SERVED_NAME}'", MODEL_NAME_RESERVED)

ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MODEL_NAME_MAX,
        pattern=MODEL_NAME_PATTERN,
        json_schema_extra=validations(MODEL_NAME_RULE),
    ),
]


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a stable model name (the CEL rule's check), or None."""
    if VERSION_SUFFIX.search(name) or name == BASE_SERVED_NAME:
        return MODEL_NAME_RESERVED
    return None


def version_name(model: str, version: int) -> str:
    """The immutable name one adapter version is loaded under: never reused for other weights."""
    return f"{model}-v{version}"


def parse_version(model: str, name: str) -> int | None:
    """n of `<model>-v<n>`, or None when `name` is not a version of `model`."""
    prefix = f"{model}-v"
    digits = name[len(prefix) :]
    if name.startswith(prefix) and digits.isascii() and digits.isdigit():  # not "²", which int() refuses
        return int(name[len(prefix) :])
    return None
