"""The real kubectl binaries (1.32 and 1.35) against the cluster: apply, get, describe, patch, replace,
delete cascades, wait, watch, label/annotate, scale and api-resources."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from .conftest import WIDGET_CRD, Kubectl, Raw, wait_for

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: main
        image: nginx:1.27
        env: [{name: A, value: "1"}, {name: B, value: "2"}]
      - name: side
        image: busybox:1.36
"""


# What `kubectl get pod,svc -o yaml` writes and users apply back. The pod asks for a node that does not exist,
# so nothing runs on either kind of cluster.
POD_AND_SERVICE_LIST = """
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web, labels: {app: web}}
  spec:
    nodeSelector: {conformance.example.com/no-such-node: "true"}
    containers: [{name: main, image: nginx:1.27}]
- apiVersion: v1
  kind: Service
  metadata: {name: web}
  spec:
    selector: {app: web}
    ports: [{port: 80, targetPort: 8080}]
"""


def widget_yaml(name: str, size: int = 2, **labels: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "conformance.example.com/v1",
            "kind": "Widget",
            "metadata": {"name": name, "labels": labels},
            "spec": {"size": size},
        }
    )


def test_api_resources_lists_builtins_and_custom_resources(kubectl: Kubectl, widget_crd: Any) -> None:
    out = kubectl("api-resources").stdout
    for line in ("pods ", "deployments ", "jobs ", "leases ", "customresourcedefinitions ", "widgets "):
        assert line in out
    wide = kubectl("api-resources", "--api-group=conformance.example.com", "-o", "name").stdout.split()
    assert wide == ["widgets.conformance.example.com"]


def test_apply_crd_is_idempotent_and_established(kubectl: Kubectl, widget_crd: Any, tmp_path: Any) -> None:
    manifest = tmp_path / "crd.yaml"
    manifest.write_text(yaml.safe_dump(WIDGET_CRD))
    out = kubectl("apply", "-f", str(manifest)).stdout
    assert "customresourcedefinition.apiextensions.k8s.io/widgets.conformance.example.com" in out
    kubectl("wait", "--for=condition=Established", "crd/widgets.conformance.example.com", "--timeout=10s")


def test_apply_custom_resource_and_get_printer_columns(
    kubectl: Kubectl, namespace: str, widget_crd: Any
) -> None:
    assert (
        "created"
        in kubectl("apply", "-n", namespace, "-f", "-", input=widget_yaml("w1", 3, app="demo")).stdout
    )
    assert (
        "unchanged"
        in kubectl("apply", "-n", namespace, "-f", "-", input=widget_yaml("w1", 3, app="demo")).stdout
    )
    kubectl(
        "patch",
        "-n",
        namespace,
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}',
    )
    lines = kubectl("get", "-n", namespace, "wdg").stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "PHASE", "READY", "AGE"]
    assert lines[1].split()[:4] == ["w1", "3", "Running", "True"]
    obj = kubectl.json("get", "-n", namespace, "widgets.conformance.example.com", "w1")
    assert obj["spec"] == {"size": 3, "mode": "small", "replicas": 1}
    as_yaml = yaml.safe_load(kubectl("get", "-n", namespace, "widget/w1", "-o", "yaml").stdout)
    assert as_yaml["metadata"]["uid"] == obj["metadata"]["uid"]
    # Re-applying a changed spec bumps generation; the status written through /status survives.
    kubectl("apply", "-n", namespace, "-f", "-", input=widget_yaml("w1", 4, app="demo"))
    obj = kubectl.json("get", "-n", namespace, "widget", "w1")
    assert obj["metadata"]["generation"] == 2 and obj["status"]["phase"] == "Running"


