"""The chart's pod admission policy (templates/pod-admission.yaml, issue 20 defect 4): a namespace editor
cannot create a pod with the operator's labels or with a controller ownerReference to a Job (a pod forged
under a genuine stage Job, whose termination message the operator would read), nor add those labels later,
while the Job and ReplicaSet controllers still create the pods of Jobs and Deployments that carry them.

Runs unchanged against a real cluster (KUBECONFIG): the policy is rendered from the chart and installed under
its own release name, the editor is impersonated, and the controllers are the cluster's own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from finetune_vocabulary.labels import LABEL_COMPONENT, LABEL_JOB_UID, LABEL_MANAGED_BY, MANAGER

from ..chart.chart_helpers import chart_template
from .conftest import Raw, wait_for

ADMISSION = "/apis/admissionregistration.k8s.io/v1"
RBAC = "/apis/rbac.authorization.k8s.io/v1"
EDITOR = "mallory@example.com"
OURS = {
    LABEL_MANAGED_BY: MANAGER,
    LABEL_COMPONENT: "evaluate",
    LABEL_JOB_UID: "5b1f0c9e-0000-4000-8000-000000000001",
}
UNSCHEDULED = "conformance-nobody"  # no scheduler picks these pods up: nothing runs


def pod(name: str, labels: dict[str, str], owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": _pod_spec()}


def _pod_spec() -> dict[str, Any]:
    return {
        "schedulerName": UNSCHEDULED,
        "restartPolicy": "Never",
        "containers": [{"name": "trainer", "image": "busybox", "command": ["true"]}],
    }


@pytest.fixture
def editor_namespace(raw: Raw, namespace: str) -> Iterator[str]:
    """The chart's pod policy installed, and EDITOR bound to the built-in `edit` role in `namespace`."""
    objects = chart_template("pod-admission.yaml", "conformance-pods")
    paths = []
    for obj in objects:
        plural = (
            "validatingadmissionpolicies"
            if obj["kind"] == "ValidatingAdmissionPolicy"
            else ("validatingadmissionpolicybindings")
        )
        status, body, _ = raw.request("POST", f"{ADMISSION}/{plural}", obj)
        assert status == 201, body
        paths.append(f"{ADMISSION}/{plural}/{obj['metadata']['name']}")
    binding = {
        "metadata": {"name": "mallory-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": EDITOR}],
    }
    status, body, _ = raw.request("POST", f"{RBAC}/namespaces/{namespace}/rolebindings", binding)
    assert status == 201, body
    try:
        yield namespace
    finally:
        for path in reversed(paths):
            raw.request("DELETE", path)


def as_editor(raw: Raw, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any, Any]:
    return raw.request(method, path, body, headers={"Impersonate-User": EDITOR}, **kw)


def test_an_editor_cannot_forge_a_pod_under_a_job_but_the_controllers_pods_start(
    raw: Raw, editor_namespace: str
) -> None:
    ns = editor_namespace
    pods = f"/api/v1/namespaces/{ns}/pods"

    def refused() -> bool:  # a real API server enforces a new policy after a moment
        probe = pod(f"probe-{uuid.uuid4().hex[:6]}", OURS)
        return as_editor(raw, "POST", pods, probe)[0] == 403

    wait_for(refused, "the pod admission policy to take effect")

    # The editor may create Jobs (with our labels) and plain pods ...
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "forged-evaluate", "labels": OURS},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": OURS}, "spec": _pod_spec()}},
    }
    status, created, _ = as_editor(raw, "POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)
    assert status == 201, created
    under_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": "forged-evaluate",
        "uid": created["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    status, body, _ = as_editor(raw, "POST", pods, pod("plain", {"app": "mine"}))
    assert status == 201, body

    # ... but not a pod with our labels, nor one whose controller is a Job, labelled or not.
    for forged in (pod("labelled", OURS), pod("owned", OURS, under_job), pod("unlabelled", {}, under_job)):
        status, body, _ = as_editor(raw, "POST", pods, forged)
        assert (status, body.get("reason")) == (403, "Forbidden"), body
        assert "only the Job and ReplicaSet controllers may create a pod" in body["message"], body
        assert f"{EDITOR} is not one of them" in body["message"]

    # Nor add our labels, or a Job as controller, to a pod afterwards; other labels are fine.
    merge = "application/merge-patch+json"
    status, body, _ = as_editor(
        raw, "PATCH", f"{pods}/plain", {"metadata": {"labels": OURS}}, content_type=merge
    )
    assert (status, body.get("reason")) == (403, "Forbidden"), body
    assert "may not add or change them" in body["message"]

    # The Job controller's pod carries our labels and the Job as controller: admitted.
    def job_pod() -> dict[str, Any] | None:
        _, listed, _ = raw.request("GET", f"{pods}?labelSelector=job-name%3Dforged-evaluate")
        return next(iter(listed.get("items") or []), None)

    genuine = wait_for(job_pod, "the Job controller to create its pod")
    assert genuine["metadata"]["labels"][LABEL_JOB_UID] == OURS[LABEL_JOB_UID]
    assert genuine["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    name = genuine["metadata"]["name"]
    status, body, _ = as_editor(
        raw, "PATCH", f"{pods}/{name}", {"metadata": {"labels": {"note": "looked-at"}}}, content_type=merge
    )
    assert status == 200, body
    status, body, _ = as_editor(
        raw,
        "PATCH",
        f"{pods}/{name}",
        {"metadata": {"labels": {LABEL_JOB_UID: "another"}}},
        content_type=merge,
    )
    assert (status, body.get("reason")) == (403, "Forbidden"), body


def test_a_deployments_pods_with_our_labels_are_still_created(raw: Raw, editor_namespace: str) -> None:
    ns = editor_namespace
    selector = {LABEL_JOB_UID: OURS[LABEL_JOB_UID], LABEL_COMPONENT: "serve"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "served", "labels": OURS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**OURS, **selector}},
                "spec": _pod_spec() | {"restartPolicy": "Always"},
            },
        },
    }
    status, body, _ = as_editor(raw, "POST", f"/apis/apps/v1/namespaces/{ns}/deployments", deployment)
    assert status == 201, body

    def pods() -> list[dict[str, Any]]:
        query = f"labelSelector={LABEL_COMPONENT}%3Dserve"
        return raw.request("GET", f"/api/v1/namespaces/{ns}/pods?{query}")[1].get("items") or []

    created = wait_for(pods, "the ReplicaSet (Deployment) controller to create its pod", timeout=30)
    assert created[0]["metadata"]["labels"][LABEL_MANAGED_BY] == MANAGER
