"""Restart safety and preemption, end to end: issue 5's (d) eviction mid-run and (e) operator restarts."""

from __future__ import annotations

import collections
import os
import signal
import time
from typing import Any

import pytest

from .conftest import Jobs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(900)]


def _running_train_pod(jobs: Jobs) -> dict[str, Any] | None:
    pods = [
        p
        for p in jobs.list("Pod", "app.kubernetes.io/component=train")
        if p["status"].get("phase") == "Running"
    ]
    return pods[0] if pods else None


def test_operator_restarted_at_three_stages_completes_without_duplicates(
    jobs: Jobs, local_cluster: Any
) -> None:
    if not hasattr(local_cluster, "_stop_operator"):
        pytest.skip("needs the embedded cluster's operator process")
    jobs.create("restarts", evaluation={"compareToBase": False})

    def restart_when(check: Any, what: str) -> None:
        jobs.wait("restarts", check, 300, what)
        local_cluster.call(local_cluster._stop_operator())
        time.sleep(2)  # the world moves on without the operator
        local_cluster.call(local_cluster._start_operator())

    restart_when(lambda s: s.get("phase") == "Validating", "Validating")
    restart_when(lambda s: (s.get("progress") or {}).get("step", 0) >= 1, "training progress")
    restart_when(lambda s: s.get("phase") == "Evaluating", "Evaluating")
    status = jobs.wait_phase("restarts", "Succeeded", "Failed", "Rejected", timeout=300)
    assert status["phase"] == "Succeeded", status
    names = sorted(j["metadata"]["name"] for j in jobs.list("Job"))
    assert names == ["restarts-evaluate", "restarts-train", "restarts-validate"]
    # One Event per transition, even across three operator restarts.
    transitions = collections.Counter(e["reason"] for e in jobs.events("restarts"))
    for reason in ("Validating", "Training", "Evaluating", "Succeeded"):
        assert transitions[reason] == 1, transitions


def test_operator_killed_with_sigkill_comes_back_and_completes_the_job(
    jobs: Jobs, local_cluster: Any
) -> None:
    """`make local-cluster` / `make demo` supervise the operator like a Deployment's pod: kill -9 it mid-run
    and it is back within seconds, and the job still finishes with one child per stage."""
    if not hasattr(local_cluster, "operator_process"):
        pytest.skip("needs the embedded cluster's operator process")
    jobs.create("sigkill", hyperparameters={"maxSteps": 10}, evaluation={"enabled": False})
    jobs.wait("sigkill", lambda s: s.get("phase") in ("Validating", "Training"), 300, "Validating")
    before, restarts = local_cluster.operator_process, getattr(local_cluster, "operator_restarts", 0)
    os.kill(before.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        current = local_cluster.operator_process
        if current.pid != before.pid and current.returncode is None:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the operator was not restarted within 15 s of kill -9")
    assert local_cluster.operator_restarts == restarts + 1
    status = jobs.wait_phase("sigkill", "Succeeded", "Failed", timeout=400)
    assert status["phase"] == "Succeeded", status
    assert sorted(j["metadata"]["name"] for j in jobs.list("Job")) == ["sigkill-train", "sigkill-validate"]


def test_evicted_trainer_resumes_from_its_checkpoint(jobs: Jobs, lc_api: Any) -> None:
    from kubernetes import client

    jobs.create("evicted", hyperparameters={"maxSteps": 600}, evaluation={"enabled": False})
    core = client.CoreV1Api(lc_api)

    def training_has_started(_status: dict[str, Any]) -> bool:
        # Read the pod's own log rather than status.progress (polled every 10 s): on an idle machine the
        # whole run can end between two polls.
        running = _running_train_pod(jobs)
        if running is None:
            return False
        log = core.read_namespaced_pod_log(running["metadata"]["name"], jobs.namespace)
        return '"event": "progress"' in log or '"event":"progress"' in log

    jobs.wait("evicted", training_has_started, 300, "training progress from a running pod")
    pod = _running_train_pod(jobs)
    assert pod is not None
    name = pod["metadata"]["name"]
    core.create_namespaced_pod_eviction(
        name, jobs.namespace, {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}
    )
    status = jobs.wait_phase("evicted", "Succeeded", "Failed", timeout=400)
    assert status["phase"] == "Succeeded", status
    assert status["retries"] == 1
    # The evicted pod is gone (eviction deletes it); its replacement resumed from the committed checkpoint.
    pods = jobs.list("Pod", "app.kubernetes.io/component=train")
    resumed = [p for p in pods if p["metadata"]["name"] != name]
    assert resumed, pods
    log = client.CoreV1Api(lc_api).read_namespaced_pod_log(resumed[-1]["metadata"]["name"], jobs.namespace)
    assert "resum" in log
    assert any(e["reason"] == "Retrying" for e in jobs.events("evicted"))
