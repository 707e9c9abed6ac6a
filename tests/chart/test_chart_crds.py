"""The chart ships the generated CRD unchanged, from crds/ (installed once; see docs/helm.md)."""

from __future__ import annotations

import json

import pytest
import yaml

from .chart_helpers import CHART, REPO, by_kind, render

pytestmark = pytest.mark.helm

GENERATED = REPO / "crds"
SHIPPED = CHART / "crds"
# kube-apiserver caps all annotations of an object at 256 KiB; client-side `kubectl apply` copies the whole
# object into one of them. Staying well below keeps every apply mode working.
ANNOTATION_LIMIT = 262144


def test_chart_crds_are_byte_identical_to_the_generated_ones() -> None:
    generated = {p.name: p.read_bytes() for p in GENERATED.glob("*.yaml")}
    shipped = {p.name: p.read_bytes() for p in SHIPPED.glob("*.yaml")}
    assert generated, "crds/ is empty: run `make crds`"
    assert shipped.keys() == generated.keys(), "sync with: cp crds/*.yaml charts/finetune-operator/crds/"
    for name, content in generated.items():
        assert shipped[name] == content, (
            f"charts/finetune-operator/crds/{name} is stale: cp crds/{name} charts/finetune-operator/crds/"
        )


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_is_safe_for_server_side_and_client_side_apply(path) -> None:
    crd = yaml.safe_load(path.read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    metadata = crd["metadata"]
    assert set(metadata) <= {"name", "labels", "annotations"}, "no server-populated fields in a shipped CRD"
    annotations = metadata.get("annotations") or {}
    assert "kubectl.kubernetes.io/last-applied-configuration" not in annotations
    assert len(json.dumps(annotations)) < 1024
    assert "status" not in crd
    assert len(json.dumps(crd, separators=(",", ":"))) < ANNOTATION_LIMIT // 2


def test_crds_are_not_templates_so_upgrades_never_touch_them(helm: str) -> None:
    assert by_kind(render(helm), "CustomResourceDefinition") == []
    crds = by_kind(render(helm, include_crds=True), "CustomResourceDefinition")
    names = sorted(c["metadata"]["name"] for c in crds)
    plurals = ("finetunejobs", "finetunepolicies", "finetuneschedules", "modelservers")
    assert names == [f"{plural}.finetune.dev" for plural in plurals]
    assert all("helm.sh/resource-policy" not in (c["metadata"].get("annotations") or {}) for c in crds)
