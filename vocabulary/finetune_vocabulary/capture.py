"""Traffic capture, feedback and canary figures: what a ModelServer's router writes and reports, and what the
operator (rollout decisions, FineTuneSchedule data Jobs) and the trainer's `assemble` stage read back.

Storage layout, under a pool's capture prefix `<capture.destination>/<namespace>/<modelserver>`:

- `<model>/captured/<YYYY-MM-DD>/<HHMMSS>-<pod>-<seq>.jsonl`: sampled chats of the stable name `<model>`,
  one JSON object per line (`CAPTURE_FIELDS`), one object per router pod per flush interval, written whole
  (never a partial line). The time in the key is the flush time (UTC): a reader lists after a cutoff cheaply.
- `feedback/<YYYY-MM-DD>/<HHMMSS>-<pod>-<seq>.jsonl`: `POST /v1/feedback` records (`FEEDBACK_FIELDS`), joined
  to captured chats by completion id (feedback can reach any replica, so it is not filed under a model).

Everything written has been through `redact` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime

# --- capture layout --------------------------------------------------------------------------------------
CAPTURED_DIR = "captured"
FEEDBACK_DIR = "feedback"


def capture_prefix(destination: str, namespace: str, modelserver: str) -> str:
    """Where one ModelServer's routers write: `<destination>/<namespace>/<modelserver>` (no trailing /)."""
    return f"{destination.rstrip('/')}/{namespace}/{modelserver}"


def captured_prefix(prefix: str, model: str) -> str:
    """The captured chats of one stable model name under a pool's capture prefix."""
    return f"{prefix.rstrip('/')}/{model}/{CAPTURED_DIR}"


def feedback_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/{FEEDBACK_DIR}"


def object_name(when: datetime, pod: str, seq: int) -> str:
    """`<YYYY-MM-DD>/<HHMMSS>-<pod>-<seq>.jsonl`: one flush of one router (`when` in UTC)."""
    return f"{when:%Y-%m-%d}/{when:%H%M%S}-{pod}-{seq:06d}.jsonl"


# --- records ---------------------------------------------------------------------------------------------
# A captured chat: {"id": completion id, "time": ISO-8601 UTC, "model": stable name, "version": versioned
# name that answered, "latencyMs": float, "messages": [... the request's messages, {"role": "assistant",
# "content": answer}]} — chat format, so a captured file is a valid `chat` dataset.
CAPTURE_FIELDS = ("id", "time", "model", "version", "latencyMs", "messages")
# Feedback: {"id": completion id, "time": ISO-8601 UTC, "rating": 1 | -1, "correction"?: str}
FEEDBACK_FIELDS = ("id", "time", "rating", "correction")
RATINGS = (1, -1)
COMPLETION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # checked with fullmatch
MAX_CORRECTION_CHARS = 32_768

# --- redaction (capture and assembly) ----------------------------------------------------------------------
# Candidates found by linear-time patterns (no nested quantifiers: they run on untrusted request and answer
# text), then confirmed by a digit count (and the Luhn check for card numbers): dates and plain numbers stay.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}")
_DIGIT_RUN = re.compile(r"\+?\(?\d[\d ().-]{5,30}\d")
REDACTOR_NAMES = ("email", "phone", "creditCard")


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char) * (2 if index % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _is_card(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and _luhn(digits) and not re.search(r"[().]", candidate)


def _is_phone(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 7 <= len(digits) <= 15 and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", candidate.strip())


def redaction_mark(name: str) -> str:
    return f"[{name}]"


def redact(text: str, names: Iterable[str]) -> str:
    """`text` with e-mail addresses, card numbers and phone numbers (each if named) replaced by `[<name>]`."""
    chosen = set(names)
    if "email" in chosen:
        text = _EMAIL.sub(redaction_mark("email"), text)

    def digits(match: re.Match[str]) -> str:
        found = match.group(0)
        if "creditCard" in chosen and _is_card(found):
            return redaction_mark("creditCard")
        if "phone" in chosen and _is_phone(found):
            return redaction_mark("phone")
        return found

    return _DIGIT_RUN.sub(digits, text) if chosen & {"phone", "creditCard"} else text


# --- canary: routing and live figures ----------------------------------------------------------------------
VERSION_HEADER = "X-Model-Version"  # on every answer to a model request: the versioned name that answered
CONVERSATION_HEADER = "X-Conversation-Id"  # sticky routing key when the body has no `user`
# Latency histogram bucket upper bounds (ms) of the routers' per-version figures; one more bucket (+Inf) last.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10_000,
    30_000,
    60_000,
)


def percentile_ms(buckets: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q ≤ 1) of a histogram with counts per LATENCY_BUCKETS_MS bucket (+Inf last), as
    that bucket's upper bound (the last finite bound for +Inf); None when empty."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return float(LATENCY_BUCKETS_MS[min(index, len(LATENCY_BUCKETS_MS) - 1)])
    return float(LATENCY_BUCKETS_MS[-1])


def merge_buckets(histograms: Iterable[Sequence[int]]) -> list[int]:
    """Sum per-replica histograms (exact: the buckets are the same everywhere)."""
    merged = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for histogram in histograms:
        for index, count in enumerate(list(histogram)[: len(merged)]):
            merged[index] += int(count)
    return merged
