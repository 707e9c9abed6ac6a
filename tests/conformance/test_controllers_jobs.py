"""Job controller: retries, pod failure policy, suspend, deadline and the 1.31+ condition sequence."""

from __future__ import annotations

import re
import sys

import pytest
from kubernetes import client
from localcluster.pytest_plugin import condition, events, job, job_pods, pod, wait_for

pytestmark = pytest.mark.local_kubelet
PY = sys.executable


@pytest.fixture
def ns(lc_namespace):
    return lc_namespace


def create_job(api, ns, name, command, **spec):
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{"name": "main", "image": "busybox", "command": command}],
                }
            },
            **spec,
        },
    }
    client.BatchV1Api(api).create_namespaced_job(ns, body)


def finished(api, ns, name):
    obj = job(api, ns, name)
    for kind in ("Complete", "Failed"):
        cond = condition(obj, kind)
        if cond and cond["status"] == "True":
            return obj
    return None


def test_job_completes_with_real_pod_names_labels_and_conditions(lc_api, ns, lc_kubectl_one):
    create_job(lc_api, ns, "ok", ["sh", "-c", "echo done"])
    lc_kubectl_one("wait", "--for=condition=Complete", "job/ok", "--timeout=30s", namespace=ns)
    obj = job(lc_api, ns, "ok")
    status = obj["status"]
    assert status["succeeded"] == 1 and not status.get("failed") and not status.get("active")
    assert status["startTime"] and status["completionTime"]
    assert condition(obj, "SuccessCriteriaMet")["reason"] == "CompletionsReached"
    assert condition(obj, "Complete")["reason"] == "CompletionsReached"
    (only,) = job_pods(lc_api, ns, "ok")
    assert re.fullmatch(r"ok-[bcdfghjklmnpqrstvwxz2456789]{5}", only["metadata"]["name"])
    labels = only["metadata"]["labels"]
    assert labels["batch.kubernetes.io/job-name"] == "ok"
    assert labels["batch.kubernetes.io/controller-uid"] == obj["metadata"]["uid"]
    owner = only["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "Job",
        "ok",
        obj["metadata"]["uid"],
        True,
    )
    assert any(e["reason"] == "SuccessfulCreate" for e in events(lc_api, ns, "ok"))


def test_backoff_limit_two_retries_twice_then_fails(lc_api, ns):
    create_job(lc_api, ns, "flaky", ["sh", "-c", "exit 1"], backoffLimit=2)
    obj = wait_for(lambda: finished(lc_api, ns, "flaky"), timeout=45, what="job to finish")
    failed = condition(obj, "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"] == "Job has reached the specified backoff limit"
    assert condition(obj, "FailureTarget")["reason"] == "BackoffLimitExceeded"
    assert obj["status"]["failed"] == 3
    assert not obj["status"].get("active")
    pods = job_pods(lc_api, ns, "flaky")
    assert len(pods) == 3
    assert all(p["status"]["phase"] == "Failed" for p in pods)


def test_pod_failure_policy_fail_job_on_exit_code(lc_api, ns):
    policy = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}}
        ]
    }
    create_job(lc_api, ns, "fatal", ["sh", "-c", "exit 42"], backoffLimit=6, podFailurePolicy=policy)
    obj = wait_for(lambda: finished(lc_api, ns, "fatal"), timeout=30, what="job to fail")
    failed = condition(obj, "Failed")
    (only,) = job_pods(lc_api, ns, "fatal")
    assert failed["reason"] == "PodFailurePolicy"
    assert failed["message"] == (
        f"Container main for pod {ns}/{only['metadata']['name']} failed with exit code 42 "
        "matching FailJob rule at index 0"
    )
    assert obj["status"]["failed"] == 1


