"""The adapter router's traffic capture and feedback (docs/capture.md).

The request path only decides whether a chat is sampled, tees the bytes it relays anyway (bounded) and puts
one item on a bounded queue; it never parses, redacts, or waits for storage. A background thread does the
rest every `flushSeconds`: parses each chat (a streamed answer is assembled from its deltas), redacts it,
and writes one whole object per stable name (and one of feedback) per interval per pod, skipping empty
intervals. A failed write is retried at the next flushes (same key: written whole or not at all), then its
records are counted as `failures`. Storage is the trainer's (the code that fetches adapters), imported in
the writer thread only.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_vocabulary.capture import (
    COMPLETION_ID,
    MAX_CORRECTION_CHARS,
    RATINGS,
    REDACTOR_NAMES,
    captured_prefix,
    feedback_prefix,
    object_name,
    redact,
)

log = logging.getLogger("finetune_trainer.adapter_router")

MAX_CAPTURED_BYTES = 2**20  # a request body or an answer over this is not captured (counted dropped)
QUEUE_ITEMS = 10_000  # chats and feedback waiting for the next flush; beyond it: dropped
QUEUE_BYTES = 64 * 2**20  # bytes of those held at once; beyond it: dropped (bounds the router's memory)
WRITE_ATTEMPTS = 3  # flushes a failed object is tried at before its records count as failures
MAX_PENDING = 64  # failed objects kept for a retry at once


class CaptureError(ValueError):
    """A capture entry of the state the router refuses (the message names it)."""


@dataclass(frozen=True)
class CaptureConfig:
    prefix: str
    sample_rate: float
    redact: tuple[str, ...]
    flush_seconds: float


def check_capture(document: Any, destinations: list[str] | tuple[str, ...]) -> CaptureConfig | None:
    """The state's `capture` (absent or null: off); its prefix must lie under a --capture-destination."""
    from .adapter_router import ADAPTER_URI, under_source

    if document is None:
        return None
    if not isinstance(document, Mapping):
        raise CaptureError("capture must be an object or null")
    prefix = document.get("prefix")
    if not isinstance(prefix, str) or not prefix.startswith("s3://") or not ADAPTER_URI.fullmatch(prefix):
        raise CaptureError(f"capture.prefix: {prefix!r} is not an s3:// URI")
    if not under_source(prefix, destinations):
        raise CaptureError(
            f"capture.prefix: {prefix!r} is not under the router's capture destinations "
            f"({', '.join(destinations) or 'none'}: "
            "ModelServer spec.adapterSources / spec.captureDestinations)"
        )
    rate = document.get("sampleRate", 0.1)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise CaptureError(f"capture.sampleRate: {rate!r} is not a fraction 0..1")
    names = document.get("redact", list(REDACTOR_NAMES))
    if not isinstance(names, list) or any(n not in REDACTOR_NAMES for n in names):
        raise CaptureError(f"capture.redact: {names!r} must be a list of {', '.join(REDACTOR_NAMES)}")
    flush = document.get("flushSeconds", 60)
    if isinstance(flush, bool) or not isinstance(flush, (int, float)) or not 1 <= flush <= 3600:
        raise CaptureError(f"capture.flushSeconds: {flush!r} is not a number of seconds 1..3600")
    return CaptureConfig(prefix.rstrip("/"), float(rate), tuple(names), float(flush))


def check_feedback(document: Any) -> dict[str, Any]:
    """A `POST /v1/feedback` body; CaptureError naming the bad field."""
    if not isinstance(document, Mapping):
        raise CaptureError("the body must be a JSON object {id, rating, correction?}")
    ident, rating, correction = document.get("id"), document.get("rating"), document.get("correction")
    if not isinstance(ident, str) or not COMPLETION_ID.fullmatch(ident):
        raise CaptureError(f"id: {ident!r} is not a completion id (the `id` of a chat completion)")
    if isinstance(rating, bool) or rating not in RATINGS:
        raise CaptureError(f"rating: {rating!r} must be 1 or -1")
    if correction is not None and (not isinstance(correction, str) or len(correction) > MAX_CORRECTION_CHARS):
        raise CaptureError(f"correction: must be a string of at most {MAX_CORRECTION_CHARS} characters")
    return {"id": ident, "rating": rating, **({"correction": correction} if correction is not None else {})}


def assemble_answer(answer: bytes, streamed: bool) -> tuple[str, str]:
    """(completion id, assistant text) of a chat completion's answer (JSON, or SSE deltas)."""
    if not streamed:
        document = json.loads(answer)
        message = (document.get("choices") or [{}])[0].get("message") or {}
        return str(document.get("id") or ""), str(message.get("content") or "")
    ident, parts = "", []
    for line in answer.decode("utf-8", errors="replace").splitlines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        chunk = json.loads(line[5:])
        ident = ident or str(chunk.get("id") or "")
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) == 0:
                parts.append(str((choice.get("delta") or {}).get("content") or ""))
    return ident, "".join(parts)


