"""Dataset formats and their conversion to the canonical chat form ``{"messages": [...], "category"?: str}``.

- chat:        ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- completion:  ``{"prompt": "...", "completion": "..."}``
- instruction: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``

Any format may carry a string ``category`` (used for the balance report and a stratified held-out split).
Also home of the default chat template for base models that ship none (validate counts tokens with it and
train formats examples with it, so both agree).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

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
    messages = record["messages"]
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f'field "messages" must be a list, got {type(messages).__name__}')
    if not messages:
        raise RecordError("empty_field", 'field "messages" is empty')
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
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
    _check_turn_order(out)
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


# --- comparison keys ----------------------------------------------------------------------------------------

_PUNCT_SPACE = re.compile(r"[\W_]+", re.UNICODE)


def normalise_text(text: str) -> str:
    """Case, Unicode form, punctuation and whitespace folded: 'Hello,  World!' == 'hello world'."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCT_SPACE.sub(" ", text).strip()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def exact_key(example: dict[str, Any]) -> str:
    """Identical conversations (roles and contents byte for byte)."""
    return _digest([[m["role"], m["content"]] for m in example["messages"]])


def normalised_key(example: dict[str, Any]) -> str:
    """Conversations equal after :func:`normalise_text`."""
    return _digest([[m["role"], normalise_text(m["content"])] for m in example["messages"]])


def prompt_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    """Everything before the final assistant turn (what evaluation sends to the model)."""
    messages: list[dict[str, str]] = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def prompt_key(example: dict[str, Any]) -> str:
    """Normalised prompt: train/test overlap is a prompt seen in training, whatever its answer."""
    return _digest([[m["role"], normalise_text(m["content"])] for m in prompt_messages(example)])
