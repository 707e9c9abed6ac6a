"""The adapter router's canary and capture (issue 24), in process against a stub engine and moto's S3: weighted
sticky routing, the version header, failover to the champion, injected faults, the live figures of GET /state,
capture (sampling, redaction, batching, streamed answers, storage down), feedback and /metrics."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.adapter_router import (
    PublicServer,
    Router,
    StateError,
    Vllm,
    admin_handler,
    check_document,
    proxy_handler,
)
from finetune_trainer.router_canary import Faults
from finetune_trainer.router_capture import Capture
from finetune_vocabulary.capture import CONVERSATION_HEADER, LATENCY_BUCKETS_MS, VERSION_HEADER

from .conftest import S3Bucket

ADAPTERS = {"bot-v1": "s3://r/one", "bot-v2": "s3://r/two"}
ROUTES = {"bot": "bot-v1"}


class Engine:
    """A stub vLLM: runtime LoRA calls, /health, /v1/models, and chat completions answered at once with
    "answer from <model>" (as SSE deltas when `stream` is set); a model in `failing` answers 500."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.failing: set[str] = set()
        self.asked: list[str] = []
        self.count = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as uvicorn: no delayed-ACK wait between headers and body

            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                data = [{"id": n} for n in sorted(outer.loaded | {"base"})]
                self.reply(200, json.dumps({"object": "list", "data": data}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("load_lora_adapter"):
                    (outer.loaded.add if self.path == "/v1/load_lora_adapter" else outer.loaded.discard)(
                        body["lora_name"]
                    )
                    self.reply(200, b"{}")
                    return
                model = body["model"]
                outer.asked.append(model)
                if model in outer.failing:
                    self.reply(500, b'{"error": {"message": "engine failure"}}')
                    return
                outer.count += 1
                ident = f"chatcmpl-{outer.count}"
                if body.get("stream"):
                    self.stream(ident, model)
                    return
                message = {"role": "assistant", "content": f"answer from {model}"}
                answer = {"id": ident, "model": model, "choices": [{"index": 0, "message": message}]}
                self.reply(200, json.dumps(answer).encode())

            def stream(self, ident: str, model: str) -> None:
                events = b"".join(
                    b"data: "
                    + json.dumps({"id": ident, "choices": [{"index": 0, "delta": {"content": part}}]}).encode()
                    + b"\n\n"
                    for part in ("answer ", "from ", model)
                )
                self.reply(200, events + b"data: [DONE]\n\n", "text/event-stream")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def engine() -> Iterator[Engine]:
    stub = Engine()
    yield stub
    stub.server.shutdown()


def serve(handler: type[BaseHTTPRequestHandler], server_class: Any = ThreadingHTTPServer) -> Iterator[str]:
    server = server_class(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def make_router(engine: Engine, tmp_path: Path, destinations: list[str], faults: bool = True) -> Router:
    def fetch(uri: str, dest: Path) -> None:
        dest.mkdir(parents=True)

    router = Router(
        Vllm(engine.url),
        tmp_path / "adapters",
        fetch=fetch,
        sources=["s3://r/"],
        destinations=destinations,
        faults=Faults(enabled=faults),
        capture=Capture(pod="pod-a"),
    )
    router.start(None)
    return router


@pytest.fixture
def router(engine: Engine, tmp_path: Path, s3: S3Bucket) -> Router:
    return make_router(engine, tmp_path, [s3.uri("capture")])


@pytest.fixture
def public(router: Router) -> Iterator[str]:
    yield from serve(proxy_handler(router), PublicServer)


@pytest.fixture
def admin(router: Router) -> Iterator[str]:
    yield from serve(admin_handler(router))


class Client:
    """One keep-alive connection to a port."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = self.conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def chat(self, content: str = "hi", headers: dict[str, str] | None = None, **extra: Any) -> tuple[int, str]:
        body = {"model": "bot", "messages": [{"role": "user", "content": content}], **extra}
        status, answer_headers, _ = self.call("POST", "/v1/chat/completions", body, headers)
        return status, answer_headers.get(VERSION_HEADER, "")


def apply(router: Router, weights: Any = None, capture: Any = None) -> dict[str, Any]:
    document = {"adapters": ADAPTERS, "routes": ROUTES, "weights": weights, "capture": capture}
    return router.apply_state(router.check(document))


def capture_on(s3: S3Bucket, rate: float = 1.0, redact: list[str] | None = None) -> dict[str, Any]:
    names = ["email", "phone", "creditCard"] if redact is None else redact
    return {"prefix": s3.uri("capture/ns/pool"), "sampleRate": rate, "redact": names, "flushSeconds": 3600}


def objects(s3: S3Bucket, prefix: str) -> list[list[dict[str, Any]]]:
    """Each object under `prefix`: its JSON lines (every line must parse: never a partial one)."""
    found = []
    for key in s3.keys(prefix):
        text = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read().decode()
        assert text.endswith("\n")
        found.append([json.loads(line) for line in text.splitlines()])
    return found


# --- canary --------------------------------------------------------------------------------------------------


def test_weights_split_unsticky_requests_as_asked_and_every_answer_names_its_version(
    router: Router, public: str, admin: str
) -> None:
    apply(router, {"bot": {"bot-v1": 80, "bot-v2": 20}})
    client = Client(public)
    versions = Counter(client.chat()[1] for _ in range(2000))
    assert set(versions) == {"bot-v1", "bot-v2"}
    # Binomial(2000, 0.2): sd ~ 17.9; 5 sd either side.
    assert abs(versions["bot-v2"] - 400) < 90
    stats = json.loads(Client(admin).call("GET", "/state")[2])["stats"]
    assert {v: s["requests"] for v, s in stats.items()} == dict(versions)
    assert all(len(s["latencyBuckets"]) == len(LATENCY_BUCKETS_MS) + 1 for s in stats.values())
    # Without weights every request goes to the route, as before.
    apply(router)
    assert {client.chat()[1] for _ in range(50)} == {"bot-v1"}


def test_requests_stick_to_a_version_by_user_then_by_conversation_header(router: Router, public: str) -> None:
    apply(router, {"bot": {"bot-v1": 50, "bot-v2": 50}})
    client = Client(public)
    by_user = {user: {client.chat(user=user)[1] for _ in range(5)} for user in (f"user-{i}" for i in range(40))}
    assert all(len(seen) == 1 for seen in by_user.values())
    assert set().union(*by_user.values()) == {"bot-v1", "bot-v2"}
    by_conversation = {
        c: {client.chat(headers={CONVERSATION_HEADER: c})[1] for _ in range(5)} for c in (f"c{i}" for i in range(40))
    }
    assert all(len(seen) == 1 for seen in by_conversation.values())
    assert set().union(*by_conversation.values()) == {"bot-v1", "bot-v2"}


@pytest.mark.parametrize("how", ["fault", "engine 500"])
def test_a_failing_challenger_is_failed_over_to_the_champion_and_counted(
    router: Router, public: str, admin: str, engine: Engine, how: str
) -> None:
    apply(router, {"bot": {"bot-v1": 50, "bot-v2": 50}})
    if how == "fault":
        status, _, body = Client(admin).call("PUT", "/faults", {"bot-v2": {"status": 503, "rate": 1.0}})
        assert status == 200 and json.loads(body) == {"bot-v2": {"status": 503, "rate": 1.0}}
    else:
        engine.failing.add("bot-v2")
    client = Client(public)
    answers = [client.chat() for _ in range(200)]
    assert answers == [(200, "bot-v1")] * 200
    stats = json.loads(Client(admin).call("GET", "/state")[2])["stats"]
    assert stats["bot-v2"]["requests"] == stats["bot-v2"]["errors"] > 50
    assert stats["bot-v1"]["requests"] == 200 and stats["bot-v1"]["errors"] == 0
    assert ("bot-v2" in engine.asked) is (how != "fault")  # a fault never reaches the engine
    # Cleared: the challenger answers again.
    engine.failing.clear()
    assert Client(admin).call("PUT", "/faults", {})[0] == 200
    assert "bot-v2" in {client.chat()[1] for _ in range(50)}


def test_the_fault_endpoints_exist_only_with_fault_injection(engine: Engine, tmp_path: Path) -> None:
    router = make_router(engine, tmp_path, [], faults=False)
    for url in serve(admin_handler(router)):
        assert Client(url).call("PUT", "/faults", {"bot-v1": {"status": 500}})[0] == 404
        assert Client(url).call("GET", "/faults")[0] == 404
    assert router.faults.table == {}


def test_a_failing_champion_is_answered_as_is(router: Router, public: str, engine: Engine, admin: str) -> None:
    apply(router)
    engine.failing.add("bot-v1")
    assert Client(public).chat() == (500, "bot-v1")
    stats = json.loads(Client(admin).call("GET", "/state")[2])["stats"]
    assert stats == {"bot-v1": {"requests": 1, "errors": 1, "latencyBuckets": stats["bot-v1"]["latencyBuckets"]}}


def test_stats_restart_when_a_models_weights_change(router: Router, public: str) -> None:
    apply(router, {"bot": {"bot-v1": 90, "bot-v2": 10}})
    client = Client(public)
    for _ in range(30):
        client.chat()
    assert sum(s["requests"] for s in router.state()["stats"].values()) == 30
    apply(router, {"bot": {"bot-v1": 90, "bot-v2": 10}})  # the same weights: kept
    assert sum(s["requests"] for s in router.state()["stats"].values()) == 30
    state = apply(router, {"bot": {"bot-v1": 50, "bot-v2": 50}})
    assert state["stats"] == {} and state["weights"] == {"bot": {"bot-v1": 50, "bot-v2": 50}}
    client.chat()
    apply(router)  # weights removed: a change too
    assert router.state()["stats"] == {}


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"weights": {"bot": {"bot-v1": 90, "bot-v3": 10}}}, "weights.bot.bot-v3: not among the adapters"),
        ({"weights": {"bot": {"bot-v1": 90, "bot-v2": 20}}}, "weights.bot: the percents sum to 110"),
        ({"weights": {"bot": {"bot-v2": 100}}}, "weights.bot: the route 'bot-v1'"),
        ({"weights": {"bot": {"bot-v1": 50.5, "bot-v2": 49.5}}}, "weights.bot.bot-v1: 50.5 is not an integer"),
        ({"weights": {"other": {"bot-v1": 100}}}, "weights.other: not among the routes"),
        ({"capture": {"prefix": "s3://elsewhere/x"}}, "capture.prefix: 's3://elsewhere/x' is not under"),
        ({"capture": {"prefix": "s3://cap/x/../y"}}, "capture.prefix"),
        ({"capture": {"prefix": "s3://cap/x", "sampleRate": 2}}, "capture.sampleRate: 2"),
        ({"capture": {"prefix": "s3://cap/x", "redact": ["ssn"]}}, "capture.redact"),
        ({"capture": {"prefix": "s3://cap/x", "flushSeconds": 0}}, "capture.flushSeconds: 0"),
    ],
)
def test_bad_state_documents_are_refused_naming_the_entry(extra: dict[str, Any], words: str) -> None:
    document = {"adapters": ADAPTERS, "routes": ROUTES, **extra}
    with pytest.raises(StateError) as refused:
        check_document(document, ["s3://r/"], ["s3://cap/"])
    assert words in str(refused.value)


def test_capture_is_refused_without_capture_destinations() -> None:
    document = {"adapters": ADAPTERS, "routes": ROUTES, "capture": {"prefix": "s3://cap/x"}}
    assert check_document(document, ["s3://r/"], ["s3://cap"]).capture is not None
    with pytest.raises(StateError, match="none: ModelServer spec.adapterSources"):
        check_document(document, ["s3://r/"], [])


def test_the_admin_port_refuses_a_bad_weight_and_keeps_the_state(router: Router, admin: str) -> None:
    apply(router, {"bot": {"bot-v1": 90, "bot-v2": 10}})
    bad = {"adapters": ADAPTERS, "routes": ROUTES, "weights": {"bot": {"bot-v1": 1}}}
    status, _, body = Client(admin).call("PUT", "/state", bad)
    assert status == 400 and "weights.bot" in json.loads(body)["error"]
    assert router.canary.weights == {"bot": {"bot-v1": 90, "bot-v2": 10}}