def feedback_answer(capture: Capture, body: bytes) -> tuple[int, dict[str, Any]]:
    """`POST /v1/feedback`: (200, the answer) once checked and queued, else (status, an OpenAI error's
    message, type and code): 404 with capture off, 400 naming the bad field, 503 with the queue full."""
    config = capture.config
    if config is None:
        message = "feedback needs capture on for this ModelServer (spec.capture)"
        return 404, {"message": message, "type": "invalid_request_error", "code": "capture_off"}
    try:
        document = check_feedback(json.loads(body))
    except CaptureError as exc:
        return 400, {"message": str(exc), "type": "invalid_request_error", "code": "invalid_feedback"}
    except ValueError:
        return 400, {
            "message": "the body is not JSON",
            "type": "invalid_request_error",
            "code": "invalid_feedback",
        }
    if not capture.offer(Feedback(config, document)):
        return 503, {
            "message": "the capture queue is full; retry",
            "type": "server_error",
            "code": "overloaded",
        }
    return 200, {"id": document["id"], "object": "feedback", "recorded": True}


def tee_chunk(tee: bytearray | None, chunk: bytes) -> bytearray | None:
    """`tee` with `chunk` added, or None once over MAX_CAPTURED_BYTES (that answer is not captured)."""
    if tee is None or len(tee) + len(chunk) > MAX_CAPTURED_BYTES:
        return None
    tee += chunk
    return tee


def _redact_content(content: Any, names: tuple[str, ...]) -> Any:
    if isinstance(content, str):
        return redact(content, names)
    if isinstance(content, list):  # content parts: redact the text ones, keep the rest's shape
        return [
            {**p, "text": redact(str(p.get("text", "")), names)} if isinstance(p, dict) and "text" in p else p
            for p in content
        ]
    return content


def chat_record(item: Chat) -> dict[str, Any]:
    """The redacted captured record (CAPTURE_FIELDS) of one chat."""
    names = item.config.redact
    request = json.loads(item.request)
    ident, answer = assemble_answer(item.answer, item.streamed)
    messages = [
        {**m, "content": _redact_content(m.get("content"), names)}
        for m in request.get("messages") or []
        if isinstance(m, dict)
    ]
    messages.append({"role": "assistant", "content": redact(answer, names)})
    return {
        "id": ident,
        "time": item.time,
        "model": item.model,
        "version": item.version,
        "latencyMs": round(item.latency_ms, 3),
        "messages": messages,
    }


def feedback_record(item: Feedback) -> dict[str, Any]:
    record = {"id": item.body["id"], "time": item.time, "rating": item.body["rating"]}
    if "correction" in item.body:
        record["correction"] = redact(item.body["correction"], item.config.redact)
    return record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Chat:
    config: CaptureConfig
    model: str
    version: str
    latency_ms: float
    request: bytes
    answer: bytes
    streamed: bool
    time: str = field(default_factory=_now)


@dataclass
class Feedback:
    config: CaptureConfig
    body: dict[str, Any]
    time: str = field(default_factory=_now)


@dataclass
class Pending:
    uri: str
    data: bytes
    records: int
    model: str | None  # None: feedback
    attempts: int = 0


def _default_write(uri: str, data: bytes) -> None:
    from . import storage

    storage.write_bytes(uri, data, content_type="application/x-ndjson")


def _size(item: Chat | Feedback) -> int:
    return len(item.request) + len(item.answer) if isinstance(item, Chat) else 1024


def pod_name() -> str:
    name = os.environ.get("POD_NAME") or socket.gethostname()
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name)[:63] or "router"


