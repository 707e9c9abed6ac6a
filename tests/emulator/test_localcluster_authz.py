"""The embedded cluster's RBAC rule matching, aggregation and admission-policy matching, without a server."""

from __future__ import annotations

from typing import Any

import pytest
from localcluster.apiserver.auth import UserInfo, user_with_defaults
from localcluster.apiserver.policy import Request, matches
from localcluster.apiserver.rbac import (
    Attributes,
    Authorizer,
    aggregate,
    forbidden_message,
    rule_allows,
)

ALICE = UserInfo("alice", ("system:authenticated",))


def attrs(
    verb: str, resource: str, sub: str = "", name: str = "", group: str = "", ns: str = "a"
) -> Attributes:
    return Attributes(ALICE, verb, ns, group, resource, sub, name)


@pytest.mark.parametrize(
    ("rule", "request_attrs", "allowed"),
    [
        ({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}, attrs("get", "pods"), True),
        ({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}, attrs("list", "pods"), False),
        ({"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}, attrs("get", "pods", "log"), False),
        ({"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}, attrs("get", "pods", "log"), True),
        (
            {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]},
            attrs("get", "jobs", "status"),
            True,
        ),
        ({"apiGroups": ["apps"], "resources": ["*"], "verbs": ["get"]}, attrs("get", "pods"), False),
        (
            {"apiGroups": [""], "resources": ["cm"], "resourceNames": ["x"], "verbs": ["get"]},
            attrs("get", "cm", name="x"),
            True,
        ),
        (
            {"apiGroups": [""], "resources": ["cm"], "resourceNames": ["x"], "verbs": ["get"]},
            attrs("get", "cm", name="y"),
            False,
        ),
    ],
)
def test_rule_allows(rule: dict[str, Any], request_attrs: Attributes, allowed: bool) -> None:
    assert rule_allows(rule, request_attrs) is allowed


def test_non_resource_urls_match_exactly_or_by_prefix() -> None:
    rule = {"nonResourceURLs": ["/healthz", "/apis/*"], "verbs": ["get"]}
    path = lambda p: Attributes(ALICE, "get", path=p, resource_request=False)  # noqa: E731
    assert rule_allows(rule, path("/healthz")) and rule_allows(rule, path("/apis/batch/v1"))
    assert not rule_allows(rule, path("/healthz/etcd")) and not rule_allows(rule, path("/api"))


def test_resource_names_never_grant_collections() -> None:
    role = {
        "metadata": {"name": "r", "namespace": "a"},
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["x"], "verbs": ["list", "get"]}
        ],
    }
    binding = {
        "metadata": {"name": "b", "namespace": "a"},
        "roleRef": {"kind": "Role", "name": "r"},
        "subjects": [{"kind": "User", "name": "alice"}],
    }
    store = {"roles": [role], "rolebindings": [binding], "clusterroles": [], "clusterrolebindings": []}
    authorizer = Authorizer(lambda plural, ns: store[plural])
    assert authorizer.allowed(attrs("get", "configmaps", name="x"))
    assert not authorizer.allowed(attrs("list", "configmaps"))


def test_forbidden_message_wording() -> None:
    assert forbidden_message(attrs("deletecollection", "jobs", group="batch")) == (
        'User "alice" cannot deletecollection resource "jobs" in API group "batch" in the namespace "a"'
    )
    assert forbidden_message(attrs("list", "nodes", ns="")) == (
        'User "alice" cannot list resource "nodes" in API group "" at the cluster scope'
    )


def test_aggregation_collects_rules_of_selected_roles_once() -> None:
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}
    roles = [
        {
            "metadata": {"name": "parent"},
            "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "1"}}]},
        },
        {"metadata": {"name": "a", "labels": {"agg": "1"}}, "rules": [rule]},
        {"metadata": {"name": "b", "labels": {"agg": "1"}}, "rules": [rule]},
        {"metadata": {"name": "c"}, "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]},
    ]
    assert aggregate(roles) == {"parent": [rule]}
    roles[0]["rules"] = [rule]
    assert aggregate(roles) == {}


def test_service_account_users_get_their_groups() -> None:
    user = user_with_defaults("system:serviceaccount:ml:robot", [])
    assert user.groups == ("system:serviceaccounts", "system:serviceaccounts:ml", "system:authenticated")


def request(**kw: Any) -> Request:
    base: dict[str, Any] = dict(
        operation="CREATE",
        group="",
        version="v1",
        kind="ConfigMap",
        resource="configmaps",
        subresource="",
        namespace="a",
        name="x",
        namespaced=True,
        obj={"metadata": {"labels": {"tier": "web"}}},
        old=None,
        user={"username": "alice"},
        namespace_object={"metadata": {"labels": {"team": "a"}}},
    )
    base.update(kw)
    return Request(**base)


def test_policy_match_constraints() -> None:
    rule = {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}
    assert matches({"resourceRules": [rule]}, request())
    assert not matches({"resourceRules": [rule]}, request(operation="UPDATE"))
    assert not matches({"resourceRules": [rule]}, request(subresource="status"))  # subresources: named only
    assert matches(
        {"resourceRules": [{**rule, "resources": ["configmaps/status"]}]}, request(subresource="status")
    )
    assert not matches({"resourceRules": [rule], "excludeResourceRules": [rule]}, request())
    assert matches({"namespaceSelector": {"matchLabels": {"team": "a"}}}, request())
    assert not matches({"namespaceSelector": {"matchLabels": {"team": "b"}}}, request())
    assert not matches({"objectSelector": {"matchLabels": {"tier": "db"}}}, request())
