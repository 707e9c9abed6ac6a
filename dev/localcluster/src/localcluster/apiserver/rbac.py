"""RBAC authorization as kube-apiserver's RBAC authorizer does it (k8s.io/kubernetes/plugin/pkg/auth/
authorizer/rbac), plus the default ClusterRoles and ClusterRole aggregation.

- Rules: verbs, apiGroups, resources (`pods`, `pods/log`, `*/status`, `*`), resourceNames, nonResourceURLs
  (exact, or a prefix ending in `*`); a rule with resourceNames never matches create, list, watch or
  deletecollection of a whole collection (there is no name), as in Kubernetes.
- Bindings: RoleBinding (a Role or ClusterRole, rules apply in the binding's namespace), ClusterRoleBinding;
  subjects User, Group and ServiceAccount (namespace defaults to the binding's).
- `system:masters` is allowed everything without looking at RBAC (as kube-apiserver's privileged group).
- The 403 message is kube-apiserver's (`forbidden_message`).
Not emulated: escalation checks on writing Roles/Bindings (a user may grant what they do not hold), the
`bind`/`escalate` verbs' special meaning, Node and Webhook authorizers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .auth import UserInfo

RBAC_GROUP = "rbac.authorization.k8s.io"
COLLECTION_VERBS = frozenset({"create", "list", "watch", "deletecollection"})


@dataclass(frozen=True)
class Attributes:
    """What a request wants, as the authorizer sees it."""

    user: UserInfo
    verb: str
    namespace: str = ""
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""
    resource_request: bool = True


def forbidden_message(attrs: Attributes) -> str:
    """kube-apiserver's responsewriters.forbiddenMessage."""
    user = attrs.user.name
    if not attrs.resource_request:
        return f'User "{user}" cannot {attrs.verb} path "{attrs.path}"'
    resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
    if attrs.namespace:
        return (
            f'User "{user}" cannot {attrs.verb} resource "{resource}" in API group "{attrs.api_group}" '
            f'in the namespace "{attrs.namespace}"'
        )
    return (
        f'User "{user}" cannot {attrs.verb} resource "{resource}" in API group "{attrs.api_group}" '
        "at the cluster scope"
    )


def _verb_matches(rule: dict[str, Any], verb: str) -> bool:
    verbs = rule.get("verbs") or []
    return "*" in verbs or verb in verbs


def _group_matches(rule: dict[str, Any], group: str) -> bool:
    groups = rule.get("apiGroups") or []
    return "*" in groups or group in groups


