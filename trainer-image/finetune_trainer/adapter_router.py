"""``python -m finetune_trainer.adapter_router``: the adapter-sync and router sidecar of a ModelServer pod.

One process beside vLLM (which runs with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) in every pool pod:

- On start it waits for vLLM, then downloads and loads every adapter the operator's ConfigMap lists
  (``--state-file``) and sets the stable-name routes; only then does ``/ready`` answer 200, so a new,
  replaced or restarted pod joins the Service with every promoted adapter loaded.
- The admin port (never in the Service; the ModelServer's NetworkPolicy admits only the operator's pods) takes
  the operator's desired state: ``PUT /state`` with
  ``{"adapters": {"<model>-v<n>": "s3://…/adapter"}, "routes": {"<model>": "<model>-v<n>"}}``. It loads what
  is missing (each under its immutable versioned name), then switches the routes, then unloads what is no
  longer listed, and answers with what is loaded. ``GET /state`` reports it. Adapter URIs outside the
  ``--adapter-source`` prefixes (the ModelServer's spec.adapterSources, fixed when the pod is built) are
  refused whoever asks, so even a caller that reaches the admin port cannot make the pod read anything else
  its credentials can.
- The public port proxies the OpenAI API to vLLM, rewriting ``"model": "<stable name>"`` to the routed
  version, so a stable name never means different weights inside vLLM (no stale prefix-cache blocks) and a
  route switch between requests fails none. ``/v1/models`` lists vLLM's models plus the stable names. Only
  the paths of ``PUBLIC_ROUTES`` are served, matched after decoding and collapsing the request target as the
  engine's server would (``/v1/%75nload_lora_adapter`` is ``/v1/unload_lora_adapter``, not on the list: 404),
  and the normalised path is what is forwarded. Bodies are capped (``MAX_BODY``, 413), connections served at
  once are bounded (``MAX_CONNECTIONS``, 503 beyond), request bodies held at once are bounded
  (``BODY_BUDGET``), and answers (SSE streams included) are streamed through, never buffered.
- Canary and capture (docs/capture.md; router_canary.py, router_capture.py): the state may also carry
  ``weights`` (a stable name's requests split between versions, sticky per ``user`` or
  ``X-Conversation-Id``; a failing challenger's request is asked again of the route) and ``capture``
  (sampled chats written, redacted, in batches by a background thread; ``POST /v1/feedback``). Every answer
  to a request naming a model says ``X-Model-Version``; ``GET /state`` reports per-version figures and
  ``GET /metrics`` (admin) is Prometheus text; ``--fault-injection`` serves ``PUT/GET /faults``.
- A version it loaded that vLLM no longer lists (unloaded behind its back, or lost) is loaded again: at once
  when vLLM answers 404 for a name it routes (the request is then retried once), and every
  ``--check-seconds``.

Standard library only on the request path (threads: one per connection, bounded), so it runs in the trainer
image without pins; the capture writer uses the trainer's storage code, imported in its thread.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import random
import re
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from finetune_vocabulary.capture import CONVERSATION_HEADER, VERSION_HEADER

from .router_canary import Canary, CanaryError, Faults, Routed, check_weights, route_request
from .router_capture import (
    MAX_CAPTURED_BYTES,
    Capture,
    CaptureConfig,
    CaptureError,
    Chat,
    check_capture,
    feedback_answer,
    tee_chunk,
)

log = logging.getLogger("finetune_trainer.adapter_router")

# Checked with fullmatch: with match or search, "$" also admits a final newline.
VERSION_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?-v[0-9]+")
STABLE_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
ADAPTER_URI = re.compile(r"(s3|pvc)://[\x21-\x7e]+")  # printable ASCII: no space, NUL or other control
# The public port's allow-list: normalised path -> methods. Anything else is 404 and never reaches vLLM (its
# runtime /v1/load_lora_adapter and /v1/unload_lora_adapter above all).
PUBLIC_ROUTES: Mapping[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({"POST"}),
    "/v1/completions": frozenset({"POST"}),
    "/v1/embeddings": frozenset({"POST"}),
    "/v1/feedback": frozenset({"POST"}),  # answered by the router (capture), never forwarded
    "/tokenize": frozenset({"POST"}),
    "/detokenize": frozenset({"POST"}),
    "/v1/models": frozenset({"GET"}),
    "/health": frozenset({"GET"}),
    "/version": frozenset({"GET"}),
}
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "expect",
    }
)
# 2 MiB: a full 128k-token context of plain text is ~0.5 MiB of JSON. Parsing and re-serialising a body
# briefly costs ~10x its size (measured: a 60 MiB chat body peaked at 653 MiB RSS), so the cap and the budget
# bound the public port at ~350 MiB of bodies in flight (the container's limit is 1 GiB).
MAX_BODY = 2 * 2**20
BODY_BUDGET = 32 * 2**20  # request bodies held at once by the public port (a request waits for room)
BODY_WAIT = 30.0  # seconds a request waits for room in BODY_BUDGET before a 503
MAX_CONNECTIONS = 64  # connections the public port serves at once; more are answered 503
MAX_REFUSING = 16  # extra connections answered 503 at once; beyond that a connection is closed unanswered
IDLE_SECONDS = 60.0  # a client socket silent this long (idle keep-alive, stalled read) is closed
CHUNK = 65536
MAX_DRAIN = 64 * 2**20  # an unread body drained before closing, so the client reads the refusal
UNSAFE_IN_PATH = re.compile(r"[%;\\\x00-\x20\x7f-\x9f]")
MAX_STATE_BODY = 1 * 2**20  # PUT /state: at most a few hundred adapters
MAX_ADAPTERS = 512


class StateError(ValueError):
    """A desired state the sidecar refuses (bad names or URIs)."""


def under_source(uri: str, sources: Sequence[str]) -> bool:
    """`uri` lies under one of `sources` at a path boundary (s3://b/runs does not admit s3://b/runs-x)."""
    if {".", ".."} & set(uri.split("/")):
        return False
    return any((uri.rstrip("/") + "/").startswith(s.rstrip("/") + "/") for s in sources)


def check_state(document: Any, sources: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(adapters, routes) from a desired-state document; StateError naming the bad entry. Every adapter URI
    must lie under one of `sources` (none given: every URI is refused)."""
    if not isinstance(document, Mapping):
        raise StateError("the state must be a JSON object")
    adapters, routes = document.get("adapters") or {}, document.get("routes") or {}
    if not isinstance(adapters, Mapping) or not isinstance(routes, Mapping):
        raise StateError("adapters and routes must be objects")
    if len(adapters) > MAX_ADAPTERS or len(routes) > MAX_ADAPTERS:
        raise StateError(f"at most {MAX_ADAPTERS} adapters and routes")
    for name, uri in adapters.items():
        if not isinstance(name, str) or not VERSION_NAME.fullmatch(name) or len(name) > 64:
            raise StateError(f"adapters: {name!r} is not a versioned name <model>-v<n>")
        if not isinstance(uri, str) or not ADAPTER_URI.fullmatch(uri) or {".", ".."} & set(uri.split("/")):
            raise StateError(f"adapters.{name}: {uri!r} is not an s3:// or pvc:// URI")
        if not under_source(uri, sources):
            raise StateError(
                f"adapters.{name}: {uri!r} is not under the pool's adapter sources "
                f"({', '.join(sources) or 'none'}: ModelServer spec.adapterSources)"
            )
    for model, target in routes.items():
        if not isinstance(model, str) or not STABLE_NAME.fullmatch(model) or len(model) > 64:
            raise StateError(f"routes: {model!r} is not a model name")
        if not isinstance(target, str) or target not in adapters:
            raise StateError(f"routes.{model}: {target!r} is not among the adapters")
    return dict(adapters), dict(routes)


@dataclass(frozen=True)
class State:
    """A checked desired-state document."""

    adapters: dict[str, str]
    routes: dict[str, str]
    weights: dict[str, dict[str, int]]
    capture: CaptureConfig | None


def check_document(document: Any, sources: Sequence[str], destinations: Sequence[str] = ()) -> State:
    """The whole desired state (adapters, routes, weights, capture); StateError naming the bad entry.
    Capture prefixes must lie under `destinations` (none given: capture is refused)."""
    adapters, routes = check_state(document, sources)
    try:
        weights = check_weights(document.get("weights"), adapters, routes)
        capture = check_capture(document.get("capture"), list(destinations))
    except (CanaryError, CaptureError) as exc:
        raise StateError(str(exc)) from None
    return State(adapters, routes, weights, capture)


def public_path(target: str) -> str | None:
    """The allow-listed path a request target means, or None (404, never forwarded). The path is decoded
    (%xx) and collapsed ("//", ".", "..", a final "/") as the engine's server would read it; one that still
    holds "%" (double encoding), ";", "\\" or a control character is refused. The query is not forwarded."""
    if not target.startswith("/"):  # absolute-form and "*" targets
        return None
    raw = target.split("?", 1)[0].split("#", 1)[0]
    try:
        decoded = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return None
    if UNSAFE_IN_PATH.search(decoded):
        return None
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment == "..":
            if not segments:
                return None
            segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    path = "/" + "/".join(segments)
    return path if path in PUBLIC_ROUTES else None


def with_stable_names(models: Mapping[str, Any], routes: Mapping[str, str]) -> dict[str, Any]:
    """vLLM's /v1/models plus one entry per stable name (its `root` says which version it serves)."""
    data = [m for m in models.get("data") or [] if isinstance(m, dict)]
    by_id = {m.get("id"): m for m in data}
    for model, target in sorted(routes.items()):
        if target in by_id:
            data.append({**by_id[target], "id": model, "root": target})
    return {**models, "data": data}


class Vllm:
    """The local vLLM server's runtime LoRA API."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 8000

    def connection(self, timeout: float = 600) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 600) -> tuple[int, bytes]:
        conn = self.connection(timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def healthy(self) -> bool:
        try:
            return self.call("GET", "/health", timeout=5)[0] == 200
        except OSError:
            return False

    def models(self) -> set[str]:
        """The ids vLLM lists in /v1/models (the base model and every loaded adapter)."""
        status, body = self.call("GET", "/v1/models", timeout=30)
        if status != 200:
            raise RuntimeError(f"vLLM /v1/models answered {status}")
        return {str(m.get("id")) for m in json.loads(body).get("data") or [] if isinstance(m, dict)}

    def load(self, name: str, path: Path) -> None:
        status, body = self.call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if status != 200:
            raise RuntimeError(f"vLLM refused to load {name}: {status} {body[:300]!r}")

    def unload(self, name: str) -> None:
        status, body = self.call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):
            raise RuntimeError(f"vLLM refused to unload {name}: {status} {body[:300]!r}")


def fetch_adapter(uri: str, dest: Path) -> None:
    """The committed adapter directory, verified against its manifest (as the `fetch` init container)."""
    from . import manifest

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest.download_committed(uri, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


class Router:
    """What is loaded and where each stable name goes; mutations are serialised by one lock."""

    def __init__(
        self,
        vllm: Vllm,
        adapters_dir: Path,
        fetch: Any = fetch_adapter,
        sources: Sequence[str] = (),
        destinations: Sequence[str] = (),
        faults: Faults | None = None,
        capture: Capture | None = None,
    ) -> None:
        self.vllm = vllm
        self.sources = tuple(sources)  # the only prefixes adapters may come from
        self.destinations = tuple(destinations)  # the only prefixes capture may write under
        self.canary = Canary()
        self.faults = faults or Faults(enabled=False)
        self.capture = capture or Capture()
        self.adapters_dir = adapters_dir
        self.fetch = fetch
        self.loaded: dict[str, str] = {}
        self.routes: dict[str, str] = {}
        self.ready = False
        self.error: str | None = None
        self.reloads = 0  # versions found missing from vLLM and loaded again
        self.lock = threading.Lock()

    def state(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "loaded": dict(self.loaded),
            "routes": dict(self.routes),
            "reloads": self.reloads,
            "weights": {m: dict(split) for m, split in self.canary.weights.items()},
            "stats": self.canary.report(),
            "capture": self.capture.counters(),
            **({"error": self.error} if self.error else {}),
        }

    def check(self, document: Any) -> State:
        return check_document(document, self.sources, self.destinations)

    def apply_state(self, state: State) -> dict[str, Any]:
        """apply() plus the weights (after the routes switch, before anything is unloaded) and capture."""
        return self.apply(state.adapters, state.routes, state.weights, state.capture)

    def apply(
        self,
        adapters: Mapping[str, str],
        routes: Mapping[str, str],
        weights: Mapping[str, Mapping[str, int]] | None = None,
        capture: CaptureConfig | None = None,
    ) -> dict[str, Any]:
        """Load what is missing, switch the routes and weights, unload what is not listed; the seconds each
        load took."""
        timings: dict[str, float] = {}
        with self.lock:
            for name, uri in sorted(adapters.items()):
                if self.loaded.get(name) == uri:
                    continue
                began = time.monotonic()
                path = self.adapters_dir / name
                self.fetch(uri, path)
                if name in self.loaded:  # never different weights under one name: drop the old first
                    self.vllm.unload(name)
                self.vllm.load(name, path)
                self.loaded[name] = uri
                timings[name] = round(time.monotonic() - began, 3)
                log.info("loaded %s from %s in %.2fs", name, uri, timings[name])
            self.routes = dict(routes)
            self.canary.set_weights(weights or {})
            self.capture.configure(capture)
            for name in sorted(set(self.loaded) - set(adapters)):
                self.vllm.unload(name)
                del self.loaded[name]
                shutil.rmtree(self.adapters_dir / name, ignore_errors=True)
                log.info("unloaded %s", name)
        return {**self.state(), "loadSeconds": timings}

    def start(self, state_file: Path | None, wait_seconds: float = 3600) -> None:
        """Wait for vLLM, load what the ConfigMap lists, then report ready."""
        deadline = time.monotonic() + wait_seconds
        while not self.vllm.healthy():
            if time.monotonic() > deadline:
                self.error = "vLLM did not become healthy"
                return
            time.sleep(1)
        state = State({}, {}, {}, None)
        if state_file is not None and state_file.exists():
            try:
                state = self.check(json.loads(state_file.read_text() or "{}"))
            except (ValueError, StateError) as exc:
                log.error("ignoring %s: %s", state_file, exc)
        while True:
            try:
                self.apply_state(state)
                break
            except Exception as exc:  # retried: storage or vLLM may be briefly unavailable
                self.error = str(exc)[:500]
                log.warning("initial adapter sync failed, retrying: %s", exc)
                time.sleep(5)
        self.error = None
        self.ready = True

    def repair(self) -> list[str]:
        """Load again every version this router loaded that vLLM no longer lists (unloaded behind its back, or
        lost), so /state and the routes tell the truth; the names reloaded."""
        with self.lock:
            if not self.ready or not self.loaded:
                return []
            missing = sorted(set(self.loaded) - self.vllm.models())
            for name in missing:
                path = self.adapters_dir / name
                if not path.is_dir():
                    self.fetch(self.loaded[name], path)
                self.vllm.load(name, path)
                log.warning("%s was missing from vLLM; loaded it again", name)
            self.reloads += len(missing)
            return missing

    def watch(self, interval: float, stop: threading.Event) -> None:
        """repair() every `interval` seconds until `stop` is set."""
        while not stop.wait(interval):
            try:
                self.repair()
            except Exception as exc:  # vLLM or storage briefly unavailable: the next pass retries
                self.error = f"reloading a missing version failed: {str(exc)[:400]}"
                log.warning("%s", self.error)
            else:
                self.error = None


def _send(
    handler: BaseHTTPRequestHandler, status: int, document: Any, headers: Mapping[str, str] | None = None
) -> None:
    body = json.dumps(document).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def _send_text(handler: BaseHTTPRequestHandler, status: int, text: str, content_type: str) -> None:
    body = text.encode()
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _read_body(handler: BaseHTTPRequestHandler, limit: int = MAX_BODY) -> bytes:
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        raise StateError("bad Content-Length") from None
    if length < 0 or length > limit:
        raise StateError("request body too large")
    return handler.rfile.read(length) if length else b""


def admin_handler(router: Router) -> type[BaseHTTPRequestHandler]:
    class Admin(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("admin: " + format, *args)

        def do_GET(self) -> None:
            if self.path == "/ready":
                _send(self, 200 if router.ready and router.vllm.healthy() else 503, router.state())
            elif self.path in ("/state", "/healthz"):
                _send(self, 200, router.state())
            elif self.path == "/metrics":
                text = "\n".join(router.canary.prometheus() + router.capture.prometheus()) + "\n"
                _send_text(self, 200, text, "text/plain; version=0.0.4; charset=utf-8")
            elif self.path == "/faults" and router.faults.enabled:
                _send(self, 200, router.faults.table)
            else:
                _send(self, 404, {"error": "not found"})

        def do_PUT(self) -> None:
            if self.path == "/faults" and router.faults.enabled:
                self.put_faults()
                return
            if self.path != "/state":
                _send(self, 404, {"error": "not found"})
                return
            try:
                body = _read_body(self, MAX_STATE_BODY)
                state = router.check(json.loads(body or b"{}"))
            except (ValueError, StateError) as exc:
                self.close_connection = True  # an unread body must not be parsed as the next request
                _send(self, 400, {"error": str(exc)})
                return
            if not router.ready:
                _send(self, 409, {"error": "the initial sync has not finished", **router.state()})
                return
            try:
                _send(self, 200, router.apply_state(state))
            except Exception as exc:
                log.warning("applying the state failed: %s", exc)
                _send(self, 502, {"error": str(exc)[:500], **router.state()})

        def put_faults(self) -> None:
            """Chaos tests (--fault-injection only): replace the fault table."""
            try:
                _send(self, 200, router.faults.replace(json.loads(_read_body(self, MAX_STATE_BODY) or b"{}")))
            except (ValueError, StateError) as exc:
                self.close_connection = True
                _send(self, 400, {"error": str(exc)})

    return Admin


def _refuse(
    handler: BaseHTTPRequestHandler,
    status: int,
    message: str,
    kind: str,
    code: str,
    unread: int = 0,
    extra: Mapping[str, str] | None = None,
) -> None:
    """An OpenAI-style error. With `unread` body bytes left (or a 503) the connection closes, after the body
    is drained (up to MAX_DRAIN), so the client reads this answer rather than a reset."""
    close = bool(unread) or status >= 500 or handler.close_connection
    headers = {"Connection": "close", **({"Retry-After": "1"} if status == 503 else {})} if close else {}
    headers.update(extra or {})
    _send(
        handler, status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers
    )
    if close:
        handler.close_connection = True
        left = min(unread, MAX_DRAIN)
        with contextlib.suppress(OSError):
            while left > 0 and (chunk := handler.rfile.read(min(left, CHUNK))):
                left -= len(chunk)


Answer = tuple[http.client.HTTPConnection, http.client.HTTPResponse]


class Budget:
    """At most `total` bytes of request bodies held at once; take() waits up to `wait` seconds for room."""

    def __init__(self, total: int) -> None:
        self.free = total
        self.cond = threading.Condition()

    def take(self, size: int, wait: float) -> bool:
        with self.cond:
            if not self.cond.wait_for(lambda: self.free >= size, timeout=wait):
                return False
            self.free -= size
            return True

    def give(self, size: int) -> None:
        with self.cond:
            self.free += size
            self.cond.notify_all()


def _declared_length(handler: BaseHTTPRequestHandler) -> int:
    """The request's Content-Length, 0 when absent or unreadable."""
    try:
        return max(int(handler.headers.get("Content-Length") or 0), 0)
    except ValueError:
        return 0


class Busy(BaseHTTPRequestHandler):
    """What a connection beyond MAX_CONNECTIONS gets: 503 to its first request, then the connection closes."""

    protocol_version = "HTTP/1.1"
    timeout = 5

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("busy: " + format, *args)

    def handle_one_request(self) -> None:
        self.close_connection = True
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline or not self.parse_request():
                return
            message = f"the router is serving {MAX_CONNECTIONS} connections already; retry"
            _refuse(self, 503, message, "server_error", "overloaded", _declared_length(self))
        except OSError:
            pass


class PublicServer(HTTPServer):
    """The public port: at most `limit` connections served at once, one thread each; up to `refusing` more are
    answered 503 (Busy) on threads of their own, and any beyond those are closed unanswered, so neither
    threads nor memory grow with the number of clients."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        limit: int = MAX_CONNECTIONS,
        refusing: int = MAX_REFUSING,
    ) -> None:
        self.slots = (
            (threading.BoundedSemaphore(limit), handler),
            (threading.BoundedSemaphore(refusing), Busy),
        )
        self.request_queue_size = limit + refusing  # the listen backlog
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        for slot, handler in self.slots:
            if slot.acquire(blocking=False):
                threading.Thread(
                    target=self._serve_one, args=(request, client_address, slot, handler), daemon=True
                ).start()
                return
        self.shutdown_request(request)

    def _serve_one(
        self, request: Any, client_address: Any, slot: threading.BoundedSemaphore, handler: Any
    ) -> None:
        try:
            handler(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slot.release()


class Proxy(BaseHTTPRequestHandler):
    """The public port: the allow-listed OpenAI paths, routed and forwarded to vLLM (see proxy_handler)."""

    router: Router
    budget: Budget

    protocol_version = "HTTP/1.1"
    timeout = IDLE_SECONDS
    # Headers and body go out in separate writes: with Nagle on, the body waits for the client's delayed
    # ACK (~40 ms per keep-alive answer).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("proxy: " + format, *args)

    def do_GET(self) -> None:
        self.serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def serve(self) -> None:
        path = public_path(self.path)
        if path is None or self.command not in PUBLIC_ROUTES[path]:
            # Its body is drained, not read, and the connection closes: never taken for a next request.
            unread = _declared_length(self)
            self.close_connection = self.close_connection or unread > 0 or "Transfer-Encoding" in self.headers
            if path is None:
                message, code = f"not found: this port serves {', '.join(sorted(PUBLIC_ROUTES))}", "not_found"
                _refuse(self, 404, message, "invalid_request_error", code, unread)
            else:
                message = f"{path} takes {', '.join(sorted(PUBLIC_ROUTES[path]))}"
                _refuse(self, 405, message, "invalid_request_error", "method_not_allowed", unread)
            return
        if path == "/v1/models":
            self.models()
            return
        size = self.body_size()
        if size is None:
            return
        if not self.budget.take(size, BODY_WAIT):
            message = "the router holds too many request bodies at once; retry"
            _refuse(self, 503, message, "server_error", "overloaded", size)
            return
        try:
            body = self.rfile.read(size)
            if path == "/v1/feedback":
                self.feedback(body)
                return
            conversation = self.headers.get(CONVERSATION_HEADER)
            routed = route_request(body, self.router.routes, self.router.canary, conversation)
            sample = self.sample(path, routed, body)
            del body
            forwarded = self.forward(path, routed)
        finally:
            self.budget.give(size)
        if forwarded is not None:
            self.answer(path, *forwarded, sample)

    def answer(
        self,
        path: str,
        answer: Answer,
        routed: Routed,
        latency: float,
        sample: tuple[CaptureConfig, bytes] | None,
    ) -> None:
        """Relay the engine's answer (teeing it when the chat is sampled for capture) and enqueue the chat."""
        capturing = sample is not None and 200 <= answer[1].status < 300
        tee: bytearray | None = bytearray() if capturing else None
        try:
            tee = self.relay(answer[1], routed.version, tee)
        except OSError as exc:  # the client or vLLM went away mid-answer
            log.info("relaying %s ended early: %s", path, exc)
            self.close_connection = True
            tee = None
        finally:
            answer[0].close()
        if sample is None or not capturing:
            return
        if tee is None:
            self.router.capture.drop()
            return
        streamed = "text/event-stream" in (answer[1].getheader("Content-Type") or "")
        config, request = sample
        assert routed.stable is not None and routed.version is not None
        chat = Chat(config, routed.stable, routed.version, latency * 1000, request, bytes(tee), streamed)
        self.router.capture.offer(chat)

    def sample(self, path: str, routed: Routed, body: bytes) -> tuple[CaptureConfig, bytes] | None:
        """(the capture config, the request body) when this chat of a stable name is sampled for capture."""
        if path != "/v1/chat/completions" or routed.stable is None:
            return None
        config = self.router.capture.sampled(random.random())
        if config is None:
            return None
        if len(body) > MAX_CAPTURED_BYTES:
            self.router.capture.drop()
            return None
        return config, body

    def feedback(self, body: bytes) -> None:
        """`POST /v1/feedback`: checked, then queued for the capture writer (filed beside the chats)."""
        status, document = feedback_answer(self.router.capture, body)
        if status == 200:
            _send(self, 200, document)
        else:
            _refuse(self, status, document["message"], document["type"], document["code"])

    def body_size(self) -> int | None:
        """The request body's length, or None after refusing it (chunked, bad or over MAX_BODY)."""
        if "Transfer-Encoding" in self.headers:
            message = "send the body with a Content-Length (chunked request bodies are not accepted)"
            _refuse(self, 411, message, "invalid_request_error", "length_required", 1)
            return None
        try:
            size = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            size = -1
        if size < 0:
            _refuse(self, 400, "bad Content-Length", "invalid_request_error", "bad_request", 1)
            return None
        if size > MAX_BODY:
            limit = f"{MAX_BODY} bytes ({MAX_BODY // 2**20} MiB)"
            message = f"the request body is {size} bytes; this server accepts at most {limit}"
            _refuse(self, 413, message, "invalid_request_error", "request_too_large", size)
            return None
        return size

    def forward(self, path: str, routed: Routed) -> tuple[Answer, Routed, float] | None:
        """The engine's answer to the request, with where it went and its latency (seconds to the response
        headers). A version other than the stable name's route that fails (>= 500, no answer, an injected
        fault) is counted and the request asked once more of the route (the champion). None after the router
        answered itself (a fault, or 502)."""
        began = time.monotonic()
        outcome = self.attempt(path, routed)
        if _failed(outcome) and routed.stable and routed.champion and routed.version != routed.champion:
            self.count(routed, outcome, time.monotonic() - began)
            if isinstance(outcome, tuple):
                outcome[0].close()
            log.info("%s failed (%s); asking %s", routed.version, _code(outcome), routed.champion)
            routed = routed.to(routed.champion)
            began = time.monotonic()
            outcome = self.attempt(path, routed)
        latency = time.monotonic() - began
        self.count(routed, outcome, latency)
        extra = {VERSION_HEADER: routed.version} if routed.version else {}
        if isinstance(outcome, int):
            message = f"injected fault for {routed.version} (chaos test)"
            _refuse(self, outcome, message, "server_error", "injected_fault", extra=extra)
            return None
        if isinstance(outcome, OSError):
            message = f"the model server did not answer: {outcome}"
            _refuse(self, 502, message, "server_error", "bad_gateway", extra=extra)
            return None
        return outcome, routed, latency

    def count(self, routed: Routed, outcome: Answer | int | OSError, seconds: float) -> None:
        if routed.version is not None:
            code = _code(outcome)
            self.router.canary.record(
                routed.model, routed.version, code, seconds, _failed(outcome), routed.stable
            )

    def attempt(self, path: str, routed: Routed) -> Answer | int | OSError:
        """One try: an injected fault's status, the connection error, or vLLM's answer; a 404 for a version
        this router loaded makes it load what vLLM lost and ask once more."""
        fault = self.router.faults.hit(routed.version) if routed.version else None
        if fault is not None:
            return fault
        drop = HOP_HEADERS | {"content-length"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
        if routed.body or self.command != "GET":
            headers["Content-Length"] = str(len(routed.body))
        answer = self.ask(path, routed.body, headers)
        if isinstance(answer, OSError) or answer[1].status != 404 or routed.version not in self.router.loaded:
            return answer
        answer[1].read(CHUNK)  # vLLM's "The model ... does not exist."
        answer[0].close()
        try:
            self.router.repair()
        except Exception as exc:  # answered with vLLM's 404 below; the periodic check retries
            log.warning("reloading %s failed: %s", routed.version, exc)
        return self.ask(path, routed.body, headers)

    def ask(self, path: str, body: bytes, headers: Mapping[str, str]) -> Answer | OSError:
        conn = self.router.vllm.connection()
        try:
            conn.request(self.command, path, body=body or None, headers=dict(headers))
            return conn, conn.getresponse()
        except OSError as exc:
            conn.close()
            return exc

    def relay(
        self, response: http.client.HTTPResponse, version: str | None = None, tee: bytearray | None = None
    ) -> bytearray | None:
        """vLLM's answer, streamed through in chunks as they come (SSE included), never held whole, with the
        version that answered. `tee` collects a copy (the capture) up to MAX_CAPTURED_BYTES; returned whole,
        or None when over it or the answer ended early."""
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_HEADERS | {"content-length", VERSION_HEADER.lower()}:
                self.send_header(key, value)
        if version:
            self.send_header(VERSION_HEADER, version)
        length = response.getheader("Content-Length")
        if length is not None:
            self.send_header("Content-Length", length)
            self.end_headers()
            sent = 0
            while chunk := response.read1(CHUNK):
                self.wfile.write(chunk)
                sent += len(chunk)
                tee = tee_chunk(tee, chunk)
            self.close_connection = self.close_connection or sent != int(length)
            return None if sent != int(length) else tee
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while chunk := response.read1(CHUNK):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            tee = tee_chunk(tee, chunk)
        self.wfile.write(b"0\r\n\r\n")
        return tee

    def models(self) -> None:
        try:
            status, body = self.router.vllm.call("GET", "/v1/models", timeout=30)
        except OSError as exc:
            status, body = 0, str(exc).encode()
        if status != 200:
            message = f"the model server's /v1/models answered {status}: {body[:200]!r}"
            _refuse(self, 502, message, "server_error", "bad_gateway")
            return
        _send(self, 200, with_stable_names(json.loads(body), self.router.routes))


def _failed(outcome: Answer | int | OSError) -> bool:
    """An error of the version asked: an injected fault, no answer, or the engine's >= 500."""
    return not isinstance(outcome, tuple) or outcome[1].status >= 500


def _code(outcome: Answer | int | OSError) -> str:
    if isinstance(outcome, int):
        return str(outcome)
    return "502" if isinstance(outcome, OSError) else str(outcome[1].status)


def proxy_handler(router: Router, bodies: Budget | None = None) -> type[BaseHTTPRequestHandler]:
    """The public port's handler for `router`; `bodies` bounds the request bodies held at once."""
    return type("Proxy", (Proxy,), {"router": router, "budget": bodies or Budget(BODY_BUDGET)})


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m finetune_trainer.adapter_router", description=__doc__)
    p.add_argument("--port", type=int, default=8080, help="public OpenAI port (the Service's target)")
    p.add_argument("--admin-port", type=int, default=8081, help="operator-only port: /state, /ready")
    p.add_argument("--vllm-url", default="http://127.0.0.1:8000")
    p.add_argument("--state-file", type=Path, help="the ConfigMap's desired state (JSON)")
    p.add_argument("--adapters-dir", type=Path, required=True, help="shared with vLLM (emptyDir)")
    p.add_argument(
        "--adapter-source",
        action="append",
        default=[],
        help="s3:// or pvc:// prefix adapters may be loaded from (repeatable; none: every URI is refused)",
    )
    p.add_argument(
        "--capture-destination",
        action="append",
        default=[],
        help="s3:// prefix the state's capture.prefix may lie under (repeatable; none: capture is refused)",
    )
    p.add_argument(
        "--fault-injection",
        action="store_true",
        help="serve PUT/GET /faults on the admin port (chaos tests; off: 404)",
    )
    p.add_argument(
        "--check-seconds",
        type=float,
        default=10.0,
        help="seconds between checks that vLLM lists every loaded version (a missing one is loaded again)",
    )
    p.add_argument("--log-level", default=os.environ.get("FTJ_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    args.adapters_dir.mkdir(parents=True, exist_ok=True)
    router = Router(
        Vllm(args.vllm_url),
        args.adapters_dir,
        sources=args.adapter_source,
        destinations=args.capture_destination,
        faults=Faults(enabled=args.fault_injection),
    )
    ThreadingHTTPServer.daemon_threads = True
    admin = ThreadingHTTPServer(("", args.admin_port), admin_handler(router))
    public = PublicServer(("", args.port), proxy_handler(router))
    threading.Thread(target=admin.serve_forever, name="admin", daemon=True).start()
    threading.Thread(target=router.start, args=(args.state_file,), name="initial-sync", daemon=True).start()
    stop = threading.Event()  # never set: the watcher and the capture writer live as long as the process
    threading.Thread(target=router.capture.run, args=(stop,), name="capture", daemon=True).start()
    if args.check_seconds > 0:
        threading.Thread(
            target=router.watch, args=(args.check_seconds, stop), name="watch", daemon=True
        ).start()
    log.info("adapter router on :%d (admin :%d) for vLLM at %s", args.port, args.admin_port, args.vllm_url)
    with contextlib.suppress(KeyboardInterrupt):
        public.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
