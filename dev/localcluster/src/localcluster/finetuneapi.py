"""The OpenAI-compatible fine-tuning API (`python -m finetune_api`, docs/openai-api.md) in the embedded
cluster: the chart's own api objects (`helm template` of charts/finetune-operator with `api.enabled=true`, so
the chart is the one source of the Deployment, Service, ServiceAccount and RBAC) in namespace `default`; the
local kubelet runs the operator image's `python -m finetune_api` from the repository's .venv (runtime.py), as
the chart's ServiceAccount. The host reaches it through services.json (key `finetune-api`), pods at
IN_CLUSTER_URL.

`LocalCluster.start_finetune_api()` applies them; `make local-cluster` and `make demo` start it in the
background, test sessions only when a fixture asks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .controllers.services import SERVICES_KEY_ANNOTATION
from .kubeclient import DEPLOYMENTS, SERVICES, Resource

NAMESPACE = "default"
RELEASE = "finetune-operator"  # the chart's fullname is then the release: objects `finetune-operator-api`
NAME = f"{RELEASE}-api"
PORT = 8000
BUCKET = "finetune-api"
FILES_URI = f"s3://{BUCKET}/files"
SERVICES_KEY = "finetune-api"  # services.json alias of default/finetune-operator-api
IN_CLUSTER_URL = f"http://{NAME}.{NAMESPACE}.svc:{PORT}"

RBAC_API = "/apis/rbac.authorization.k8s.io/v1"
# The kinds the chart's api.yaml renders, and where each lives.
KINDS: dict[str, Resource] = {
    "ServiceAccount": Resource("/api/v1", "serviceaccounts"),
    "Service": SERVICES,
    "Deployment": DEPLOYMENTS,
    "ClusterRole": Resource(RBAC_API, "clusterroles", namespaced=False),
    "ClusterRoleBinding": Resource(RBAC_API, "clusterrolebindings", namespaced=False),
    "Role": Resource(RBAC_API, "roles"),
    "RoleBinding": Resource(RBAC_API, "rolebindings"),
}


def helm_binary(root: Path) -> str:
    """$HELM, else the helm the Makefile installs (.tools/bin/helm), else one on PATH."""
    for candidate in (os.environ.get("HELM"), str(root / ".tools" / "bin" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("the finetune API needs helm to render the chart (run `make tools`)")


def chart_template(root: Path, template: str, *values: str) -> list[dict[str, Any]]:
    """One template of the repository's chart rendered by helm (`values`: `key=value` for --set)."""
    sets = [arg for value in values for arg in ("--set", value)]
    result = subprocess.run(
        [
            helm_binary(root),
            "template",
            RELEASE,
            str(root / "charts" / "finetune-operator"),
            "--namespace",
            NAMESPACE,
            "--show-only",
            f"templates/{template}",
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"helm template of the chart's {template} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def manifests(root: Path, s3_secret: str) -> list[dict[str, Any]]:
    """The chart's api objects for the embedded cluster, the Service marked with its services.json alias."""
    docs = chart_template(
        root,
        "api.yaml",
        "api.enabled=true",
        f"api.files.uri={FILES_URI}",
        f"api.files.credentialsSecret={s3_secret}",
        f"api.port={PORT}",
        f"api.service.port={PORT}",
    )
    for doc in docs:
        if doc["kind"] == "Service":
            doc["metadata"].setdefault("annotations", {})[SERVICES_KEY_ANNOTATION] = SERVICES_KEY
    return docs


def collection_path(manifest: dict[str, Any]) -> str:
    """Where to POST the manifest (its kind must be one the chart's api.yaml renders)."""
    return KINDS[manifest["kind"]].path(manifest["metadata"].get("namespace") or NAMESPACE)
