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
  route switch between requests fails none. ``/v1/models`` lists vLLM's models plus the stable names. vLLM's
  own ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` are refused on the public port.

Standard library only (threads; one per connection), so it runs in the trainer image without new pins.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("finetune_trainer.adapter_router")

VERSION_NAME = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?-v[0-9]+$")
STABLE_NAME = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$")
ADAPTER_URI = re.compile(r"^(s3|pvc)://[^\s]+$")
REFUSED_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
)
MAX_BODY = 64 * 2**20  # proxied OpenAI requests
MAX_STATE_BODY = 1 * 2**20  # PUT /state: at most a few hundred adapters
MAX_ADAPTERS = 512


class StateError(ValueError):
    """A desired state the sidecar refuses (bad names or URIs)."""


def under_source(uri: str, sources: Sequence[str]) -> bool:
    """`uri` lies under one of `sources` at a path boundary (s3://b/runs does not admit s3://b/runs-x)."""
    if ".." in uri.split("/"):
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
        if not isinstance(name, str) or not VERSION_NAME.match(name) or len(name) > 64:
            raise StateError(f"adapters: {name!r} is not a versioned name <model>-v<n>")
        if not isinstance(uri, str) or not ADAPTER_URI.match(uri) or ".." in uri.split("/"):
            raise StateError(f"adapters.{name}: {uri!r} is not an s3:// or pvc:// URI")
        if not under_source(uri, sources):
            raise StateError(
                f"adapters.{name}: {uri!r} is not under the pool's adapter sources "
                f"({', '.join(sources) or 'none'}: ModelServer spec.adapterSources)"
            )
    for model, target in routes.items():
        if not isinstance(model, str) or not STABLE_NAME.match(model) or len(model) > 64:
            raise StateError(f"routes: {model!r} is not a model name")
        if target not in adapters:
            raise StateError(f"routes.{model}: {target!r} is not among the adapters")
    return dict(adapters), dict(routes)


def rewrite_model(body: bytes, routes: Mapping[str, str]) -> bytes:
    """The request body with a routed stable name replaced by its version; anything else unchanged."""
    if not routes or not body:
        return body
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict) or document.get("model") not in routes:
        return body
    document["model"] = routes[document["model"]]
    return json.dumps(document).encode()


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
        self, vllm: Vllm, adapters_dir: Path, fetch: Any = fetch_adapter, sources: Sequence[str] = ()
    ) -> None:
        self.vllm = vllm
        self.sources = tuple(sources)  # the only prefixes adapters may come from
        self.adapters_dir = adapters_dir
        self.fetch = fetch
        self.loaded: dict[str, str] = {}
        self.routes: dict[str, str] = {}
        self.ready = False
        self.error: str | None = None
        self.lock = threading.Lock()

    def state(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "loaded": dict(self.loaded),
            "routes": dict(self.routes),
            **({"error": self.error} if self.error else {}),
        }

    def apply(self, adapters: Mapping[str, str], routes: Mapping[str, str]) -> dict[str, Any]:
        """Load what is missing, switch the routes, unload what is not listed; the seconds each load took."""
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
        adapters: dict[str, str] = {}
        routes: dict[str, str] = {}
        if state_file is not None and state_file.exists():
            try:
                adapters, routes = check_state(json.loads(state_file.read_text() or "{}"), self.sources)
            except (ValueError, StateError) as exc:
                log.error("ignoring %s: %s", state_file, exc)
        while True:
            try:
                self.apply(adapters, routes)
                break
            except Exception as exc:  # retried: storage or vLLM may be briefly unavailable
                self.error = str(exc)[:500]
                log.warning("initial adapter sync failed, retrying: %s", exc)
                time.sleep(5)
        self.error = None
        self.ready = True


def _send(handler: BaseHTTPRequestHandler, status: int, document: Any) -> None:
    body = json.dumps(document).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
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
            else:
                _send(self, 404, {"error": "not found"})

        def do_PUT(self) -> None:
            if self.path != "/state":
                _send(self, 404, {"error": "not found"})
                return
            try:
                body = _read_body(self, MAX_STATE_BODY)
                adapters, routes = check_state(json.loads(body or b"{}"), router.sources)
            except (ValueError, StateError) as exc:
                self.close_connection = True  # an unread body must not be parsed as the next request
                _send(self, 400, {"error": str(exc)})
                return
            if not router.ready:
                _send(self, 409, {"error": "the initial sync has not finished", **router.state()})
                return
            try:
                _send(self, 200, router.apply(adapters, routes))
            except Exception as exc:
                log.warning("applying the state failed: %s", exc)
                _send(self, 502, {"error": str(exc)[:500], **router.state()})

    return Admin


def proxy_handler(router: Router) -> type[BaseHTTPRequestHandler]:
    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("proxy: " + format, *args)

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/v1/models":
                status, body = router.vllm.call("GET", "/v1/models", timeout=30)
                if status == 200:
                    _send(self, 200, with_stable_names(json.loads(body), router.routes))
                    return
            self.forward()

        def do_POST(self) -> None:
            self.forward()

        def do_DELETE(self) -> None:
            self.forward()

        def forward(self) -> None:
            if self.path.split("?", 1)[0] in REFUSED_PATHS:
                _send(self, 403, {"error": "adapters are managed by the operator (ModelServer)"})
                return
            try:
                body = rewrite_model(_read_body(self), router.routes)
            except StateError as exc:
                _send(self, 413, {"error": str(exc)})
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            conn = router.vllm.connection()
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                self.send_response(response.status)
                length = response.getheader("Content-Length")
                for key, value in response.getheaders():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                if length is not None:
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    self.wfile.write(response.read())
                    return
                self.send_header("Transfer-Encoding", "chunked")  # streamed answers (stream: true)
                self.end_headers()
                while chunk := response.read1(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except OSError as exc:
                log.warning("proxying %s failed: %s", self.path, exc)
                self.close_connection = True
            finally:
                conn.close()

    return Proxy


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
    p.add_argument("--log-level", default=os.environ.get("FTJ_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    args.adapters_dir.mkdir(parents=True, exist_ok=True)
    router = Router(Vllm(args.vllm_url), args.adapters_dir, sources=args.adapter_source)
    ThreadingHTTPServer.daemon_threads = True
    admin = ThreadingHTTPServer(("", args.admin_port), admin_handler(router))
    public = ThreadingHTTPServer(("", args.port), proxy_handler(router))
    threading.Thread(target=admin.serve_forever, name="admin", daemon=True).start()
    threading.Thread(target=router.start, args=(args.state_file,), name="initial-sync", daemon=True).start()
    log.info("adapter router on :%d (admin :%d) for vLLM at %s", args.port, args.admin_port, args.vllm_url)
    with contextlib.suppress(KeyboardInterrupt):
        public.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
