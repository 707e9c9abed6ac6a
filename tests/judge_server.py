"""A deterministic OpenAI-compatible judge for tests: ``POST /v1/chat/completions`` on 127.0.0.1:<free port>.

The verdict is a pure function of the request (the trainer's judge prompts put the graded text between
``<<<ANSWER`` / ``ANSWER>>>`` markers, and a pairwise request has ``ANSWER_A`` / ``ANSWER_B``):

* pointwise (``{"score", "reason"}``): ``high`` when the answer is good, else ``low``; good = equals the
  ``<<<REFERENCE`` block (stripped) or, when ``word`` is set, contains ``word``;
* pairwise (``{"winner", "reason"}``): the good one of A and B, ``tie`` when both or neither are;
* safety (``{"unsafe", "reason"}``, the system prompt names the safety reviewer): unsafe when the answer
  matches ``unsafe_pattern`` (a Python regex, search).

Misbehaviour on demand: ``throttle`` first requests answer 429 with ``Retry-After: retry_after``; ``fail``
first requests answer 500; an answer containing ``garbage_word`` always gets a verdict that is not JSON;
``reject_response_format`` answers 400 "response_format is not supported" to requests that carry one;
``fence`` wraps verdicts in a ```json block. Every request is recorded (``requests``: path, headers, body,
monotonic arrival time) so tests can assert temperature 0, the Authorization header and the timing.

Usage::

    with JudgeServer(word="good") as judge:
        judge.url            # "http://127.0.0.1:<port>/v1"
        judge.requests       # [{"path", "headers", "body", "time"}, ...]
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_BLOCK = r"<<<{tag}\n(.*?)\n{tag}>>>"


def _block(text: str, tag: str) -> str | None:
    match = re.search(_BLOCK.format(tag=tag), text, re.S)
    return match.group(1) if match else None


@dataclass
class JudgeServer:
    word: str | None = None
    high: float = 10
    low: float = 1
    unsafe_pattern: str = r"(?i)\bbomb\b"
    throttle: int = 0
    retry_after: str = "1"
    fail: int = 0
    garbage_word: str | None = None
    reject_response_format: bool = False
    fence: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)

    # --- verdicts (pure functions of the request) ---------------------------------------------------------

    def good(self, answer: str, reference: str | None) -> bool:
        if self.word is not None:
            return self.word in answer
        return reference is not None and answer.strip() == reference.strip()

    def verdict(self, body: dict[str, Any]) -> str:
        messages = body.get("messages") or []
        system = next((m["content"] for m in messages if m.get("role") == "system"), "")
        user = "\n".join(m["content"] for m in messages if m.get("role") == "user")
        reference = _block(user, "REFERENCE")
        if "safety reviewer" in system:
            answer = _block(user, "ANSWER") or ""
            doc: dict[str, Any] = {
                "unsafe": bool(re.search(self.unsafe_pattern, answer)),
                "reason": "pattern",
            }
        elif _block(user, "ANSWER_A") is not None:
            first, second = _block(user, "ANSWER_A") or "", _block(user, "ANSWER_B") or ""
            answer = first + second
            a, b = self.good(first, reference), self.good(second, reference)
            doc = {"winner": "tie" if a == b else ("A" if a else "B"), "reason": "the good one wins"}
        else:
            answer = _block(user, "ANSWER") or ""
            ok = self.good(answer, reference)
            doc = {"score": self.high if ok else self.low, "reason": "good" if ok else "not good"}
        if self.garbage_word is not None and self.garbage_word in answer:
            return "I think this answer is fine."
        text = json.dumps(doc)
        return f"```json\n{text}\n```" if self.fence else text

    # --- HTTP ---------------------------------------------------------------------------------------------

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length) or b"{}")
        with self._lock:
            self.requests.append(
                {
                    "path": handler.path,
                    "headers": dict(handler.headers),
                    "body": body,
                    "time": time.monotonic(),
                }
            )
            number = len(self.requests)
        if handler.path.rstrip("/") != "/v1/chat/completions":
            return self._send(handler, 404, {"error": {"message": "not found"}})
        if number <= self.throttle:
            return self._send(
                handler, 429, {"error": {"message": "slow down"}}, {"Retry-After": self.retry_after}
            )
        if number <= self.throttle + self.fail:
            return self._send(handler, 500, {"error": {"message": "internal error"}})
        if self.reject_response_format and "response_format" in body:
            return self._send(handler, 400, {"error": {"message": "response_format is not supported"}})
        content = self.verdict(body)
        self._send(
            handler,
            200,
            {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion",
                "model": body.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            },
        )

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler, status: int, doc: Any, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(doc).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    def start(self) -> JudgeServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner._respond(self)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
