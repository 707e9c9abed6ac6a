"""RBAC as kube-apiserver enforces it: verbs, subresources, resourceNames, groups, ClusterRole aggregation,
non-resource URLs, impersonation, access reviews (`kubectl auth can-i`) and ServiceAccount tokens, with the
apiserver's 403 wording. Users are impersonated by the admin kubeconfig (`Impersonate-User`, `--as`), which
works the same on a real cluster."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Raw, wait_for

RBAC = "/apis/rbac.authorization.k8s.io/v1"
GROUP = "rbac.authorization.k8s.io"


def as_user(user: str, group: str | None = None) -> dict[str, Any]:
    headers: dict[str, Any] = {"Impersonate-User": user}
    if group:
        headers["Impersonate-Group"] = group
    return headers


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def role(raw: Raw, namespace: str, name: str, rules: list[dict[str, Any]]) -> None:
    status, body, _ = raw.request(
        "POST", f"{RBAC}/namespaces/{namespace}/roles", {"metadata": {"name": name}, "rules": rules}
    )
    assert status == 201, body


def bind(
    raw: Raw, namespace: str, name: str, ref_kind: str, ref: str, subjects: list[dict[str, Any]]
) -> None:
    body = {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": GROUP, "kind": ref_kind, "name": ref},
        "subjects": subjects,
    }
    status, answer, _ = raw.request("POST", f"{RBAC}/namespaces/{namespace}/rolebindings", body)
    assert status == 201, answer


def user(name: str) -> dict[str, Any]:
    return {"kind": "User", "apiGroup": GROUP, "name": name}


@pytest.fixture
def cluster_objects(raw: Raw) -> Iterator[list[str]]:
    """Paths of cluster-scoped objects a test creates, deleted afterwards."""
    paths: list[str] = []
    yield paths
    for path in paths:
        raw.request("DELETE", path)


def test_role_grants_only_its_verbs_with_apiserver_wording(raw: Raw, namespace: str) -> None:
    alice = unique("alice")
    role(
        raw,
        namespace,
        "reader",
        [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        ],
    )
    bind(raw, namespace, "reader", "Role", "reader", [user(alice)])
    pods = f"/api/v1/namespaces/{namespace}/pods"
    headers = as_user(alice)
    assert raw.request("GET", pods, headers=headers)[0] == 200
    assert raw.request("GET", f"{pods}/nothing", headers=headers)[0] == 404  # allowed, just absent
    status, body, _ = raw.request("DELETE", f"{pods}/nothing", headers=headers)
    assert status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == (
        f'pods "nothing" is forbidden: User "{alice}" cannot delete resource "pods" in API group "" '
        f'in the namespace "{namespace}"'
    )
    assert body["details"] == {"name": "nothing", "kind": "pods"}
    status, body, _ = raw.request("GET", f"{pods}?watch=true&timeoutSeconds=1", headers=headers)
    assert status == 403
    assert body["message"] == (
        f'pods is forbidden: User "{alice}" cannot watch resource "pods" in API group "" '
        f'in the namespace "{namespace}"'
    )
    cms = f"/api/v1/namespaces/{namespace}/configmaps"
    status, body, _ = raw.request("POST", cms, {"metadata": {"name": "mine"}}, headers=headers)
    assert status == 201, body
    status, body, _ = raw.request("DELETE", cms, headers=headers)
    assert status == 403 and 'cannot deletecollection resource "configmaps"' in body["message"]
    status, body, _ = raw.request("GET", "/apis/batch/v1/namespaces/" + namespace + "/jobs", headers=headers)
    assert status == 403 and 'cannot list resource "jobs" in API group "batch"' in body["message"]
    status, body, _ = raw.request("GET", "/api/v1/namespaces", headers=headers)
    assert status == 403
    assert body["message"] == (
        f'namespaces is forbidden: User "{alice}" cannot list resource "namespaces" in API group "" '
        "at the cluster scope"
    )


def test_subresources_and_resource_names(raw: Raw, namespace: str) -> None:
    bob = unique("bob")
    role(
        raw,
        namespace,
        "narrow",
        [
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
            {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]},
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": ["open"],
                "verbs": ["get", "update"],
            },
        ],
    )
    bind(raw, namespace, "narrow", "Role", "narrow", [user(bob)])
    headers = as_user(bob)
    pods = f"/api/v1/namespaces/{namespace}/pods"
    assert raw.request("GET", f"{pods}/p/log", headers=headers)[0] == 404  # authorized: the pod is absent
    assert raw.request("GET", f"{pods}/p/status", headers=headers)[0] == 404
    status, body, _ = raw.request("GET", f"{pods}/p", headers=headers)
    assert status == 403 and f'User "{bob}" cannot get resource "pods" in API group ""' in body["message"]
    status, body, _ = raw.request(
        "GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/d/scale", headers=headers
    )
    assert status == 403
    assert body["message"] == (
        f'deployments.apps "d" is forbidden: User "{bob}" cannot get resource "deployments/scale" '
        f'in API group "apps" in the namespace "{namespace}"'
    )
    cms = f"/api/v1/namespaces/{namespace}/configmaps"
    for name in ("open", "closed"):
        assert raw.request("POST", cms, {"metadata": {"name": name}})[0] == 201
    assert raw.request("GET", f"{cms}/open", headers=headers)[0] == 200
    status, body, _ = raw.request("GET", f"{cms}/closed", headers=headers)
    assert status == 403 and body["message"].startswith('configmaps "closed" is forbidden')
    assert raw.request("GET", cms, headers=headers)[0] == 403  # resourceNames never grant list


def test_groups_cluster_role_binding_and_reviews(
    raw: Raw, namespace: str, cluster_objects: list[str]
) -> None:
    group = unique("auditors")
    name = unique("conformance-ns-reader")
    status, body, _ = raw.request(
        "POST",
        f"{RBAC}/clusterroles",
        {
            "metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list"]}],
        },
    )
    assert status == 201, body
    cluster_objects.append(f"{RBAC}/clusterroles/{name}")
    status, body, _ = raw.request(
        "POST",
        f"{RBAC}/clusterrolebindings",
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "Group", "apiGroup": GROUP, "name": group}],
        },
    )
    assert status == 201, body
    cluster_objects.append(f"{RBAC}/clusterrolebindings/{name}")
    carol = unique("carol")
    assert raw.request("GET", "/api/v1/namespaces", headers=as_user(carol))[0] == 403
    assert raw.request("GET", "/api/v1/namespaces", headers=as_user(carol, group))[0] == 200

    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": carol,
            "groups": [group],
            "resourceAttributes": {"verb": "list", "resource": "namespaces"},
        },
    }
    status, body, _ = raw.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    assert status == 201 and body["status"]["allowed"] is True
    review["spec"]["groups"] = []
    status, body, _ = raw.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    assert status == 201 and body["status"]["allowed"] is False
    self_review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": "delete", "resource": "namespaces", "name": namespace}},
    }
    status, body, _ = raw.request(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        self_review,
        headers=as_user(carol, group),
    )
    assert status == 201 and body["status"]["allowed"] is False


def test_cluster_role_aggregation_fills_rules(raw: Raw, namespace: str, cluster_objects: list[str]) -> None:
    label = f"conformance.example.com/aggregate-{uuid.uuid4().hex[:6]}"
    parent, child = unique("conformance-parent"), unique("conformance-child")
    status, body, _ = raw.request(
        "POST",
        f"{RBAC}/clusterroles",
        {
            "metadata": {"name": parent},
            "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {label: "true"}}]},
        },
    )
    assert status == 201, body
    cluster_objects.append(f"{RBAC}/clusterroles/{parent}")
    rule = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}
    status, body, _ = raw.request(
        "POST",
        f"{RBAC}/clusterroles",
        {"metadata": {"name": child, "labels": {label: "true"}}, "rules": [rule]},
    )
    assert status == 201, body
    cluster_objects.append(f"{RBAC}/clusterroles/{child}")

    def parent_rules() -> list[dict[str, Any]]:
        return raw.request("GET", f"{RBAC}/clusterroles/{parent}")[1].get("rules") or []

    wait_for(lambda: parent_rules() == [rule], "the aggregated rules")
    dave = unique("dave")
    bind(raw, namespace, "agg", "ClusterRole", parent, [user(dave)])
    cms = f"/api/v1/namespaces/{namespace}/configmaps"
    wait_for(lambda: raw.request("GET", cms, headers=as_user(dave))[0] == 200, "access through aggregation")
    status, body, _ = raw.request(
        "PATCH",
        f"{RBAC}/clusterroles/{child}",
        {"metadata": {"labels": {label: None}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    wait_for(lambda: parent_rules() == [], "the rules to leave with the label")
    wait_for(lambda: raw.request("GET", cms, headers=as_user(dave))[0] == 403, "access to go")


def test_default_edit_role_and_kubectl_auth_can_i(kubectl: Any, raw: Raw, namespace: str) -> None:
    erin = unique("erin")
    bind(raw, namespace, "erin-edit", "ClusterRole", "edit", [user(erin)])
    other = f"conf-{uuid.uuid4().hex[:8]}"
    assert raw.request("POST", "/api/v1/namespaces", {"metadata": {"name": other}})[0] == 201
    try:
        assert (
            kubectl("auth", "can-i", "create", "configmaps", "-n", namespace, "--as", erin).stdout.strip()
            == "yes"
        )
        assert (
            kubectl(
                "auth", "can-i", "get", "pods", "--subresource=log", "-n", namespace, "--as", erin
            ).stdout.strip()
            == "yes"
        )
        denied = kubectl("auth", "can-i", "create", "configmaps", "-n", other, "--as", erin, check=False)
        assert denied.returncode == 1 and denied.stdout.strip() == "no"
        edit_rbac = kubectl(
            "auth", "can-i", "create", "rolebindings", "-n", namespace, "--as", erin, check=False
        )
        assert edit_rbac.stdout.strip() == "no"  # edit, unlike admin, cannot grant access
        # An ordinary user's kubectl works: discovery is open to every authenticated user.
        kubectl("create", "configmap", "by-erin", "-n", namespace, "--from-literal=a=b", "--as", erin)
        listed = kubectl("get", "configmaps", "-n", namespace, "-o", "name", "--as", erin).stdout.split()
        assert "configmap/by-erin" in listed
        refused = kubectl("get", "configmaps", "-n", other, "--as", erin, check=False)
        assert refused.returncode != 0
        assert (
            f'configmaps is forbidden: User "{erin}" cannot list resource "configmaps" in API group "" '
            f'in the namespace "{other}"'
        ) in refused.stderr
        rules = kubectl("auth", "can-i", "--list", "-n", namespace, "--as", erin).stdout
        assert "configmaps" in rules and "deployments.apps" in rules
    finally:
        raw.request("DELETE", f"/api/v1/namespaces/{other}")


def test_non_resource_urls(raw: Raw, cluster_objects: list[str]) -> None:
    grace = unique("grace")
    assert raw.request("GET", "/version", headers=as_user(grace))[0] == 200  # system:public-info-viewer
    assert raw.request("GET", "/apis", headers=as_user(grace))[0] == 200  # system:discovery
    status, body, _ = raw.request("GET", "/logs", headers=as_user(grace))
    assert status == 403
    assert body["message"] == f'forbidden: User "{grace}" cannot get path "/logs"'
    name = unique("conformance-logs-reader")
    status, body, _ = raw.request(
        "POST",
        f"{RBAC}/clusterroles",
        {"metadata": {"name": name}, "rules": [{"nonResourceURLs": ["/logs", "/logs/*"], "verbs": ["get"]}]},
    )
    assert status == 201, body
    cluster_objects.append(f"{RBAC}/clusterroles/{name}")
    status, body, _ = raw.request(
        "POST",
        f"{RBAC}/clusterrolebindings",
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": name},
            "subjects": [user(grace)],
        },
    )
    assert status == 201, body
    cluster_objects.append(f"{RBAC}/clusterrolebindings/{name}")
    wait_for(lambda: raw.request("GET", "/logs", headers=as_user(grace))[0] != 403, "the path to open")


def token_client(api: Any, token: str) -> Any:
    """A Python client with only a bearer token (no client certificate), trusting the admin's CA."""
    from kubernetes import client

    base = api.configuration
    config = client.Configuration()
    config.host = base.host
    config.ssl_ca_cert = base.ssl_ca_cert
    config.verify_ssl = base.verify_ssl
    config.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(config)


