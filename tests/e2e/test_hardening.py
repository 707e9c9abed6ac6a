"""Issue 9, items 1, 4 and 5 end to end on the embedded cluster with the real operator: spoofed children in
another namespace, Events under injected 429s, and a child name held by an orphaned leftover; issue 20,
defect 4: a forged child with the job's own ownerReference, or a forged pod under the genuine evaluate Job,
cannot pass the gate."""

from __future__ import annotations

import collections
import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ..chart.chart_helpers import chart_template
from .conftest import GROUP, PLURAL, VERSION, Jobs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(600)]

EVIL_ADAPTER = "s3://attacker-bucket/evil-adapter"


@pytest.fixture
def other_namespace(lc_api: Any) -> Iterator[str]:
    from kubernetes import client

    name = f"t-{secrets.token_hex(4)}"
    core = client.CoreV1Api(lc_api)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    with contextlib.suppress(Exception):
        core.delete_namespace(name, propagation_policy="Background", grace_period_seconds=0)


def _spoof_job(name: str, victim: dict[str, Any], stage: str, summary: dict[str, Any], owner: bool) -> dict:
    """A Job carrying the victim's labels whose pod writes a crafted termination message."""
    meta = victim["metadata"]
    labels = {
        "app.kubernetes.io/managed-by": "finetune-operator",
        "app.kubernetes.io/component": stage,
        "finetune.dev/job-uid": meta["uid"],
    }
    message = json.dumps({"exitCode": 0, "summary": summary})
    body: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "busybox",
                            "command": ["sh", "-c", f"printf '%s' '{message}' > /dev/termination-log"],
                        }
                    ],
                },
            },
        },
    }
    if owner:  # even an ownerReference naming the victim's uid, from the wrong namespace
        body["metadata"]["ownerReferences"] = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FineTuneJob",
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
            }
        ]
    return body


def test_spoofed_children_in_another_namespace_leave_the_victim_alone(
    jobs: Jobs, lc_api: Any, other_namespace: str
) -> None:
    from kubernetes import client

    victim = jobs.create("victim", suspend=True)  # holds still: nothing of its own can finish
    jobs.wait_phase("victim", "Suspended", timeout=120)
    batch = client.BatchV1Api(lc_api)
    summaries = {
        "validate": {"train": 10, "test": 2, "trainTokens": 100},
        "train": {"adapter": EVIL_ADAPTER, "step": 1, "totalSteps": 1, "loss": 0.1},
    }
    spoofs = []
    for stage, summary in summaries.items():
        for owner in (False, True):
            name = f"evil-{stage}-{'owned' if owner else 'labels'}"
            batch.create_namespaced_job(other_namespace, _spoof_job(name, victim, stage, summary, owner))
            spoofs.append(name)

    def spoof_pods_done() -> bool:
        pods = client.CoreV1Api(lc_api).list_namespaced_pod(other_namespace, _preload_content=False).json()
        done = [p for p in pods["items"] if p["status"].get("phase") in ("Succeeded", "Failed")]
        return len(done) >= 2  # at least the label-only ones (the owned ones may be garbage-collected)

    jobs.wait("victim", lambda _: spoof_pods_done(), 120, "the spoofed pods to write their messages")
    time.sleep(12)  # a resync tick and the child events have come and gone
    status = jobs.status("victim")
    assert status["phase"] == "Suspended", status
    assert EVIL_ADAPTER not in json.dumps(status)
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["status"] != "True", validated
    assert [j["metadata"]["name"] for j in jobs.list("Job")] == ["victim-validate"]


