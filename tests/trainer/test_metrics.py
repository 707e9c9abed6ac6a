"""Evaluation metrics (exact match, token F1, ROUGE-L, perplexity) and the reference API model scoring."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from finetune_trainer import metrics
from finetune_trainer.config import EvaluationSpec, ReferenceSpec
from finetune_trainer.evaluate import Example, examples_from_chat, score_reference


@pytest.mark.parametrize(
    ("prediction", "reference", "em", "f1", "rouge"),
    [
        ("Paris", "Paris", 1.0, 1.0, 1.0),
        ("  Paris \n", "Paris", 1.0, 1.0, 1.0),  # whitespace does not count
        ("paris", "Paris", 0.0, 0.0, 0.0),  # case does
        ("the cat sat", "the cat sat down", 0.0, 2 * 0.75 / 1.75, 2 * 0.75 / 1.75),
        ("sat cat the", "the cat sat", 0.0, 1.0, 1 / 3),  # F1 ignores order, ROUGE-L does not
        ("", "answer", 0.0, 0.0, 0.0),
        ("a a b", "a b b", 0.0, 2 / 3, 2 / 3),  # token counts are clipped
    ],
)
def test_text_metrics(prediction: str, reference: str, em: float, f1: float, rouge: float) -> None:
    assert metrics.exact_match(prediction, reference) == em
    assert metrics.token_f1(prediction, reference) == pytest.approx(f1)
    assert metrics.rouge_l(prediction, reference) == pytest.approx(rouge)


def test_scores_are_means_over_examples() -> None:
    scores = metrics.score_text(["A B", "C", "x"], ["A B", "C D", "y"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["token_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.score_text(["a", "b"], ["a"])


def test_loss_and_perplexity() -> None:
    out = metrics.loss_metrics(nll_sum=6.0, n_tokens=3)
    assert out["loss"] == 2.0 and out["perplexity"] == pytest.approx(math.exp(2.0))
    assert metrics.loss_metrics(1.0, 0) == {}


def test_examples_split_before_the_last_assistant_turn() -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        }
    ]
    (example,) = examples_from_chat(rows)
    assert example.reference == "a2" and [m["content"] for m in example.prompt] == ["s", "q1", "a1", "q2"]


class _FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint: answers the uppercase of the last user message for even digits only."""

    seen_auth: list[str] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen_auth.append(self.headers.get("Authorization", ""))
        if self.path != "/v1/chat/completions" or body.get("temperature") != 0:
            self.send_response(400)
            self.end_headers()
            return
        question = body["messages"][-1]["content"]
        answer = question.upper() if int(question[-1]) % 2 == 0 else "no idea"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_openai() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def test_reference_model_is_scored_like_the_others(fake_openai: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTJ_REFERENCE_API_KEY", "sk-test-reference-key-123456")
    _FakeOpenAI.seen_auth.clear()
    examples = [Example([{"role": "user", "content": f"item {i}"}], f"ITEM {i}") for i in range(4)]
    ev = EvaluationSpec(metrics=["exact_match", "token_f1"])
    scores, answers = score_reference(
        ReferenceSpec(endpoint=fake_openai, model="ref-1"), examples, ev, allow_plain_http=["127.0.0.1"]
    )
    assert answers == ["ITEM 0", "no idea", "ITEM 2", "no idea"]
    assert scores == {"exact_match": 0.5, "token_f1": 0.5}
    assert set(_FakeOpenAI.seen_auth) == {"Bearer sk-test-reference-key-123456"}


def test_unreachable_reference_is_reported_not_fatal_and_keeps_the_key_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FTJ_REFERENCE_API_KEY", "sk-test-reference-key-123456")
    ref = ReferenceSpec(endpoint="http://127.0.0.1:9/v1", model="ref-1")
    scores, answers = score_reference(
        ref,
        [Example([{"role": "user", "content": "q"}], "a")],
        EvaluationSpec(),
        timeout=2,
        allow_plain_http=["127.0.0.0/8"],
    )
    assert answers is None and "ref-1" in scores["error"]
    assert "sk-test-reference-key" not in json.dumps(scores)
