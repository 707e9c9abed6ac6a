"""Shared helpers for the Helm chart tests: the real helm binary, rendering, manifest walking."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from localcluster import finetuneapi

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
VALUES_DIR = Path(__file__).parent / "values"
BAD_VALUES_DIR = Path(__file__).parent / "bad-values"
SNAPSHOTS = Path(__file__).parent / "snapshots"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion), our kubectl's, newest with schemas.
KUBE_VERSIONS = ("1.32.0", "1.35.0", "1.37.0")


def helm_binary() -> str | None:
    """$HELM, else the helm v4 the Makefile installs (.tools/bin/helm), else one on PATH; None without one."""
    try:
        return finetuneapi.helm_binary(REPO)
    except RuntimeError:
        return None


def chart_template(template: str, release: str = "ftop") -> list[dict[str, Any]]:
    """One template of the chart rendered with its default values (skips the test without helm): what the
    cluster-level tests install on their own, e.g. an admission policy."""
    import pytest

    helm = helm_binary()
    if helm is None:
        pytest.skip("helm not installed (make tools)")
    out = run_helm(helm, "template", release, str(CHART), "--show-only", f"templates/{template}").stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@functools.cache
def _render_cached(
    helm: str,
    values_file: str | None,
    kube_version: str,
    include_crds: bool,
    namespace: str,
    extra: tuple[str, ...],
) -> tuple[dict[str, Any], ...]:
    args = ["template", "ftop", str(CHART), "--namespace", namespace, "--kube-version", kube_version]
    if include_crds:
        args.append("--include-crds")
    if values_file:
        args += ["--values", values_file]
    args += list(extra)
    out = run_helm(helm, *args).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(
    helm: str,
    values_file: Path | str | None = None,
    *,
    kube_version: str = KUBE_VERSIONS[0],
    include_crds: bool = False,
    namespace: str = "finetune-system",
    extra: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """`helm template` the chart and return its manifests (deep copies: callers may mutate them)."""
    import copy

    docs = _render_cached(
        helm, str(values_file) if values_file else None, kube_version, include_crds, namespace, tuple(extra)
    )
    return copy.deepcopy(list(docs))


def values_files() -> list[Path]:
    return sorted(VALUES_DIR.glob("*.yaml"))


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m.get("kind") == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def pod_specs(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec in the manifests, named `Kind/name`."""
    for manifest in manifests:
        path = POD_TEMPLATE_PATHS.get(manifest.get("kind", ""))
        if path is None:
            continue
        spec: Any = manifest
        for key in path:
            spec = spec[key]
        yield f"{manifest['kind']}/{manifest['metadata']['name']}", spec


@functools.cache
def _kubernetes_schemas(version: str) -> tuple[Path, Any]:
    """The strict JSON schemas kubernetes-validate ships for `version`, with their definitions registry
    loaded once (kubernetes_validate.validate re-reads the 1.3 MB definitions file on every call)."""
    import json

    import kubernetes_validate
    import referencing
    from kubernetes_validate.utils import all_versions, major_minor

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    shipped = [v for v in all_versions() if major_minor(v) == major_minor(version)]
    assert shipped, f"kubernetes-validate ships no schemas for Kubernetes {version}"
    directory = root / f"v{shipped[-1]}-local-strict"
    definitions = referencing.Resource.from_contents(
        json.loads((directory / "_definitions.json").read_text())
    )
    return directory, definitions @ referencing.Registry()


@functools.cache
def _validator(version: str, filename: str) -> Any:
    import json

    import jsonschema

    directory, registry = _kubernetes_schemas(version)
    path = directory / filename
    if not path.exists():
        return None
    return jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=registry)


def kubernetes_schema_errors(manifest: dict[str, Any], version: str) -> list[str]:
    """Strict validation against the Kubernetes `version` OpenAPI schema (unknown fields fail)."""
    import re

    api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", manifest["apiVersion"])
    validator = _validator(version, f"{manifest['kind'].lower()}-{api_version}.json")
    if validator is None:
        return [f"no schema for {manifest['apiVersion']} {manifest['kind']} in Kubernetes {version}"]
    return [
        f"{'.'.join(str(p) for p in error.path)}: {error.message}"
        for error in validator.iter_errors(manifest)
    ]
