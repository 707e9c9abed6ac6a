"""The resource types the emulator serves: built-in kinds and the ones CRDs register."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    status_subresource: bool = False
    scale: dict[str, str] | None = None  # specReplicasPath, statusReplicasPath, labelSelectorPath
    subresources: frozenset[str] = frozenset()  # extra: log, eviction, binding
    generation: bool = False  # metadata.generation tracks spec changes
    strategic: bool = True  # built-ins accept strategic merge patch; custom resources do not
    field_selectors: frozenset[str] = frozenset()
    storage_group: str | None = None  # where objects live when two groups serve one kind (events)
    crd: dict[str, Any] | None = None
    validator: Any = None
    printer_columns: list[dict[str, Any]] | None = None  # a CRD version's additionalPrinterColumns
    verbs: tuple[str, ...] = (
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    )

    def __post_init__(self) -> None:
        if not self.singular:
            self.singular = self.kind.lower()

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> tuple[str, str]:
        return (self.group if self.storage_group is None else self.storage_group, self.plural)

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def supports_field(self, name: str) -> bool:
        if name in ("metadata.name", "metadata.namespace"):
            return self.namespaced or name == "metadata.name"
        return name in self.field_selectors


_POD_FIELDS = frozenset(
    {
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
        "spec.hostNetwork",
    }
)
_EVENT_FIELDS = frozenset(
    {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    }
)
_EVENT_V1_FIELDS = frozenset(
    {
        "regarding.kind",
        "regarding.namespace",
        "regarding.name",
        "regarding.uid",
        "regarding.apiVersion",
        "reason",
        "reportingController",
        "type",
    }
)


# Create-only kinds answered from the request and never stored: (group, plural, kind, namespaced).
REVIEW_KINDS = [
    ("authorization.k8s.io", "selfsubjectaccessreviews", "SelfSubjectAccessReview", False),
    ("authorization.k8s.io", "subjectaccessreviews", "SubjectAccessReview", False),
    ("authorization.k8s.io", "localsubjectaccessreviews", "LocalSubjectAccessReview", True),
    ("authorization.k8s.io", "selfsubjectrulesreviews", "SelfSubjectRulesReview", False),
    ("authentication.k8s.io", "selfsubjectreviews", "SelfSubjectReview", False),
    ("authentication.k8s.io", "tokenreviews", "TokenReview", False),
]


def builtin_types() -> list[ResourceType]:
    rt = ResourceType
    return [
        rt(
            "",
            "v1",
            "namespaces",
            "Namespace",
            False,
            short_names=["ns"],
            status_subresource=True,
            field_selectors=frozenset({"status.phase"}),
        ),
        rt(
            "",
            "v1",
            "pods",
            "Pod",
            True,
            short_names=["po"],
            categories=["all"],
            status_subresource=True,
            subresources=frozenset({"log", "eviction", "binding"}),
            field_selectors=_POD_FIELDS,
        ),
        rt(
            "",
            "v1",
            "services",
            "Service",
            True,
            short_names=["svc"],
            categories=["all"],
            status_subresource=True,
        ),
        rt("", "v1", "endpoints", "Endpoints", True, short_names=["ep"]),
        rt("", "v1", "configmaps", "ConfigMap", True, short_names=["cm"]),
        rt("", "v1", "secrets", "Secret", True, field_selectors=frozenset({"type"})),
        rt(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            True,
            short_names=["sa"],
            subresources=frozenset({"token"}),
        ),
        rt("", "v1", "events", "Event", True, short_names=["ev"], field_selectors=_EVENT_FIELDS),
        rt(
            "",
            "v1",
            "nodes",
            "Node",
            False,
            short_names=["no"],
            status_subresource=True,
            field_selectors=frozenset({"spec.unschedulable"}),
        ),
        rt(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            True,
            short_names=["pvc"],
            status_subresource=True,
        ),
        rt(
            "",
            "v1",
            "persistentvolumes",
            "PersistentVolume",
            False,
            short_names=["pv"],
            status_subresource=True,
        ),
        rt("", "v1", "resourcequotas", "ResourceQuota", True, short_names=["quota"], status_subresource=True),
        rt("", "v1", "limitranges", "LimitRange", True, short_names=["limits"]),
        rt(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            True,
            short_names=["ev"],
            storage_group="",
            field_selectors=_EVENT_V1_FIELDS,
        ),
        rt(
            "batch",
            "v1",
            "jobs",
            "Job",
            True,
            categories=["all"],
            status_subresource=True,
            generation=True,
            field_selectors=frozenset({"status.successful"}),
        ),
        rt(
            "batch",
            "v1",
            "cronjobs",
            "CronJob",
            True,
            short_names=["cj"],
            categories=["all"],
            status_subresource=True,
            generation=True,
        ),
        rt(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            True,
            short_names=["deploy"],
            categories=["all"],
            status_subresource=True,
            generation=True,
            scale={
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        ),
        rt(
            "apps",
            "v1",
            "replicasets",
            "ReplicaSet",
            True,
            short_names=["rs"],
            categories=["all"],
            status_subresource=True,
            generation=True,
            scale={
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        ),
        rt(
            "apps",
            "v1",
            "statefulsets",
            "StatefulSet",
            True,
            short_names=["sts"],
            categories=["all"],
            status_subresource=True,
            generation=True,
            scale={
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        ),
        rt(
            "apps",
            "v1",
            "daemonsets",
            "DaemonSet",
            True,
            short_names=["ds"],
            categories=["all"],
            status_subresource=True,
            generation=True,
        ),
        rt("coordination.k8s.io", "v1", "leases", "Lease", True),
        rt(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            True,
            short_names=["pdb"],
            status_subresource=True,
            generation=True,
        ),
        rt(
            "networking.k8s.io",
            "v1",
            "ingresses",
            "Ingress",
            True,
            short_names=["ing"],
            status_subresource=True,
            generation=True,
        ),
        rt(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            True,
            short_names=["netpol"],
            generation=True,
        ),
        rt("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", False, short_names=["pc"]),
        rt("storage.k8s.io", "v1", "storageclasses", "StorageClass", False, short_names=["sc"]),
        rt("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
        rt("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
        rt("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
        rt("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
        rt(
            "admissionregistration.k8s.io",
            "v1",
            "validatingadmissionpolicies",
            "ValidatingAdmissionPolicy",
            False,
            status_subresource=True,
            generation=True,
            categories=["api-extensions"],
        ),
        rt(
            "admissionregistration.k8s.io",
            "v1",
            "validatingadmissionpolicybindings",
            "ValidatingAdmissionPolicyBinding",
            False,
            generation=True,
            categories=["api-extensions"],
        ),
        *[
            rt(group, "v1", plural, kind, namespaced, verbs=("create",))
            for group, plural, kind, namespaced in REVIEW_KINDS
        ],
        rt(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            False,
            short_names=["crd", "crds"],
            status_subresource=True,
            generation=True,
            categories=["api-extensions"],
        ),
    ]


# events.k8s.io/v1 shares storage with core v1 events; these map the renamed fields both ways.
_EVENT_RENAMES = [
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("source", "deprecatedSource"),
    ("reportingComponent", "reportingController"),
    ("reportingInstance", "reportingInstance"),
]


def event_to_v1(obj: dict[str, Any]) -> dict[str, Any]:
    """Core Event → events.k8s.io/v1 Event."""
    out = {k: v for k, v in obj.items() if k not in {a for a, _ in _EVENT_RENAMES}}
    for core, v1 in _EVENT_RENAMES:
        if core in obj:
            out[v1] = obj[core]
    out["apiVersion"] = "events.k8s.io/v1"
    return out


def event_from_v1(obj: dict[str, Any]) -> dict[str, Any]:
    """events.k8s.io/v1 Event → core Event (the stored form)."""
    out = {k: v for k, v in obj.items() if k not in {b for _, b in _EVENT_RENAMES}}
    for core, v1 in _EVENT_RENAMES:
        if v1 in obj:
            out[core] = obj[v1]
    if "reportingController" in obj and "source" not in out:
        out["source"] = {"component": obj["reportingController"]}
    if "eventTime" in obj and "lastTimestamp" not in out:
        out["lastTimestamp"] = obj.get("eventTime")
    out["apiVersion"] = "v1"
    return out
