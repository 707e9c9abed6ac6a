"""Container logs in the CRI file format (`<RFC3339Nano> <stream> <P|F> <text>`), read back for pods/log."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

_CHUNK = 16 * 1024


def _stamp() -> bytes:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


class LogFile:
    """One container run's log; stdout and stderr pumps append whole lines (partial ones tagged P)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()

    def write(self, stream: bytes, text: bytes, partial: bool) -> None:
        self._fh.write(b"%s %s %s %s\n" % (_stamp(), stream, b"P" if partial else b"F", text))

    async def pump(self, reader: asyncio.StreamReader, stream: str) -> None:
        tag = stream.encode()
        buffer = b""
        while True:
            chunk = await reader.read(_CHUNK)
            if not chunk:
                break
            buffer += chunk
            while True:
                idx = buffer.find(b"\n")
                if idx < 0:
                    break
                self.write(tag, buffer[:idx], partial=False)
                buffer = buffer[idx + 1 :]
            while len(buffer) >= _CHUNK:
                self.write(tag, buffer[:_CHUNK], partial=True)
                buffer = buffer[_CHUNK:]
        if buffer:
            self.write(tag, buffer, partial=True)

    def close(self) -> None:
        self._fh.close()


def parse_line(raw: bytes) -> tuple[datetime | None, bytes, bool]:
    """CRI line → (timestamp, text, is_partial)."""
    parts = raw.rstrip(b"\n").split(b" ", 3)
    if len(parts) < 4:
        return None, raw, False
    try:
        when = datetime.strptime(parts[0].decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        when = None
    return when, parts[3], parts[2] == b"P"


def _records(data: bytes) -> list[tuple[datetime | None, bytes]]:
    """Group CRI lines into log records (partials joined with their final line), each ending in \\n unless the
    stream ended without one."""
    out: list[tuple[datetime | None, bytes]] = []
    pending = b""
    first: datetime | None = None
    for raw in data.splitlines():
        when, text, partial = parse_line(raw)
        if not pending:
            first = when
        pending += text
        if not partial:
            out.append((first, pending + b"\n"))
            pending = b""
    if pending:
        out.append((first, pending))
    return out


def _render(when: datetime | None, text: bytes, timestamps: bool) -> bytes:
    if timestamps and when is not None:
        return when.strftime("%Y-%m-%dT%H:%M:%S.%f000Z").encode() + b" " + text
    return text


async def read_log(
    path: Path,
    *,
    tail: int | None = None,
    since: datetime | None = None,
    timestamps: bool = False,
    limit_bytes: int | None = None,
    follow: bool = False,
    still_running: Callable[[], bool] = lambda: False,
) -> AsyncIterator[bytes]:
    """Yield the log as kubectl shows it; with follow, keep streaming until the container stops."""
    sent = 0
    data = path.read_bytes() if path.exists() else b""
    # Only complete CRI lines are consumed; a half-written one waits for the next read.
    cut = data.rfind(b"\n") + 1
    offset = cut
    records = _records(data[:cut])
    if since is not None:
        records = [r for r in records if r[0] is None or r[0] >= since]
    if tail is not None and tail >= 0:
        records = records[-tail:] if tail else []
    for when, text in records:
        chunk = _render(when, text, timestamps)
        if limit_bytes is not None:
            chunk = chunk[: max(0, limit_bytes - sent)]
        if chunk:
            sent += len(chunk)
            yield chunk
        if limit_bytes is not None and sent >= limit_bytes:
            return
    if not follow:
        return
    pending = b""
    while True:
        running = still_running()
        size = os.path.getsize(path) if path.exists() else 0
        if size > offset:
            with open(path, "rb") as fh:
                fh.seek(offset)
                new = fh.read(size - offset)
            cut = new.rfind(b"\n") + 1
            offset += cut
            for raw in new[:cut].splitlines():
                when, text, partial = parse_line(raw)
                pending += text
                if partial:
                    continue
                chunk = _render(when, pending + b"\n", timestamps)
                pending = b""
                if limit_bytes is not None:
                    chunk = chunk[: max(0, limit_bytes - sent)]
                sent += len(chunk)
                if chunk:
                    yield chunk
                if limit_bytes is not None and sent >= limit_bytes:
                    return
            continue
        if not running:
            if pending:
                yield pending
            return
        await asyncio.sleep(0.2)


def tail_text(path: Path, max_lines: int = 80, max_bytes: int = 2048) -> str:
    """The end of a log for FallbackToLogsOnError: last 80 lines or 2 KiB, whichever is smaller."""
    if not path.exists():
        return ""
    text = b"".join(t for _, t in _records(path.read_bytes()))
    lines = text.splitlines(keepends=True)[-max_lines:]
    return b"".join(lines)[-max_bytes:].decode("utf-8", "replace")
