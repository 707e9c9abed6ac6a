"""deployment.extraArgs: the vLLM server flags a user may pass, checked by CEL and by the model alike."""

from __future__ import annotations

import re
from collections.abc import Sequence

from finetune_operator.api.schema import EXTRA_ARGS_REFUSED, rule

# vLLM server flags a user may pass in deployment.extraArgs (docs/serving.md). Everything else is refused: the
# operator sets the model, tokenizer, host, port, served names and LoRA modules, and flags such as
# --trust-remote-code, --config, --api-key or --chat-template would run code, read files or carry secrets.
VLLM_BOOLEAN_FLAGS = (
    "enforce-eager",
    "no-enforce-eager",
    "enable-prefix-caching",
    "no-enable-prefix-caching",
    "enable-chunked-prefill",
    "no-enable-chunked-prefill",
    "async-scheduling",
    "no-async-scheduling",
    "enable-auto-tool-choice",
    "disable-log-stats",
    "no-enable-log-requests",
    "disable-uvicorn-access-log",
    "disable-fastapi-docs",
)
VLLM_VALUE_FLAGS = (
    "dtype",
    "seed",
    "max-num-seqs",
    "max-num-batched-tokens",
    "gpu-memory-utilization",
    "kv-cache-memory-bytes",
    "kv-cache-dtype",
    "block-size",
    "distributed-executor-backend",
    "max-loras",
    "max-cpu-loras",
    "lora-dtype",
    "max-logprobs",
    "scheduling-policy",
    "quantization",
    "cpu-offload-gb",
    "uvicorn-log-level",
    "tool-call-parser",
    "reasoning-parser",
)
_ARG_VALUE = r"[A-Za-z0-9._:+-]+"
EXTRA_ARG_FLAG_PATTERN = (
    rf"^--(?:(?:{'|'.join(VLLM_BOOLEAN_FLAGS)})|(?:{'|'.join(VLLM_VALUE_FLAGS)})(?:={_ARG_VALUE})?)$"
)
EXTRA_ARG_VALUE_FLAG_PATTERN = rf"^--(?:{'|'.join(VLLM_VALUE_FLAGS)})$"
EXTRA_ARG_VALUE_PATTERN = rf"^{_ARG_VALUE}$"
MAX_EXTRA_ARGS = 32


def extra_args_problem(args: Sequence[str]) -> int | None:
    """Index of the first argument the allow-list refuses, or None (the CEL rule below, in Python)."""
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            ok = re.fullmatch(EXTRA_ARG_FLAG_PATTERN, arg) is not None
        else:
            ok = (
                i > 0
                and re.fullmatch(EXTRA_ARG_VALUE_FLAG_PATTERN, args[i - 1]) is not None
                and re.fullmatch(EXTRA_ARG_VALUE_PATTERN, arg) is not None
            )
        if not ok:
            return i
    return None


def check_extra_args(args: list[str] | None) -> list[str] | None:
    """The models' validator for an extraArgs field: the allow-list's message and the refused item."""
    values = args or []
    index = extra_args_problem(values)
    if index is not None:
        raise ValueError(f"{EXTRA_ARGS_REFUSED} (refused: item {index}, {values[index]!r})")
    return args


# CEL has no indexed iteration: walk the (bounded) indices so a value can be checked against its flag.
EXTRA_ARGS_RULE = rule(
    f"{list(range(MAX_EXTRA_ARGS))}.all(i, i >= size(self) || (self[i].startsWith('-') "
    f"? self[i].matches('{EXTRA_ARG_FLAG_PATTERN}') "
    f": (i > 0 && self[i - 1].matches('{EXTRA_ARG_VALUE_FLAG_PATTERN}') "
    f"&& self[i].matches('{EXTRA_ARG_VALUE_PATTERN}'))))",
    EXTRA_ARGS_REFUSED,
)