class Capture:
    """The capture config in force, the queue the request path feeds, and the writer thread's counters."""

    def __init__(self, pod: str | None = None, write: Callable[[str, bytes], None] = _default_write) -> None:
        self.config: CaptureConfig | None = None
        self.pod = pod or pod_name()
        self.write = write
        self.queue: queue.Queue[Chat | Feedback] = queue.Queue(QUEUE_ITEMS)
        self.queued_bytes = 0
        self.groups: dict[tuple[str, str | None], list[str]] = {}  # (object prefix, model) -> lines taken
        self.held = 0  # bytes of the items in `groups`
        self.pending: list[Pending] = []
        self.seq = 0
        self.records: dict[str, int] = {}  # stable name -> records written
        self.feedback = self.failures = self.dropped = 0
        self.lock = threading.Lock()  # counters
        self.flushing = threading.Lock()  # one flush at a time
        self.wake = threading.Event()

    def configure(self, config: CaptureConfig | None) -> None:
        self.config = config
        self.wake.set()  # a shorter flush interval takes effect now

    def sampled(self, draw: float) -> CaptureConfig | None:
        """The config to capture a request with, when `draw` (uniform 0..1) falls in the sample."""
        config = self.config
        return config if config is not None and draw < config.sample_rate else None

    def drop(self, count: int = 1) -> None:
        with self.lock:
            self.dropped += count

    def offer(self, item: Chat | Feedback) -> bool:
        """Enqueue without waiting; False (counted dropped) when the queue is full."""
        size = _size(item)
        with self.lock:
            if self.queued_bytes + size > QUEUE_BYTES:
                self.dropped += 1
                return False
            self.queued_bytes += size
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            with self.lock:
                self.queued_bytes -= size
                self.dropped += 1
            return False

    def counters(self) -> dict[str, int]:
        with self.lock:
            return {
                "records": sum(self.records.values()),
                "feedback": self.feedback,
                "failures": self.failures,
                "dropped": self.dropped,
            }

    def flush(self) -> int:
        """Write what was queued since the last flush (one object per stable name, one of feedback) and retry
        earlier failed objects; the number of objects written."""
        with self.flushing:
            while self.take(0):
                pass
            self.pending.extend(self._objects())
            return self._write_pending()

    def take(self, wait: float) -> bool:
        """Turn one queued item (waiting up to `wait` seconds for one) into its redacted line, so the parsing
        is spread over the interval rather than done in a burst at the flush; False when none came. Its
        bytes stay counted in `queued_bytes` until the flush (memory bound)."""
        try:
            item = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
        except queue.Empty:
            return False
        self.held += _size(item)
        try:
            if isinstance(item, Chat):
                key: tuple[str, str | None] = (captured_prefix(item.config.prefix, item.model), item.model)
                line = json.dumps(chat_record(item), ensure_ascii=False)
            else:
                key, line = (feedback_prefix(item.config.prefix), None), json.dumps(feedback_record(item))
        except (ValueError, TypeError, AttributeError, IndexError) as exc:  # not a chat we can read
            log.debug("not captured: %s", exc)
            self.drop()
            return True
        self.groups.setdefault(key, []).append(line)
        return True

    def _objects(self) -> list[Pending]:
        groups, self.groups = self.groups, {}
        with self.lock:
            self.queued_bytes -= self.held
        self.held = 0
        when = datetime.now(UTC)
        objects = []
        for (prefix, model), lines in groups.items():
            self.seq += 1
            uri = f"{prefix}/{object_name(when, self.pod, self.seq)}"
            objects.append(Pending(uri, ("\n".join(lines) + "\n").encode(), len(lines), model))
        return objects

    def _write_pending(self) -> int:
        written, kept = 0, list[Pending]()
        for obj in self.pending:
            obj.attempts += 1
            try:
                self.write(obj.uri, obj.data)
            except Exception as exc:  # storage down or refusing: retried at the next flush, then counted
                log.warning("capture: writing %s failed (attempt %d): %s", obj.uri, obj.attempts, exc)
                if obj.attempts < WRITE_ATTEMPTS and len(kept) < MAX_PENDING:
                    kept.append(obj)
                else:
                    with self.lock:
                        self.failures += obj.records
                continue
            written += 1
            with self.lock:
                if obj.model is None:
                    self.feedback += obj.records
                else:
                    self.records[obj.model] = self.records.get(obj.model, 0) + obj.records
        self.pending = kept
        return written

    def run(self, stop: threading.Event) -> None:
        """Take items as they come and flush every `flushSeconds` of the config in force, until `stop` is
        set (then flush once more)."""
        deadline = time.monotonic()
        while not stop.is_set():
            config = self.config
            interval = config.flush_seconds if config else 5.0
            deadline = min(deadline, time.monotonic() + interval) if self.wake.is_set() else deadline
            self.wake.clear()
            left = deadline - time.monotonic()
            if left > 0:
                try:
                    with self.flushing:
                        self.take(min(left, 0.5))
                except Exception as exc:  # never kills the writer
                    log.warning("capture: reading a queued chat failed: %s", exc)
                continue
            self._safe_flush()
            deadline = time.monotonic() + interval
        self._safe_flush()

    def _safe_flush(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # never kills the writer
            log.warning("capture flush failed: %s", exc)

    def prometheus(self) -> list[str]:
        counters = self.counters()
        lines = [
            "# HELP finetune_capture_records_total Captured chats written, by stable name.",
            "# TYPE finetune_capture_records_total counter",
        ]
        with self.lock:
            lines += [
                f'finetune_capture_records_total{{model="{m}"}} {n}' for m, n in sorted(self.records.items())
            ]
        for name, key, text in (
            ("finetune_capture_failures_total", "failures", "Captured records lost to failed writes."),
            ("finetune_capture_dropped_total", "dropped", "Chats or feedback not captured (queue, size)."),
            ("finetune_feedback_total", "feedback", "Feedback records written."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {counters[key]}"]
        return lines