def _resource_matches(rule: dict[str, Any], resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for item in rule.get("resources") or []:
        if item == "*" or item == combined:
            return True
        if subresource and item == f"*/{subresource}":
            return True
    return False


def _name_matches(rule: dict[str, Any], name: str) -> bool:
    names = rule.get("resourceNames") or []
    return not names or name in names


def _url_matches(rule: dict[str, Any], path: str) -> bool:
    for url in rule.get("nonResourceURLs") or []:
        if url == "*" or url == path or (url.endswith("*") and path.startswith(url[:-1])):
            return True
    return False


def rule_allows(rule: dict[str, Any], attrs: Attributes) -> bool:
    if not _verb_matches(rule, attrs.verb):
        return False
    if not attrs.resource_request:
        return _url_matches(rule, attrs.path)
    return (
        _group_matches(rule, attrs.api_group)
        and _resource_matches(rule, attrs.resource, attrs.subresource)
        and _name_matches(rule, attrs.name)
    )


def subject_matches(subject: dict[str, Any], user: UserInfo, binding_ns: str) -> bool:
    kind = subject.get("kind")
    name = subject.get("name", "")
    if kind == "User":
        return bool(name == user.name)
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns
        return user.name == f"system:serviceaccount:{ns}:{name}"
    return False


# A source of RBAC objects: `select(plural, namespace or None)` → stored objects (rbac.authorization.k8s.io).
Select = Callable[[str, str | None], list[dict[str, Any]]]


class Authorizer:
    """Decides from the stored Roles/Bindings; rules per (user, namespace) are cached until an RBAC write."""

    def __init__(self, select: Select) -> None:
        self.select = select
        self._cache: dict[tuple[UserInfo, str], list[dict[str, Any]]] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    def _role_rules(self, ref: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
        kind, name = ref.get("kind"), ref.get("name", "")
        if kind == "ClusterRole":
            roles = [r for r in self.select("clusterroles", None) if r["metadata"]["name"] == name]
        elif kind == "Role":
            roles = [r for r in self.select("roles", namespace) if r["metadata"]["name"] == name]
        else:
            roles = []
        return [rule for role in roles for rule in role.get("rules") or []]

    def rules_for(self, user: UserInfo, namespace: str) -> list[dict[str, Any]]:
        """Every rule that applies to the user in this namespace ("" = cluster scope only)."""
        key = (user, namespace)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        rules: list[dict[str, Any]] = []
        for binding in self.select("clusterrolebindings", None):
            if any(subject_matches(s, user, "") for s in binding.get("subjects") or []):
                rules.extend(self._role_rules(binding.get("roleRef") or {}, ""))
        if namespace:
            for binding in self.select("rolebindings", namespace):
                if any(subject_matches(s, user, namespace) for s in binding.get("subjects") or []):
                    rules.extend(self._role_rules(binding.get("roleRef") or {}, namespace))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = rules
        return rules

    def allowed(self, attrs: Attributes) -> bool:
        if attrs.user.is_admin:
            return True
        if attrs.resource_request and not attrs.name and attrs.verb in COLLECTION_VERBS:
            rules = [r for r in self.rules_for(attrs.user, attrs.namespace) if not r.get("resourceNames")]
        else:
            rules = self.rules_for(attrs.user, attrs.namespace)
        return any(rule_allows(rule, attrs) for rule in rules)

    def rules_review(self, user: UserInfo, namespace: str) -> dict[str, Any]:
        """SelfSubjectRulesReview status: the rules the user holds in the namespace."""
        if user.is_admin:
            rules = [
                {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]},
                {"verbs": ["*"], "nonResourceURLs": ["*"]},
            ]
        else:
            rules = self.rules_for(user, namespace)
        resource_rules = []
        non_resource_rules = []
        for rule in rules:
            if rule.get("nonResourceURLs"):
                non_resource_rules.append(
                    {"verbs": rule["verbs"], "nonResourceURLs": rule["nonResourceURLs"]}
                )
            else:
                item = {
                    k: rule[k] for k in ("verbs", "apiGroups", "resources", "resourceNames") if rule.get(k)
                }
                resource_rules.append(item)
        return {
            "resourceRules": resource_rules,
            "nonResourceRules": non_resource_rules,
            "incomplete": False,
        }


# ---------------------------------------------------------------------------------------------- aggregation
def _selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    from .selectors import label_selector_matches

    return bool(label_selector_matches(selector, labels))


def aggregate(clusterroles: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """ClusterRole name → the rules its aggregationRule selects (for the roles whose rules must change)."""
    roles = list(clusterroles)
    changes: dict[str, list[dict[str, Any]]] = {}
    for role in roles:
        rule = role.get("aggregationRule")
        if not rule:
            continue
        selectors = rule.get("clusterRoleSelectors") or []
        wanted: list[dict[str, Any]] = []
        for other in sorted(roles, key=lambda r: r["metadata"]["name"]):
            if other is role:
                continue
            labels = other["metadata"].get("labels") or {}
            if any(_selector_matches(s, labels) for s in selectors):
                for item in other.get("rules") or []:
                    if item not in wanted:
                        wanted.append(copy.deepcopy(item))
        if (role.get("rules") or []) != wanted:
            changes[role["metadata"]["name"]] = wanted
    return changes


# ---------------------------------------------------------------------------------------------- defaults
_BOOT = {"kubernetes.io/bootstrapping": "rbac-defaults"}
_AGG = "rbac.authorization.k8s.io/aggregate-to-"
_READ = ["get", "list", "watch"]
_WRITE = ["create", "delete", "deletecollection", "patch", "update"]


def _role(
    name: str,
    rules: list[dict[str, Any]],
    labels: dict[str, str] | None = None,
    aggregate_from: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {
            "name": name,
            "labels": {**_BOOT, **(labels or {})},
            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
        },
        "rules": rules,
    }
    if aggregate_from:
        body["aggregationRule"] = {
            "clusterRoleSelectors": [{"matchLabels": {f"{_AGG}{aggregate_from}": "true"}}]
        }
        body["rules"] = []
    return body


def _binding(name: str, role: str, groups: list[str]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": dict(_BOOT),
            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
        },
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups],
    }


