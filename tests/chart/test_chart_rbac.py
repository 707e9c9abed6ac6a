"""RBAC: least privilege in cluster and namespaced modes, snapshot, no Secret access, aggregation."""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml

from .chart_helpers import SNAPSHOTS, VALUES_DIR, by_kind, one, render, values_files

pytestmark = pytest.mark.helm

SNAPSHOT = SNAPSHOTS / "rbac.yaml"
ROLE_KINDS = ("ClusterRole", "Role")
SECRET_RESOURCES = {"secrets", "*"}


def rbac_view(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """Roles and bindings as `Kind/[namespace/]name` → rules or roleRef+subjects (what the snapshot holds)."""
    view: dict[str, Any] = {}
    for manifest in manifests:
        kind = manifest["kind"]
        if kind not in {"ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"}:
            continue
        meta = manifest["metadata"]
        key = "/".join(filter(None, [kind, meta.get("namespace"), meta["name"]]))
        if kind in ROLE_KINDS:
            aggregate = sorted(k for k, v in meta["labels"].items() if "aggregate-to" in k and v == "true")
            view[key] = {"rules": manifest["rules"], **({"aggregateTo": aggregate} if aggregate else {})}
        else:
            view[key] = {"roleRef": manifest["roleRef"], "subjects": manifest["subjects"]}
    return view


def snapshot_now(helm: str) -> dict[str, Any]:
    return {path.stem: rbac_view(render(helm, path, namespace="finetune-system")) for path in values_files()}


def test_rbac_matches_the_committed_snapshot(helm: str) -> None:
    current = snapshot_now(helm)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(
            "# Rendered RBAC per values file: regenerate with UPDATE_SNAPSHOTS=1 after reviewing the "
            "diff.\n" + yaml.safe_dump(current, sort_keys=True, width=120)
        )
    assert SNAPSHOT.exists(), "no snapshot: run UPDATE_SNAPSHOTS=1 pytest tests/chart/test_chart_rbac.py"
    committed = yaml.safe_load(SNAPSHOT.read_text())
    assert current == committed, (
        "the chart's RBAC changed; review it, then UPDATE_SNAPSHOTS=1 pytest tests/chart/test_chart_rbac.py"
    )


def grants_secrets(rule: dict[str, Any]) -> bool:
    groups = set(rule.get("apiGroups") or [])
    resources = {r.split("/")[0] for r in rule.get("resources") or []}
    return bool(groups & {"", "*"}) and bool(resources & SECRET_RESOURCES)


@pytest.mark.parametrize(
    "rule",
    [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["*"], "verbs": ["watch"]},
        {"apiGroups": [""], "resources": ["pods", "secrets/finalizers"], "verbs": ["update"]},
    ],
)
def test_secret_detector_catches_direct_and_wildcard_grants(rule: dict[str, Any]) -> None:
    assert grants_secrets(rule)


@pytest.mark.parametrize("values", values_files(), ids=[p.stem for p in values_files()])
def test_no_role_grants_anything_on_secrets_or_uses_wildcards(helm: str, values) -> None:
    for manifest in render(helm, values):
        if manifest["kind"] not in ROLE_KINDS:
            continue
        assert "aggregationRule" not in manifest
        for rule in manifest["rules"]:
            name = manifest["metadata"]["name"]
            assert not grants_secrets(rule), f"{name} grants {rule['verbs']} on secrets: {rule}"
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), f"{name}: wildcard {field} in {rule}"
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule


def operator_rules(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    roles = [m for m in by_kind(manifests, kind) if not m["metadata"]["name"].endswith(("-edit", "-view"))]
    assert roles
    return roles[0]["rules"]


def flatten(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def operator_verbs() -> set[tuple[str, str, str]]:
    """What the operator declares it uses (operator/finetune_operator/k8s/rbac.py)."""
    from finetune_operator.k8s import rbac

    return {(g, r, v) for (g, r), verbs in rbac.verbs().items() for v in verbs}


def test_cluster_mode_grants_exactly_the_operator_verbs_cluster_wide(helm: str) -> None:
    manifests = render(helm, VALUES_DIR / "default.yaml")
    assert flatten(operator_rules(manifests, "ClusterRole")) == operator_verbs()
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "ftop-finetune-operator",
    }
    service_account = one(manifests, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": service_account, "namespace": "finetune-system"}
    ]
    assert by_kind(manifests, "Role") == [] and by_kind(manifests, "RoleBinding") == []


def test_namespaced_mode_grants_the_same_verbs_per_namespace_and_only_policies_cluster_wide(
    helm: str,
) -> None:
    manifests = render(helm, VALUES_DIR / "namespaced.yaml")
    roles = by_kind(manifests, "Role")
    bindings = by_kind(manifests, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    from finetune_operator.k8s import rbac

    cluster_verbs = {
        (g, r, v)
        for rule in rbac.CLUSTER_RULES
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    for role, binding in zip(roles, bindings, strict=True):
        assert flatten(role["rules"]) == operator_verbs() - cluster_verbs
        assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"][0]["namespace"] == "finetune-system"
    # Cluster-scoped: FineTunePolicies and namespace labels (a Role cannot grant them), bound to the
    # operator; the aggregated user-facing roles are bound to no one by the chart.
    (policies,) = by_kind(manifests, "ClusterRoleBinding")
    assert policies["roleRef"]["name"] == "ftop-finetune-operator-policies"
    roles_by_name = {m["metadata"]["name"]: m for m in by_kind(manifests, "ClusterRole")}
    assert set(roles_by_name) == {
        "ftop-finetune-operator-edit",
        "ftop-finetune-operator-view",
        "ftop-finetune-operator-policies",
    }
    assert flatten(roles_by_name["ftop-finetune-operator-policies"]["rules"]) == cluster_verbs


def test_aggregated_roles_let_namespace_users_manage_finetunejobs(helm: str) -> None:
    manifests = render(helm, VALUES_DIR / "default.yaml")
    roles = {m["metadata"]["name"]: m for m in by_kind(manifests, "ClusterRole")}
    edit, view = roles["ftop-finetune-operator-edit"], roles["ftop-finetune-operator-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    edit_grants = flatten(edit["rules"])
    for verb in ("create", "update", "patch", "delete", "get", "list", "watch"):
        assert ("finetune.dev", "finetunejobs", verb) in edit_grants
    assert ("finetune.dev", "finetunejobs/status", "patch") not in edit_grants  # status is the operator's
    for verb in ("create", "update", "patch", "delete", "get", "list", "watch"):
        assert ("finetune.dev", "finetuneschedules", verb) in edit_grants
    assert ("finetune.dev", "finetuneschedules", "get") in flatten(view["rules"])
    # status.children is what makes a child count (docs/security.md): no aggregated role may write any status
    for role in (edit, view):
        for status in ("finetunejobs/status", "modelservers/status", "finetuneschedules/status"):
            assert {v for _, r, v in flatten(role["rules"]) if r == status} <= {"get", "list", "watch"}
    # FineTunePolicies are the platform team's: no aggregated role grants anything on them.
    for role in (edit, view):
        assert not any("finetunepolicies" in r for _, r, _ in flatten(role["rules"]))
    assert {v for _, _, v in flatten(view["rules"])} == {"get", "list", "watch"}
