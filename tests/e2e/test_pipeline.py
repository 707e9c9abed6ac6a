"""End to end on the embedded cluster: the real operator (started by the cluster), the real trainer on the
toy model, the local kubelet running pods as processes. Issue 5's scenarios (b), (c), (f), (g), (h) here;
the slow serving ones in test_serving.py."""

from __future__ import annotations

import time

import pytest

from .conftest import Jobs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(600)]


def _gpu_requests(pods: list[dict]) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in pods
        for c in p["spec"]["containers"]
        if "nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
    ]


def test_bad_dataset_fails_at_validation_and_no_pod_asks_for_a_gpu(jobs: Jobs) -> None:
    jobs.create(
        "bad-data",
        dataset={"train": jobs.assets["bad"], "test": None},
        resources={"gpus": 4, "gpuType": "a100-80gb"},
    )
    status = jobs.wait_phase("bad-data", "Failed", timeout=120)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidDataset"
    assert "train.jsonl line 2: invalid JSON" in status["message"]
    assert [j["metadata"]["name"] for j in jobs.list("Job")] == ["bad-data-validate"]
    assert _gpu_requests(jobs.list("Pod")) == []
    reasons = [e["reason"] for e in jobs.events("bad-data")]
    assert "Validating" in reasons and "InvalidDataset" in reasons


def test_sixteen_gpus_wait_with_the_schedulers_reason(jobs: Jobs) -> None:
    jobs.create("greedy", resources={"gpus": 16, "gpuType": "a100-80gb"})
    jobs.wait_phase("greedy", "Training", timeout=180)
    began = time.monotonic()
    status = jobs.wait(
        "greedy",
        lambda s: "Insufficient nvidia.com/gpu" in (s.get("message") or ""),
        30,
        "the scheduler's reason in status.message",
    )
    assert time.monotonic() - began < 30
    trained = next(c for c in status["conditions"] if c["type"] == "Trained")
    assert trained["reason"] == "Unschedulable"
    assert status["gpuHoursEstimate"] > 0
    assert any(
        e["reason"] == "Unschedulable" and "nvidia.com/gpu" in e["message"] for e in jobs.events("greedy")
    )


def test_failed_gate_rejects_and_never_deploys(jobs: Jobs) -> None:
    # An exact_match nobody reaches: the gate must fail with the numbers.
    jobs.create(
        "strict",
        evaluation={"thresholds": [{"metric": "exact_match", "min": 1.01}]},
        deployment={"enabled": True},
    )
    status = jobs.wait_phase("strict", "Rejected", "Failed", timeout=420)
    assert status["phase"] == "Rejected", status
    evaluation = status["evaluation"]
    assert evaluation["passed"] is False
    assert "exact_match" in evaluation["tuned"] and "exact_match" in evaluation["base"]
    assert any("below the minimum 1.01" in r for r in evaluation["reasons"])
    assert jobs.list("Deployment") == [] and jobs.list("Service") == []
    assert status["progress"]["step"] == status["progress"]["totalSteps"] > 0
    assert status["artifacts"]["adapter"].startswith("s3://runs/e2e/")


def test_suspend_then_resume_from_the_checkpoint(jobs: Jobs) -> None:
    # Long enough that training is still running when the suspend arrives (the job is deleted at the end).
    jobs.create("pausable", hyperparameters={"maxSteps": 5000}, evaluation={"enabled": False})
    jobs.wait("pausable", lambda s: (s.get("progress") or {}).get("step", 0) >= 2, 240, "training progress")
    jobs.patch("pausable", {"suspend": True})
    jobs.wait_phase("pausable", "Suspended", timeout=60)
    train = next(j for j in jobs.list("Job") if j["metadata"]["name"] == "pausable-train")
    assert train["spec"]["suspend"] is True
    jobs.wait(
        "pausable",
        lambda _: (
            not [
                p
                for p in jobs.list("Pod", "app.kubernetes.io/component=train")
                if p["status"].get("phase") in ("Pending", "Running")
            ]
        ),
        60,
        "the training pod to stop",
    )
    step_at_pause = (jobs.status("pausable").get("progress") or {}).get("step", 0)
    jobs.patch("pausable", {"suspend": False})
    jobs.wait_phase("pausable", "Training", timeout=60)
    status = jobs.wait(
        "pausable",
        lambda s: (s.get("progress") or {}).get("step", 0) > step_at_pause,
        240,
        "progress after resuming",
    )
    assert status["phase"] in ("Training", "Succeeded")
    reasons = [e["reason"] for e in jobs.events("pausable")]
    assert "Suspended" in reasons
    jobs.delete("pausable")


def test_deleting_a_job_mid_training_removes_its_children(jobs: Jobs) -> None:
    jobs.create("doomed", hyperparameters={"maxSteps": 5000})
    jobs.wait(
        "doomed",
        lambda s: (
            s.get("phase") == "Training"
            and bool(
                [
                    p
                    for p in jobs.list("Pod", "app.kubernetes.io/component=train")
                    if p["status"].get("phase") == "Running"
                ]
            )
        ),
        240,
        "a running training pod",
    )
    jobs.delete("doomed")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (jobs.list("Job") or jobs.list("Pod")):
        time.sleep(0.5)
    assert jobs.list("Job") == [] and jobs.list("Pod") == []
