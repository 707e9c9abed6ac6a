"""The servecheck stage (issue 22, served equals evaluated) against a tiny fake OpenAI server.

The server answers from a table (prompt → answer), refuses prompts over a length with 400 (as vLLM does past
--max-model-len), and can fail with 503 a few times first. The stage runs through the CLI (termination
message and exit code are what the operator reads).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .toy_fixtures import environment, run_stage

ROWS = [
    ("What colour is the sky?", "The sky is blue."),
    ("How many legs has a cat?", "A cat has four legs."),
    ("Capital of France?", "Paris is the capital of France."),
    ("Describe " + "a very long prompt " * 40, "It is long."),  # refused: over the fake max length
    ("Not asked", "beyond servingCheck.examples"),
]
MAX_PROMPT_CHARS = 300


class FakeEngine:
    """Answers with the expected text except for `wrong` prompts; 503 for the first `failures` requests, then
    vLLM's 404 for a model it does not hold for the next `missing` ones (a replica without the version)."""

    def __init__(self, wrong: dict[str, str], failures: int = 0, missing: int = 0) -> None:
        self.wrong, self.failures, self.missing = wrong, failures, missing
        self.requests: list[dict[str, Any]] = []
        answers = dict(ROWS)
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                engine.requests.append({"path": self.path, **body})
                prompt = body["messages"][-1]["content"]
                if engine.failures > 0:
                    engine.failures -= 1
                    self.reply(503, {"error": "loading"})
                elif engine.missing > 0:
                    engine.missing -= 1
                    message = f"The model `{body['model']}` does not exist."
                    self.reply(404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
                elif len(prompt) > MAX_PROMPT_CHARS:
                    self.reply(400, {"error": {"message": "maximum context length is 128 tokens"}})
                else:
                    text = engine.wrong.get(prompt, answers[prompt])
                    self.reply(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

            def reply(self, code: int, doc: Any) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def engine_factory() -> Iterator[Any]:
    started: list[FakeEngine] = []

    def start(wrong: dict[str, str] | None = None, failures: int = 0, missing: int = 0) -> FakeEngine:
        engine = FakeEngine(wrong or {}, failures, missing)
        threading.Thread(target=engine.server.serve_forever, daemon=True).start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.server.shutdown()
        engine.server.server_close()


@pytest.fixture
def run_prefix(tmp_path: Path) -> str:
    """A run whose validate stage committed data/test.jsonl (local storage)."""
    from finetune_trainer import manifest

    data = tmp_path / "data-src"
    data.mkdir()
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ROWS
    ]
    (data / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prefix = tmp_path / "run"
    manifest.commit_dir(data, str(prefix / "data"), kind="data")
    return str(prefix)


def config(prefix: str, url: str, metric: str = "token_f1", examples: int = 4) -> dict[str, Any]:
    return {
        "runPrefix": prefix,
        "job": {"namespace": "team-a", "name": "bot", "uid": "u1"},
        "spec": {
            "baseModel": {"uri": "hf://org/tiny"},
            "dataset": {"train": "s3://b/train.jsonl"},
            "evaluation": {"maxNewTokens": 17},
        },
        "servingCheck": {"url": url, "model": "bot-v3", "metric": metric, "examples": examples},
    }


def servecheck(tmp_path: Path, doc: dict[str, Any]) -> Any:
    with environment(FTJ_WORKDIR=str(tmp_path / "work"), FTJ_TERMINATION_LOG=str(tmp_path / "term")):
        return run_stage("servecheck", doc, tmp_path / "term")


def test_served_answers_are_scored_like_evaluate_and_refusals_count_as_wrong(
    tmp_path: Path, run_prefix: str, engine_factory: Any
) -> None:
    from finetune_trainer import metrics

    wrong = {ROWS[1][0]: "A cat has many legs."}
    engine = engine_factory(wrong)
    result = servecheck(tmp_path, config(run_prefix, engine.url))

    assert result.exit_code == 0, result.termination.get("message")
    # The first 4 held-out prompts, greedy, maxNewTokens, the versioned model name, at the chat endpoint.
    assert sorted(r["messages"][-1]["content"] for r in engine.requests) == sorted(q for q, _ in ROWS[:4])
    assert {(r["path"], r["model"], r["temperature"], r["max_tokens"]) for r in engine.requests} == {
        ("/v1/chat/completions", "bot-v3", 0, 17)
    }
    # The refused prompt scores as an empty answer, by evaluate's own scoring code.
    answers = [ROWS[0][1], wrong[ROWS[1][0]], ROWS[2][1], ""]
    expected = metrics.score_text(answers, [a for _, a in ROWS[:4]])["token_f1"]
    assert result.termination["summary"] == {
        "metric": "token_f1",
        "value": round(expected, 6),
        "examples": 4,
        "refused": 1,
    }
    assert 0 < expected < 0.75  # one wrong-ish answer and one refusal pull it below 3/4 of perfect


def test_exact_match_is_the_checked_metric_when_the_operator_names_it(
    tmp_path: Path, run_prefix: str, engine_factory: Any
) -> None:
    engine = engine_factory({ROWS[0][0]: "the sky is blue."})
    result = servecheck(tmp_path, config(run_prefix, engine.url, metric="exact_match", examples=3))
    assert result.exit_code == 0, result.termination.get("message")
    assert result.termination["summary"]["metric"] == "exact_match"
    assert result.termination["summary"]["value"] == pytest.approx(
        2 / 3, abs=1e-6
    )  # case differs: not an exact match
    assert result.termination["summary"]["refused"] == 0


def test_5xx_is_retried_then_scored(
    tmp_path: Path, run_prefix: str, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer import servecheck as module

    monkeypatch.setattr(module, "BACKOFF_S", 0.01)
    engine = engine_factory(failures=3)
    result = servecheck(tmp_path, config(run_prefix, engine.url, examples=3))
    assert result.exit_code == 0, result.termination.get("message")
    assert result.termination["summary"]["value"] == 1.0 and result.termination["summary"]["refused"] == 0
    assert len(engine.requests) == 3 + 3


def test_a_replica_without_the_version_yet_is_asked_again(
    tmp_path: Path, run_prefix: str, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool replica that joined the Service before the operator's push gave it the version answers 404 for
    it: asked again (the push, or another replica, answers), not a refusal that would fail the check."""
    from finetune_trainer import servecheck as module

    monkeypatch.setattr(module, "BACKOFF_S", 0.01)
    engine = engine_factory(missing=3)
    result = servecheck(tmp_path, config(run_prefix, engine.url, examples=3))
    assert result.exit_code == 0, result.termination.get("message")
    assert result.termination["summary"]["value"] == 1.0 and result.termination["summary"]["refused"] == 0
    assert len(engine.requests) == 3 + 3


def test_a_version_missing_for_good_is_refused(
    tmp_path: Path, run_prefix: str, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer import servecheck as module

    monkeypatch.setattr(module, "BACKOFF_S", 0.01)
    engine = engine_factory(missing=1000)
    result = servecheck(tmp_path, config(run_prefix, engine.url, examples=2))
    assert result.exit_code == 0, result.termination.get("message")
    assert result.termination["summary"]["value"] == 0.0 and result.termination["summary"]["refused"] == 2
    assert len(engine.requests) == 2 * module.ATTEMPTS


def test_unreachable_endpoint_is_transient(
    tmp_path: Path, run_prefix: str, engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer import servecheck as module
    from finetune_vocabulary.exitcodes import ExitCode

    monkeypatch.setattr(module, "BACKOFF_S", 0.01)
    engine = engine_factory()
    url = engine.url
    engine.server.shutdown()
    engine.server.server_close()
    result = servecheck(tmp_path, config(run_prefix, url, examples=2))
    assert result.exit_code == ExitCode.TRANSIENT
    assert "unreachable" in result.termination["message"]


def test_a_metric_the_trainer_cannot_compute_is_invalid_config(
    tmp_path: Path, run_prefix: str, engine_factory: Any
) -> None:
    from finetune_vocabulary.exitcodes import ExitCode

    engine = engine_factory()
    result = servecheck(tmp_path, config(run_prefix, engine.url, metric="no-such-grader", examples=1))
    assert result.exit_code == ExitCode.INVALID_CONFIG
    assert "servingCheck.metric" in result.termination["message"]


@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_prompts_and_expected_answers_come_from_any_objectives_test_set(
    tmp_path: Path, engine_factory: Any, objective: str
) -> None:
    """dpo: the chosen side is the expected answer; kto: the desirable completions only (an undesirable
    example is not asked); grpo: `expected`. The engine answers ROWS' answers, so every asked prompt scores
    1 exactly when the expected answer is ROWS' answer to it."""
    from finetune_trainer import manifest

    def prompt(q: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]

    lines: list[dict[str, Any]]
    if objective == "dpo":
        lines = [{"prompt": prompt(q), "chosen": a, "rejected": "I do not know."} for q, a in ROWS[:3]]
    elif objective == "kto":
        lines = [{"prompt": prompt(ROWS[0][0]), "completion": "Nonsense.", "label": False}]
        lines += [{"prompt": prompt(q), "completion": a, "label": True} for q, a in ROWS[:3]]
    else:
        lines = [{"prompt": prompt(q), "expected": a} for q, a in ROWS[:3]]
    data = tmp_path / "data-src"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prefix = str(tmp_path / "run")
    manifest.commit_dir(data, f"{prefix}/data", kind="data")
    engine = engine_factory()
    doc = config(prefix, engine.url, metric="exact_match", examples=3)
    doc["spec"]["objective"] = objective

    result = servecheck(tmp_path, doc)

    assert result.exit_code == 0, result.termination.get("message")
    assert result.termination["summary"] == {
        "metric": "exact_match",
        "value": 1.0,
        "examples": 3,
        "refused": 0,
    }
    assert sorted(r["messages"][-1]["content"] for r in engine.requests) == sorted(q for q, _ in ROWS[:3])
    assert all(r["messages"][0] == {"role": "system", "content": "Be brief."} for r in engine.requests)
