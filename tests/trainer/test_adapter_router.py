"""The ModelServer pod's adapter router (finetune_trainer.adapter_router), against a fake vLLM HTTP server:
what it accepts from the operator, the order of load / route / unload, model rewriting, and the public port's
refusals. The e2e test (tests/e2e/test_modelserver.py) runs it with real vLLM."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.adapter_router import (
    Router,
    StateError,
    Vllm,
    admin_handler,
    check_state,
    proxy_handler,
    rewrite_model,
    with_stable_names,
)


class FakeVllm:
    """Records the runtime LoRA calls and echoes the model of completions, as vLLM does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.loaded: set[str] = set()
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
                if self.path == "/health":
                    self.reply(200, {})
                else:
                    data = [{"id": "base"}] + [{"id": n, "parent": "base"} for n in sorted(outer.loaded)]
                    self.reply(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/load_lora_adapter":
                    outer.calls.append(("load", body["lora_name"]))
                    outer.loaded.add(body["lora_name"])
                    self.reply(200, {})
                elif self.path == "/v1/unload_lora_adapter":
                    outer.calls.append(("unload", body["lora_name"]))
                    outer.loaded.discard(body["lora_name"])
                    self.reply(200, {})
                else:
                    self.reply(200, {"model": body["model"], "choices": [{"message": {"content": "Q"}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def vllm() -> Iterator[FakeVllm]:
    fake = FakeVllm()
    yield fake
    fake.server.shutdown()


@pytest.fixture
def router(vllm: FakeVllm, tmp_path: Path) -> Router:
    def fetch(uri: str, dest: Path) -> None:
        dest.mkdir(parents=True)
        (dest / "adapter_config.json").write_text(json.dumps({"uri": uri}))

    return Router(Vllm(vllm.url), tmp_path, fetch=fetch, sources=["s3://r/"])


def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def public(router: Router) -> Iterator[str]:
    yield from serve(proxy_handler(router))


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
    assert json.loads(rewrite_model(b'{"model": "bot", "x": 1}', routes)) == {"model": "bot-v2", "x": 1}
    assert rewrite_model(b'{"model": "bot-v1"}', routes) == b'{"model": "bot-v1"}'
    assert rewrite_model(b"not json", routes) == b"not json"
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


def test_the_public_port_refuses_vllms_own_adapter_endpoints(
    router: Router, vllm: FakeVllm, public: str
) -> None:
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        status, _ = call(public + path, "POST", {"lora_name": "evil", "lora_path": "/etc"})
        assert status == 403
    assert vllm.calls == []
