"""``servecheck``: served equals evaluated. Once the operator has a version loaded in the serving engine, and
before the stable name routes to it, the first ``servingCheck.examples`` held-out prompts (the committed
``test.jsonl`` in its objective's form, with the answers evaluate compares against: chat's last assistant
turn, dpo's chosen side, kto's desirable completions, grpo's expected) go through the engine's OpenAI
endpoint, greedy, with evaluation.maxNewTokens, and the answers are scored by the same code as the evaluate
stage (metrics.score_text, or a deterministic grader). The operator compares the score with the evaluated
one; this stage only reports.

A request the engine refuses (4xx, e.g. a prompt longer than --max-model-len) is a wrong answer (score 0),
counted in ``refused``: a served model that cannot answer is not the evaluated one. 5xx answers and
connection errors are retried with backoff; an endpoint still unreachable after that is TRANSIENT. A 404
saying the checked model does not exist is retried too, and refused only if it persists: a pool replica that
became ready after the operator loaded the version (it started from an older state) joins the Service before
the operator's next push gives it the version, and the Service may send a request there meanwhile.
No key is sent: the URL is the pool's in-cluster Service, built by the operator.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary.metrics import TEXT_METRICS

from . import graders, metrics
from .config import ServingCheckTarget, TrainerConfig
from .evaluate import Example, load_test_set
from .exitcodes import InvalidConfigError, TransientError
from .termination import StageResult

log = logging.getLogger(__name__)

CONCURRENCY = 4
ATTEMPTS = 6  # per request: 5xx and connection errors (then TRANSIENT), a missing model (then refused)
BACKOFF_S = 1.0  # doubled after each failed attempt
TIMEOUT_S = 300.0  # one greedy answer on a CPU engine can take minutes
MAX_ANSWER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    text: str
    refused: str | None = None  # the engine's 4xx answer, shortened


class Unavailable(Exception):
    """A 5xx answer or a connection error: worth another try."""


def _post(url: str, body: dict[str, Any], timeout: float) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidConfigError(f"servingCheck.url: {url!r} is not an http(s) URL")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path or "/", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read(MAX_ANSWER_BYTES)
    finally:
        conn.close()


def _model_missing(data: bytes, model: str) -> bool:
    """The engine's 404 for a model it does not hold (vLLM: "The model `<name>` does not exist.")."""
    text = data[:1000].decode(errors="replace")
    return model in text and "does not exist" in text


def ask(target: ServingCheckTarget, prompt: list[dict[str, Any]], max_tokens: int) -> Answer:
    """One greedy chat completion; retried on 5xx, connection errors and a missing model, refused on 4xx
    (redirects too)."""
    url = target.url.rstrip("/") + "/chat/completions"
    body = {"model": target.model, "messages": prompt, "temperature": 0, "max_tokens": max_tokens}
    delay, last = BACKOFF_S, ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(delay)
            delay *= 2
        try:
            status, data = _post(url, body, TIMEOUT_S)
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
            continue
        if status >= 500:
            last = f"HTTP {status}: {data[:200].decode(errors='replace')}"
            continue
        if status == 404 and _model_missing(data, target.model) and attempt + 1 < ATTEMPTS:
            continue  # this replica has not got the version yet (see the module's docstring)
        if status >= 300:
            return Answer("", f"HTTP {status}: {data[:300].decode(errors='replace')}")
        try:
            doc = json.loads(data)
            return Answer(str(doc["choices"][0]["message"].get("content") or "").strip())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Answer("", f"HTTP {status}: not a chat completion: {data[:200].decode(errors='replace')}")
    raise TransientError(f"serving check: {url} unreachable after {ATTEMPTS} attempts: {last}")


def score_answers(
    config: TrainerConfig, metric: str, answers: Sequence[str], expected: Sequence[str]
) -> float:
    """The mean of `metric` by the evaluate stage's code: a text metric or a deterministic grader."""
    if metric in TEXT_METRICS:
        return metrics.score_text(answers, expected)[metric]
    found = [g for g in config.spec.evaluation.graders if g.name == metric]
    if not found:
        raise InvalidConfigError(
            f"servingCheck.metric: {metric} is neither a text metric ({', '.join(TEXT_METRICS)}) nor "
            "a grader of evaluation.graders"
        )
    values = graders.score_answers(found[0], answers, expected)
    return sum(values) / len(values) if values else 0.0


def check(config: TrainerConfig, target: ServingCheckTarget, examples: Sequence[Example]) -> dict[str, Any]:
    """Ask the engine for every example (concurrently) and score the answers: the stage's summary."""
    max_tokens = config.spec.evaluation.max_new_tokens
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        answers = list(pool.map(lambda e: ask(target, e.prompt, max_tokens), examples))
    refused = [a.refused for a in answers if a.refused is not None]
    if refused:
        log.warning(
            "%d of %d requests refused by the engine, e.g. %s", len(refused), len(answers), refused[0]
        )
    value = score_answers(config, target.metric, [a.text for a in answers], [e.reference for e in examples])
    return {
        "metric": target.metric,
        "value": round(value, 6),
        "examples": len(answers),
        "refused": len(refused),
    }


def run(config: TrainerConfig) -> StageResult:
    target = config.serving_check
    if target is None:
        raise InvalidConfigError("servingCheck: missing (the operator sets url, model, metric and examples)")
    examples = load_test_set(
        config.layout.data, config.workdir / "servecheck" / "data", config.spec.objective
    )[: target.examples]
    summary = check(config, target, examples)
    log.info("served %s scored", target.model, extra={"fields": {"event": "servecheck", **summary}})
    message = (
        f"{target.model} at {target.url}: {summary['metric']} {summary['value']:.4g} on "
        f"{summary['examples']} held-out prompts ({summary['refused']} refused)"
    )
    return StageResult(summary, message)
