"""The trainer's side of dataset formats: the default chat template for base models that ship none
(validate counts tokens with it and train formats examples with it, so both agree), reading back the
canonical splits validate wrote, and the comparison keys of cleaning (duplicates, leakage).

Parsing a line in any format, and converting it to its objective's canonical form, is
finetune_vocabulary.records (shared with the OpenAI-compatible API's upload check).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from finetune_vocabulary.records import CANONICAL_FORMAT, RecordError, loads_record, to_canonical

from .exitcodes import InvalidDataError

# Plain-text markers, so no token has to be added to the vocabulary (no resized embeddings for vLLM LoRA).
# Newlines right after a block tag are emitted as expressions: transformers renders with trim_blocks.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n{% generation %}{{ message['content'] }}"
    "{{ eos_token if eos_token else '' }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template the default one; returns True when it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


# TRL's GRPOConfig.max_completion_length default (tests pin it): the trainer leaves the field unset when
# hyperparameters.maxCompletionLength is, so validate budgets the same number of completion tokens.
GRPO_DEFAULT_MAX_COMPLETION_LENGTH = 512


def read_canonical(path: Path, objective: str) -> list[dict[str, Any]]:
    """The records of a split validate wrote (``data/{train,validation,test}.jsonl``) in ``objective``'s
    canonical form; InvalidDataError naming the file and line for a line that is not in that form."""
    fmt = CANONICAL_FORMAT.get(objective)
    if fmt is None:
        raise ValueError(f"unknown objective {objective!r}")
    records: list[dict[str, Any]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = loads_record(raw.decode("utf-8"))
                if to_canonical(record, fmt) != record:
                    raise RecordError("format_mismatch", _not_canonical(record, to_canonical(record, fmt)))
            except UnicodeDecodeError:
                problem = "bytes that are not UTF-8"
            except RecordError as err:
                problem = err.message
            else:
                records.append(record)
                continue
            raise InvalidDataError(
                f"{path.name} line {lineno}: not a canonical {objective} record: {problem}"
            )
    return records


def _not_canonical(record: dict[str, Any], canonical: dict[str, Any]) -> str:
    field = next(k for k in [*record, *canonical] if record.get(k) != canonical.get(k))
    if field not in canonical:
        return f'unexpected field "{field}"'
    if field in ("prompt", "messages"):
        return f'field "{field}" must be a list of {{"role", "content"}} messages'
    return f'field "{field}" must be plain text'


# --- comparison keys ----------------------------------------------------------------------------------------

_PUNCT_SPACE = re.compile(r"[\W_]+", re.UNICODE)


def normalise_text(text: str) -> str:
    """Case, Unicode form, punctuation and whitespace folded: 'Hello,  World!' == 'hello world'."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCT_SPACE.sub(" ", text).strip()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _turns(example: dict[str, Any]) -> list[list[str]]:
    """[role, text] of a canonical example: the chat's messages, or the prompt followed by the answer fields
    (named by their field) of the other objectives."""
    if "messages" in example:
        return [[m["role"], m["content"]] for m in example["messages"]]
    turns = [[m["role"], m["content"]] for m in example["prompt"]]
    turns += [[f, example[f]] for f in ("chosen", "rejected", "completion", "expected") if f in example]
    return turns + ([["label", json.dumps(example["label"])]] if "label" in example else [])


def exact_key(example: dict[str, Any]) -> str:
    """Identical examples (roles and contents byte for byte; preference pairs: prompt and both sides)."""
    return _digest(_turns(example))


def normalised_key(example: dict[str, Any]) -> str:
    """Examples equal after :func:`normalise_text`."""
    return _digest([[role, normalise_text(text)] for role, text in _turns(example)])


def prompt_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    """Everything before the final assistant turn (what evaluation sends to the model); the other
    objectives' canonical ``prompt``."""
    if "messages" not in example:
        prompt: list[dict[str, str]] = example["prompt"]
        return prompt
    messages: list[dict[str, str]] = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def prompt_key(example: dict[str, Any]) -> str:
    """Normalised prompt: train/test overlap is a prompt seen in training, whatever its answer."""
    return _digest([[m["role"], normalise_text(m["content"])] for m in prompt_messages(example)])


def chat_views(example: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat conversations whose tokens bound the example's length: the chat itself; the prompt with each
    side (dpo: chosen and rejected, the longer counts) or with the completion (kto); the prompt alone (grpo,
    whose completions are budgeted by maxCompletionLength)."""
    if "messages" in example:
        return [example]
    prompt = example["prompt"]
    sides = [example[f] for f in ("chosen", "rejected", "completion") if f in example]
    if not sides:
        return [{"messages": prompt}]
    return [{"messages": [*prompt, {"role": "assistant", "content": side}]} for side in sides]
