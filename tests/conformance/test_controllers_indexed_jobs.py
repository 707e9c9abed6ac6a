"""Indexed Jobs and headless Services, what a multi-node training Job relies on: one pod per index with
JOB_COMPLETION_INDEX, the completion-index annotation and label and the hostname `<job>-<index>`; with a
headless Service named by `subdomain`, each pod resolves and reaches another by `<job>-<index>.<service>`;
completedIndexes / failedIndexes; backoffLimitPerIndex; per-index pod logs through kubectl. Runs against a
real cluster with KUBECONFIG (image python:3.12-slim there; the embedded cluster runs the host's python3)."""

from __future__ import annotations

import re

import pytest
from kubernetes import client
from localcluster.pytest_plugin import condition, job, job_pods, wait_for

pytestmark = pytest.mark.local_kubelet

INDEX = "batch.kubernetes.io/job-completion-index"
# Index 0 listens; index 1 resolves `ring-0.ring` (waiting for the record, as a rank waits for rank 0) and
# sends its index; both print what they saw.
RING = r"""
import os, socket, time
me = int(os.environ["JOB_COMPLETION_INDEX"])
print("index", me, flush=True)
if me == 0:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 5555))
    server.listen(1)
    server.settimeout(60)
    conn, _ = server.accept()
    print("got", conn.recv(64).decode(), flush=True)
else:
    deadline = time.time() + 60
    while True:
        try:
            address = socket.gethostbyname("ring-0.ring")
            sock = socket.create_connection((address, 5555), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    sock.sendall(f"hello from {me}".encode())
    print("sent to", address, flush=True)
"""


@pytest.fixture
def ns(lc_namespace):
    return lc_namespace


def indexed_job(name: str, script: str, completions: int, **spec):
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 2,
                    "subdomain": name,
                    "containers": [
                        {"name": "main", "image": "python:3.12-slim", "command": ["python3", "-c", script]}
                    ],
                },
            },
            **spec,
        },
    }


def finished(api, ns, name):
    obj = job(api, ns, name)
    return obj if condition(obj, "Complete") or condition(obj, "Failed") else None


def test_indexed_pods_find_each_other_through_the_headless_service(lc_api, ns, lc_kubectl_one):
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ring"},
        "spec": {
            "clusterIP": "None",
            "selector": {"app": "ring"},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "ring", "port": 5555}],
        },
    }
    client.CoreV1Api(lc_api).create_namespaced_service(ns, service)
    client.BatchV1Api(lc_api).create_namespaced_job(ns, indexed_job("ring", RING, 2, backoffLimit=0))
    obj = wait_for(lambda: finished(lc_api, ns, "ring"), timeout=90, what="indexed job to finish")
    assert condition(obj, "Complete") and condition(obj, "Complete")["status"] == "True", obj["status"]
    assert obj["status"]["completedIndexes"] == "0-1" and obj["status"]["succeeded"] == 2
    pods = sorted(job_pods(lc_api, ns, "ring"), key=lambda p: p["metadata"]["annotations"][INDEX])
    assert [p["metadata"]["annotations"][INDEX] for p in pods] == ["0", "1"]
    for index, p in enumerate(pods):
        assert re.fullmatch(rf"ring-{index}-[a-z0-9]{{5}}", p["metadata"]["name"])
        assert p["metadata"]["labels"][INDEX] == str(index)
        assert p["spec"]["hostname"] == f"ring-{index}" and p["spec"]["subdomain"] == "ring"
        env = {e["name"]: e for e in p["spec"]["containers"][0]["env"]}
        assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            f"metadata.annotations['{INDEX}']"
        )
    # every index's log is reachable with kubectl logs <pod of that index>
    first = lc_kubectl_one("logs", pods[0]["metadata"]["name"], namespace=ns).stdout
    second = lc_kubectl_one("logs", pods[1]["metadata"]["name"], namespace=ns).stdout
    assert "index 0" in first and "got hello from 1" in first
    assert "index 1" in second and f"sent to {pods[0]['status']['podIP']}" in second


def test_backoff_limit_per_index_fails_only_that_index(lc_api, ns):
    script = "import os, sys; sys.exit(1 if os.environ['JOB_COMPLETION_INDEX'] == '1' else 0)"
    body = indexed_job("per-index", script, 3, backoffLimitPerIndex=1)
    client.BatchV1Api(lc_api).create_namespaced_job(ns, body)
    obj = wait_for(lambda: finished(lc_api, ns, "per-index"), timeout=60, what="indexed job to finish")
    failed = condition(obj, "Failed")
    assert failed and failed["status"] == "True" and failed["reason"] == "FailedIndexes", obj["status"]
    assert obj["status"]["completedIndexes"] == "0,2" and obj["status"]["failedIndexes"] == "1"
    assert obj["status"]["failed"] == 2 and obj["status"]["succeeded"] == 2
    ones = [p for p in job_pods(lc_api, ns, "per-index") if p["metadata"]["annotations"][INDEX] == "1"]
    counts = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-index-failure-count"] for p in ones)
    assert counts == ["0", "1"]
