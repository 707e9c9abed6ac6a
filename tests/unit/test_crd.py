"""The generated CRD: committed file up to date, structural, bounded (so CEL cost estimation passes on a
real API server), and with the names, columns and subresources the issue asks for."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cel
import pytest
import re2
import yaml
from finetune_operator.api import crdgen
from localcluster.crdvalidation import CRDValidator, validate_value

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / crdgen.CRD_FILENAME
ALLOWED_KEYWORDS = {
    "description",
    "type",
    "format",
    "enum",
    "default",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "anyOf",
    "nullable",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
}

# The one free-form value: a JSON Schema grader's schema (bounded by maxProperties and, in the models, size).
FREE_FORM = {".spec.evaluation.graders[].jsonSchema.schema"}


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return crdgen.build_crd()


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    version = crd["spec"]["versions"][0]
    return dict(version["schema"]["openAPIV3Schema"])


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", crdgen.KINDS, ids=lambda kind: kind.kind)
def test_committed_crd_is_up_to_date(kind: crdgen.Kind) -> None:
    path = ROOT / "crds" / kind.filename
    assert path.exists() and path.read_text(encoding="utf-8") == crdgen.render_crd(kind), (
        "run `make crds` and commit the result"
    )


def test_no_stray_crd_files() -> None:
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(k.filename for k in crdgen.KINDS)


def test_written_file_round_trips(tmp_path: Path, crd: dict[str, Any]) -> None:
    path = crdgen.write_crd(tmp_path)
    assert yaml.safe_load(path.read_text()) == crd
    assert not list(tmp_path.glob("*.tmp"))


def test_names_scope_subresources_and_columns(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert spec["group"] == "finetune.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FineTuneJob",
        "listKind": "FineTuneJobList",
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "categories": ["finetune"],
    }
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Base model", "Method", "Progress", "Eval", "Endpoint", "Age"]


def test_printer_columns_point_at_schema_fields(crd: dict[str, Any], schema: dict[str, Any]) -> None:
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            continue
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == "string", column


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema):
        assert set(node) <= ALLOWED_KEYWORDS, (path, set(node) - ALLOWED_KEYWORDS)
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node and node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "anyOf" not in node, path
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "object" and path not in {".metadata", *FREE_FORM}:
            assert "properties" in node or isinstance(node.get("additionalProperties"), dict), path
        assert not node.get("x-kubernetes-preserve-unknown-fields") or path in FREE_FORM, (
            f"{path}: nothing is meant to be free-form"
        )
        for required in node.get("required", []):
            assert required in node["properties"], (path, required)


def test_every_value_is_bounded(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema["properties"]["spec"], ".spec"):
        kind = node.get("type")
        if node.get("x-kubernetes-int-or-string"):
            assert "maxLength" in node and "pattern" in node, path
        elif kind == "string":
            assert "enum" in node or "maxLength" in node, f"{path}: string without maxLength"
        elif kind in {"integer", "number"}:
            assert "minimum" in node and "maximum" in node, f"{path}: unbounded number"
        elif kind == "array":
            assert "maxItems" in node, f"{path}: list without maxItems"
        elif kind == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path}: map without maxProperties"
    # status too: the operator writes it, and CEL cost estimation covers status rules as well
    for path, node in nodes(schema["properties"]["status"], ".status"):
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "string" and "enum" not in node and node.get("format") != "date-time":
            assert "maxLength" in node, path


def test_shaped_strings_have_patterns(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    shaped = [
        spec["baseModel"]["properties"]["uri"],
        spec["dataset"]["properties"]["train"],
        spec["storage"]["properties"]["output"],
        spec["storage"]["properties"]["credentialsSecret"],
        spec["resources"]["properties"]["gpuType"],
        spec["resources"]["properties"]["queueName"],
        spec["evaluation"]["properties"]["reference"]["properties"]["url"],
    ]
    for node in shaped:
        assert node["pattern"].startswith("^") and node["pattern"].endswith("$")


def test_patterns_are_valid_re2(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema):
        if "pattern" in node:
            re2.compile(node["pattern"])  # Go's regexp (RE2): no look-around or back-references
            assert "(?=" not in node["pattern"] and "(?!" not in node["pattern"], path


def test_defaults_are_valid_and_survive_pruning(schema: dict[str, Any]) -> None:
    found = 0
    for path, node in nodes(schema):
        if "default" in node:
            found += 1
            assert validate_value(node["default"], node, path) == [], path
    assert found >= 20


def test_cel_rules_compile_and_field_paths_exist(schema: dict[str, Any]) -> None:
    rules = 0
    for path, node in nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            rules += 1
            cel.compile(rule["rule"])
            assert rule.get("message"), (path, rule)
            target = node
            for part in rule.get("fieldPath", "").strip(".").split(".") if rule.get("fieldPath") else []:
                target = target["properties"][part]
            if "oldSelf" in rule["rule"]:
                assert path.count(".") == 2 and path.startswith(".spec."), (
                    "transition rules sit on spec fields"
                )
    assert rules >= 10


def test_immutable_fields_have_transition_rules(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    for name in ("baseModel", "dataset", "method", "lora", "hyperparameters"):
        assert {"rule": "self == oldSelf", "message": f"{name} is immutable once set"} in spec[name][
            "x-kubernetes-validations"
        ]
    # the run's artifacts live under storage.output; credentials and the service account may be rotated
    assert {
        "rule": "self.output == oldSelf.output",
        "message": "storage.output is immutable once set",
        "fieldPath": ".output",
    } in spec["storage"]["x-kubernetes-validations"]
    for name in ("resources", "evaluation", "deployment", "suspend"):
        assert not any("oldSelf" in r["rule"] for r in spec[name].get("x-kubernetes-validations", []))


def test_small_enough_for_client_side_apply(crd: dict[str, Any]) -> None:
    # kubectl apply stores the whole object in an annotation; annotations are limited to 256 KiB in total.
    assert len(json.dumps(crd, separators=(",", ":"))) < 128 * 1024


def test_validator_accepts_the_generated_crd(crd: dict[str, Any]) -> None:
    validator = CRDValidator(crd, "v1alpha1")
    assert validator.kind == "FineTuneJob" and validator.group == "finetune.dev"


def test_cli_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crdgen.main([str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "finetune.dev_finetunejobs.yaml").read_text() == crdgen.render_crd()
    assert "finetune.dev_finetunejobs.yaml" in capsys.readouterr().out


def test_crd_document_matches_the_apiextensions_v1_schema() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    document = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    kubernetes_validate.validate(document, "1.32", strict=True)
    document["spec"]["versions"][0]["additionalPrinterColumns"][0]["jsonpath"] = ".status.phase"
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: a misspelled key is caught
        kubernetes_validate.validate(document, "1.32", strict=True)
