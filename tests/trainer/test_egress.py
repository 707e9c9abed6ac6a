"""The reference API key goes to the reference endpoint only: no redirects, https unless the operator allows
plain http for the host, never a link-local / metadata address (egress.py). Real HTTP servers on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from finetune_trainer import egress
from finetune_trainer.config import EvaluationSpec, ReferenceSpec, parse_config
from finetune_trainer.evaluate import Example, score_reference

KEY = "sk-reference-key-that-must-not-travel-0123456789"
EXAMPLES = [Example([{"role": "user", "content": "q"}], "a")]


@dataclass
class Server:
    port: int
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Authorization)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"


@contextlib.contextmanager
def _serve(answer: Any) -> Iterator[Server]:
    """A loopback HTTP server that records every request's Authorization and answers ``answer(handler)``."""
    record = Server(0)

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            record.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
            status, headers, body = answer(self)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _any

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()


def _ok(_: Any) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "a"}}]}).encode()
    return 200, {"Content-Type": "application/json"}, body


@pytest.fixture
def collector() -> Iterator[Server]:
    """The other origin a hostile endpoint redirects to: it must never see the key."""
    with _serve(_ok) as server:
        yield server


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTJ_REFERENCE_API_KEY", KEY)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"])  # another port; another host name
def test_a_redirect_is_not_followed_and_the_key_stays_with_the_endpoint(
    collector: Server, status: int, target_host: str
) -> None:
    location = f"{collector.url(target_host)}/steal/chat/completions"
    with _serve(lambda _: (status, {"Location": location}, b"")) as endpoint:
        scores, answers = score_reference(
            ReferenceSpec(endpoint=endpoint.url() + "/v1", model="m"),
            EXAMPLES,
            EvaluationSpec(),
            timeout=5,
            allow_plain_http=["127.0.0.0/8", "localhost"],
        )
        assert endpoint.seen == [("POST", "/v1/chat/completions", f"Bearer {KEY}")]
    assert collector.seen == []  # the second origin never saw a request, let alone the key
    assert answers is None
    assert f"answered {status} redirecting to {location}" in scores["error"]
    assert "redirects are not followed" in scores["error"]
    assert KEY not in json.dumps(scores)


def test_plain_http_needs_the_operators_allowance(collector: Server) -> None:
    ref = ReferenceSpec(endpoint=collector.url() + "/v1", model="m")
    scores, answers = score_reference(ref, EXAMPLES, EvaluationSpec(), timeout=5)
    assert answers is None and "plain http is not allowed" in scores["error"]
    assert collector.seen == []
    scores, answers = score_reference(
        ref, EXAMPLES, EvaluationSpec(), timeout=5, allow_plain_http=["127.0.0.1"]
    )
    assert answers == ["a"] and collector.seen == [("POST", "/v1/chat/completions", f"Bearer {KEY}")]


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://169.254.169.254/latest/meta-data",
        "https://169.254.170.2/v1",  # ECS task metadata
        "http://[fd00:ec2::254]/v1",
        "http://[::ffff:169.254.169.254]/v1",
        "https://[fe80::1]/v1",
    ],
)
def test_metadata_and_link_local_addresses_are_refused_even_when_plain_http_is_allowed(endpoint: str) -> None:
    allow = ["0.0.0.0/0", "::/0"]
    with pytest.raises(egress.RefusedEndpoint, match="link-local or cloud metadata"):
        egress.check_url(endpoint, egress.PlainHttpAllowance.parse(allow))
    scores, answers = score_reference(
        ReferenceSpec(endpoint=endpoint, model="m"),
        EXAMPLES,
        EvaluationSpec(),
        timeout=2,
        allow_plain_http=allow,
    )
    assert answers is None and "metadata" in scores["error"]


def test_a_name_that_resolves_to_metadata_is_refused_before_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = socket.getaddrinfo
    connected: list[Any] = []

    def fake_dns(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "reference.evil.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 443))]
        return real(host, *args, **kwargs)

    def no_connect(self: socket.socket, address: Any) -> None:
        connected.append(address)
        raise OSError("test: no connection expected")

    monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    with pytest.raises(egress.RefusedEndpoint, match=r"resolves to 169\.254\.169\.254"):
        egress.post_json(
            "https://reference.evil.test/v1/chat/completions", {}, allowance=egress.PlainHttpAllowance()
        )
    assert connected == []


def test_plain_http_allowance_by_network_is_checked_on_the_resolved_address(
    collector: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    allowance = egress.PlainHttpAllowance.parse(["10.0.0.0/8"])
    with pytest.raises(egress.RefusedEndpoint, match=r"outside the operator's reference\.allowPlainHttp"):
        egress.post_json(collector.url("localhost") + "/v1", {}, allowance=allowance)
    assert collector.seen == []
    loopback = egress.PlainHttpAllowance.parse(["127.0.0.0/8"])
    assert egress.post_json(collector.url("localhost") + "/v1", {}, allowance=loopback)["choices"]


def test_the_config_refuses_a_bad_endpoint_before_any_stage_runs() -> None:
    """Every stage parses FTJ_CONFIG first: validate fails, naming the field, before a GPU is requested."""
    doc: dict[str, Any] = {
        "runPrefix": "/tmp/run",
        "spec": {
            "baseModel": {"uri": "hf://org/model"},
            "dataset": {"train": "s3://b/train.jsonl"},
            "evaluation": {"reference": {"endpoint": "http://gateway.internal/v1", "model": "m"}},
        },
    }
    from finetune_trainer.exitcodes import InvalidConfigError

    with pytest.raises(
        InvalidConfigError, match=r"spec\.evaluation\.reference\.endpoint: http://gateway\.internal"
    ):
        parse_config(doc)
    allowed = parse_config({**doc, "referencePolicy": {"allowPlainHttpHosts": ["gateway.internal"]}})
    assert allowed.reference_policy.allow_plain_http_hosts == ["gateway.internal"]
    doc["spec"]["evaluation"]["reference"]["endpoint"] = "https://user:pw@api.example.com/v1"
    with pytest.raises(InvalidConfigError, match="credentials in the URL"):
        parse_config(doc)