def test_service_account_token_authenticates_as_the_account(raw: Raw, api: Any, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    assert (
        raw.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": "robot"}}
        )[0]
        == 201
    )
    role(raw, namespace, "cm-reader", [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}])
    bind(
        raw,
        namespace,
        "robot",
        "Role",
        "cm-reader",
        [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}],
    )
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 600},
    }
    status, body, _ = raw.request(
        "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/robot/token", request
    )
    assert status == 201, body
    token = body["status"]["token"]
    assert body["status"]["expirationTimestamp"]
    robot = token_client(api, token)
    try:
        core = client.CoreV1Api(robot)
        wait_for(lambda: _status(lambda: core.list_namespaced_config_map(namespace)) == 200, "the binding")
        with pytest.raises(ApiException) as denied:
            core.list_namespaced_secret(namespace)
        assert denied.value.status == 403
        assert json.loads(denied.value.body)["message"] == (
            f'secrets is forbidden: User "system:serviceaccount:{namespace}:robot" cannot list resource '
            f'"secrets" in API group "" in the namespace "{namespace}"'
        )
        who = client.AuthenticationV1Api(robot).create_self_subject_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        )
        assert who.status.user_info.username == f"system:serviceaccount:{namespace}:robot"
        assert {
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
        } <= set(who.status.user_info.groups)
        # Only those allowed the impersonate verb may impersonate.
        response = robot.rest_client.pool_manager.request(
            "GET",
            f"{robot.configuration.host}/api/v1/namespaces/{namespace}/configmaps",
            headers={"Authorization": f"Bearer {token}", "Impersonate-User": "root"},
            retries=False,
        )
        assert response.status == 403
        assert json.loads(response.data)["message"] == (
            f'users "root" is forbidden: User "system:serviceaccount:{namespace}:robot" cannot impersonate '
            'resource "users" in API group "" at the cluster scope'
        )
        # Deleting the account revokes its tokens.
        assert raw.request("DELETE", f"/api/v1/namespaces/{namespace}/serviceaccounts/robot")[0] == 200
        wait_for(
            lambda: _status(lambda: core.list_namespaced_config_map(namespace)) == 401, "the token to die"
        )
    finally:
        robot.close()


