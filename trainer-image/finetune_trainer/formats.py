"""Dataset formats and their conversion to the canonical chat form ``{"messages": [...], "category"?: str}``.

- chat:        ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- completion:  ``{"prompt": "...", "completion": "..."}``
- instruction: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``

The other objectives' formats (finetune_vocabulary.objectives) convert to their own canonical forms, whose
``prompt`` is always a list of chat messages ending with a user turn (a system message allowed first):

- preference (dpo): ``{"prompt"|"messages", "chosen", "rejected"}`` -> ``{"prompt", "chosen", "rejected"}``
- unpaired-preference (kto): ``{"prompt"|"messages", "completion", "label"}`` -> ``{"prompt", "completion",
  "label"}``
- prompt-only (grpo): ``{"prompt"|"messages", "expected"?}`` -> ``{"prompt", "expected"?}``

where an input ``prompt`` is a string (one user turn) or a list of messages, and a side (chosen, rejected,
completion) is a string or a list of assistant messages (their contents joined by a newline).

Any format may carry a string ``category`` (used for the balance report and a stratified held-out split).
Also home of the default chat template for base models that ship none (validate counts tokens with it and
train formats examples with it, so both agree).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from finetune_vocabulary.objectives import (
    PREFERENCE_FORMAT,
    PROMPT_ONLY_FORMAT,
    SFT_FORMATS,
    UNPAIRED_PREFERENCE_FORMAT,
    formats_for,
)

from .exitcodes import InvalidDataError

FORMATS = ("chat", "completion", "instruction")
ROLES = ("system", "user", "assistant")

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


class RecordError(ValueError):
    """One example is unusable. ``kind`` is a key of validate.ERROR_KINDS; the message names the field."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


