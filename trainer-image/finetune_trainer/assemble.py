"""``assemble`` stage: a FineTuneSchedule run's training set, built by its data Job (CPU only, no model).

base (the curated set, read like validate reads a train file) + the pool's captured chats up to ``until``
joined with their feedback (by completion id, the latest feedback per id wins), then:

  * kept: a chat rated ≥ ``capture.minRating`` (unrated: 0), or one with a correction;
  * per objective: sft a chat (a correction replaces the answer); dpo only corrected chats, as a pair
    (chosen: the correction, rejected: the original); kto the rated chats with ``label: rating > 0`` (a
    correction also as a desirable completion); grpo the prompt (a correction as ``expected``);
  * captured text redacted again (``capture.redact``), then deduplicated by validate's normalised key (base
    first), then every example whose prompt is a prompt of the test set removed (validate's prompt key:
    case, Unicode form, punctuation and whitespace folded), so the fixed held-out set never leaks;
  * ``new`` = kept captured examples with ``time > since``; below ``minNewExamples`` nothing is written
    (``ready: false``), else the file is written whole (one put) with ``assembly.json`` beside it.

A broken base line fails the stage (INVALID_DATA naming the line); a broken captured or feedback line (cut
off, garbled, not a chat) is skipped and counted: capture is best-effort traffic, never a reason to stop.
Records are written in the objective's canonical form (records.CANONICAL_FORMAT), which validate reads.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_vocabulary.capture import (
    COMPLETION_ID,
    MAX_CORRECTION_CHARS,
    RATINGS,
    captured_prefix,
    feedback_prefix,
    redact,
)
from finetune_vocabulary.records import (
    CANONICAL_FORMAT,
    ERROR_KINDS,
    DatasetError,
    Example,
    Findings,
    RecordError,
    loads_record,
    parse_file,
    read_lines,
    to_canonical,
    to_chat,
)

from . import storage
from .config import AssembleConfig, AssembleSpec, CaptureSource
from .exitcodes import InvalidConfigError, InvalidDataError
from .formats import normalised_key, prompt_key
from .termination import StageResult, raise_if_preempted
from .validate import count_tokens, drop_overlong, load_token_counter, objective_completion_budget

log = logging.getLogger(__name__)

ASSEMBLY_FILE = "assembly.json"


@dataclass
class Chat:
    """One captured chat: its canonical chat form, when it was answered, and its feedback."""

    id: str
    time: datetime
    messages: list[dict[str, str]]
    rating: int = 0
    correction: str | None = None


@dataclass
class Candidate:
    """An example on its way to the output: where it came from decides what it counts as."""

    data: dict[str, Any]
    captured: bool = False
    corrected: bool = False
    time: datetime | None = None


@dataclass
class Counts:
    base: int = 0
    captured: int = 0
    corrected: int = 0
    duplicates: int = 0
    held_out: int = 0
    too_long: int | None = None  # None: no maxSeqLength given, nothing counted (older configs)
    skipped: dict[str, int] = field(default_factory=lambda: {"captured": 0, "feedback": 0})

    def examples(self) -> dict[str, int]:
        return {
            "base": self.base,
            "captured": self.captured,
            "corrected": self.corrected,
            "duplicates": self.duplicates,
            "heldOut": self.held_out,
            **({"tooLong": self.too_long} if self.too_long is not None else {}),
            "total": self.base + self.captured,
        }

    def tally(self, kept: Iterable[Candidate]) -> None:
        kept = list(kept)
        self.base = sum(not c.captured for c in kept)
        self.captured = sum(c.captured for c in kept)
        self.corrected = sum(c.corrected for c in kept)


# --- inputs -----------------------------------------------------------------------------------------------


def _fetch(uri: str, field_name: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except storage.NotFound:
        raise InvalidConfigError(f"{field_name}: {uri} not found") from None
    except ValueError as exc:
        raise InvalidConfigError(f"{field_name}: {exc}") from None


def read_dataset(data: bytes, name: str, spec: AssembleSpec, role: str) -> list[dict[str, Any]]:
    """A base or test file in the objective's canonical form, read by validate's parser (any format it
    accepts); an invalid line is INVALID_DATA naming the file and line."""
    findings = Findings()
    try:
        parsed = parse_file(
            read_lines(io.BytesIO(data), spec.max_line_bytes),
            name,
            "auto",
            findings,
            objective=spec.objective,
            role=role,
        )
    except DatasetError as exc:
        raise InvalidDataError(str(exc)) from None
    errors = findings.first(ERROR_KINDS, 10)
    if errors:
        total = sum(findings.of(ERROR_KINDS).values())
        raise InvalidDataError(
            f"assemble.{'base' if role == 'train' else role}: {total} unusable line(s): "
            + "; ".join(f.render() for f in errors),
            summary={"errors": findings.of(ERROR_KINDS)},
        )
    return [example.data for example in parsed.examples]


def _jsonl(data: bytes) -> Iterable[Any]:
    """Parsed lines of a capture object; None for a line that is not JSON (cut off, garbled, not UTF-8)."""
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            yield loads_record(raw.decode("utf-8"))
        except (UnicodeDecodeError, RecordError):
            yield None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _chat(record: Any) -> Chat | None:
    """A captured record as a Chat, or None when it is not one (missing id/time, not a valid chat)."""
    if not isinstance(record, dict):
        return None
    cid, when = record.get("id"), _time(record.get("time"))
    if not isinstance(cid, str) or not COMPLETION_ID.fullmatch(cid) or when is None:
        return None
    try:
        messages = to_chat({"messages": record.get("messages")}, "chat")["messages"]
    except RecordError:
        return None
    return Chat(cid, when, messages)


def _feedback(record: Any) -> tuple[str, datetime, int, str | None] | None:
    if not isinstance(record, dict):
        return None
    cid, when, rating = record.get("id"), _time(record.get("time")), record.get("rating")
    correction = record.get("correction")
    if not isinstance(cid, str) or not COMPLETION_ID.fullmatch(cid) or when is None:
        return None
    if isinstance(rating, bool) or rating not in RATINGS:
        return None
    if correction is not None and (
        not isinstance(correction, str) or not correction.strip() or len(correction) > MAX_CORRECTION_CHARS
    ):
        return None
    return cid, when, int(rating), correction


def read_capture(source: CaptureSource, until: datetime, counts: Counts) -> list[Chat]:
    """Every captured chat of the model answered at or before ``until``, with its latest feedback."""
    chats: dict[str, Chat] = {}
    for info in storage.list_files(captured_prefix(source.prefix, source.model)):
        for record in _jsonl(storage.read_bytes(info.uri)):
            chat = _chat(record)
            if chat is None:
                counts.skipped["captured"] += 1
            elif chat.time <= until:
                chats.setdefault(chat.id, chat)  # a completion id is one answer: a repeat adds nothing
        raise_if_preempted("assemble")
    latest: dict[str, tuple[datetime, int, str | None]] = {}
    for info in storage.list_files(feedback_prefix(source.prefix)):
        for record in _jsonl(storage.read_bytes(info.uri)):
            found = _feedback(record)
            if found is None:
                counts.skipped["feedback"] += 1
                continue
            cid, when, rating, correction = found
            if cid not in latest or when >= latest[cid][0]:  # later files win ties: listing order is time
                latest[cid] = (when, rating, correction)
    for cid, (_, rating, correction) in latest.items():
        if cid in chats:
            chats[cid].rating, chats[cid].correction = rating, correction
    return sorted(chats.values(), key=lambda c: (c.time, c.id))


# --- captured chats as examples -------------------------------------------------------------------------


def _with_answer(messages: list[dict[str, str]], answer: str) -> list[dict[str, str]]:
    return [*messages[:-1], {"role": "assistant", "content": answer}]


def chat_examples(chat: Chat, objective: str, min_rating: int) -> list[tuple[dict[str, Any], bool]]:
    """(record in the objective's input format, made from a correction) for one captured chat."""
    corrected = chat.correction is not None
    if chat.rating < min_rating and not corrected:
        return []
    prompt, original = chat.messages[:-1], chat.messages[-1]["content"]
    if objective == "sft":
        answer = chat.correction if chat.correction is not None else original
        return [({"messages": _with_answer(chat.messages, answer)}, corrected)]
    if objective == "dpo":
        if chat.correction is None:
            return []
        return [({"messages": prompt, "chosen": chat.correction, "rejected": original}, True)]
    if objective == "kto":
        out = (
            [({"messages": prompt, "completion": original, "label": chat.rating > 0}, False)]
            if chat.rating
            else []
        )
        if chat.correction is not None:
            out.append(({"messages": prompt, "completion": chat.correction, "label": True}, True))
        return out
    record: dict[str, Any] = {"messages": prompt}
    if chat.correction is not None:
        record["expected"] = chat.correction
    return [(record, corrected)]


def _redacted(value: Any, names: list[str]) -> Any:
    """Every string inside a record redacted (contents, sides, expected); booleans and keys unchanged."""
    if isinstance(value, str):
        return redact(value, names)
    if isinstance(value, list):
        return [_redacted(item, names) for item in value]
    if isinstance(value, dict):
        return {key: item if key == "role" else _redacted(item, names) for key, item in value.items()}
    return value


def captured_candidates(
    chats: Iterable[Chat], source: CaptureSource, objective: str, counts: Counts
) -> list[Candidate]:
    """The kept chats as canonical examples, redacted; a chat that makes no valid example (a prompt not
    ending with a user turn, a correction equal to the answer) is skipped and counted."""
    fmt = CANONICAL_FORMAT[objective]
    out: list[Candidate] = []
    for chat in chats:
        for record, corrected in chat_examples(chat, objective, source.min_rating):
            try:
                data = to_canonical(_redacted(record, list(source.redact)), fmt)
            except RecordError:
                counts.skipped["captured"] += 1
                continue
            out.append(Candidate(data, captured=True, corrected=corrected, time=chat.time))
    return out


# --- cleaning ---------------------------------------------------------------------------------------------


def clean(candidates: list[Candidate], test: list[dict[str, Any]], counts: Counts) -> list[Candidate]:
    """Duplicates dropped (the first kept: base comes first), then every test prompt's example."""
    seen: set[str] = set()
    unique: list[Candidate] = []
    for candidate in candidates:
        key = normalised_key(candidate.data)
        if key in seen:
            counts.duplicates += 1
            continue
        seen.add(key)
        unique.append(candidate)
    held_out = {prompt_key(example) for example in test}
    kept = [c for c in unique if prompt_key(c.data) not in held_out]
    counts.held_out += len(unique) - len(kept)
    counts.tally(kept)
    return kept


def drop_too_long(
    kept: list[Candidate], spec: AssembleSpec, workdir: Path, counts: Counts
) -> list[Candidate]:
    """Captured examples longer than the template's maxSeqLength left out and counted, by the validate
    stage's own tokenizer and rule (chat template applied; dpo/kto the longer side; grpo the prompt plus the
    completion budget), so one long chat in the traffic cannot fail the run's validate stage. Base examples
    stay: they are the user's own (validate reports them as before). The tokenizer is loaded only when a
    captured example is left to count."""
    if spec.max_seq_length is None or spec.base_model is None:
        return kept
    counts.too_long = 0
    captured = [c for c in kept if c.captured]
    if not captured:
        return kept
    counter, _ = load_token_counter(spec.base_model, workdir, "assemble.baseModel")
    budget = objective_completion_budget(spec.objective, spec.max_completion_length)
    examples = [Example("captured", index, c.data) for index, c in enumerate(captured)]
    count_tokens(examples, counter, completion_budget=budget)
    fits = {e.line for e in drop_overlong(examples, spec.max_seq_length, Findings(), budget)}
    over = {id(c) for index, c in enumerate(captured) if index not in fits}
    counts.too_long = len(over)
    out = [c for c in kept if id(c) not in over]
    counts.tally(out)
    return out


def count_new(kept: Iterable[Candidate], since: datetime | None) -> int:
    return sum(c.captured and (since is None or (c.time is not None and c.time > since)) for c in kept)


# --- the stage --------------------------------------------------------------------------------------------


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def assembly_uri(output: str) -> str:
    return f"{output.rsplit('/', 1)[0]}/{ASSEMBLY_FILE}" if "/" in output else ASSEMBLY_FILE


def _record(spec: AssembleSpec, summary: dict[str, Any], counts: Counts) -> dict[str, Any]:
    """assembly.json: what was asked, what came out, and what was skipped."""
    capture = spec.capture.model_dump(by_alias=True) if spec.capture is not None else None
    return {
        "base": spec.base,
        "test": spec.test,
        "capture": capture,
        "objective": spec.objective,
        "since": _iso(spec.since) if spec.since is not None else None,
        "until": _iso(spec.until),
        "minNewExamples": spec.min_new_examples,
        "baseModel": spec.base_model.model_dump(by_alias=True) if spec.base_model is not None else None,
        "maxSeqLength": spec.max_seq_length,
        "summary": summary,
        "skipped": counts.skipped,
        "written": _iso(datetime.now(UTC)),
    }


def run(config: AssembleConfig) -> StageResult:
    spec = config.assemble
    counts = Counts()
    base = read_dataset(_fetch(spec.base, "assemble.base"), spec.base.rsplit("/", 1)[-1], spec, "train")
    test = read_dataset(_fetch(spec.test, "assemble.test"), spec.test.rsplit("/", 1)[-1], spec, "test")
    candidates = [Candidate(example) for example in base]
    if spec.capture is not None:
        chats = read_capture(spec.capture, spec.until, counts)
        candidates += captured_candidates(chats, spec.capture, spec.objective, counts)
    raise_if_preempted("assemble")
    kept = drop_too_long(clean(candidates, test, counts), spec, config.workdir, counts)
    raise_if_preempted("assemble")
    new = count_new(kept, spec.since)
    ready = new >= spec.min_new_examples
    summary: dict[str, Any] = {
        "ready": ready,
        "newExamples": new,
        "train": spec.output if ready else None,
        "cutoff": _iso(spec.until),
        "examples": counts.examples(),
        "skipped": sum(counts.skipped.values()),
    }
    figures = counts.examples()
    if not ready:
        message = f"not ready: {new} new examples < minNewExamples {spec.min_new_examples}; nothing written"
        log.info(message, extra={"fields": {"event": "assembled", **summary}})
        return StageResult(summary, message)
    body = "".join(json.dumps(c.data, ensure_ascii=False) + "\n" for c in kept)
    storage.write_bytes(spec.output, body.encode("utf-8"), content_type="application/jsonl")
    record = json.dumps(_record(spec, summary, counts), indent=2, ensure_ascii=False)
    storage.write_bytes(assembly_uri(spec.output), record.encode("utf-8"), content_type="application/json")
    message = (
        f"{figures['total']} examples ({figures['base']} base, {figures['captured']} captured of which "
        f"{figures['corrected']} corrected, {new} new) to {spec.output}; removed {figures['duplicates']} "
        f"duplicates and {figures['heldOut']} test prompts"
        + (
            f" and {counts.too_long} captured over maxSeqLength {spec.max_seq_length}"
            if counts.too_long
            else ""
        )
    )
    log.info(message, extra={"fields": {"event": "assembled", **summary}})
    return StageResult(summary, message)
