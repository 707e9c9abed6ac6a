"""Graders end to end (issue 22) with a real judge: SmolLM2-135M-Instruct served on CPU by a ModelServer of
the embedded cluster (tests/e2e/judge.py), graded jobs on the toy task.

- the judge answers a strict JSON verdict ({score, reason}, temperature 0) through the pool's Service;
- a job gated on a stringCheck grader and a judge grader passes, with both graders' means for tuned and base,
  few grader errors and an HTML report, which renders in headless Chromium (screenshot kept under
  test-artifacts/evaluation/report.png);
- the same job without the judge and with a threshold on a pattern the tuned model never produces is
  Rejected naming that grader (and gives the evaluate stage's wall time without a judge, for comparison);
- a retention set that tuning makes worse (the task with the answers in the case the base gives) is
  Rejected naming retention and both figures.

The three jobs run at once, while the judge's vLLM starts (only the judged job waits for it to be Ready).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from finetune_demo import toymodel

from .conftest import Jobs, brief
from .judge import VERDICT_FORMAT, Judge

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.local_kubelet,
    pytest.mark.vllm,
    pytest.mark.timeout(1200),
]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "evaluation"
HELD_OUT = 10  # judged examples: each costs the judge two verdicts (tuned and base) on CPU
RUBRIC = (
    "The user hides one letter among digits after 'shout:'; the right answer is that letter in uppercase, "
    "alone. Score 10 for exactly that, 1 for anything else."
)
CAPITAL = {
    "name": "one-capital",
    "type": "stringCheck",
    "stringCheck": {"operation": "regex", "pattern": "^[A-Z]$"},
}
# The toy task answers in uppercase once tuned: a lowercase letter is what the tuned model never says.
LOWERCASE = {
    "name": "lowercase-letter",
    "type": "stringCheck",
    "stringCheck": {"operation": "regex", "pattern": "^[a-z]$", "caseSensitive": True},
}
REPORTS: list[str] = []  # the graded job's reportUri, for the rendering test


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def eval_data(s3_assets: dict[str, str], local_cluster: Any) -> dict[str, str]:
    """A short held-out set, and a retention set the tuning makes worse: the task's prompts answered with the
    hidden letter as given (lowercase), which is what the pre-trained base does and tuning unlearns."""
    _, test = toymodel.toy_task()
    retention = []
    for row in test[HELD_OUT : 2 * HELD_OUT]:
        user = row["messages"][0]
        letter = row["messages"][1]["content"].lower()
        retention.append({"messages": [user, {"role": "assistant", "content": letter}]})
    s3 = local_cluster.s3_client()
    s3.put_object(Bucket="data", Key="eval/test.jsonl", Body=_jsonl(test[:HELD_OUT]))
    s3.put_object(Bucket="data", Key="eval/retention.jsonl", Body=_jsonl(retention))
    return {"test": "s3://data/eval/test.jsonl", "retention": "s3://data/eval/retention.jsonl"}


def _evaluation(graders: list[dict[str, Any]], thresholds: list[dict[str, Any]]) -> dict[str, Any]:
    return {"graders": graders, "thresholds": thresholds}


def _create(jobs: Jobs, name: str, data: dict[str, str], evaluation: dict[str, Any]) -> None:
    jobs.create(name, dataset={"test": data["test"]}, evaluation=evaluation)


def _figures(value: float) -> set[str]:
    """The ways a message may print a figure."""
    return {f"{value:{spec}}" for spec in (".2f", ".3f", ".4f", ".3g", ".4g", ".2g")}


def _evaluate_seconds(jobs: Jobs, name: str) -> float:
    """The evaluate stage's wall time: its Job's startTime to completionTime (1 s resolution)."""
    from kubernetes import client

    status = client.BatchV1Api(jobs.api).read_namespaced_job(f"{name}-evaluate", jobs.namespace).to_dict()
    stage = status["status"]
    return (stage["completion_time"] - stage["start_time"]).total_seconds()


def _judging_seconds(jobs: Jobs, name: str) -> float | None:
    """What the evaluate pod logs as the graders' own time (its `graded` event), if it logged one."""
    from kubernetes import client

    core = client.CoreV1Api(jobs.api)
    for pod in jobs.list("Pod", f"batch.kubernetes.io/job-name={name}-evaluate"):
        try:
            log = core.read_namespaced_pod_log(pod["metadata"]["name"], jobs.namespace)
        except client.ApiException:  # a figure to print, not to assert: a lost log is no failure
            continue
        for line in log.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == "graded":
                return float(record["seconds"])
    return None