def test_apply_rejects_invalid_custom_resources(kubectl: Kubectl, namespace: str, widget_crd: Any) -> None:
    result = kubectl("apply", "-n", namespace, "-f", "-", input=widget_yaml("bad", 0), check=False)
    assert result.returncode != 0
    assert 'The Widget "bad" is invalid' in result.stderr
    assert "spec.size: Invalid value: 0" in result.stderr
    result = kubectl("apply", "-n", namespace, "-f", "-", input=widget_yaml("huge", 50), check=False)
    assert "size above 10 needs mode big" in result.stderr
    unknown = widget_yaml("unknown", 2).replace("size: 2", "size: 2\n  colour: red")
    result = kubectl("apply", "-n", namespace, "-f", "-", input=unknown, check=False)
    assert result.returncode != 0 and 'unknown field "spec.colour"' in result.stderr
    kubectl("apply", "-n", namespace, "--validate=false", "-f", "-", input=unknown)
    assert "colour" not in kubectl.json("get", "-n", namespace, "widget", "unknown")["spec"]
    # Built-in kinds too: server-side field validation names every unknown field.
    typo = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "typo"},
        "spec": {
            "nodeSelector": {"conformance.example.com/no-such-node": "true"},
            "containers": [{"name": "c", "image": "busybox", "imagePullPolicyy": "Always"}],
        },
    }
    result = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(typo), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.containers[0].imagePullPolicyy"' in result.stderr
    result = kubectl("apply", "-n", namespace, "--validate=warn", "-f", "-", input=json.dumps(typo))
    assert 'unknown field "spec.containers[0].imagePullPolicyy"' in result.stderr


def test_apply_builtin_uses_strategic_merge(kubectl: Kubectl, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=DEPLOYMENT)
    changed = DEPLOYMENT.replace('{name: B, value: "2"}]', '{name: B, value: "3"}, {name: C, value: "4"}]')
    assert "configured" in kubectl("apply", "-n", namespace, "-f", "-", input=changed).stdout
    obj = kubectl.json("get", "-n", namespace, "deploy", "web")
    assert obj["spec"]["template"]["spec"]["containers"][0]["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
    ]
    assert obj["metadata"]["generation"] == 2
    kubectl(
        "patch",
        "-n",
        namespace,
        "deploy",
        "web",
        "-p",
        '{"spec":{"template":{"spec":{"containers":[{"name":"side","image":"busybox:1.37"}]}}}}',
    )
    images = kubectl(
        "get", "-n", namespace, "deploy", "web", "-o", "jsonpath={.spec.template.spec.containers[*].image}"
    ).stdout
    assert images == "nginx:1.27 busybox:1.37"
    kubectl(
        "patch",
        "-n",
        namespace,
        "deploy",
        "web",
        "--type=json",
        "-p",
        '[{"op":"replace","path":"/spec/replicas","value":3}]',
    )
    result = kubectl(
        "patch",
        "-n",
        namespace,
        "deploy",
        "web",
        "--type=json",
        "-p",
        '[{"op":"test","path":"/spec/replicas","value":9}]',
        check=False,
    )
    assert result.returncode != 0
    kubectl("scale", "-n", namespace, "deploy", "web", "--replicas=5")
    header = kubectl("get", "-n", namespace, "deploy").stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert kubectl.json("get", "-n", namespace, "deploy", "web")["spec"]["replicas"] == 5


def test_apply_a_list_of_a_pod_and_a_service(kubectl: Kubectl, namespace: str) -> None:
    """kubectl validates a `kind: List` on the client (OpenAPI v2), each item on the server."""
    created = kubectl("apply", "-n", namespace, "-f", "-", input=POD_AND_SERVICE_LIST).stdout.splitlines()
    assert created == ["pod/web created", "service/web created"]
    again = kubectl("apply", "-n", namespace, "-f", "-", input=POD_AND_SERVICE_LIST).stdout.splitlines()
    assert again == ["pod/web unchanged", "service/web unchanged"]
    assert kubectl("get", "-n", namespace, "pod,svc", "-o", "name").stdout.split() == [
        "pod/web",
        "service/web",
    ]
    assert kubectl.json("get", "-n", namespace, "svc", "web")["spec"]["ports"][0]["targetPort"] == 8080
    deleted = kubectl("delete", "-n", namespace, "--wait=false", "-f", "-", input=POD_AND_SERVICE_LIST).stdout
    assert 'pod "web" deleted' in deleted and 'service "web" deleted' in deleted


