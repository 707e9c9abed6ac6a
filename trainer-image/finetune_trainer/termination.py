"""Termination message (≤ 4 KiB JSON for the operator) and SIGTERM/preemption handling.

Train code polls :func:`preemption_requested` (e.g. from a ``TrainerCallback.on_step_end``), commits a
checkpoint, then raises :class:`~finetune_trainer.exitcodes.PreemptedError`; the CLI turns that into exit
code 21. Other stages get an immediate ``PreemptedError`` from the signal handler (they hold nothing that a
rerun cannot redo; nothing is committed before their manifest is written).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .exitcodes import ExitCode, PreemptedError
from .logs import redact, redact_obj

log = logging.getLogger(__name__)

MAX_TERMINATION_BYTES = 4096  # kubelet truncates terminationMessagePath content at 4096 bytes
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


@dataclass
class StageResult:
    """What a stage's ``run(config)`` returns: the termination summary and a one-line message."""

    summary: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def termination_log_path() -> Path:
    return Path(os.environ.get("FTJ_TERMINATION_LOG", DEFAULT_TERMINATION_LOG))


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def _truncate_utf8(text: str, max_bytes: int) -> str:
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[: max(0, max_bytes - 3)].decode("utf-8", errors="ignore") + "..."


def build_termination_message(
    stage: str,
    code: ExitCode | int,
    message: str = "",
    summary: dict[str, Any] | None = None,
    max_bytes: int = MAX_TERMINATION_BYTES,
) -> bytes:
    """The JSON document of the contract, shrunk to ``max_bytes``: message first, then summary entries."""
    code = ExitCode(code) if code in ExitCode._value2member_map_ else code
    reason = code.name if isinstance(code, ExitCode) else "ERROR"
    doc: dict[str, Any] = {
        "stage": stage,
        "exitCode": int(code),
        "reason": reason,
        "message": redact(message),
        "summary": redact_obj(summary or {}),
    }
    data = _encode(doc)
    if len(data) <= max_bytes:
        return data
    # Keep the message readable down to 1 KiB, then drop the biggest summary entries, then cut the message.
    doc["message"] = _truncate_utf8(
        doc["message"], max(1024, len(doc["message"].encode()) - (len(data) - max_bytes))
    )
    data = _encode(doc)
    while len(data) > max_bytes and doc["summary"]:
        biggest = max(doc["summary"], key=lambda k: len(_encode({k: doc["summary"][k]})))
        doc["summary"].pop(biggest)
        doc["truncated"] = True
        data = _encode(doc)
    if len(data) > max_bytes:
        overflow = len(data) - max_bytes
        doc["message"] = _truncate_utf8(doc["message"], len(doc["message"].encode()) - overflow - 8)
        data = _encode(doc)
    return data


def write_termination_message(
    stage: str,
    code: ExitCode | int,
    message: str = "",
    summary: dict[str, Any] | None = None,
    path: Path | str | None = None,
) -> bytes:
    """Write the termination message; on a distributed run only each pod's first process (local rank 0)
    writes. Returns what was written."""
    data = build_termination_message(stage, code, message, summary)
    if os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) != "0":
        return data
    target = Path(path) if path is not None else termination_log_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    except OSError as exc:  # outside a pod /dev/termination-log is usually not writable
        log.warning("cannot write termination message to %s: %s", target, exc)
    return data


# --- preemption -----------------------------------------------------------------------------------------

_preempted = threading.Event()


def preemption_requested() -> bool:
    """True once SIGTERM arrived. Train code checks it at step boundaries."""
    return _preempted.is_set()


def request_preemption() -> None:
    """Set the flag (the signal handler does this; tests and callbacks may too)."""
    _preempted.set()


def clear_preemption() -> None:
    _preempted.clear()


def raise_if_preempted(what: str = "stage") -> None:
    if _preempted.is_set():
        raise PreemptedError(f"SIGTERM received; {what} stopped")


def install_sigterm_handler(*, raise_immediately: bool) -> None:
    """On SIGTERM set the preemption flag; with ``raise_immediately`` also raise PreemptedError at once."""

    def _handler(signum: int, frame: Any) -> None:
        first = not _preempted.is_set()
        _preempted.set()
        if first:
            log.warning("SIGTERM received: stopping", extra={"fields": {"event": "sigterm"}})
        if raise_immediately and first:
            raise PreemptedError("SIGTERM received before the stage finished; nothing was committed")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