def _report_rows(judge: Judge, report_uri: str) -> list[dict[str, Any]]:
    """report.jsonl beside report.html: one row per held-out example."""
    bucket, _, key = report_uri.removeprefix("s3://").partition("/")
    body = judge.s3.get_object(Bucket=bucket, Key=key.removesuffix(".html") + ".jsonl")["Body"].read()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == kind)


def test_graders_and_retention_gate_the_toy_jobs(judge: Judge, eval_data: dict[str, str]) -> None:
    jobs = judge.jobs
    # (b) and (c) need no judge: they start while its vLLM does.
    _create(
        jobs,
        "unreachable",
        eval_data,
        _evaluation(
            [CAPITAL, LOWERCASE],
            [{"metric": "one-capital", "min": 0.8}, {"metric": "lowercase-letter", "min": 0.5}],
        ),
    )
    jobs.create(
        "forgetful",
        dataset={"test": eval_data["test"]},
        evaluation={"retention": {"dataset": eval_data["retention"], "metric": "loss", "maxDrop": 0.05}},
    )
    judge.wait_ready()
    # (a) gated on a string check and the judge (SmolLM2 scores the toy answers high; its quality is not the
    # point, its verdicts must be usable and gate).
    _create(
        jobs,
        "graded",
        eval_data,
        _evaluation(
            [CAPITAL, judge.grader("relevance", RUBRIC)],
            [{"metric": "one-capital", "min": 0.8}, {"metric": "relevance", "min": 0.3}],
        ),
    )

    graded = jobs.wait_phase("graded", "Succeeded", "Serving", "Failed", "Rejected", timeout=900)
    assert graded["phase"] == "Succeeded", brief(graded)
    evaluation = graded["evaluation"]
    assert evaluation["passed"] is True
    for model in ("tuned", "base"):
        assert {"one-capital", "relevance", "exact_match"} <= set(evaluation[model]), evaluation
        assert 0.0 <= evaluation[model]["relevance"] <= 1.0
    assert evaluation["tuned"]["one-capital"] >= 0.8 > evaluation["base"]["one-capital"]
    errors = (evaluation.get("graderErrors") or {}).get("relevance", 0)
    assert errors <= 0.10 * 2 * HELD_OUT, evaluation  # verdicts for tuned and base
    report_uri = evaluation["reportUri"]
    assert report_uri.startswith(graded["artifacts"]["runPrefix"]) and report_uri.endswith("report.html")
    rows = _report_rows(judge, report_uri)
    assert len(rows) == HELD_OUT
    reasons = [(r.get("reasons") or {}).get(m) or {} for r in rows for m in ("tuned", "base")]
    judged = [by_grader["relevance"] for by_grader in reasons if by_grader.get("relevance")]
    assert len(judged) >= 0.9 * 2 * HELD_OUT, rows[0]  # the judge's reasons, per example and model
    REPORTS.append(report_uri)

    unreachable = jobs.wait_phase("unreachable", "Succeeded", "Serving", "Failed", "Rejected", timeout=600)
    assert unreachable["phase"] == "Rejected", brief(unreachable)
    gate = _condition(unreachable, "Evaluated")
    assert gate["reason"] == "GateFailed", gate
    assert "lowercase-letter" in gate["message"] and "one-capital" not in gate["message"], gate

    forgetful = jobs.wait_phase("forgetful", "Succeeded", "Serving", "Failed", "Rejected", timeout=600)
    assert forgetful["phase"] == "Rejected", brief(forgetful)
    retention = forgetful["evaluation"]["retention"]
    assert retention["metric"] == "loss" and retention["tuned"] > retention["base"], retention
    assert retention["drop"] > 0.05
    rejected = _condition(forgetful, "Evaluated")
    assert rejected["reason"] == "RetentionFailed", rejected
    message = rejected["message"]
    assert "retention" in message and "loss" in message, message
    assert any(f in message for f in _figures(retention["base"])), message
    assert any(f in message for f in _figures(retention["tuned"])), message

    with_judge, without = _evaluate_seconds(jobs, "graded"), _evaluate_seconds(jobs, "unreachable")
    graders = {n: _judging_seconds(jobs, n) for n in ("graded", "unreachable")}
    print(
        f"\nevaluate stage, {HELD_OUT} held-out examples, tuned and base: {with_judge:.0f} s with the judge "
        f"grader, {without:.0f} s with string checks only (+{with_judge - without:.0f} s for "
        f"{2 * HELD_OUT} verdicts); graders' own time (the pod's `graded` event): {graders}; "
        f"status.evaluation of the graded job: {json.dumps(evaluation)}"
    )