def test_pod_failure_policy_ignores_disruption(lc_api, ns):
    policy = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    create_job(
        lc_api,
        ns,
        "tolerant",
        [PY, "-c", "import time; time.sleep(30)"],
        backoffLimit=0,
        podFailurePolicy=policy,
    )

    def running_pod():
        pods = [p for p in job_pods(lc_api, ns, "tolerant") if p["status"].get("phase") == "Running"]
        return pods[0] if pods else None

    first = wait_for(running_pod, what="first pod running")["metadata"]["name"]
    client.CoreV1Api(lc_api).create_namespaced_pod_eviction(
        first,
        ns,
        {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": first, "namespace": ns}},
    )
    second = wait_for(
        lambda: (p := running_pod()) and p["metadata"]["name"] != first and p,
        timeout=30,
        what="replacement pod",
    )
    obj = job(lc_api, ns, "tolerant")
    assert second["metadata"]["name"].startswith("tolerant-")
    assert not obj["status"].get("failed")
    assert condition(obj, "Failed") is None


def test_suspend_and_resume(lc_api, ns):
    create_job(lc_api, ns, "later", [PY, "-c", "import time; time.sleep(30)"], suspend=True)
    obj = wait_for(
        lambda: (o := job(lc_api, ns, "later")) and condition(o, "Suspended") and o, what="Suspended"
    )
    suspended = condition(obj, "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", "JobSuspended")
    assert job_pods(lc_api, ns, "later") == []
    batch = client.BatchV1Api(lc_api)
    batch.patch_namespaced_job("later", ns, {"spec": {"suspend": False}})
    wait_for(
        lambda: any(p["status"].get("phase") == "Running" for p in job_pods(lc_api, ns, "later")),
        what="pod running after resume",
    )
    resumed = condition(job(lc_api, ns, "later"), "Suspended")
    assert (resumed["status"], resumed["reason"]) == ("False", "JobResumed")
    batch.patch_namespaced_job("later", ns, {"spec": {"suspend": True}})
    wait_for(
        lambda: (
            job_pods(lc_api, ns, "later") == []
            or all(p["metadata"].get("deletionTimestamp") for p in job_pods(lc_api, ns, "later"))
        ),
        what="pods deleted",
    )
    obj = wait_for(
        lambda: (o := job(lc_api, ns, "later")) and not o["status"].get("active") and o,
        what="active back to 0",
    )
    assert condition(obj, "Suspended")["status"] == "True"
    assert not obj["status"].get("failed")  # pods removed by suspension are not failures


def test_active_deadline_seconds(lc_api, ns):
    create_job(lc_api, ns, "slow", [PY, "-c", "import time; time.sleep(60)"], activeDeadlineSeconds=2)
    obj = wait_for(lambda: finished(lc_api, ns, "slow"), timeout=20, what="deadline")
    failed = condition(obj, "Failed")
    assert failed["reason"] == "DeadlineExceeded"
    assert failed["message"] == "Job was active longer than specified deadline"
    assert not obj["status"].get("active")
    for p in job_pods(lc_api, ns, "slow"):
        assert p["metadata"].get("deletionTimestamp") or p["status"]["phase"] == "Failed"
    _ = pod


@pytest.mark.parametrize("policy", ["TerminatingOrFailed", "Failed"])
def test_pod_replacement_policy(lc_api, ns, policy):
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "r"},
        "spec": {
            "backoffLimit": 3,
            "podReplacementPolicy": policy,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 3,
                    "containers": [{"name": "main", "image": "busybox", "command": [PY, "-c", stubborn]}],
                }
            },
        },
    }
    client.BatchV1Api(lc_api).create_namespaced_job(ns, body)
    first = wait_for(
        lambda: [p for p in job_pods(lc_api, ns, "r") if p["status"].get("phase") == "Running"],
        what="pod running",
    )[0]["metadata"]["name"]
    client.CoreV1Api(lc_api).delete_namespaced_pod(first, ns)
    obj = wait_for(
        lambda: (o := job(lc_api, ns, "r"))["status"].get("terminating") == 1 and o,
        what="terminating counted",
    )
    names = lambda: {p["metadata"]["name"] for p in job_pods(lc_api, ns, "r")}  # noqa: E731
    if policy == "TerminatingOrFailed":
        wait_for(lambda: len(names()) == 2, timeout=2.5, what="replacement while the old pod terminates")
        assert pod(lc_api, ns, first)["metadata"]["deletionTimestamp"]
    else:
        assert obj["status"].get("active", 0) == 0
        assert names() == {first}
        wait_for(
            lambda: first not in names() and len(names()) == 1, timeout=10, what="replacement after removal"
        )
    final = wait_for(
        lambda: (o := job(lc_api, ns, "r"))["status"].get("failed") == 1 and o,
        timeout=10,
        what="deleted pod counted as failed",
    )
    assert final["status"]["active"] == 1


