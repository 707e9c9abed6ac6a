"""Multi-node training end to end on the embedded cluster: a LoRA FineTuneJob with resources.nodes 2 runs
as an Indexed Job of two pods (gloo on the CPU, one process each) meeting at index 0 through the headless
Service; evicting index 1 mid-training ends the attempt for both, both restart from the checkpoint rank 0
committed, and the job succeeds with one retry counted and one continuous loss curve."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from .conftest import Jobs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(900)]

INDEX = "batch.kubernetes.io/job-completion-index"
STEPS = 80


def _train_pods(jobs: Jobs) -> list[dict[str, Any]]:
    return jobs.list("Pod", "app.kubernetes.io/component=train")


def _running(jobs: Jobs, index: str) -> dict[str, Any] | None:
    pods = [
        p
        for p in _train_pods(jobs)
        if p["status"].get("phase") == "Running" and p["metadata"]["annotations"].get(INDEX) == index
    ]
    return pods[0] if pods else None


def _progress(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if '"event": "progress"' in line]


def test_two_nodes_survive_an_eviction_of_rank_one(jobs: Jobs, lc_api: Any, local_cluster: Any) -> None:
    from kubernetes import client

    core = client.CoreV1Api(lc_api)
    jobs.create(
        "gang",
        resources={"gpus": 1, "gpuType": "a100-80gb", "nodes": 2},
        hyperparameters={"maxSteps": STEPS},
        checkpoint={"everySteps": 20, "keep": 2},
        evaluation={"enabled": False},
    )

    def rank_zero_stepping(_status: dict[str, Any]) -> bool:
        pod = _running(jobs, "0")
        if pod is None or _running(jobs, "1") is None:
            return False
        steps = _progress(core.read_namespaced_pod_log(pod["metadata"]["name"], jobs.namespace))
        return bool(steps) and steps[-1]["step"] >= 25

    jobs.wait("gang", rank_zero_stepping, 400, "both ranks running, rank 0 past step 25")
    status = jobs.status("gang")
    assert status["progress"]["parallelism"].startswith("ddp over 2 nodes x 1 ranks"), status["progress"]
    (service,) = [s for s in jobs.list("Service") if s["spec"].get("clusterIP") == "None"]
    assert service["metadata"]["name"] == "gang-train"
    victim = _running(jobs, "1")
    assert victim is not None
    name = victim["metadata"]["name"]
    evicted_at = time.monotonic()
    core.create_namespaced_pod_eviction(
        name, jobs.namespace, {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}
    )
    status = jobs.wait_phase("gang", "Succeeded", "Failed", timeout=600)
    finished_at = time.monotonic()
    assert status["phase"] == "Succeeded", status
    assert status["retries"] == 1, status
    assert status["progress"]["step"] == STEPS

    # every index ran twice; the second attempt of each rank resumed from the same committed checkpoint
    pods = _train_pods(jobs)
    by_index: dict[str, list[dict[str, Any]]] = {"0": [], "1": []}
    for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"]):
        by_index[pod["metadata"]["annotations"][INDEX]].append(pod)
    assert len(by_index["1"]) == 1 and len(by_index["0"]) == 2, [p["metadata"]["name"] for p in pods]
    # (the evicted pod is deleted by the eviction; its replacement is the one left)
    first_rank_zero = by_index["0"][0]
    assert first_rank_zero["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 21
    logs = {
        i: core.read_namespaced_pod_log(p[-1]["metadata"]["name"], jobs.namespace)
        for i, p in by_index.items()
    }
    resumed = [json.loads(line) for line in logs["0"].splitlines() if '"event": "resume"' in line]
    assert resumed and resumed[0]["step"] >= 20, logs["0"][-3000:]
    assert '"event": "resume"' in logs["1"]  # rank 1 read the same checkpoint (it writes none)
    assert '"event": "checkpoint"' not in logs["1"] and not _progress(logs["1"])  # rank 0 speaks for the run
    first = _progress(core.read_namespaced_pod_log(first_rank_zero["metadata"]["name"], jobs.namespace))
    second = _progress(logs["0"])
    assert second[0]["step"] == resumed[0]["step"] <= first[-1]["step"]

    # one loss curve: steps 1..STEPS once each, the resumed part continuing where the checkpoint left off
    s3 = local_cluster.s3_client()
    prefix = status["artifacts"]["runPrefix"].removeprefix("s3://")
    bucket, _, key = prefix.partition("/")
    metrics = json.loads(s3.get_object(Bucket=bucket, Key=f"{key}/train/metrics.json")["Body"].read())
    steps = [e["step"] for e in metrics["logHistory"] if "loss" in e]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    losses = {e["step"]: e["loss"] for e in metrics["logHistory"] if "loss" in e}
    at = resumed[0]["step"]
    before = [losses[s] for s in steps if at - 20 < s <= at]
    after = [losses[s] for s in steps if at < s <= at + 20]
    assert max(after) < 2 * max(before) and losses[steps[0]] > 2 * losses[STEPS]
    print(
        f"multi-node eviction: 2 nodes x 1 gloo process, {STEPS} steps; evicted rank 1 at step "
        f"{first[-1]['step']}, both ranks resumed from step {at}; eviction -> success "
        f"{finished_at - evicted_at:.1f} s; loss {sum(before) / len(before):.4f} (last 20 steps before) -> "
        f"{sum(after) / len(after):.4f} (first 20 after); final {losses[STEPS]:.4f}; "
        f"retries {status['retries']}"
    )