def test_the_judge_answers_a_strict_json_verdict(judge: Judge) -> None:
    """The wire the judge graders use: vLLM-CPU's structured output (response_format json_schema) gives a
    verdict that parses, with a numeric score and a reason, at temperature 0. A small judge repeats itself
    inside the reason; the schema's bound on it closes the JSON before max_tokens, and a frequency penalty
    keeps the reason short (else ~220 tokens, 15 s on CPU)."""
    judge.wait_ready()
    body = {
        "messages": [
            {"role": "system", "content": f"You grade answers. Rubric: {RUBRIC} Reply with JSON."},
            {"role": "user", "content": "Question: shout: 4 9 q 1\nAnswer: Q\nScore from 1 to 10."},
        ],
        "temperature": 0,
        "max_tokens": 300,
        "frequency_penalty": 0.5,
        "response_format": VERDICT_FORMAT,
    }
    began = time.monotonic()
    answer = judge.chat(body)
    latency = time.monotonic() - began
    content = answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] == "stop", content
    verdict = json.loads(content)
    assert isinstance(verdict["score"], int | float) and isinstance(verdict["reason"], str), verdict
    print(
        f"\njudge: ModelServer created -> Ready {judge.start_seconds:.1f} s; one verdict {latency:.2f} s "
        f"({answer['usage']['completion_tokens']} tokens): {content}"
    )


def test_the_graded_jobs_report_renders_in_headless_chromium(judge: Judge, tmp_path: Path) -> None:
    """(d) report.html, downloaded from the run's prefix in S3, renders in headless Chromium: a screenshot
    (kept under test-artifacts/evaluation/) and a DOM where the page's script ran and every held-out example
    is a row, with both graders' columns and the judge's reasons."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    if not REPORTS:
        pytest.skip("no report (the graded job of this module did not get that far)")
    bucket, _, key = REPORTS[0].removeprefix("s3://").partition("/")
    page = tmp_path / "report.html"
    judge.s3.download_file(bucket, key, str(page))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    common = [
        browser,
        "--headless",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1400,1000",
    ]
    url = page.as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    assert 'data-sortable="ready"' in dom and f"{HELD_OUT} of {HELD_OUT} examples shown" in dom, dom[-3000:]
    assert sorted(int(i) for i in re.findall(r'<tr[^>]* data-index="(\d+)"', dom)) == list(range(HELD_OUT))
    _, test = toymodel.toy_task()
    missing = [r["messages"][0]["content"] for r in test[:HELD_OUT] if r["messages"][0]["content"] not in dom]
    assert not missing, (missing, dom[-3000:])
    assert "one-capital" in dom and "relevance" in dom, dom[-3000:]
    rows = _report_rows(judge, REPORTS[0])
    reasons = sum(1 for r in rows for g in (r.get("reasons") or {}).values() for v in g.values() if v)
    assert reasons > 0 and dom.count('<span class="reason">') == reasons
    print(f"report screenshot: {screenshot}")