MAX_JSON_DEPTH = 64  # a chat record needs 4 levels; deeper lines are invalid, never a stage crash


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (scalars 0), walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def loads_record(text: str | bytes) -> Any:
    """``json.loads`` of one untrusted line, nested at most MAX_JSON_DEPTH deep, else RecordError."""
    too_deep = RecordError("invalid_json", f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except json.JSONDecodeError as exc:
        raise RecordError("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def detect_format(record: Any) -> str | None:
    """The format a single record looks like, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "instruction" in record or "output" in record:
        return "instruction"
    return None


def _text(record: dict[str, Any], field: str, *, required: bool = True) -> str | None:
    if field not in record or record[field] is None:
        if required:
            raise RecordError("missing_field", f'missing field "{field}"')
        return None
    value = record[field]
    if not isinstance(value, str):
        raise RecordError("wrong_type", f'field "{field}" must be a string, got {type(value).__name__}')
    if required and not value.strip():
        raise RecordError("empty_field", f'field "{field}" is empty')
    return value


def _required_text(record: dict[str, Any], field: str) -> str:
    value = _text(record, field)
    assert value is not None  # _text raises for a missing required field
    return value


def _category(record: dict[str, Any]) -> str | None:
    value = record.get("category")
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise RecordError("wrong_type", 'field "category" must be a non-empty string')
    return str(value).strip()


def _chat_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" not in record or record["messages"] is None:
        raise RecordError("missing_field", 'missing field "messages"')
    messages = _messages(record["messages"], "messages")
    _check_turn_order(messages)
    return messages


def _messages(messages: Any, field: str) -> list[dict[str, str]]:
    """The ``{"role", "content"}`` messages of a list field (errors name ``field[i]``); no turn order."""
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f'field "{field}" must be a list, got {type(messages).__name__}')
    if not messages:
        raise RecordError("empty_field", f'field "{field}" is empty')
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RecordError("wrong_type", f"{where} must be an object")
        if "role" not in message:
            raise RecordError("missing_field", f'{where}: missing field "role"')
        role = message["role"]
        if role not in ROLES:
            raise RecordError(
                "unknown_role",
                f"{where}.role: unknown role {json.dumps(role)[:40]} (expected system, user or assistant)",
            )
        if "content" not in message or message["content"] is None:
            raise RecordError("missing_field", f'{where}: missing field "content"')
        content = message["content"]
        if not isinstance(content, str):
            raise RecordError("wrong_type", f"{where}.content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise RecordError("empty_field", f"{where}.content is empty")
        out.append({"role": role, "content": content})
    return out


def _check_turn_order(messages: list[dict[str, str]]) -> None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise RecordError("no_assistant_turn", "no assistant turn (nothing to learn from)")
    if "system" in roles[1:]:
        raise RecordError(
            "bad_turn_order", f"messages[{roles.index('system', 1)}]: system message must come first"
        )
    first_assistant = roles.index("assistant")
    if "user" not in roles[:first_assistant]:
        raise RecordError(
            "bad_turn_order", f"messages[{first_assistant}]: assistant turn before any user turn"
        )
    if roles[-1] != "assistant":
        raise RecordError(
            "bad_turn_order", f"messages[{len(roles) - 1}]: conversation must end with an assistant turn"
        )


def to_chat(record: Any, fmt: str) -> dict[str, Any]:
    """Convert one parsed JSON value of format ``fmt`` to the canonical chat form, or raise RecordError."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    looks_like = detect_format(record)
    if looks_like is not None and looks_like != fmt:
        raise RecordError("format_mismatch", f"looks like {looks_like} format but the dataset is {fmt}")
    if fmt == "chat":
        messages = _chat_messages(record)
    elif fmt == "completion":
        prompt = _required_text(record, "prompt")
        completion = _required_text(record, "completion")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif fmt == "instruction":
        instruction = _required_text(record, "instruction")
        extra = _text(record, "input", required=False)
        output = _required_text(record, "output")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:  # pragma: no cover - guarded by config
        raise ValueError(f"unknown format {fmt}")
    example: dict[str, Any] = {"messages": messages}
    category = _category(record)
    if category is not None:
        example["category"] = category
    return example


# --- the preference and prompt-only formats (objectives dpo, kto, grpo) -------------------------------------

# What a record of each format holds, for messages that name a format.
FORMAT_FIELDS: dict[str, str] = {
    "chat": '{"messages"}',
    "completion": '{"prompt", "completion"}',
    "instruction": '{"instruction", "input"?, "output"}',
    PREFERENCE_FORMAT: '{"prompt"|"messages", "chosen", "rejected"}',
    UNPAIRED_PREFERENCE_FORMAT: '{"prompt"|"messages", "completion", "label": true|false}',
    PROMPT_ONLY_FORMAT: '{"prompt"|"messages", "expected"?}',
}
# The canonical format validate writes for each objective (what read_canonical reads back).
CANONICAL_FORMAT: dict[str, str] = {
    "sft": "chat",
    "dpo": PREFERENCE_FORMAT,
    "kto": UNPAIRED_PREFERENCE_FORMAT,
    "grpo": PROMPT_ONLY_FORMAT,
}
# TRL's GRPOConfig.max_completion_length default (tests pin it): the trainer leaves the field unset when
# hyperparameters.maxCompletionLength is, so validate budgets the same number of completion tokens.
GRPO_DEFAULT_MAX_COMPLETION_LENGTH = 512
_ANSWER_FIELDS = ("completion", "output", "instruction", "chosen", "rejected", "label")


def _ends_with_assistant(messages: Any) -> bool:
    return isinstance(messages, list) and bool(messages) and _role(messages[-1]) == "assistant"


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def fits_format(record: dict[str, Any], fmt: str) -> bool:
    """Whether a record has the fields that tell ``fmt`` apart (its values are checked on conversion)."""
    if fmt == PREFERENCE_FORMAT:
        return "chosen" in record or "rejected" in record
    if fmt == UNPAIRED_PREFERENCE_FORMAT:
        return "label" in record
    if fmt == PROMPT_ONLY_FORMAT:
        return (
            ("prompt" in record or "messages" in record)
            and not any(f in record for f in _ANSWER_FIELDS)
            and not _ends_with_assistant(record.get("messages"))
        )
    return detect_format(record) == fmt


def record_shape(record: Any) -> str | None:
    """The format a record looks like among all formats, whatever the objective, or None."""
    if not isinstance(record, dict):
        return None
    for fmt in (PREFERENCE_FORMAT, UNPAIRED_PREFERENCE_FORMAT, PROMPT_ONLY_FORMAT):
        if fits_format(record, fmt):
            return fmt
    return detect_format(record)


def foreign_to_sft(record: Any) -> str | None:
    """The preference format a record is unmistakably in (chosen and rejected; a completion with a boolean
    label), or None: such records are no SFT data. Anything looser stays an SFT line with its own errors."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record and "rejected" in record:
        return PREFERENCE_FORMAT
    if "completion" in record and isinstance(record.get("label"), bool):
        return UNPAIRED_PREFERENCE_FORMAT
    return None


def objective_mismatch(objective: str, shape: str | None, where: str) -> str:
    """``dataset.train: records are chat, but objective dpo needs the preference format ({...})``."""
    fmts = formats_for(objective)
    needs = (
        f"the {fmts[0]} format ({FORMAT_FIELDS[fmts[0]]})"
        if len(fmts) == 1
        else f"the {', '.join(fmts[:-1])} or {fmts[-1]} format"
    )
    records = f"records are {shape}" if shape else "records are in no known format"
    return f"{where}: {records}, but objective {objective} needs {needs}"


def _prompt(record: dict[str, Any]) -> list[dict[str, str]]:
    """The prompt as chat messages ending with a user turn, from ``prompt`` (string or messages) or
    ``messages``."""
    given = [f for f in ("prompt", "messages") if record.get(f) is not None]
    if not given:
        raise RecordError("missing_field", 'missing field "prompt" (or "messages")')
    if len(given) == 2:
        raise RecordError("format_mismatch", 'both "prompt" and "messages": give the prompt once')
    field, value = given[0], record[given[0]]
    if field == "prompt" and isinstance(value, str):
        if not value.strip():
            raise RecordError("empty_field", 'field "prompt" is empty')
        return [{"role": "user", "content": value}]
    if field == "prompt" and not isinstance(value, list):
        raise RecordError(
            "wrong_type", f'field "prompt" must be a string or a list of messages, got {type(value).__name__}'
        )
    messages = _messages(value, field)
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise RecordError(
            "bad_turn_order", f"{field}[{roles.index('system', 1)}]: system message must come first"
        )
    if "assistant" in roles and "user" not in roles[: roles.index("assistant")]:
        raise RecordError(
            "bad_turn_order", f"{field}[{roles.index('assistant')}]: assistant turn before any user turn"
        )
    if roles[-1] != "user":
        raise RecordError(
            "bad_turn_order", f"{field}[{len(roles) - 1}]: the prompt must end with a user turn"
        )
    return messages


def _side(record: dict[str, Any], field: str) -> str:
    """A completion side (chosen, rejected, completion) as text: a string or a list of assistant messages."""
    if field not in record or record[field] is None:
        raise RecordError("missing_field", f'missing field "{field}"')
    value = record[field]
    if isinstance(value, str):
        if not value.strip():
            raise RecordError("empty_field", f'field "{field}" is empty')
        return value
    if not isinstance(value, list):
        raise RecordError(
            "wrong_type",
            f'field "{field}" must be a string or a list of assistant messages, got {type(value).__name__}',
        )
    messages = _messages(value, field)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise RecordError(
                "bad_turn_order", f"{field}[{i}]: must be an assistant turn, got {message['role']}"
            )
    return "\n".join(m["content"] for m in messages)


def _label(record: dict[str, Any]) -> bool:
    if "label" not in record or record["label"] is None:
        raise RecordError("missing_field", 'missing field "label"')
    label = record["label"]
    if not isinstance(label, bool):
        raise RecordError(
            "wrong_type",
            f'field "label" must be true or false, got {type(label).__name__} {json.dumps(label)[:40]}',
        )
    return label


def to_canonical(record: Any, fmt: str) -> dict[str, Any]:
    """Convert one parsed JSON value of format ``fmt`` to its objective's canonical form, or raise
    RecordError (the SFT formats: :func:`to_chat`)."""
    if fmt in SFT_FORMATS:
        return to_chat(record, fmt)
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    if not fits_format(record, fmt):
        looks_like = record_shape(record)
        raise RecordError(
            "format_mismatch",
            f"looks like {looks_like} format but the dataset is {fmt}"
            if looks_like
            else f"not in the {fmt} format {FORMAT_FIELDS[fmt]}",
        )
    example: dict[str, Any] = {"prompt": _prompt(record)}
    if fmt == PREFERENCE_FORMAT:
        example["chosen"], example["rejected"] = _side(record, "chosen"), _side(record, "rejected")
        if example["chosen"].strip() == example["rejected"].strip():
            raise RecordError("identical_pair", 'fields "chosen" and "rejected" are identical')
    elif fmt == UNPAIRED_PREFERENCE_FORMAT:
        example["completion"], example["label"] = _side(record, "completion"), _label(record)
    elif fmt == PROMPT_ONLY_FORMAT:
        expected = _text(record, "expected", required=False)
        if expected is not None and not expected.strip():
            raise RecordError("empty_field", 'field "expected" is empty')
        if expected is not None:
            example["expected"] = expected
    else:  # pragma: no cover - guarded by config
        raise ValueError(f"unknown format {fmt}")
    category = _category(record)
    if category is not None:
        example["category"] = category
    return example


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