def test_get_with_label_selectors_and_label_annotate(kubectl: Kubectl, namespace: str) -> None:
    for name, tier in (("a", "web"), ("b", "db"), ("c", "")):
        kubectl("create", "configmap", name, "-n", namespace)
        if tier:
            kubectl("label", "-n", namespace, "configmap", name, f"tier={tier}")

    def names(*selector: str) -> list[str]:
        return kubectl("get", "-n", namespace, "cm", *selector, "-o", "name").stdout.split()

    assert names("-l", "tier=web") == ["configmap/a"]
    assert names("-l", "tier in (web,db)") == ["configmap/a", "configmap/b"]
    assert names("-l", "!tier") == ["configmap/c", "configmap/kube-root-ca.crt"] or names("-l", "!tier") == [
        "configmap/c"
    ]
    kubectl("label", "-n", namespace, "cm", "a", "tier=api", "--overwrite")
    kubectl("annotate", "-n", namespace, "cm", "a", "note=hello")
    obj = kubectl.json("get", "-n", namespace, "cm", "a")
    assert obj["metadata"]["labels"]["tier"] == "api" and obj["metadata"]["annotations"]["note"] == "hello"
    kubectl("label", "-n", namespace, "cm", "a", "tier-")
    kubectl("annotate", "-n", namespace, "cm", "a", "note-")
    obj = kubectl.json("get", "-n", namespace, "cm", "a")
    assert "tier" not in (obj["metadata"].get("labels") or {})
    assert "note" not in (obj["metadata"].get("annotations") or {})
    result = kubectl("label", "-n", namespace, "cm", "b", "tier=other", check=False)
    assert result.returncode != 0 and "already has a value" in result.stderr


def test_replace_with_stale_resource_version_conflicts(
    kubectl: Kubectl, namespace: str, tmp_path: Any
) -> None:
    kubectl("create", "configmap", "rep", "-n", namespace, "--from-literal=k=1")
    stale = tmp_path / "stale.yaml"
    stale.write_text(kubectl("get", "-n", namespace, "cm", "rep", "-o", "yaml").stdout)
    kubectl("patch", "-n", namespace, "cm", "rep", "-p", '{"data":{"k":"2"}}')
    result = kubectl("replace", "-f", str(stale), check=False)
    assert result.returncode != 0
    assert "the object has been modified" in result.stderr and "Conflict" not in result.stdout
    fresh = kubectl.json("get", "-n", namespace, "cm", "rep")
    fresh["data"]["k"] = "3"
    kubectl("replace", "-f", "-", input=json.dumps(fresh))
    assert kubectl.json("get", "-n", namespace, "cm", "rep")["data"]["k"] == "3"


def _owner_and_dependent(kubectl: Kubectl, namespace: str, suffix: str) -> None:
    kubectl("create", "configmap", f"owner-{suffix}", "-n", namespace)
    uid = kubectl.json("get", "-n", namespace, "cm", f"owner-{suffix}")["metadata"]["uid"]
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"dep-{suffix}",
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": f"owner-{suffix}",
                    "uid": uid,
                    "blockOwnerDeletion": True,
                }
            ],
        },
    }
    kubectl("create", "-f", "-", input=json.dumps(dependent))


@pytest.mark.parametrize("cascade", ["background", "foreground", "orphan"])
def test_delete_cascade_modes(kubectl: Kubectl, namespace: str, cascade: str) -> None:
    _owner_and_dependent(kubectl, namespace, cascade)
    kubectl("delete", "-n", namespace, "cm", f"owner-{cascade}", f"--cascade={cascade}", "--timeout=20s")
    assert kubectl("get", "-n", namespace, "cm", f"owner-{cascade}", check=False).returncode != 0

    def dependent() -> Any:
        result = kubectl("get", "-n", namespace, "cm", f"dep-{cascade}", "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    if cascade == "orphan":
        assert not dependent()["metadata"].get("ownerReferences")
    elif cascade == "foreground":
        assert dependent() is None  # foreground: the owner goes only after its blocking dependents
    else:
        wait_for(lambda: dependent() is None, "background collection", timeout=20, interval=0.2)


def test_wait_for_condition_and_jsonpath(kubectl: Kubectl, namespace: str, widget_crd: Any) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=widget_yaml("waited", 2))
    condition = kubectl.popen(
        "wait", "-n", namespace, "widget/waited", "--for=condition=Ready", "--timeout=20s"
    )
    jsonpath = kubectl.popen(
        "wait", "-n", namespace, "widget/waited", "--for=jsonpath={.status.phase}=Running", "--timeout=20s"
    )
    time.sleep(0.5)
    assert condition.poll() is None and jsonpath.poll() is None
    kubectl(
        "patch",
        "-n",
        namespace,
        "widget",
        "waited",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}',
    )
    assert condition.wait(20) == 0, condition.stderr.read() if condition.stderr else ""
    assert jsonpath.wait(20) == 0
    kubectl("delete", "-n", namespace, "widget", "waited", "--wait=false")
    kubectl("wait", "-n", namespace, "widget/waited", "--for=delete", "--timeout=10s")


