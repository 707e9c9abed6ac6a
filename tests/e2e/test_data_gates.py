"""Data gates end to end (issue 15 item 4): bad or too-small data stops at the CPU validation Job, with the
line or the numbers named, before any training (GPU) pod exists; a small dataset's warnings reach a condition
and an Event; testSize never leaves training with fewer examples than the held-out set."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .conftest import Jobs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(600)]


def _example(i: int) -> dict[str, Any]:
    # Inputs the toy model's tokenizer knows (digits, lower-case letters): "upper w 4 2" → "W".
    letter = "abcdefghijklmnopqrstuvwxyz"[i % 26]
    digits = " ".join(str(int(d)) for d in f"{i:04d}")
    return {
        "messages": [
            {"role": "user", "content": f"upper {letter} {digits}"},
            {"role": "assistant", "content": letter.upper()},
        ]
    }


def _upload(jobs: Jobs, local_cluster: Any, key: str, lines: list[bytes]) -> str:
    local_cluster.s3_client().put_object(Bucket="data", Key=key, Body=b"".join(x + b"\n" for x in lines))
    return f"s3://data/{key}"


def _lines(n: int) -> list[bytes]:
    return [json.dumps(_example(i)).encode() for i in range(n)]


def _gpu_pods(jobs: Jobs) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in jobs.list("Pod")
        for c in p["spec"]["containers"]
        if "nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
    ]


def _assert_stopped_at_validation(jobs: Jobs, name: str) -> dict[str, Any]:
    status = jobs.wait_phase(name, "Failed", timeout=180)
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InvalidDataset"), status
    assert [j["metadata"]["name"] for j in jobs.list("Job")] == [f"{name}-validate"]
    assert [p["metadata"]["labels"]["app.kubernetes.io/component"] for p in jobs.list("Pod")] == ["validate"]
    assert _gpu_pods(jobs) == []
    return status


def test_a_truncated_line_fails_validation_naming_it_with_no_gpu_pod(jobs: Jobs, local_cluster: Any) -> None:
    """The issue's case: 60 lines, line 7 truncated JSON, testSize 100 — it used to train on 1 example."""
    lines = _lines(60)
    lines[6] = lines[6][:25]
    train = _upload(jobs, local_cluster, "gates/truncated.jsonl", lines)
    jobs.create(
        "truncated",
        dataset={"train": train, "test": None, "testSize": 100},
        resources={"gpus": 4, "gpuType": "a100-80gb"},
    )
    status = _assert_stopped_at_validation(jobs, "truncated")
    assert "truncated.jsonl line 7: invalid JSON" in status["message"]
    assert "dataset.maxErrorRate 0%" in status["message"]


def test_a_50_mb_line_is_a_line_error_not_an_oom_kill(jobs: Jobs, local_cluster: Any) -> None:
    """One valid but huge line used to OOM-kill the validate pod three times; now it is line 3's error."""
    lines = _lines(40)
    huge = {
        "messages": [{"role": "user", "content": "1 " * (25 * 2**20)}, {"role": "assistant", "content": "A"}]
    }
    lines[2] = json.dumps(huge).encode()
    train = _upload(jobs, local_cluster, "gates/huge-line.jsonl", lines)
    jobs.create("huge-line", dataset={"train": train, "test": None})
    status = _assert_stopped_at_validation(jobs, "huge-line")
    assert (
        "huge-line.jsonl line 3: line is 52428886 bytes, over dataset.maxLineBytes 1048576"
        in status["message"]
    )
    assert "OutOfMemory" not in json.dumps(status) and "checkpoint" not in status["message"]
    (pod,) = jobs.list("Pod")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (10, "Error")


def test_too_few_examples_fail_before_training_naming_both_numbers(jobs: Jobs, local_cluster: Any) -> None:
    train = _upload(jobs, local_cluster, "gates/tiny.jsonl", _lines(15))
    jobs.create("tiny", dataset={"train": train, "test": None}, resources={"gpus": 1, "gpuType": "a100-80gb"})
    status = _assert_stopped_at_validation(jobs, "tiny")
    assert "only 13 training examples" in status["message"]
    assert "dataset.minTrainExamples 20" in status["message"]


def test_forty_examples_keep_train_above_test_and_warn_in_a_condition_and_an_event(
    jobs: Jobs, local_cluster: Any
) -> None:
    """40 valid examples with testSize 100 used to give train 1 / test 39."""
    train = _upload(jobs, local_cluster, "gates/forty.jsonl", _lines(40))
    jobs.create(
        "forty",
        dataset={"train": train, "test": None, "testSize": 100},
        hyperparameters={"maxSteps": 2},
        evaluation={"enabled": False},
    )
    status = jobs.wait(
        "forty",
        lambda s: any(
            c["type"] == "Validated" and c["status"] != "Unknown" for c in s.get("conditions") or []
        ),
        180,
        "the Validated condition",
    )
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "True", status
    assert (status["dataset"]["train"], status["dataset"]["test"]) == (32, 8)
    assert status["dataset"]["train"] >= status["dataset"]["test"]
    assert "32 training examples, 8 held out" in validated["message"]
    assert "testSize 39 reduced to 8" in validated["message"]
    assert "at least 500 are recommended" in validated["message"]
    assert "?" not in validated["message"]
    jobs.wait(
        "forty",
        lambda _: len([e for e in jobs.events("forty") if e["reason"] == "DatasetWarning"]) >= 2,
        30,
        "the DatasetWarning Events",
    )
    warnings = [e for e in jobs.events("forty") if e["reason"] == "DatasetWarning"]
    assert {e["type"] for e in warnings} == {"Warning"}
    assert any("only 32 training examples" in e["message"] for e in warnings)
    # A warning is not a failure: training goes on, and its condition never prints '?'.
    status = jobs.wait_phase("forty", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded", status
    assert all("?" not in c["message"] for c in status["conditions"])
