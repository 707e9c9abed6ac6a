"""`helm lint` and `helm template` over the values matrix: Kubernetes schemas, restricted pods, behaviour."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .chart_helpers import (
    CHART,
    KUBE_VERSIONS,
    by_kind,
    kubernetes_schema_errors,
    one,
    pod_specs,
    render,
    run_helm,
    values_files,
)
from .pss import check_restricted

pytestmark = pytest.mark.helm

VALUES = values_files()
VALUE_IDS = [path.stem for path in VALUES]
MATRIX = VALUES[0].parent

# CRD kinds have no schema in kubernetes-validate: checked against the fields we render.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}
CUSTOM_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}
CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "Namespace",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


def deployment(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return one(manifests, "Deployment")


def operator_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = deployment(manifests)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def test_matrix_covers_the_issue_cases() -> None:
    assert {"default", "namespaced", "metrics", "gpu-types", "digests"} <= set(VALUE_IDS)


@pytest.mark.parametrize("values", [None, *VALUES], ids=["no-values", *VALUE_IDS])
def test_helm_lint_strict(helm: str, values: Path | None) -> None:
    args = ["lint", str(CHART), "--strict", "--kube-version", KUBE_VERSIONS[0]]
    if values:
        args += ["--values", str(values)]
    result = run_helm(helm, *args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUES, ids=VALUE_IDS)
def test_every_manifest_matches_the_kubernetes_schema(helm: str, values: Path, kube_version: str) -> None:
    manifests = render(helm, values, kube_version=kube_version, include_crds=True)
    assert manifests
    for manifest in manifests:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        custom = CUSTOM_SCHEMAS.get((manifest["apiVersion"], manifest["kind"]))
        if custom is not None:
            jsonschema.validate(manifest, custom)
            continue
        errors = kubernetes_schema_errors(manifest, kube_version)
        assert errors == [], f"{values.stem}: {name} is invalid for Kubernetes {kube_version}"


def test_schema_validation_rejects_unknown_and_mistyped_fields() -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": "http"}], "selectr": {}},
    }
    errors = " ".join(kubernetes_schema_errors(manifest, KUBE_VERSIONS[0]))
    assert "selectr" in errors and "spec.ports.0.port" in errors


@pytest.mark.parametrize("values", VALUES, ids=VALUE_IDS)
def test_every_pod_is_pod_security_restricted(helm: str, values: Path) -> None:
    manifests = render(helm, values)
    specs = list(pod_specs(manifests))
    assert specs, "the chart renders no pod"
    for name, spec in specs:
        annotations = deployment(manifests)["spec"]["template"]["metadata"].get("annotations", {})
        assert check_restricted(spec, annotations) == [], name


@pytest.mark.parametrize("values", VALUES, ids=VALUE_IDS)
def test_the_operator_pod_reads_no_secret(helm: str, values: Path) -> None:
    """The operator never reads Secrets: none mounted, none in its environment (pull secrets: the kubelet)."""
    for name, spec in pod_specs(render(helm, values)):
        assert not [v for v in spec.get("volumes", []) if "secret" in v or "projected" in v], name
        for container in spec["containers"] + spec.get("initContainers", []):
            assert not [e for e in container.get("envFrom", []) if "secretRef" in e], name
            assert not [
                e for e in container.get("env", []) if "secretKeyRef" in (e.get("valueFrom") or {})
            ], name


@pytest.mark.parametrize("values", VALUES, ids=VALUE_IDS)
def test_resources_are_namespaced_to_the_release_or_cluster_scoped(helm: str, values: Path) -> None:
    manifests = render(helm, values, namespace="ml-platform")
    watch = (yaml.safe_load(values.read_text()) or {}).get("watchNamespaces") or []
    for manifest in manifests:
        namespace = manifest["metadata"].get("namespace")
        if manifest["kind"] in CLUSTER_SCOPED:
            assert namespace is None, manifest["metadata"]["name"]
        elif manifest["kind"] in {"Role", "RoleBinding"}:
            assert namespace in watch
        else:
            assert namespace == "ml-platform", f"{manifest['kind']}/{manifest['metadata']['name']}"
        assert manifest["metadata"]["labels"]["app.kubernetes.io/instance"] == "ftop"


def test_deployment_runs_one_restricted_operator_with_probe_metrics_and_config(helm: str) -> None:
    manifests = render(helm, MATRIX / "default.yaml")
    spec = deployment(manifests)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    container = operator_container(manifests)
    assert container["image"] == "ghcr.io/finetune-operator/operator:0.1.0"
    assert container["command"] == ["python", "-m", "finetune_operator"]
    assert container["args"] == [
        "--all-namespaces",
        "--config",
        "/etc/finetune-operator/config.yaml",
        "--metrics-port",
        "9090",
        "--liveness-port",
        "8080",
        "--log-level",
        "INFO",
    ]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "healthz": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "read-only root filesystem needs a writable /tmp"
    config_volume = volumes[mounts["/etc/finetune-operator"]]
    configmap = one(manifests, "ConfigMap")
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "config.yaml" in configmap["data"]
    assert pod["serviceAccountName"] == one(manifests, "ServiceAccount")["metadata"]["name"]


def test_namespaced_mode_passes_each_namespace_to_the_operator(helm: str) -> None:
    manifests = render(helm, MATRIX / "namespaced.yaml")
    args = operator_container(manifests)["args"]
    assert "--all-namespaces" not in args
    pairs = [args[i + 1] for i, arg in enumerate(args) if arg == "--namespace"]
    assert pairs == ["team-a", "team-b"]


def test_metrics_service_and_servicemonitor_target_the_metrics_port(helm: str) -> None:
    manifests = render(helm, MATRIX / "metrics.yaml")
    container = operator_container(manifests)
    assert container["args"][container["args"].index("--metrics-port") + 1] == "9191"
    service = one(manifests, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9191, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}
    ]
    assert by_kind(render(helm, MATRIX / "default.yaml"), "ServiceMonitor") == []


def _operator_config(manifests: list[dict[str, Any]], tmp_path: Path):
    from finetune_operator.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(one(manifests, "ConfigMap")["data"]["config.yaml"])
    return load_config(path, env={})


def test_default_config_is_accepted_by_the_operator(helm: str, tmp_path: Path) -> None:
    config = _operator_config(render(helm, MATRIX / "default.yaml"), tmp_path)
    assert config.images.trainer == "ghcr.io/finetune-operator/trainer:0.1.0"
    assert config.images.vllm == "vllm/vllm-openai:v0.32.0"
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "cpu"} <= set(config.gpu_types)
    assert config.gpu_type("a100-80gb").node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert config.gpu_type("cpu").resource_name == ""


def test_the_operator_knows_its_own_pods_for_modelserver_network_policies(
    helm: str, tmp_path: Path
) -> None:
    manifests = render(helm, MATRIX / "default.yaml", namespace="ml-platform")
    config = _operator_config(manifests, tmp_path)
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert config.operator.namespace == "ml-platform"
    assert config.operator.pod_labels and config.operator.pod_labels.items() <= pod_labels.items()


def test_custom_gpu_types_reach_the_operator(helm: str, tmp_path: Path) -> None:
    config = _operator_config(render(helm, MATRIX / "gpu-types.yaml"), tmp_path)
    l4 = config.gpu_type("l4-24gb")
    assert l4.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert [t.manifest() for t in l4.tolerations][1] == {
        "key": "team",
        "operator": "Equal",
        "value": "ml",
        "effect": "NoSchedule",
    }
    assert config.gpu_type("mi300x-192gb").resource_name == "amd.com/gpu"
    assert config.gpu_type("mi300x-192gb").memory_gib == 192
    # Helm merges maps: the defaults stay, and one overridden field keeps the rest of its entry.
    a100 = config.gpu_type("a100-80gb")
    assert a100.tokens_per_second == 3500
    assert a100.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert a100.resource_name == "nvidia.com/gpu" and a100.memory_gib == 80


def test_reference_plain_http_hosts_reach_the_operator(helm: str, tmp_path: Path) -> None:
    assert (
        _operator_config(render(helm, MATRIX / "default.yaml"), tmp_path).reference.allow_plain_http_hosts
        == ()
    )
    manifests = render(
        helm, extra=("--set", "config.reference.allowPlainHttpHosts={gateway.ml.svc,10.0.0.0/8}")
    )
    config = _operator_config(manifests, tmp_path)
    assert config.reference.allow_plain_http_hosts == ("gateway.ml.svc", "10.0.0.0/8")


def test_router_fault_injection_is_off_unless_the_chaos_switch_is_set(helm: str, tmp_path: Path) -> None:
    default = _operator_config(render(helm, MATRIX / "default.yaml"), tmp_path)
    assert default.router.fault_injection is False
    manifests = render(helm, extra=("--set", "config.router.faultInjection=true"))
    assert _operator_config(manifests, tmp_path).router.fault_injection is True


def test_a_gpu_type_can_be_dropped_from_the_chart_table(helm: str) -> None:
    manifests = render(helm, extra=("--set", "config.gpuTypes.h100-80gb=null"))
    table = yaml.safe_load(one(manifests, "ConfigMap")["data"]["config.yaml"])["gpuTypes"]
    assert "h100-80gb" not in table and "a100-80gb" in table


def test_digests_pin_every_image(helm: str, tmp_path: Path) -> None:
    manifests = render(helm, MATRIX / "digests.yaml")
    container = operator_container(manifests)
    assert container["image"] == (
        "registry.example.com/ml/finetune-operator@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert container["imagePullPolicy"] == "Always"
    assert deployment(manifests)["spec"]["template"]["spec"]["imagePullSecrets"] == [
        {"name": "registry-pull"}
    ]
    config = _operator_config(manifests, tmp_path)
    assert config.images.trainer == "registry.example.com/ml/finetune-trainer@sha256:" + "1" * 64
    assert config.images.vllm == "registry.example.com/mirror/vllm-openai@sha256:" + "2" * 64
    assert config.images.pull_policy == "Always"


def test_existing_service_account_and_no_rbac(helm: str) -> None:
    manifests = render(helm, MATRIX / "existing-serviceaccount.yaml")
    assert by_kind(manifests, "ServiceAccount") == []
    assert [m["kind"] for m in manifests if "Role" in m["kind"]] == []
    assert by_kind(manifests, "Service") == []
    pod = deployment(manifests)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "finetune-operator-managed"
    assert pod["priorityClassName"] == "system-cluster-critical"
    env = {e["name"]: e.get("value") for e in operator_container(manifests)["env"]}
    assert env["FTO_RESYNC_SECONDS"] == "120"


def test_config_checksum_rolls_the_operator_only_when_the_config_changes(helm: str) -> None:
    def checksum(*extra: str) -> tuple[str, str]:
        manifests = render(helm, extra=extra)
        annotation = deployment(manifests)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return annotation, hashlib.sha256(
            one(manifests, "ConfigMap")["data"]["config.yaml"].encode()
        ).hexdigest()

    base, _ = checksum()
    assert checksum("--set", "resources.limits.memory=1Gi")[0] == base
    assert checksum("--set", "config.defaults.resyncSeconds=30")[0] != base
    assert checksum("--set", "config.images.vllm.tag=v0.33.0")[0] != base


def test_extra_args_follow_the_fixed_ones(helm: str) -> None:
    args = operator_container(render(helm, extra=("--set", "extraArgs={--debug}")))["args"]
    assert args[-1] == "--debug" and args[0] == "--all-namespaces"


def test_notes_tell_how_to_check_the_install(helm: str) -> None:
    result = run_helm(
        helm,
        "install",
        "ftop",
        str(CHART),
        "--dry-run=client",
        "--namespace",
        "finetune-system",
        "--values",
        str(MATRIX / "namespaced.yaml"),
    )
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n finetune-system" in notes
    assert "team-a" in notes and "team-b" in notes


def test_an_upgrade_that_reuses_values_without_pod_admission_keeps_the_pod_policy_on(helm: str) -> None:
    """`helm upgrade --reuse-values` (docs/helm.md) from a chart that had no `podAdmission` keeps the old
    values: the pod policy must still render, exactly as with this chart's defaults."""
    reused = render(helm, extra=("--set", "podAdmission=null"))
    assert reused == render(helm)
    assert any(m["metadata"]["name"].endswith("-pods") for m in by_kind(reused, "ValidatingAdmissionPolicy"))
