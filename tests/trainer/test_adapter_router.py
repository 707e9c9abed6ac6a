"""The ModelServer pod's adapter router (finetune_trainer.adapter_router), against a fake vLLM HTTP server:
what it accepts from the operator, the order of load / route / unload, model rewriting, and the public port's
refusals. The e2e test (tests/e2e/test_modelserver.py) runs it with real vLLM."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.adapter_router import (
    MAX_BODY,
    Budget,
    PublicServer,
    Router,
    StateError,
    Vllm,
    admin_handler,
    check_state,
    proxy_handler,
    with_stable_names,
)
from finetune_trainer.router_canary import route_request


class FakeVllm:
    """Records every request it gets and the runtime LoRA calls; answers completions for a loaded model (or
    the base) with its name and refuses any other with vLLM's 404. A completion whose prompt is "slow" waits
    for `gate`; one whose prompt is "halves" sends half its Content-Length body, then waits for `gate`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.loaded: set[str] = set()
        self.gate = threading.Event()
        self.arrived = threading.Semaphore(0)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, document: Any) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                outer.requests.append(("GET", self.path))
                if self.path == "/health":
                    self.reply(200, {})
                else:
                    data = [{"id": "base"}] + [{"id": n, "parent": "base"} for n in sorted(outer.loaded)]
                    self.reply(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                outer.requests.append(("POST", self.path))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/load_lora_adapter":
                    outer.calls.append(("load", body["lora_name"]))
                    outer.loaded.add(body["lora_name"])
                    self.reply(200, {})
                elif self.path == "/v1/unload_lora_adapter":
                    outer.calls.append(("unload", body["lora_name"]))
                    outer.loaded.discard(body["lora_name"])
                    self.reply(200, {})
                elif body["model"] not in outer.loaded | {"base"}:
                    self.reply(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
                else:
                    self.complete(body)

            def complete(self, body: dict[str, Any]) -> None:
                outer.arrived.release()
                prompt = body.get("prompt")
                if prompt == "slow":
                    outer.gate.wait(30)
                answer = json.dumps({"model": body["model"], "choices": [{"message": {"content": "Q"}}]})
                data = answer.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if prompt == "halves":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    outer.gate.wait(30)
                    data = data[len(data) // 2 :]
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def unload_behind_the_routers_back(self, name: str) -> None:
        assert call(self.url + "/v1/unload_lora_adapter", "POST", {"lora_name": name})[0] == 200


@pytest.fixture
def vllm() -> Iterator[FakeVllm]:
    fake = FakeVllm()
    yield fake
    fake.gate.set()
    fake.server.shutdown()


@pytest.fixture
def router(vllm: FakeVllm, tmp_path: Path) -> Router:
    def fetch(uri: str, dest: Path) -> None:
        dest.mkdir(parents=True)
        (dest / "adapter_config.json").write_text(json.dumps({"uri": uri}))

    return Router(Vllm(vllm.url), tmp_path, fetch=fetch, sources=["s3://r/"])


def serve(handler: type[BaseHTTPRequestHandler], server_class: Any = ThreadingHTTPServer) -> Iterator[str]:
    server = server_class(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def public(router: Router) -> Iterator[str]:
    yield from serve(proxy_handler(router), PublicServer)


@pytest.fixture
def admin(router: Router) -> Iterator[str]:
    yield from serve(admin_handler(router))


def call(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ({"adapters": {"bot": "s3://b/a"}}, "not a versioned name"),
        ({"adapters": {"bot-v1": "file:///etc"}}, "not an s3:// or pvc:// URI"),
        ({"adapters": {"bot-v1": "s3://b/../a"}}, "not an s3:// or pvc:// URI"),
        ({"adapters": {"bot-v1": "s3://b/a"}, "routes": {"bot": "bot-v2"}}, "not among the adapters"),
        ({"adapters": {"../x-v1": "s3://b/a"}}, "not a versioned name"),
        ({"adapters": {"bot-v1": "s3://other/a"}}, "not under the pool's adapter sources"),
        ({"adapters": {"bot-v1": "s3://b-evil/a"}}, "not under the pool's adapter sources"),
        ({"adapters": {"bot-v1": "pvc://b/a"}}, "not under the pool's adapter sources"),
    ],
)
def test_the_router_refuses_states_that_could_reach_a_path_or_an_unknown_version(
    state: dict[str, Any], words: str
) -> None:
    with pytest.raises(StateError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_state(state, ["s3://b"])


def test_without_adapter_sources_the_router_refuses_every_uri() -> None:
    assert check_state({"adapters": {"bot-v1": "s3://b/a"}}, ["s3://b/"])[0] == {"bot-v1": "s3://b/a"}
    with pytest.raises(StateError, match=r"none: ModelServer spec\.adapterSources"):
        check_state({"adapters": {"bot-v1": "s3://b/a"}}, [])


def test_the_admin_port_loads_nothing_from_outside_the_adapter_sources(
    router: Router, admin: str, vllm: FakeVllm
) -> None:
    router.ready = True
    status, answer = call(
        admin + "/state", "PUT", {"adapters": {"bot-v1": "s3://secrets/x"}, "routes": {"bot": "bot-v1"}}
    )
    assert status == 400 and "s3://secrets/x" in answer["error"] and "adapterSources" in answer["error"]
    assert vllm.calls == [] and router.loaded == {} and router.routes == {}


def test_the_admin_port_refuses_an_oversized_state_without_reading_it(router: Router, admin: str) -> None:
    router.ready = True
    request = urllib.request.Request(
        admin + "/state",
        data=b"{}",
        method="PUT",
        headers={"Content-Type": "application/json", "Content-Length": str(2 * 2**20)},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400 and b"too large" in refused.value.read()


def test_only_a_routed_stable_name_is_rewritten() -> None:
    routes = {"bot": "bot-v2"}
    assert json.loads(route_request(b'{"model": "bot", "x": 1}', routes).body) == {"model": "bot-v2", "x": 1}
    assert route_request(b'{"model": "bot-v1"}', routes).body == b'{"model": "bot-v1"}'
    assert route_request(b"not json", routes).body == b"not json"
    listed = with_stable_names({"data": [{"id": "base"}, {"id": "bot-v2", "parent": "base"}]}, routes)
    assert [(m["id"], m.get("root")) for m in listed["data"]] == [
        ("base", None),
        ("bot-v2", None),
        ("bot", "bot-v2"),
    ]


def test_a_new_version_is_loaded_before_the_route_switches_and_the_old_one_unloaded_after(
    router: Router, vllm: FakeVllm, admin: str, public: str
) -> None:
    router.start(None)
    assert call(admin + "/ready")[0] == 200
    status, state = call(
        admin + "/state", "PUT", {"adapters": {"bot-v1": "s3://r/a"}, "routes": {"bot": "bot-v1"}}
    )
    assert status == 200 and state["loaded"] == {"bot-v1": "s3://r/a"} and "bot-v1" in state["loadSeconds"]
    assert call(public + "/v1/chat/completions", "POST", {"model": "bot"})[1]["model"] == "bot-v1"
    call(admin + "/state", "PUT", {"adapters": {"bot-v2": "s3://r/b"}, "routes": {"bot": "bot-v2"}})
    assert vllm.calls == [("load", "bot-v1"), ("load", "bot-v2"), ("unload", "bot-v1")]
    assert call(public + "/v1/chat/completions", "POST", {"model": "bot"})[1]["model"] == "bot-v2"
    ids = {m["id"] for m in call(public + "/v1/models")[1]["data"]}
    assert ids == {"base", "bot-v2", "bot"}
    # Applying the same state again loads nothing (no reload of weights under an existing name).
    call(admin + "/state", "PUT", {"adapters": {"bot-v2": "s3://r/b"}, "routes": {"bot": "bot-v2"}})
    assert len(vllm.calls) == 3


def test_a_starting_pod_is_ready_only_after_loading_the_configmaps_adapters(
    router: Router, vllm: FakeVllm, admin: str, tmp_path: Path
) -> None:
    assert call(admin + "/ready")[0] == 503
    assert (
        call(admin + "/state", "PUT", {"adapters": {}, "routes": {}})[0] == 409
    )  # not before the first sync
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps({"adapters": {"bot-v3": "s3://r/c"}, "routes": {"bot": "bot-v3"}}))
    router.start(state_file)
    assert vllm.loaded == {"bot-v3"}
    assert call(admin + "/ready")[0] == 200 and call(admin + "/state")[1]["routes"] == {"bot": "bot-v3"}


def raw(
    base: str, method: str, target: str, body: bytes | None = None, timeout: float = 10
) -> tuple[int, dict[str, str], Any]:
    """One request with the target exactly as given (urllib would normalise some), its JSON answer."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def promoted(router: Router, admin: str) -> None:
    router.start(None)
    state = {"adapters": {"bot-v1": "s3://r/a"}, "routes": {"bot": "bot-v1"}}
    assert call(admin + "/state", "PUT", state)[0] == 200


UNLOAD = [
    "/v1/unload_lora_adapter",
    "/v1/load_lora_adapter",
    "/v1/%75nload_lora_adapter",
    "/v1%2Funload_lora_adapter",
    "/v1%2funload_lora_adapter",
    "/v1/unload%5Flora%5Fadapter",
    "/%76%31/%75%6e%6c%6f%61%64%5f%6c%6f%72%61%5f%61%64%61%70%74%65%72",
    "//v1/unload_lora_adapter",
    "/v1//unload_lora_adapter",
    "/v1/./unload_lora_adapter",
    "/v1/x/../unload_lora_adapter",
    "/v1/chat/completions/../../unload_lora_adapter",
    "/v1/chat/completions/%2e%2e/%2e%2e/unload_lora_adapter",
    "/../v1/unload_lora_adapter",
    "/V1/UNLOAD_LORA_ADAPTER",
    "/v1/unload_lora_adapter/",
    "/v1/unload_lora_adapter;x=1",
    "/v1/unload_lora_adapter?x=1",
    "/v1/%2575nload_lora_adapter",
    "/v1/unload_lora_adapter%00",
    "/v1%5Cunload_lora_adapter",
    "/v1/chat/completions;/../../unload_lora_adapter",
    "http://127.0.0.1/v1/unload_lora_adapter",
    "/v1/chat/completions%3F/../../unload_lora_adapter",
]


@pytest.mark.parametrize("target", UNLOAD)
def test_the_public_port_never_forwards_the_adapter_endpoints_however_they_are_spelled(
    router: Router, vllm: FakeVllm, admin: str, public: str, target: str
) -> None:
    promoted(router, admin)
    before = list(vllm.requests)
    status, _, answer = raw(public, "POST", target, json.dumps({"lora_name": "bot-v1"}).encode())
    assert (status, answer["error"]["code"]) == (404, "not_found"), answer
    assert vllm.requests == before and "bot-v1" in vllm.loaded  # nothing reached the engine
    assert call(public + "/v1/chat/completions", "POST", {"model": "bot"})[1]["model"] == "bot-v1"


@pytest.mark.parametrize(
    "target",
    [
        "/v1/chat/completions",
        "//v1/chat/completions",
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1/%63hat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completions?api-version=1",
    ],
)
def test_allowed_paths_are_forwarded_normalised_and_routed(
    router: Router, vllm: FakeVllm, admin: str, public: str, target: str
) -> None:
    promoted(router, admin)
    status, _, answer = raw(public, "POST", target, json.dumps({"model": "bot"}).encode())
    assert (status, answer["model"]) == (200, "bot-v1")
    assert vllm.requests[-1] == ("POST", "/v1/chat/completions")
    assert raw(public, "GET", "/v1/chat/completions")[0] == 405
    assert raw(public, "DELETE", "/v1/models")[0] == 405


def test_a_body_over_the_cap_is_refused_with_413_and_never_parsed_or_forwarded(
    router: Router, vllm: FakeVllm, admin: str, public: str
) -> None:
    promoted(router, admin)
    before = list(vllm.requests)
    big = json.dumps({"model": "bot", "prompt": "x" * MAX_BODY}).encode()
    status, _, answer = raw(public, "POST", "/v1/completions", big)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    assert answer["error"]["type"] == "invalid_request_error" and "2 MiB" in answer["error"]["message"]
    assert vllm.requests == before
    fits = json.dumps({"model": "bot", "prompt": "x" * (MAX_BODY - 100)}).encode()
    assert raw(public, "POST", "/v1/completions", fits)[2]["model"] == "bot-v1"


def wait_until(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_connections_beyond_the_limit_are_answered_503_and_the_others_complete(
    router: Router, vllm: FakeVllm, admin: str
) -> None:
    promoted(router, admin)
    server = PublicServer(("127.0.0.1", 0), proxy_handler(router), limit=2, refusing=1)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    slow = json.dumps({"model": "bot", "prompt": "slow"}).encode()
    answers: list[int] = []
    waiting = [
        threading.Thread(target=lambda: answers.append(raw(base, "POST", "/v1/completions", slow)[0]))
        for _ in range(2)
    ]
    try:
        for thread in waiting:
            thread.start()
        for _ in waiting:  # both are inside the engine: the limit is reached
            assert vllm.arrived.acquire(timeout=10)
        status, headers, answer = raw(base, "POST", "/v1/completions", slow)
        assert status == 503 and answer["error"]["code"] == "overloaded" and headers["Retry-After"] == "1"
        vllm.gate.set()
        for thread in waiting:
            thread.join(10)
        assert answers == [200, 200]
        wait_until(lambda: raw(base, "POST", "/v1/completions", slow)[0] == 200)  # slots are given back
    finally:
        vllm.gate.set()
        server.shutdown()


def test_request_bodies_held_at_once_are_bounded(
    router: Router, vllm: FakeVllm, admin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finetune_trainer.adapter_router as module

    promoted(router, admin)
    monkeypatch.setattr(module, "BODY_WAIT", 0.2)
    slow = json.dumps({"model": "bot", "prompt": "slow", "pad": "x" * 600_000}).encode()
    server = PublicServer(("127.0.0.1", 0), proxy_handler(router, Budget(1_000_000)))
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    first = threading.Thread(target=raw, args=(base, "POST", "/v1/completions", slow))
    try:
        first.start()
        assert vllm.arrived.acquire(timeout=10)  # its body is held until vLLM answers
        status, _, answer = raw(base, "POST", "/v1/completions", slow)
        assert status == 503 and answer["error"]["code"] == "overloaded"
        vllm.gate.set()
        first.join(10)
        assert raw(base, "POST", "/v1/completions", slow)[0] == 200
    finally:
        vllm.gate.set()
        server.shutdown()


def test_answers_are_streamed_through_not_buffered(
    router: Router, vllm: FakeVllm, admin: str, public: str
) -> None:
    promoted(router, admin)
    url = urllib.parse.urlsplit(public)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "bot", "prompt": "halves"}))
        response = conn.getresponse()  # vLLM sent its headers and half the body, then waits for the gate
        first = response.read1(65536)
        assert first and b"bot-v1" in first
        vllm.gate.set()
        rest = response.read()
        assert json.loads(first + rest)["model"] == "bot-v1"
    finally:
        conn.close()


def test_a_version_unloaded_behind_the_routers_back_is_loaded_again_on_the_next_request(
    router: Router, vllm: FakeVllm, admin: str, public: str
) -> None:
    promoted(router, admin)
    vllm.unload_behind_the_routers_back("bot-v1")
    status, answer = call(public + "/v1/chat/completions", "POST", {"model": "bot"})
    assert (status, answer["model"]) == (200, "bot-v1")
    assert "bot-v1" in vllm.loaded and vllm.calls[-1] == ("load", "bot-v1")
    state = call(admin + "/state")[1]
    assert state["loaded"] == {"bot-v1": "s3://r/a"} and state["reloads"] == 1


def test_the_periodic_check_reloads_a_missing_version_without_any_request(
    router: Router, vllm: FakeVllm, admin: str
) -> None:
    promoted(router, admin)
    stop = threading.Event()
    watcher = threading.Thread(target=router.watch, args=(0.05, stop), daemon=True)
    watcher.start()
    try:
        vllm.unload_behind_the_routers_back("bot-v1")
        wait_until(lambda: router.reloads == 1)
        assert "bot-v1" in vllm.loaded and call(admin + "/state")[1]["loaded"] == {"bot-v1": "s3://r/a"}
        assert vllm.calls[-2:] == [("unload", "bot-v1"), ("load", "bot-v1")]
    finally:
        stop.set()
        watcher.join(5)


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ({"adapters": {"bot-v1\n": "s3://r/a"}}, "not a versioned name"),
        ({"adapters": {"bot-v1": "s3://r/a"}, "routes": {"bot\n": "bot-v1"}}, "not a model name"),
        ({"adapters": {"bot-v1": "s3://r/a\n"}}, "not an s3:// or pvc:// URI"),
        ({"adapters": {"bot-v1": "s3://r/a\x00b"}}, "not an s3:// or pvc:// URI"),
        ({"adapters": {"bot-v1": "s3://r/a\x1bb"}}, "not an s3:// or pvc:// URI"),
        ({"adapters": {"bot-v1": "s3://r/a\x7f"}}, "not an s3:// or pvc:// URI"),
        ({"adapters": {"bot-v1": "s3://r/./a"}}, "not an s3:// or pvc:// URI"),
        ({"adapters": {"bot-v1": "s3://r/a"}, "routes": {"bot": ["bot-v1"]}}, "not among the adapters"),
    ],
)
def test_names_and_uris_with_a_final_newline_or_control_characters_are_refused(
    state: dict[str, Any], words: str, router: Router, admin: str, vllm: FakeVllm
) -> None:
    with pytest.raises(StateError, match=words):
        check_state(state, ["s3://r/"])
    router.ready = True
    status, answer = call(admin + "/state", "PUT", state)
    assert status == 400 and words in answer["error"]
    assert vllm.calls == [] and router.loaded == {}


def test_the_body_of_a_refused_request_is_never_read_as_a_next_request(
    router: Router, vllm: FakeVllm, admin: str, public: str
) -> None:
    promoted(router, admin)
    before = list(vllm.requests)
    inner = json.dumps({"model": "bot"}).encode()
    smuggled = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(inner), inner)
    outer = b"POST /v1/unload_lora_adapter HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
    url = urllib.parse.urlsplit(public)
    with socket.create_connection((url.hostname or "", url.port or 0), timeout=10) as sock:
        sock.sendall(outer + smuggled)
        received = b""
        while chunk := sock.recv(65536):  # the router closes the connection after its one answer
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 1 and received.startswith(b"HTTP/1.1 404")
    assert vllm.requests == before
