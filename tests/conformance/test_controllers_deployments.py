"""Deployment controller, readiness probes and Services on loopback (host and in-cluster DNS)."""

from __future__ import annotations

import json
import sys
import urllib.request

import pytest
from kubernetes import client
from localcluster.pytest_plugin import condition, pod, wait_for

pytestmark = pytest.mark.local_kubelet
PY = sys.executable


@pytest.fixture
def ns(lc_namespace):
    return lc_namespace


def deployment(api, ns, name):
    return client.AppsV1Api(api).read_namespaced_deployment(name, ns, _preload_content=False).json()


def web_deployment(ns, replicas=2, greeting="v1"):
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "http",
                            "image": "python:3.11",
                            "command": [PY, "-m", "http.server", "8080"],
                            "env": [{"name": "GREETING", "value": greeting}],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
                        }
                    ],
                },
            },
        },
    }


def test_deployment_becomes_available_and_is_reachable_through_its_service(
    lc_api, ns, lc_kubectl_one, local_cluster
):
    lc_kubectl_one.apply(web_deployment(ns))
    lc_kubectl_one.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        }
    )
    rollout = lc_kubectl_one(
        "rollout", "status", "deployment/web", "--timeout=40s", namespace=ns, check=False
    )
    assert rollout.returncode == 0, lc_kubectl_one("describe", "pods", namespace=ns).stdout
    obj = deployment(lc_api, ns, "web")
    status = obj["status"]
    assert (
        status["replicas"],
        status["readyReplicas"],
        status["availableReplicas"],
        status["updatedReplicas"],
    ) == (2, 2, 2, 2)
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    available = condition(obj, "Available")
    assert (available["status"], available["reason"]) == ("True", "MinimumReplicasAvailable")
    assert condition(obj, "Progressing")["reason"] == "NewReplicaSetAvailable"
    pods = (
        client.CoreV1Api(lc_api)
        .list_namespaced_pod(ns, label_selector="app=web", _preload_content=False)
        .json()
    )
    ips = {p["status"]["podIP"] for p in pods["items"]}
    assert len(ips) == 2  # both listen on 8080, each on its own loopback IP
    assert all(p["metadata"]["labels"]["pod-template-hash"] for p in pods["items"])

    # From the host, through services.json.
    url = wait_for(
        lambda: (e := local_cluster.services().get(f"{ns}/web")) and e["ports"][0]["endpoints"] and e["url"],
        what="service in services.json",
    )
    with urllib.request.urlopen(url + "/", timeout=5) as resp:
        assert resp.status == 200

    # From a pod, through cluster DNS (<svc>.<ns>.svc, the FQDN, and the short name).
    probe = (
        "import sys, urllib.request\n"
        "for url in sys.argv[1:]:\n"
        "    print(urllib.request.urlopen(url, timeout=5).status)\n"
    )
    client.CoreV1Api(lc_api).create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "client"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": "python:3.11",
                        "command": [PY, "-c", probe],
                        "args": [
                            f"http://web.{ns}.svc/",
                            f"http://web.{ns}.svc.cluster.local:80/",
                            "http://web/",
                        ],
                    }
                ],
            },
        },
    )
    done = wait_for(
        lambda: (p := pod(lc_api, ns, "client"))["status"].get("phase") in ("Succeeded", "Failed") and p,
        what="client pod",
    )
    logs = lc_kubectl_one("logs", "client", namespace=ns).stdout
    assert done["status"]["phase"] == "Succeeded", logs
    assert logs.split() == ["200", "200", "200"]


def test_template_change_replaces_pods(lc_api, ns, lc_kubectl_one):
    lc_kubectl_one.apply(web_deployment(ns, replicas=1))
    lc_kubectl_one("rollout", "status", "deployment/web", "--timeout=30s", namespace=ns)
    core = client.CoreV1Api(lc_api)
    before = {
        p["metadata"]["name"]
        for p in core.list_namespaced_pod(ns, label_selector="app=web", _preload_content=False).json()[
            "items"
        ]
    }
    lc_kubectl_one.apply(web_deployment(ns, replicas=1, greeting="v2"))
    lc_kubectl_one("rollout", "status", "deployment/web", "--timeout=30s", namespace=ns)

    def replaced():
        items = core.list_namespaced_pod(ns, label_selector="app=web", _preload_content=False).json()["items"]
        live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
        return len(live) == 1 and live[0]["metadata"]["name"] not in before and live[0]

    new = wait_for(replaced, timeout=20, what="old pod replaced")
    assert new["spec"]["containers"][0]["env"][0]["value"] == "v2"
    obj = deployment(lc_api, ns, "web")
    assert obj["status"]["updatedReplicas"] == 1 and obj["status"]["availableReplicas"] == 1
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 2
    _ = json