def _status(call: Any) -> int:
    from kubernetes.client.rest import ApiException

    try:
        call()
    except ApiException as exc:
        return int(exc.status)
    return 200


@pytest.mark.emulator
def test_emulator_anonymous_and_bad_tokens(raw: Raw, emulator: Any, namespace: str) -> None:
    # The admin kubeconfig of the embedded cluster carries no credentials: it is cluster-admin.
    status, body, _ = raw.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1"},
    )
    assert status == 201 and "system:masters" in body["status"]["userInfo"]["groups"]
    status, body, _ = raw.request("GET", "/api/v1/namespaces", headers={"Authorization": "Bearer nope"})
    assert (status, body["reason"]) == (401, "Unauthorized")
    token = f"static-{uuid.uuid4().hex}"
    emulator.add_user(token, "heidi", ["finance"])  # add_user only touches dicts: safe from this thread
    status, body, _ = raw.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert status == 201
    assert body["status"]["userInfo"] == {"username": "heidi", "groups": ["finance", "system:authenticated"]}


@pytest.mark.emulator
def test_emulator_service_account_kubeconfig_helper(
    local_cluster: Any, emulator: Any, namespace: str
) -> None:
    from kubernetes import client, config

    path = local_cluster.call(local_cluster.service_account_kubeconfig(namespace, "bot"))
    bot = config.new_client_from_config(config_file=str(path))
    try:
        who = client.AuthenticationV1Api(bot).create_self_subject_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        )
        assert who.status.user_info.username == f"system:serviceaccount:{namespace}:bot"
        assert _status(lambda: client.CoreV1Api(bot).list_namespaced_pod(namespace)) == 403
    finally:
        bot.close()
    # The embedded cluster's own operator runs as its ServiceAccount with the chart's rules, never refused.
    if local_cluster.operator_process is not None:
        account = "system:serviceaccount:default:finetune-operator"

        async def seen() -> tuple[int, list[Any]]:
            counters = emulator.counters
            return counters.by_user[account], [k for k in counters.forbidden if k[0] == account]

        _, refused = wait_for(lambda: (r := local_cluster.call(seen()))[0] and r, "operator requests")
        assert refused == []


