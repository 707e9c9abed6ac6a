"""Defaulting and create-time preparation of built-in kinds (the parts clients rely on)."""

from __future__ import annotations

import base64
import itertools
from typing import Any

_cluster_ips = itertools.count(10)


def _container_defaults(container: dict[str, Any]) -> None:
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    image = str(container.get("image", ""))
    container.setdefault(
        "imagePullPolicy",
        "Always" if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1] else "IfNotPresent",
    )
    container.setdefault("resources", {})
    for port in container.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
    requests = container["resources"].get("requests")
    limits = container["resources"].get("limits")
    if limits and not requests:
        container["resources"]["requests"] = dict(limits)


def pod_spec_defaults(spec: dict[str, Any]) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    for container in list(spec.get("containers") or []) + list(spec.get("initContainers") or []):
        if isinstance(container, dict):
            _container_defaults(container)
    for volume in spec.get("volumes") or []:
        if isinstance(volume, dict) and len(volume) == 1:
            volume["emptyDir"] = {}


def _qos(spec: dict[str, Any]) -> str:
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    guaranteed = all(
        (r.get("limits") or {}).get(k)
        and (r.get("requests") or {}).get(k, (r.get("limits") or {}).get(k)) == (r.get("limits") or {}).get(k)
        for r in resources
        for k in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"


def prepare_create(group: str, plural: str, obj: dict[str, Any]) -> None:
    """What a kind's create strategy does before storing: defaults and a fresh status."""
    spec = obj.setdefault("spec", {}) if plural in _HAS_SPEC.get(group, ()) else None
    if (group, plural) == ("", "pods"):
        assert spec is not None
        spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("priority", 0)
        tolerations = spec.setdefault("tolerations", [])
        for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
            if not any(isinstance(t, dict) and t.get("key") == key for t in tolerations):
                tolerations.append(
                    {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
                )
        pod_spec_defaults(spec)
        obj["status"] = {"phase": "Pending", "qosClass": _qos(spec)}
    elif (group, plural) == ("batch", "jobs"):
        assert spec is not None
        for key, value in (
            ("backoffLimit", 6),
            ("completions", 1),
            ("parallelism", 1),
            ("completionMode", "NonIndexed"),
            ("suspend", False),
            ("manualSelector", None),
        ):
            if value is not None:
                spec.setdefault(key, value)
        # As kube-apiserver: a Job with a podFailurePolicy may only replace pods once they have Failed.
        replacement = "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed"
        spec.setdefault("podReplacementPolicy", replacement)
        uid = obj["metadata"]["uid"]
        template = spec.setdefault("template", {})
        labels = template.setdefault("metadata", {}).setdefault("labels", {})
        if not spec.get("manualSelector"):
            generated = {
                "batch.kubernetes.io/controller-uid": uid,
                "controller-uid": uid,
                "batch.kubernetes.io/job-name": obj["metadata"]["name"],
                "job-name": obj["metadata"]["name"],
            }
            labels.update(generated)
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        pod_spec_defaults(template.setdefault("spec", {}))
        template["spec"].setdefault("restartPolicy", "Never")
        obj["status"] = {}
    elif (group, plural) in (("apps", "deployments"), ("apps", "replicasets"), ("apps", "statefulsets")):
        assert spec is not None
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        if plural == "deployments":
            spec.setdefault("progressDeadlineSeconds", 600)
            spec.setdefault(
                "strategy",
                {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}},
            )
        pod_spec_defaults(spec.setdefault("template", {}).setdefault("spec", {}))
        obj["status"] = {}
    elif (group, plural) == ("", "services"):
        assert spec is not None
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec.get("clusterIP") != "None" and not spec.get("clusterIP"):
            n = next(_cluster_ips)
            spec["clusterIP"] = f"10.96.{(n // 250) % 250}.{n % 250 + 1}"
        if spec.get("clusterIP"):
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        obj["status"] = {"loadBalancer": {}}
    elif (group, plural) == ("", "namespaces"):
        assert spec is not None
        finalizers = spec.setdefault("finalizers", [])
        if "kubernetes" not in finalizers:
            finalizers.append("kubernetes")
        obj["status"] = {"phase": "Active"}
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    elif (group, plural) == ("", "persistentvolumeclaims"):
        assert spec is not None
        spec.setdefault("volumeMode", "Filesystem")
        obj["status"] = {"phase": "Pending"}
    elif (group, plural) == ("", "secrets"):
        obj.setdefault("type", "Opaque")
    elif (group, plural) == ("", "nodes"):
        obj.setdefault("status", {})


_TEMPLATED = (("batch", "jobs"), ("apps", "deployments"), ("apps", "replicasets"), ("apps", "statefulsets"))


def prepare_update(group: str, plural: str, obj: dict[str, Any], old: dict[str, Any]) -> None:
    """Defaults an update gets before it is compared with the stored object."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return
    if (group, plural) == ("", "pods"):
        spec.setdefault("serviceAccountName", (old.get("spec") or {}).get("serviceAccountName", "default"))
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("priority", 0)
        pod_spec_defaults(spec)
    elif (group, plural) in _TEMPLATED:
        template = spec.get("template")
        if isinstance(template, dict) and isinstance(template.get("spec"), dict):
            pod_spec_defaults(template["spec"])


def normalize(group: str, plural: str, obj: dict[str, Any]) -> None:
    """What every create and update does: Secret stringData folds into data."""
    if (group, plural) == ("", "secrets") and "stringData" in obj:
        data = obj.setdefault("data", {}) or {}
        for key, value in (obj.pop("stringData") or {}).items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        obj["data"] = data
    if (group, plural) == ("", "namespaces"):
        obj.setdefault("metadata", {}).setdefault("labels", {})["kubernetes.io/metadata.name"] = obj[
            "metadata"
        ].get("name")


_HAS_SPEC = {
    "": ("pods", "services", "namespaces", "persistentvolumeclaims", "nodes"),
    "batch": ("jobs",),
    "apps": ("deployments", "replicasets", "statefulsets"),
}