def default_cluster_roles() -> list[dict[str, Any]]:
    """The bootstrap ClusterRoles kube-apiserver creates that matter to kubectl and to tenants (a subset)."""
    core_read = [
        "pods",
        "pods/log",
        "pods/status",
        "services",
        "services/status",
        "endpoints",
        "configmaps",
        "persistentvolumeclaims",
        "persistentvolumeclaims/status",
        "serviceaccounts",
        "events",
        "limitranges",
        "resourcequotas",
        "resourcequotas/status",
        "namespaces",
        "namespaces/status",
    ]
    workloads = {
        "apps": [
            "deployments",
            "deployments/scale",
            "deployments/status",
            "replicasets",
            "replicasets/scale",
            "replicasets/status",
            "statefulsets",
            "statefulsets/scale",
            "statefulsets/status",
            "daemonsets",
            "daemonsets/status",
        ],
        "batch": ["jobs", "jobs/status", "cronjobs", "cronjobs/status"],
        "policy": ["poddisruptionbudgets", "poddisruptionbudgets/status"],
        "networking.k8s.io": ["ingresses", "ingresses/status", "networkpolicies"],
    }
    view_rules = [{"apiGroups": [""], "resources": core_read, "verbs": _READ}]
    view_rules += [{"apiGroups": [g], "resources": r, "verbs": _READ} for g, r in workloads.items()]
    view_rules.append({"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": _READ})
    edit_rules = [
        {
            "apiGroups": [""],
            "resources": [
                "pods",
                "pods/eviction",
                "configmaps",
                "endpoints",
                "persistentvolumeclaims",
                "secrets",
                "services",
                "serviceaccounts",
            ],
            "verbs": _WRITE,
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": _READ},
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": _READ + _WRITE},
    ]
    edit_rules += [
        {"apiGroups": [g], "resources": [x for x in r if not x.endswith("/status")], "verbs": _WRITE}
        for g, r in workloads.items()
    ]
    admin_rules = [
        {"apiGroups": [RBAC_GROUP], "resources": ["roles", "rolebindings"], "verbs": _READ + _WRITE},
        {
            "apiGroups": ["authorization.k8s.io"],
            "resources": ["localsubjectaccessreviews"],
            "verbs": ["create"],
        },
    ]
    discovery_urls = [
        "/api",
        "/api/*",
        "/apis",
        "/apis/*",
        "/healthz",
        "/livez",
        "/openapi",
        "/openapi/*",
        "/readyz",
        "/version",
        "/version/",
    ]
    return [
        _role(
            "cluster-admin",
            [
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]},
            ],
        ),
        _role("admin", [], aggregate_from="admin"),
        _role("edit", [], {f"{_AGG}admin": "true"}, aggregate_from="edit"),
        _role("view", [], {f"{_AGG}edit": "true"}, aggregate_from="view"),
        _role("system:aggregate-to-admin", admin_rules, {f"{_AGG}admin": "true"}),
        _role("system:aggregate-to-edit", edit_rules, {f"{_AGG}edit": "true"}),
        _role("system:aggregate-to-view", view_rules, {f"{_AGG}view": "true"}),
        _role("system:discovery", [{"nonResourceURLs": discovery_urls, "verbs": ["get"]}]),
        _role(
            "system:public-info-viewer",
            [
                {
                    "nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"],
                    "verbs": ["get"],
                }
            ],
        ),
        _role(
            "system:basic-user",
            [
                {
                    "apiGroups": ["authorization.k8s.io"],
                    "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    "verbs": ["create"],
                },
                {
                    "apiGroups": ["authentication.k8s.io"],
                    "resources": ["selfsubjectreviews"],
                    "verbs": ["create"],
                },
            ],
        ),
    ]


def default_cluster_role_bindings() -> list[dict[str, Any]]:
    return [
        _binding("cluster-admin", "cluster-admin", ["system:masters"]),
        _binding("system:discovery", "system:discovery", ["system:authenticated"]),
        _binding("system:basic-user", "system:basic-user", ["system:authenticated"]),
        _binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            ["system:authenticated", "system:unauthenticated"],
        ),
    ]
