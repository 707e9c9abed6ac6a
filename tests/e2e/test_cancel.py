"""spec.cancel end to end (issue 25): a FineTuneJob whose training pod is running is cancelled with
`kubectl patch`; it ends Failed with reason Cancelled, its train Job and pods are gone (Background
propagation through the embedded garbage collector), one Normal Event says it, and it cannot be undone."""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import pytest

from .conftest import Jobs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(600)]


def _train_pods(jobs: Jobs) -> list[dict[str, Any]]:
    return jobs.list("Pod", "app.kubernetes.io/component=train")


def _wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.5)


def test_a_running_job_is_cancelled_with_kubectl_patch(jobs: Jobs, lc_kubectl_one: Any) -> None:
    # far more steps than the test waits for (the toy trains ~50 steps/s): still training at the cancel
    jobs.create("cancelled", hyperparameters={"maxSteps": 100_000}, evaluation={"enabled": False})

    def training(status: dict[str, Any]) -> bool:
        pods = _train_pods(jobs)
        return status.get("phase") == "Training" and any(p["status"].get("phase") == "Running" for p in pods)

    jobs.wait("cancelled", training, 300, "a running train pod")

    patch = json.dumps({"spec": {"cancel": True}})
    lc_kubectl_one("patch", "ftj", "cancelled", "--type", "merge", "-p", patch, namespace=jobs.namespace)
    status = jobs.wait_phase("cancelled", "Failed", "Succeeded", timeout=60)
    assert status["phase"] == "Failed", status
    assert status["message"] == "cancelled (spec.cancel) while Training"
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "Cancelled")
    assert status.get("completionTime")

    # The train Job and its pods go; the finished validation Job stays.
    _wait_until(lambda: not _train_pods(jobs), 60, "the train pods to be deleted")
    assert sorted(j["metadata"]["name"] for j in jobs.list("Job")) == ["cancelled-validate"]
    reasons = collections.Counter(e["reason"] for e in jobs.events("cancelled"))
    assert reasons["Cancelled"] == 1, reasons
    cancelled = next(e for e in jobs.events("cancelled") if e["reason"] == "Cancelled")
    assert cancelled["type"] == "Normal"

    # spec.cancel cannot be undone: the API server's transition rule names the field.
    undo = json.dumps({"spec": {"cancel": False}})
    refused = lc_kubectl_one(
        "patch", "ftj", "cancelled", "--type", "merge", "-p", undo, namespace=jobs.namespace, check=False
    )
    assert refused.returncode != 0
    assert "spec.cancel" in refused.stderr and "cannot be undone" in refused.stderr, refused.stderr
    assert jobs.get("cancelled")["spec"]["cancel"] is True