def test_ttl_after_finished_deletes_the_job_and_its_pods(lc_api, ns):
    create_job(lc_api, ns, "brief", ["true"], ttlSecondsAfterFinished=1)

    def gone():
        try:
            job(lc_api, ns, "brief")
        except client.ApiException as err:
            return err.status == 404
        return False

    wait_for(gone, timeout=20, what="job removed after its TTL")
    wait_for(lambda: job_pods(lc_api, ns, "brief") == [], timeout=20, what="pods garbage-collected")


def test_job_completes_through_api_errors_and_dropped_watches(lc_api, ns, local_cluster):
    """The controllers are API clients: injected 500s, 409s, 429s and broken watches only slow them down."""
    api = local_cluster.apiserver
    # Counted faults (every matching request fails until the count is spent), not a rate: each must fire in
    # every run, and the test checks the faults' own hits, not the cluster-wide counters other tests share.
    faults = {}

    async def inject():
        faults["pod status"] = api.add_fault("update", "pods/status", 500, count=2, namespace=ns)
        faults["job status"] = api.add_fault("update", "jobs/status", 409, count=2, namespace=ns)
        faults["pod create"] = api.add_fault("create", "pods", 429, count=2, namespace=ns)

    async def drop():
        return api.drop_watches("pods")

    async def clear():
        for fault in faults.values():
            api.remove_fault(fault)

    local_cluster.call(inject())
    try:
        command = [PY, "-c", "import time; time.sleep(1)"]
        create_job(lc_api, ns, "sturdy", command, completions=2, parallelism=1)
        assert local_cluster.call(drop()) >= 1
        obj = wait_for(lambda: finished(lc_api, ns, "sturdy"), timeout=45, what="the job to finish")
    finally:
        local_cluster.call(clear())
    assert condition(obj, "Complete")["status"] == "True"
    assert obj["status"]["succeeded"] == 2 and not obj["status"].get("failed")
    assert len(job_pods(lc_api, ns, "sturdy")) == 2
    assert {what: fault.hits for what, fault in faults.items()} == {what: 2 for what in faults}


def test_pod_replacement_policy_defaults_like_kube_apiserver(lc_api, ns):
    """Failed when the Job has a podFailurePolicy (replacement only after a pod failed), else
    TerminatingOrFailed."""
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]}
    create_job(lc_api, ns, "with-policy", ["sh", "-c", "true"], podFailurePolicy=policy)
    create_job(lc_api, ns, "without-policy", ["sh", "-c", "true"])
    assert job(lc_api, ns, "with-policy")["spec"]["podReplacementPolicy"] == "Failed"
    assert job(lc_api, ns, "without-policy")["spec"]["podReplacementPolicy"] == "TerminatingOrFailed"


def test_an_oom_killed_pod_fails_the_job_at_once_under_the_operators_policy(lc_api, ns):
    """kubelet reports OOMKilled with exit code 137; a podFailurePolicy matches exit codes, so the operator's
    rule on 137 fails the Job on the first OOM kill instead of retrying into the same limit."""
    from finetune_operator.containers.trainer import TRAINER_CONTAINER, pod_failure_policy

    script = (
        "blob = bytearray(300 * 2**20); blob[::4096] = b'x' * len(blob[::4096]); import time; time.sleep(10)"
    )
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "oom"},
        "spec": {
            "backoffLimit": 3,
            "podFailurePolicy": pod_failure_policy(),
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": TRAINER_CONTAINER,
                            "image": "busybox",
                            "command": [PY, "-c", script],
                            "resources": {"limits": {"memory": "100Mi"}},
                        }
                    ],
                }
            },
        },
    }
    client.BatchV1Api(lc_api).create_namespaced_job(ns, body)
    obj = wait_for(lambda: finished(lc_api, ns, "oom"), timeout=60, what="job to fail")
    failed = condition(obj, "Failed")
    (only,) = job_pods(lc_api, ns, "oom")
    terminated = only["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)
    assert failed["reason"] == "PodFailurePolicy"
    assert "exit code 137 matching FailJob rule at index 1" in failed["message"]
    assert obj["status"]["failed"] == 1