def test_throttled_events_arrive_exactly_once_after_the_api_recovers(jobs: Jobs, local_cluster: Any) -> None:
    api = local_cluster.apiserver
    fault = local_cluster.call(
        _async(lambda: api.add_fault("create", "events", 429, namespace=jobs.namespace))
    )
    try:
        jobs.create("throttled", hyperparameters={"maxSteps": 4}, evaluation={"enabled": False})
        jobs.wait(
            "throttled",
            lambda _: any(j["metadata"]["name"] == "throttled-train" for j in jobs.list("Job")),
            240,
            "the training Job (Validating and Training already happened)",
        )
    finally:
        local_cluster.call(_async(lambda: api.remove_fault(fault)))
    status = jobs.wait_phase("throttled", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded", status

    def settled(_status: dict[str, Any]) -> bool:
        return not _status.get("pendingEvents") and {"Validating", "Training", "Succeeded"} <= {
            e["reason"] for e in jobs.events("throttled")
        }

    jobs.wait("throttled", settled, 60, "the owed Events")
    time.sleep(3)
    posted = collections.Counter(e["reason"] for e in jobs.events("throttled"))
    # every owed Event exactly once: the phase transitions, and the validate stage's warning when it warned
    assert {r: posted[r] for r in ("Validating", "Training", "Succeeded")} == dict.fromkeys(
        ("Validating", "Training", "Succeeded"), 1
    ), posted
    assert set(posted.values()) == {1}, posted


def test_an_orphaned_child_is_named_in_the_status_of_the_recreated_job(jobs: Jobs, lc_api: Any) -> None:
    from kubernetes import client

    jobs.create("reborn", suspend=True)
    jobs.wait_phase("reborn", "Suspended", timeout=120)
    client.CustomObjectsApi(lc_api).delete_namespaced_custom_object(
        GROUP, VERSION, jobs.namespace, PLURAL, "reborn", propagation_policy="Orphan"
    )  # kubectl delete ftj reborn --cascade=orphan
    deadline = time.monotonic() + 60
    while any(o["metadata"]["name"] == "reborn" for o in _list_ftjs(lc_api, jobs.namespace)):
        assert time.monotonic() < deadline, "the FineTuneJob was not deleted"
        time.sleep(0.5)
    jobs.create("reborn", suspend=True)

    def names_the_leftover(status: dict[str, Any]) -> bool:
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return ready.get("reason") == "ChildConflict"

    status = jobs.wait("reborn", names_the_leftover, 60, "a ChildConflict condition")
    assert status["phase"] == "Pending"
    assert (
        f"Job {jobs.namespace}/reborn-validate exists and is not controlled by this FineTuneJob"
        in (status["message"])
    )
    assert f"kubectl delete job -n {jobs.namespace} reborn-validate" in status["message"]
    conflict_events = [e for e in jobs.events("reborn") if e["reason"] == "ChildConflict"]
    assert [e["type"] for e in conflict_events] == ["Warning"], [
        (e["metadata"]["name"], e["type"], e["message"][:40]) for e in conflict_events
    ]
    client.BatchV1Api(lc_api).delete_namespaced_job(
        "reborn-validate", jobs.namespace, propagation_policy="Background"
    )
    jobs.wait_phase("reborn", "Suspended", timeout=90)  # the name is free: the job carries on
    validate = next(j for j in jobs.list("Job") if j["metadata"]["name"] == "reborn-validate")
    owner = validate["metadata"]["ownerReferences"][0]
    assert owner["uid"] == jobs.get("reborn")["metadata"]["uid"]


RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def test_a_forged_evaluate_job_with_the_jobs_owner_reference_cannot_pass_the_gate(
    jobs: Jobs, lc_api: Any
) -> None:
    """Issue 20, defect 4: a namespace editor pre-creates `<job>-evaluate` with the controller ownerReference
    to the job's uid, the operator's labels and a pod whose termination message forges a passing gate. The
    operator did not create it, so the job waits with ChildConflict naming it; nothing is evaluated."""
    from kubernetes import client

    victim = jobs.create("gated", hyperparameters={"maxSteps": 1})
    forged_scores = {
        "tuned": {"exact_match": 1.0, "loss": 0.1},
        "base": {"exact_match": 0.0, "loss": 5.7},
        "n": 10,
    }
    forged = _spoof_job("gated-evaluate", victim, "evaluate", forged_scores, owner=True)
    container = forged["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = RESTRICTED  # the namespace enforces Pod Security restricted
    # The message and the path as arguments (the local kubelet maps in-container paths found in args).
    container["command"] = ["sh", "-c", 'printf "%s" "$0" > "$1"']
    container["args"] = [json.dumps({"exitCode": 0, "summary": forged_scores}), "/dev/termination-log"]
    client.BatchV1Api(lc_api).create_namespaced_job(jobs.namespace, forged)

    def decided(status: dict[str, Any]) -> bool:
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        final = status.get("phase") in ("Succeeded", "Rejected", "Failed")
        return ready.get("reason") == "ChildConflict" or final

    status = jobs.wait("gated", decided, 420, "a ChildConflict (or the gate deciding)")
    assert status["phase"] == "Pending", (status["phase"], status.get("evaluation"), status.get("message"))
    assert not status.get("evaluation"), status["evaluation"]
    message = status["message"]
    assert f"Job {jobs.namespace}/gated-evaluate exists and was not created by the operator" in message
    assert f"kubectl delete job -n {jobs.namespace} gated-evaluate" in message
    trained = next(c for c in status["conditions"] if c["type"] == "Trained")
    assert trained["status"] == "True", trained  # it waits at the gate, after a real training run
    train = next(j for j in jobs.list("Job") if j["metadata"]["name"] == "gated-train")
    assert status["children"]["Job/gated-train"]["uid"] == train["metadata"]["uid"]
    assert not (status["children"].get("Job/gated-evaluate") or {}).get("uid")


def _list_ftjs(lc_api: Any, namespace: str) -> list[dict[str, Any]]:
    from kubernetes import client

    items: list[dict[str, Any]] = client.CustomObjectsApi(lc_api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL
    )["items"]
    return items


def _async(fn: Any) -> Any:
    async def run() -> Any:
        return fn()

    return run()


EDITOR = "mallory@example.com"


@pytest.fixture
def pod_admission(lc_api: Any, jobs: Jobs) -> Iterator[Any]:
    """The chart's pod admission policy installed (the session's operator runs from source), and an API client
    acting as EDITOR, bound to the built-in `edit` role in the jobs' namespace."""
    from kubernetes import client, utils

    objects = chart_template("pod-admission.yaml")
    utils.create_from_yaml(lc_api, yaml_objects=objects)
    rbac = "rbac.authorization.k8s.io"
    client.RbacAuthorizationV1Api(lc_api).create_namespaced_role_binding(
        jobs.namespace,
        {
            "metadata": {"name": "mallory-edit"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"kind": "User", "apiGroup": rbac, "name": EDITOR}],
        },
    )
    editor = client.ApiClient(lc_api.configuration, header_name="Impersonate-User", header_value=EDITOR)
    yield editor
    admission = client.AdmissionregistrationV1Api(lc_api)
    for obj in objects:
        with contextlib.suppress(Exception):
            if obj["kind"] == "ValidatingAdmissionPolicy":
                admission.delete_validating_admission_policy(obj["metadata"]["name"])
            else:
                admission.delete_validating_admission_policy_binding(obj["metadata"]["name"])


def _forged_pod(job: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A pod that looks like the Job controller's: the Job's template labels, its controller-uid/job-name
    labels, the Job as controller, and a container that ends with a passing termination message."""
    meta = job["metadata"]
    labels = dict(job["spec"]["template"]["metadata"]["labels"])
    labels |= {
        "batch.kubernetes.io/controller-uid": meta["uid"],
        "batch.kubernetes.io/job-name": meta["name"],
    }
    labels |= {"controller-uid": meta["uid"], "job-name": meta["name"]}
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{meta['name']}-forged",
            "labels": labels,
            "ownerReferences": [owner | {"controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "trainer",
                    "image": "busybox",
                    "securityContext": RESTRICTED,
                    "command": ["sh", "-c", 'printf "%s" "$0" > "$1"'],
                    "args": [json.dumps({"exitCode": 0, "summary": summary}), "/dev/termination-log"],
                }
            ],
        },
    }


def test_a_forged_pod_under_the_genuine_evaluate_job_cannot_pass_the_gate(
    jobs: Jobs, pod_admission: Any
) -> None:
    """Issue 20, defect 4 (second half): while the operator's own `<job>-evaluate` runs, a namespace editor
    creates a pod with its labels and the Job as controller whose termination message forges a passing gate
    (the Job controller would count its success). The chart's pod admission policy refuses it, so the job is
    decided by its genuine evaluation: rejected, as its real scores deserve."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    # A gate the genuinely trained model cannot pass (loss below 1e-4), and the forged scores do.
    jobs.create(
        "forgery",
        hyperparameters={"maxSteps": 1},
        evaluation={"thresholds": [{"metric": "loss", "max": 0.0001}]},
        deployment={"enabled": False},
    )
    scores = {"loss": 0.00001, "perplexity": 1.0, "exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    forged_scores = {"tuned": scores, "base": {"loss": 5.7, "perplexity": 300.0, "exact_match": 0.0}, "n": 10}

    def evaluate_job() -> dict[str, Any] | None:
        return next((j for j in jobs.list("Job") if j["metadata"]["name"] == "forgery-evaluate"), None)

    jobs.wait("forgery", lambda _: evaluate_job() is not None, 420, "the operator's evaluate Job")
    refusal: ApiException | None = None
    try:
        client.CoreV1Api(pod_admission).create_namespaced_pod(
            jobs.namespace, _forged_pod(evaluate_job() or {}, forged_scores)
        )
    except ApiException as error:
        refusal = error

    status = jobs.wait_phase("forgery", "Succeeded", "Rejected", "Failed", timeout=420)
    evaluation = status.get("evaluation") or {}
    assert status["phase"] == "Rejected", (status["phase"], evaluation, status.get("message"))
    assert evaluation["passed"] is False and evaluation["tuned"]["loss"] > 0.0001, evaluation
    assert refusal is not None and refusal.status == 403, "the forged pod was admitted"
    assert "only the Job and ReplicaSet controllers may create a pod" in str(refusal.body)
    assert f"{EDITOR} is not one of them" in str(refusal.body)
