"""Line-level parsing of fine-tuning datasets (JSON Lines), shared by the trainer's ``validate`` and
``assemble`` stages and the OpenAI-compatible API's upload check (which cannot import the trainer), so a
line is judged by one piece of code wherever it is read. Standard library only.

- chat:        ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- completion:  ``{"prompt": "...", "completion": "..."}``
- instruction: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``

convert to the canonical chat form ``{"messages": [...], "category"?: str}``. The other objectives' formats
(finetune_vocabulary.objectives) convert to their own canonical forms, whose ``prompt`` is always a list of
chat messages ending with a user turn (a system message allowed first):

- preference (dpo): ``{"prompt"|"messages", "chosen", "rejected"}`` -> ``{"prompt", "chosen", "rejected"}``
- unpaired-preference (kto): ``{"prompt"|"messages", "completion", "label"}`` -> ``{"prompt", "completion",
  "label"}``
- prompt-only (grpo): ``{"prompt"|"messages", "expected"?}`` -> ``{"prompt", "expected"?}``

where an input ``prompt`` is a string (one user turn) or a list of messages, and a side (chosen, rejected,
completion) is a string or a list of assistant messages (their contents joined by a newline).

Any format may carry a string ``category`` (used for the balance report and a stratified held-out split).
A file-level problem raises :class:`DatasetError` (the trainer turns it into its INVALID_DATA error); a line
problem is a :class:`RecordError`, collected in :class:`Findings` with the line's number.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .objectives import (
    OBJECTIVES,
    PREFERENCE_FORMAT,
    PROMPT_ONLY_FORMAT,
    SFT_FORMATS,
    UNPAIRED_PREFERENCE_FORMAT,
    formats_for,
)

FORMATS = ("chat", "completion", "instruction")
ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """The file as a whole is unusable (its format cannot be told, or it is in another objective's format);
    the message names the file and a line."""


class RecordError(ValueError):
    """One example is unusable. ``kind`` is a key of ERROR_KINDS; the message names the field."""

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


# --- files: findings, lines, the file's format ------------------------------------------------------------

MAX_LISTED = 20  # findings listed per kind (counts are always complete)

ERROR_KINDS: dict[str, str] = {
    "line_too_long": "line longer than dataset.maxLineBytes (read without loading it whole)",
    "invalid_json": "line is not valid JSON, or nested deeper than records.MAX_JSON_DEPTH (64) levels",
    "invalid_utf8": "line contains bytes that are not UTF-8",
    "not_an_object": "JSON value is not an object",
    "missing_field": "a required field is missing",
    "empty_field": "a required field is empty (also a preference side: chosen, rejected or completion)",
    "wrong_type": "a field has the wrong type (also a kto label that is not true or false)",
    "unknown_role": "a message role is not system, user or assistant",
    "no_assistant_turn": "no assistant turn to learn from",
    "bad_turn_order": "system not first, assistant before user, or not ending with assistant",
    "format_mismatch": "line is in another format than the dataset",
    "identical_pair": "a preference pair whose chosen and rejected are the same text",
    "overlong": "longer than hyperparameters.maxSeqLength tokens (dpo/kto: the prompt with the longer side; "
    "grpo: the prompt plus hyperparameters.maxCompletionLength)",
}
CLEANING_KINDS: dict[str, str] = {
    "duplicate": "exact duplicate of an earlier example",
    "near_duplicate": "duplicate after normalising case, punctuation and whitespace",
    "leakage": "prompt also appears in the held-out set",
}
WARNING_KINDS: dict[str, str] = {
    "bom": "UTF-8 byte order mark removed",
    "category_imbalance": "largest category is more than 10x the smallest",
}
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    kind: str
    message: str

    def render(self) -> str:
        where = f"{self.file} line {self.line}" if self.line else self.file
        return f"{where}: {self.message}"


@dataclass
class Findings:
    """Counts per kind and the first MAX_LISTED findings of each kind."""

    counts: Counter[str] = field(default_factory=Counter)
    listed: dict[str, list[Finding]] = field(default_factory=dict)

    def add(self, file: str, line: int, kind: str, message: str) -> None:
        self.counts[kind] += 1
        bucket = self.listed.setdefault(kind, [])
        if len(bucket) < MAX_LISTED:
            bucket.append(Finding(file, line, kind, message))

    def of(self, kinds: Iterable[str]) -> dict[str, int]:
        return {k: self.counts[k] for k in kinds if self.counts[k]}

    def first(self, kinds: Iterable[str], n: int) -> list[Finding]:
        """The first ``n`` findings of these kinds, in file/line order."""
        found = [f for k in kinds for f in self.listed.get(k, [])]
        return sorted(found, key=lambda f: (f.file, f.line))[:n]

    def as_report(self, kinds: Iterable[str]) -> dict[str, Any]:
        return {
            k: {
                "count": self.counts[k],
                "description": desc,
                "first": [{"file": f.file, "line": f.line, "message": f.message} for f in self.listed[k]],
            }
            for k, desc in ((k, _describe(k)) for k in kinds)
            if self.counts[k]
        }


def _describe(kind: str) -> str:
    return ERROR_KINDS.get(kind) or CLEANING_KINDS.get(kind) or WARNING_KINDS.get(kind, kind)


@dataclass
class Example:
    file: str
    line: int
    data: dict[str, Any]
    tokens: int = 0


@dataclass
class ParsedFile:
    name: str
    fmt: str
    lines: int  # non-blank lines
    examples: list[Example]


# --- parsing ------------------------------------------------------------------------------------------------

SKIP_CHUNK = 1 << 16  # bytes read at a time while skipping the rest of an over-long line


@dataclass(frozen=True)
class OverlongLine:
    """A line longer than the limit, skipped without holding it (``size``: its bytes without the newline)."""

    size: int
    limit: int


def read_lines(fh: BinaryIO, max_bytes: int) -> Iterator[bytes | OverlongLine]:
    """The file's lines with at most ``max_bytes + 1`` bytes of one line in memory at a time."""
    while True:
        line = fh.readline(max_bytes + 1)
        if not line:
            return
        if line.endswith(b"\n") or len(line) <= max_bytes:
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = fh.readline(SKIP_CHUNK)
            if not line:
                break
            size += len(line)
        yield OverlongLine(size - line.endswith(b"\n"), max_bytes)


def _decode_lines(
    raw_lines: Iterable[bytes | OverlongLine], name: str, findings: Findings
) -> list[tuple[int, Any]]:
    """(line number, parsed JSON value | RecordError) for every non-blank line."""
    out: list[tuple[int, Any]] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        if isinstance(raw, OverlongLine):
            message = f"line is {raw.size} bytes, over dataset.maxLineBytes {raw.limit}"
            out.append((lineno, RecordError("line_too_long", message)))
            continue
        if lineno == 1 and raw.startswith(UTF16_BOMS):
            out.append(
                (
                    lineno,
                    RecordError("invalid_utf8", "file is UTF-16 (byte order mark found); save it as UTF-8"),
                )
            )
            continue
        if raw.startswith(UTF8_BOM):
            findings.add(name, lineno, "bom", "UTF-8 byte order mark removed")
            raw = raw[len(UTF8_BOM) :]
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append(
                (
                    lineno,
                    RecordError(
                        "invalid_utf8",
                        f"bytes that are not UTF-8 at column {exc.start + 1} "
                        f"({raw[exc.start : exc.start + 4]!r})",
                    ),
                )
            )
            continue
        try:
            out.append((lineno, loads_record(text)))
        except RecordError as exc:
            out.append((lineno, exc))
    return out


def detect_file_format(
    values: Sequence[tuple[int, Any]], name: str, objective: str = "sft", role: str = "train"
) -> str:
    """The objective's format (sft: the majority format, ties chat > completion > instruction), after
    :func:`check_objective_fit`."""
    check_objective_fit(values, name, objective, role)
    if objective != "sft":
        return CANONICAL_FORMAT[objective]
    votes = Counter(f for _, v in values if not isinstance(v, RecordError) and (f := detect_format(v)))
    if not votes:
        readable = [lineno for lineno, v in values if not isinstance(v, RecordError)]
        if not readable:
            return "chat"  # every line is broken: the error-rate check reports them with line numbers
        raise DatasetError(
            f"{name} line {readable[0]}: cannot detect the format: no line has messages, "
            "prompt/completion or instruction/output (set spec.dataset.format)"
        )
    return max(FORMATS, key=lambda f: (votes[f], -FORMATS.index(f)))


def check_objective_fit(values: Sequence[tuple[int, Any]], name: str, objective: str, role: str) -> None:
    """DatasetError naming both formats when most readable records are not in a format of the
    objective (a few stray lines are line errors instead). For sft only records that are unmistakably
    preference data count: looser SFT lines keep their own errors."""
    readable = [(lineno, v) for lineno, v in values if not isinstance(v, RecordError)]
    misfits: list[tuple[int, str | None]]
    if objective == "sft":
        misfits = [(lineno, s) for lineno, v in readable if (s := foreign_to_sft(v))]
    else:
        fmt = CANONICAL_FORMAT[objective]
        misfits = [
            (lineno, record_shape(v))
            for lineno, v in readable
            if not (isinstance(v, dict) and fits_format(v, fmt))
        ]
    if not readable or 2 * len(misfits) <= len(readable):
        return
    shape = Counter(s for _, s in misfits).most_common(1)[0][0]
    first = next(lineno for lineno, s in misfits if s == shape)
    raise DatasetError(
        f"{objective_mismatch(objective, shape, f'dataset.{role}')} "
        f"({len(misfits)} of {len(readable)} lines, first {name} line {first})"
    )


def parse_file(
    raw_lines: Iterable[bytes | OverlongLine],
    name: str,
    fmt: str,
    findings: Findings,
    *,
    objective: str = "sft",
    role: str = "train",
) -> ParsedFile:
    """Parse one JSONL file into the objective's canonical examples; problems go to ``findings``."""
    decoded = _decode_lines(raw_lines, name, findings)
    if fmt == "auto":
        fmt = detect_file_format(decoded, name, objective, role)
    else:
        check_objective_fit(decoded, name, objective, role)
    return ParsedFile(name, fmt, len(decoded), _examples(decoded, name, fmt, findings))


def _examples(decoded: Sequence[tuple[int, Any]], name: str, fmt: str, findings: Findings) -> list[Example]:
    """The lines converted to ``fmt``'s canonical form; each unusable line goes to ``findings``."""
    examples = []
    for lineno, value in decoded:
        try:
            if isinstance(value, RecordError):
                raise value
            examples.append(Example(name, lineno, to_canonical(value, fmt)))
        except RecordError as err:
            findings.add(name, lineno, err.kind, err.message)
    return examples


# --- the upload check (the OpenAI-compatible API) ----------------------------------------------------------


@dataclass(frozen=True)
class UploadCheck:
    """What an uploaded file is and which of its lines the validate stage would refuse."""

    format: str  # chat | completion | instruction | preference | unpaired-preference | prompt-only
    objectives: tuple[str, ...]  # the objectives this file can train, e.g. ("sft",) or ("dpo",)
    lines: int  # non-blank lines
    examples: int  # usable lines
    errors: tuple[Finding, ...]  # the first MAX_LISTED line errors, in line order
    error_count: int


def check_upload(fh: BinaryIO, name: str, *, max_line_bytes: int = 1 << 20) -> UploadCheck:
    """Check a file of any objective line by line with the validate stage's rules (no tokenizer: token
    lengths are the job's to check). Its format is detected among all formats of all objectives: the
    objective most readable lines are in, then that objective's format as ``dataset.format: auto`` finds
    it. DatasetError (naming a line) when no format can be told, or when no objective has most lines (the
    validate stage's "records are X, but objective Y needs ..." message)."""
    findings = Findings()
    decoded = _decode_lines(read_lines(fh, max_line_bytes), name, findings)
    fmt = detect_file_format(decoded, name, _majority_objective(decoded, name))
    examples = _examples(decoded, name, fmt, findings)
    return UploadCheck(
        format=fmt,
        objectives=tuple(o for o in OBJECTIVES if fmt in formats_for(o)),
        lines=len(decoded),
        examples=len(examples),
        errors=tuple(findings.first(ERROR_KINDS, MAX_LISTED)),
        error_count=sum(findings.of(ERROR_KINDS).values()),
    )


def _majority_objective(values: Sequence[tuple[int, Any]], name: str) -> str:
    """The objective whose formats most readable records are in (ties: sft, dpo, kto, grpo); sft when no
    line is readable (every line is then a line error)."""
    readable = [(lineno, v) for lineno, v in values if not isinstance(v, RecordError)]
    shapes = [s for _, v in readable if (s := record_shape(v))]
    if readable and not shapes:
        known = ", ".join(f"{fmt} {fields}" for fmt, fields in FORMAT_FIELDS.items())
        raise DatasetError(
            f"{name} line {readable[0][0]}: cannot detect the format: no line is in a known format ({known})"
        )
    votes = Counter(o for s in shapes for o in OBJECTIVES if s in formats_for(o))
    return max(OBJECTIVES, key=lambda o: (votes[o], -OBJECTIVES.index(o)))