def test_get_watch_streams_changes(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "configmap", "before", "-n", namespace)
    watcher = kubectl.popen("get", "-n", namespace, "cm", "-w", "--request-timeout=3s")
    time.sleep(1.0)
    kubectl("create", "configmap", "during", "-n", namespace)
    out, _ = watcher.communicate(timeout=20)
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "DATA"]
    names = [line.split()[0] for line in lines[1:]]
    assert "before" in names and "during" in names


def test_describe_shows_events(kubectl: Kubectl, namespace: str, raw: Raw, widget_crd: Any) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "described", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "command": ["sh", "-c", "true"]}]},
    }
    kubectl("apply", "-f", "-", input=json.dumps(pod))
    uid = kubectl.json("get", "-n", namespace, "pod", "described")["metadata"]["uid"]
    event = {
        "metadata": {"generateName": "described."},
        "type": "Warning",
        "reason": "ConformanceCheck",
        "message": "something noteworthy",
        "count": 1,
        "source": {"component": "conformance"},
        "involvedObject": {
            "kind": "Pod",
            "apiVersion": "v1",
            "namespace": namespace,
            "name": "described",
            "uid": uid,
        },
    }
    assert raw.request("POST", f"/api/v1/namespaces/{namespace}/events", event)[0] == 201
    out = kubectl("describe", "-n", namespace, "pod", "described").stdout
    assert "Name:" in out and "described" in out and "busybox:1.36" in out
    assert "ConformanceCheck" in out and "something noteworthy" in out
    kubectl("apply", "-n", namespace, "-f", "-", input=widget_yaml("described", 2))
    wuid = kubectl.json("get", "-n", namespace, "widget", "described")["metadata"]["uid"]
    event["involvedObject"] = {
        "kind": "Widget",
        "apiVersion": "conformance.example.com/v1",
        "namespace": namespace,
        "name": "described",
        "uid": wuid,
    }
    event["reason"] = "WidgetEvent"
    raw.request("POST", f"/api/v1/namespaces/{namespace}/events", event)
    out = kubectl("describe", "-n", namespace, "widget", "described").stdout
    assert "Size:" in out and "WidgetEvent" in out
    events = kubectl("get", "-n", namespace, "events").stdout
    assert "ConformanceCheck" in events and "pod/described" in events


def test_get_builtin_default_columns(kubectl: Kubectl, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j", "namespace": namespace},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox:1.36"}]}
            }
        },
    }
    kubectl("create", "-f", "-", input=json.dumps(job))
    header = kubectl("get", "-n", namespace, "jobs").stdout.splitlines()[0].split()
    assert header[0] == "NAME" and "COMPLETIONS" in header and header[-1] == "AGE"
    job = kubectl.json("get", "-n", namespace, "job", "j")
    assert job["spec"]["backoffLimit"] == 6
    assert (
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"] == job["metadata"]["uid"]
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "svc", "namespace": namespace},
        "spec": {"selector": {"app": "x"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    kubectl("apply", "-f", "-", input=json.dumps(service))
    header = kubectl("get", "-n", namespace, "svc").stdout.splitlines()[0].split()
    assert header[:3] == ["NAME", "TYPE", "CLUSTER-IP"]
    header = kubectl("get", "nodes").stdout.splitlines()
    assert not header or header[0].split()[:2] == ["NAME", "STATUS"]
    pods = kubectl("get", "-n", namespace, "pods", "-o", "wide", check=False)
    assert pods.returncode == 0