def test_kubectl_create_role_binding_and_as_group(kubectl: Any, raw: Raw, namespace: str) -> None:
    group = unique("devs")
    kubectl(
        "create",
        "role",
        "cm-get",
        "--verb=get",
        "--resource=configmaps",
        "--resource-name=one",
        "-n",
        namespace,
    )
    kubectl("create", "rolebinding", "devs", "--role=cm-get", f"--group={group}", "-n", namespace)
    stored = raw.request("GET", f"{RBAC}/namespaces/{namespace}/roles/cm-get")[1]
    assert stored["rules"] == [
        {"verbs": ["get"], "apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["one"]}
    ]
    binding = raw.request("GET", f"{RBAC}/namespaces/{namespace}/rolebindings/devs")[1]
    assert binding["roleRef"] == {"apiGroup": GROUP, "kind": "Role", "name": "cm-get"}
    assert binding["subjects"] == [{"kind": "Group", "apiGroup": GROUP, "name": group}]

    def can_i(*args: str) -> str:
        return str(kubectl("auth", "can-i", *args, "-n", namespace, check=False).stdout.strip())

    wait_for(
        lambda: can_i("get", "configmap/one", "--as", "someone", "--as-group", group) == "yes", "the binding"
    )
    assert can_i("get", "configmap/two", "--as", "someone", "--as-group", group) == "no"
    assert can_i("get", "configmap/one", "--as", "someone") == "no"
