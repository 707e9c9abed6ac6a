"""The adapter router's canary and capture (issue 24), in process against a stub engine and moto's S3:
weighted sticky routing, the version header, failover to the champion, injected faults, the live figures of
GET /state, capture (sampling, redaction, batching, streamed answers, storage down), feedback and /metrics."""

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
                    + json.dumps(
                        {"id": ident, "choices": [{"index": 0, "delta": {"content": part}}]}
                    ).encode()
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
        self.conn.request(
            method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = self.conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def chat(
        self, content: str = "hi", headers: dict[str, str] | None = None, **extra: Any
    ) -> tuple[int, str]:
        body = {"model": "bot", "messages": [{"role": "user", "content": content}], **extra}
        status, answer_headers, _ = self.call("POST", "/v1/chat/completions", body, headers)
        return status, answer_headers.get(VERSION_HEADER, "")

    def settle(self) -> None:
        """Returns once the router finished the previous requests of this connection (served in turn),
        their capture enqueued after the answer was relayed included."""
        assert self.call("GET", "/health")[0] == 200


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


# --- canary ----------------------------------------------------------------------------------------------


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
    by_user = {
        user: {client.chat(user=user)[1] for _ in range(5)} for user in (f"user-{i}" for i in range(40))
    }
    assert all(len(seen) == 1 for seen in by_user.values())
    assert set().union(*by_user.values()) == {"bot-v1", "bot-v2"}
    by_conversation = {
        c: {client.chat(headers={CONVERSATION_HEADER: c})[1] for _ in range(5)}
        for c in (f"c{i}" for i in range(40))
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


def test_a_failing_champion_is_answered_as_is(
    router: Router, public: str, engine: Engine, admin: str
) -> None:
    apply(router)
    engine.failing.add("bot-v1")
    assert Client(public).chat() == (500, "bot-v1")
    stats = json.loads(Client(admin).call("GET", "/state")[2])["stats"]
    assert stats == {
        "bot-v1": {"requests": 1, "errors": 1, "latencyBuckets": stats["bot-v1"]["latencyBuckets"]}
    }


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
        (
            {"weights": {"bot": {"bot-v1": 50.5, "bot-v2": 49.5}}},
            "weights.bot.bot-v1: 50.5 is not an integer",
        ),
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
    with pytest.raises(StateError, match=r"none: ModelServer spec\.adapterSources"):
        check_document(document, ["s3://r/"], [])


def test_the_admin_port_refuses_a_bad_weight_and_keeps_the_state(router: Router, admin: str) -> None:
    apply(router, {"bot": {"bot-v1": 90, "bot-v2": 10}})
    bad = {"adapters": ADAPTERS, "routes": ROUTES, "weights": {"bot": {"bot-v1": 1}}}
    status, _, body = Client(admin).call("PUT", "/state", bad)
    assert status == 400 and "weights.bot" in json.loads(body)["error"]
    assert router.canary.weights == {"bot": {"bot-v1": 90, "bot-v2": 10}}


# --- capture ---------------------------------------------------------------------------------------------


def test_a_sampled_fraction_of_chats_is_written_redacted_as_one_whole_object_per_flush(
    router: Router, public: str, s3: S3Bucket
) -> None:
    apply(router, {"bot": {"bot-v1": 50, "bot-v2": 50}}, capture_on(s3, rate=0.5))
    client = Client(public)
    for index in range(400):
        assert client.chat(f"mail me at jane.doe{index}@example.com or call +1 415 555 0100")[0] == 200
    assert client.call("POST", "/v1/completions", {"model": "bot", "prompt": "x"})[0] == 200  # not a chat
    client.settle()
    assert router.capture.flush() == 1
    [records] = objects(s3, "capture/ns/pool/bot/captured/")
    # Binomial(400, 0.5): sd 10; 5 sd either side.
    assert abs(len(records) - 200) < 50
    assert router.capture.counters() == {"records": len(records), "feedback": 0, "failures": 0, "dropped": 0}
    text = json.dumps(records)
    assert "@example.com" not in text and "555 0100" not in text
    assert "[email]" in text and "[phone]" in text
    for record in records:
        assert record["model"] == "bot" and record["version"] in ("bot-v1", "bot-v2")
        assert (
            record["id"].startswith("chatcmpl-") and record["latencyMs"] >= 0 and record["time"].endswith("Z")
        )
        assert record["messages"][-1] == {"role": "assistant", "content": f"answer from {record['version']}"}
    key = s3.keys("capture/ns/pool/bot/captured/")[0]
    assert key.split("/")[-1].split("-")[1:3] == ["pod", "a"]
    # Nothing queued since: no empty object.
    assert router.capture.flush() == 0 and len(s3.keys("capture/")) == 1


def test_a_streamed_answer_is_captured_assembled_from_its_deltas(
    router: Router, public: str, s3: S3Bucket
) -> None:
    apply(router, None, capture_on(s3))
    client = Client(public)
    status, headers, body = client.call(
        "POST",
        "/v1/chat/completions",
        {"model": "bot", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert status == 200 and headers[VERSION_HEADER] == "bot-v1" and body.count(b"data: ") == 4
    client.settle()
    router.capture.flush()
    [[record]] = objects(s3, "capture/ns/pool/bot/captured/")
    assert record["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "answer from bot-v1"},
    ]
    assert record["id"].startswith("chatcmpl-")


def test_with_capture_off_nothing_is_written(router: Router, public: str, s3: S3Bucket) -> None:
    apply(router)
    client = Client(public)
    for _ in range(20):
        assert client.chat("alice@example.com")[0] == 200
    client.settle()
    assert router.capture.flush() == 0 and s3.keys() == []
    assert router.capture.counters() == {"records": 0, "feedback": 0, "failures": 0, "dropped": 0}


def test_failed_answers_are_not_captured(router: Router, public: str, s3: S3Bucket, engine: Engine) -> None:
    apply(router, None, capture_on(s3))
    engine.failing.add("bot-v1")
    client = Client(public)
    assert client.chat()[0] == 500
    client.settle()
    assert router.capture.flush() == 0 and s3.keys() == []


def test_with_storage_down_requests_still_succeed_and_lost_records_are_counted(
    router: Router, public: str, s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply(router, None, capture_on(s3))
    with socket_closed_port() as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        client = Client(public)
        assert [client.chat()[0] for _ in range(5)] == [200] * 5
        client.settle()
        # Tried at this flush and the next ones, then given up and counted.
        assert [router.capture.flush() for _ in range(3)] == [0, 0, 0]
    assert router.capture.counters()["failures"] == 5 and router.capture.counters()["records"] == 0
    assert router.capture.flush() == 0  # nothing left to retry
    # Storage back: the next chats are written.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert client.chat()[0] == 200
    client.settle()
    assert router.capture.flush() == 1


def test_a_storage_outage_shorter_than_the_retries_loses_nothing(
    router: Router, public: str, s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply(router, None, capture_on(s3))
    with socket_closed_port() as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        client = Client(public)
        assert client.chat()[0] == 200
        client.settle()
        assert router.capture.flush() == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert router.capture.flush() == 1
    assert [len(lines) for lines in objects(s3, "capture/")] == [1]
    assert router.capture.counters()["failures"] == 0


class socket_closed_port:
    """A loopback port nothing listens on (bound, never listening: connections are refused)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()


def test_the_writer_thread_flushes_every_interval(router: Router, public: str, s3: S3Bucket) -> None:
    apply(router, None, {**capture_on(s3), "flushSeconds": 1})
    stop = threading.Event()
    writer = threading.Thread(target=router.capture.run, args=(stop,), daemon=True)
    writer.start()
    try:
        assert Client(public).chat()[0] == 200
        done = threading.Event()
        deadline = 20.0
        while not done.wait(0.1):
            deadline -= 0.1
            if s3.keys("capture/") or deadline <= 0:
                done.set()
        assert len(s3.keys("capture/")) == 1
    finally:
        stop.set()
        writer.join(10)


# --- feedback --------------------------------------------------------------------------------------------


def test_feedback_is_recorded_redacted_beside_the_captured_chats(
    router: Router, public: str, s3: S3Bucket
) -> None:
    client = Client(public)
    status, _, body = client.call("POST", "/v1/feedback", {"id": "chatcmpl-1", "rating": 1})
    assert status == 404 and "spec.capture" in json.loads(body)["error"]["message"]
    apply(router, None, capture_on(s3))
    correction = "write to bob@example.com instead"
    status, _, body = client.call(
        "POST", "/v1/feedback", {"id": "chatcmpl-1", "rating": -1, "correction": correction}
    )
    assert status == 200 and json.loads(body) == {"id": "chatcmpl-1", "object": "feedback", "recorded": True}
    assert client.call("POST", "/v1/feedback", {"id": "chatcmpl-2", "rating": 1})[0] == 200
    assert router.capture.flush() == 1
    [records] = objects(s3, "capture/ns/pool/feedback/")
    assert [(r["id"], r["rating"], r.get("correction")) for r in records] == [
        ("chatcmpl-1", -1, "write to [email] instead"),
        ("chatcmpl-2", 1, None),
    ]
    assert router.capture.counters()["feedback"] == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rating": 1}, "id"),
        ({"id": "../x", "rating": 1}, "id"),
        ({"id": "c1", "rating": 2}, "rating"),
        ({"id": "c1", "rating": True}, "rating"),
        ({"id": "c1", "rating": 1, "correction": 5}, "correction"),
        ({"id": "c1", "rating": 1, "correction": "x" * 40_000}, "correction"),
        ([1], "JSON object"),
    ],
)
def test_bad_feedback_is_refused_naming_the_field(
    router: Router, public: str, s3: S3Bucket, body: Any, field: str
) -> None:
    apply(router, None, capture_on(s3))
    status, _, answer = Client(public).call("POST", "/v1/feedback", body)
    error = json.loads(answer)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and field in error["message"]
    assert router.capture.flush() == 0


def test_feedback_is_not_forwarded_to_the_engine(
    router: Router, public: str, engine: Engine, s3: S3Bucket
) -> None:
    apply(router, None, capture_on(s3))
    assert Client(public).call("POST", "/v1/feedback", {"id": "c1", "rating": 1})[0] == 200
    assert engine.asked == []


# --- metrics ---------------------------------------------------------------------------------------------


def test_the_admin_port_serves_prometheus_metrics(
    router: Router, public: str, admin: str, s3: S3Bucket
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    apply(router, {"bot": {"bot-v1": 50, "bot-v2": 50}}, capture_on(s3))
    client = Client(public)
    for index in range(20):
        client.chat(user=f"u{index}")
    client.settle()
    router.capture.flush()
    status, headers, body = Client(admin).call("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    requests = {
        (s.labels["model"], s.labels["version"], s.labels["code"]): s.value
        for s in families["finetune_router_requests"].samples
    }
    assert sum(requests.values()) == 20 and {k[1] for k in requests} == {"bot-v1", "bot-v2"}
    counts = {
        s.labels["version"]: s.value
        for s in families["finetune_router_request_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts == {v: n for (_, v, _), n in requests.items()}
    inf = [
        s
        for s in families["finetune_router_request_duration_seconds"].samples
        if s.labels.get("le") == "+Inf"
    ]
    assert sum(s.value for s in inf) == 20
    records = families["finetune_capture_records"].samples
    assert [(s.labels["model"], s.value) for s in records] == [("bot", 20.0)]
    assert families["finetune_capture_failures"].samples[0].value == 0
    assert families["finetune_capture_dropped"].samples[0].value == 0
    assert families["finetune_feedback"].samples[0].value == 0


def test_the_command_line_takes_capture_destinations_and_fault_injection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from finetune_trainer.adapter_router import parse_args
    from finetune_trainer.router_capture import pod_name

    args = parse_args(
        ["--adapters-dir", "/x", "--capture-destination", "s3://a/", "--capture-destination", "s3://b/c"]
    )
    assert args.capture_destination == ["s3://a/", "s3://b/c"] and args.fault_injection is False
    assert parse_args(["--adapters-dir", "/x", "--fault-injection"]).fault_injection is True
    monkeypatch.setenv("POD_NAME", "pool-7d9f-abcde")
    assert pod_name() == "pool-7d9f-abcde" and Capture().pod == "pool-7d9f-abcde"
