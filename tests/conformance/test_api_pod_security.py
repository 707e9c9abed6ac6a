"""Pod Security admission at the namespace labels `pod-security.kubernetes.io/enforce|warn`, with
kube-apiserver's messages; pods are created with dryRun=All (admission runs, nothing is scheduled), except
for the Job whose controller reports the refusal as a FailedCreate event, as kube-controller-manager does."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Raw, wait_for

RESTRICTED_SC = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod(name: str, **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", **container}]},
    }


@pytest.fixture
def labelled(raw: Raw) -> Iterator[Any]:
    """make(labels) → a fresh namespace with those labels, deleted afterwards."""
    made: list[str] = []

    def make(**labels: str) -> str:
        name = f"conf-psa-{uuid.uuid4().hex[:8]}"
        full = {f"pod-security.kubernetes.io/{k.replace('_', '-')}": v for k, v in labels.items()}
        status, body, _ = raw.request(
            "POST", "/api/v1/namespaces", {"metadata": {"name": name, "labels": full}}
        )
        assert status == 201, body
        made.append(name)
        return name

    yield make
    for name in made:
        raw.request("DELETE", f"/api/v1/namespaces/{name}")


def create(raw: Raw, namespace: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
    return raw.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", body)


def test_restricted_namespace_refuses_with_apiserver_message(raw: Raw, labelled: Any) -> None:
    ns = labelled(enforce="restricted")
    status, body, _ = create(raw, ns, pod("plain"))
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == (
        'pods "plain" is forbidden: violates PodSecurity "restricted:latest": '
        "allowPrivilegeEscalation != false "
        '(container "c" must set securityContext.allowPrivilegeEscalation=false), '
        'unrestricted capabilities (container "c" must set securityContext.capabilities.drop=["ALL"]), '
        'runAsNonRoot != true (pod or container "c" must set securityContext.runAsNonRoot=true), '
        'seccompProfile (pod or container "c" must set securityContext.seccompProfile.type to '
        '"RuntimeDefault" or "Localhost")'
    )
    status, body, _ = create(raw, ns, pod("compliant", securityContext=RESTRICTED_SC))
    assert status == 201, body
    # Pod-level settings cover the containers; a hostPath volume and an added capability do not pass.
    spec = pod(
        "mixed",
        securityContext={
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
        },
    )
    spec["spec"]["securityContext"] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    spec["spec"]["volumes"] = [{"name": "host", "hostPath": {"path": "/etc"}}]
    status, body, _ = create(raw, ns, spec)
    assert status == 403
    assert body["message"] == (
        'pods "mixed" is forbidden: violates PodSecurity "restricted:latest": '
        'hostPath volumes (volume "host"), unrestricted capabilities '
        '(container "c" must not include "NET_ADMIN" in securityContext.capabilities.add), '
        'restricted volume types (volume "host" uses restricted volume type "hostPath")'
    )


def test_baseline_and_version_label(raw: Raw, labelled: Any) -> None:
    ns = labelled(enforce="baseline", enforce_version="v1.30")
    assert create(raw, ns, pod("plain"))[0] == 201  # baseline does not require a securityContext
    status, body, _ = create(raw, ns, pod("priv", securityContext={"privileged": True}))
    assert status == 403
    assert body["message"] == (
        'pods "priv" is forbidden: violates PodSecurity "baseline:v1.30": '
        'privileged (container "c" must not set securityContext.privileged=true)'
    )
    host = pod("host", ports=[{"containerPort": 80, "hostPort": 8080}])
    host["spec"]["hostNetwork"] = True
    status, body, _ = create(raw, ns, host)
    assert status == 403
    assert body["message"] == (
        'pods "host" is forbidden: violates PodSecurity "baseline:v1.30": '
        "host namespaces (hostNetwork=true), "
        'hostPort (container "c" uses hostPort 8080)'
    )


def test_unlabelled_and_privileged_namespaces_admit_anything(raw: Raw, labelled: Any, namespace: str) -> None:
    privileged = labelled(enforce="privileged")
    for ns in (namespace, privileged):
        assert create(raw, ns, pod("root", securityContext={"privileged": True, "runAsUser": 0}))[0] == 201


def test_warn_label_warns_without_refusing(raw: Raw, labelled: Any) -> None:
    ns = labelled(warn="restricted")
    status, body, headers = create(raw, ns, pod("warned", securityContext={"privileged": True}))
    assert status == 201, body
    warning = " ".join(json.loads(w.split(" ", 2)[2]) for w in headers.getlist("Warning"))  # 299 - "<text>"
    assert 'would violate PodSecurity "restricted:latest": privileged (container "c" must not set' in warning


def test_job_controller_reports_refused_pods(raw: Raw, labelled: Any) -> None:
    ns = labelled(enforce="restricted")
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "unsafe"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "command": ["true"]}],
                }
            },
        },
    }
    status, body, headers = raw.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)
    assert status == 201, body  # workloads are admitted, with a warning about their pod template
    warning = " ".join(json.loads(w.split(" ", 2)[2]) for w in headers.getlist("Warning"))
    assert 'would violate PodSecurity "restricted:latest": allowPrivilegeEscalation != false' in warning

    def failed_create() -> list[dict[str, Any]]:
        events = raw.request("GET", f"/api/v1/namespaces/{ns}/events")[1]["items"]
        return [
            e for e in events if e["reason"] == "FailedCreate" and e["involvedObject"]["name"] == "unsafe"
        ]

    event = wait_for(failed_create, "the FailedCreate event", timeout=30)[0]
    assert event["type"] == "Warning"
    assert event["message"].startswith('Error creating: pods "unsafe-')
    assert (
        'is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false'
        in event["message"]
    )
    assert raw.request("GET", f"/api/v1/namespaces/{ns}/pods")[1]["items"] == []
