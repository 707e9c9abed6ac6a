"""The OpenAI-compatible API (`api.enabled`, templates/api.yaml): off by default; when on, a restricted
Deployment running `python -m finetune_api` with flags from the values, a Service, and a ServiceAccount whose
RBAC is exactly TokenReview + SubjectAccessReview create and `get` of the one mapping ConfigMap."""

from __future__ import annotations

from typing import Any

import pytest

from .chart_helpers import (
    CHART,
    KUBE_VERSIONS,
    by_kind,
    kubernetes_schema_errors,
    pod_specs,
    render,
    run_helm,
)
from .pss import check_restricted
from .test_chart_rbac import flatten, grants_secrets

pytestmark = pytest.mark.helm

API = "ftop-finetune-operator-api"
ENABLED = (
    "--set",
    "api.enabled=true",
    "--set",
    "api.files.uri=s3://platform-files/openai",
    "--set",
    "api.files.credentialsSecret=api-s3",
)


def api_objects(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in manifests if m["metadata"]["labels"].get("app.kubernetes.io/component") == "api"]


def named(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [m for m in by_kind(manifests, kind) if m["metadata"]["name"] == API]
    return found


def api_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = named(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_api_is_off_by_default(helm: str) -> None:
    manifests = render(helm)
    assert api_objects(manifests) == []
    assert not [m for m in manifests if m["metadata"]["name"].endswith("-api")]


def test_enabled_renders_the_contracts_objects(helm: str) -> None:
    manifests = render(helm, extra=ENABLED)
    kinds = sorted(m["kind"] for m in api_objects(manifests))
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    assert {m["metadata"]["name"] for m in api_objects(manifests)} == {API}
    # The operator's own objects are still there, unchanged in number.
    assert len(by_kind(manifests, "Deployment")) == 2


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_api_objects_match_the_kubernetes_schema(helm: str, kube_version: str) -> None:
    for manifest in api_objects(render(helm, kube_version=kube_version, extra=ENABLED)):
        errors = kubernetes_schema_errors(manifest, kube_version)
        assert errors == [], f"{manifest['kind']}/{manifest['metadata']['name']}: {errors}"


def test_deployment_runs_finetune_api_with_flags_from_values(helm: str) -> None:
    manifests = render(
        helm,
        namespace="ml-platform",
        extra=(
            *ENABLED,
            "--set",
            "api.port=8443",
            "--set",
            "api.files.maxBytes=1000000",
            "--set",
            "api.maxBodyBytes=65536",
            "--set",
            "api.rateLimit.requestsPerMinute=0",
            "--set",
            "api.modelsConfigMap=team-models",
            "--set",
            "api.replicas=2",
        ),
    )
    deployment = named(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = api_container(manifests)
    assert container["image"] == "ghcr.io/finetune-operator/operator:0.1.0"  # the operator's image
    assert container["command"] == ["python", "-m", "finetune_api"]
    args = container["args"]
    assert flag(args, "--port") == "8443"
    assert flag(args, "--files-uri") == "s3://platform-files/openai"
    assert flag(args, "--max-file-bytes") == "1000000"
    assert flag(args, "--max-body-bytes") == "65536"
    assert flag(args, "--rate-limit") == "0"
    assert flag(args, "--models-configmap") == "team-models"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert container["envFrom"] == [{"secretRef": {"name": "api-s3"}}]
    assert container["ports"] == [{"name": "http", "containerPort": 8443, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == named(manifests, "ServiceAccount")["metadata"]["name"] == API
    # The Role is in the release namespace, where the mapping ConfigMap lives.
    assert named(manifests, "Role")["metadata"]["namespace"] == "ml-platform"


def test_default_limits_and_large_byte_limits_render_as_plain_integers(helm: str) -> None:
    args = api_container(render(helm, extra=ENABLED))["args"]
    assert flag(args, "--max-file-bytes") == "536870912"
    assert flag(args, "--max-body-bytes") == "1048576" and flag(args, "--rate-limit") == "600"
    assert flag(args, "--models-configmap") == "finetune-api-models"
    args = api_container(render(helm, extra=(*ENABLED, "--set", "api.files.maxBytes=10737418240")))["args"]
    assert flag(args, "--max-file-bytes") == "10737418240"  # not 1.073741824e+10


def test_no_credentials_secret_means_no_env_from(helm: str) -> None:
    container = api_container(
        render(helm, extra=("--set", "api.enabled=true", "--set", "api.files.uri=s3://files"))
    )
    assert "envFrom" not in container


def test_the_service_targets_only_the_api_pods(helm: str) -> None:
    manifests = render(
        helm, extra=(*ENABLED, "--set", "api.service.port=80", "--set", "api.service.type=NodePort")
    )
    service = named(manifests, "Service")
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    deployments = {d["metadata"]["name"]: d for d in by_kind(manifests, "Deployment")}
    api_labels = deployments[API]["spec"]["template"]["metadata"]["labels"]
    operator_labels = deployments["ftop-finetune-operator"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= api_labels.items()
    # Neither the operator's Deployment nor its metrics Service selects the API's pods, and vice versa.
    operator_selector = deployments["ftop-finetune-operator"]["spec"]["selector"]["matchLabels"]
    assert not operator_selector.items() <= api_labels.items()
    assert not deployments[API]["spec"]["selector"]["matchLabels"].items() <= operator_labels.items()
    metrics = [s for s in by_kind(manifests, "Service") if s["metadata"]["name"].endswith("-metrics")]
    assert metrics and not metrics[0]["spec"]["selector"].items() <= api_labels.items()


def test_the_api_pod_is_pod_security_restricted(helm: str) -> None:
    specs = dict(pod_specs(render(helm, extra=ENABLED)))
    spec = specs[f"Deployment/{API}"]
    assert check_restricted(spec) == []
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[mounts["/tmp"]]


def rules_of(manifests: list[dict[str, Any]], kind: str) -> set[tuple[str, str, str]]:
    return flatten(named(manifests, kind)["rules"])


def test_the_api_rbac_is_least_privilege(helm: str) -> None:
    manifests = render(helm, namespace="ml-platform", extra=ENABLED)
    assert rules_of(manifests, "ClusterRole") == {
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
    }
    role = named(manifests, "Role")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["finetune-api-models"],
            "verbs": ["get"],
        }
    ]
    subject = [{"kind": "ServiceAccount", "name": API, "namespace": "ml-platform"}]
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = named(manifests, kind)
        assert binding["subjects"] == subject
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": API}


def test_nothing_binds_the_api_account_to_jobs_secrets_or_impersonation(helm: str) -> None:
    """Every role bound to the API's ServiceAccount, in the whole render: nothing on FineTuneJobs (the
    caller's own token does that), no Secrets, no impersonation, no wildcards."""
    manifests = render(helm, extra=ENABLED)
    bound = {
        (b["roleRef"]["kind"], b["roleRef"]["name"])
        for b in by_kind(manifests, "ClusterRoleBinding") + by_kind(manifests, "RoleBinding")
        if any(s.get("name") == API for s in b["subjects"])
    }
    assert bound == {("ClusterRole", API), ("Role", API)}
    roles = [m for m in manifests if (m["kind"], m["metadata"]["name"]) in bound]
    for rule in (rule for role in roles for rule in role["rules"]):
        assert not grants_secrets(rule), rule
        assert "impersonate" not in rule["verbs"] and "*" not in rule["verbs"], rule
        assert not any(
            r.startswith(("finetunejobs", "serviceaccounts")) or r == "*" for r in rule["resources"]
        )
        assert "*" not in rule["apiGroups"]


def test_notes_tell_how_to_reach_the_api(helm: str) -> None:
    def notes(*extra: str) -> str:
        result = run_helm(
            helm, "install", "ftop", str(CHART), "--dry-run=client", "--namespace", "ml-platform", *extra
        )
        return result.stdout.split("NOTES:", 1)[1]

    text = notes(*ENABLED)
    assert "svc/ftop-finetune-operator-api 8000:8000" in text
    assert "base_url" in text and "kubectl create token" in text
    assert "finetune-api-models" in text
    assert "ftop-finetune-operator-api" not in notes()
