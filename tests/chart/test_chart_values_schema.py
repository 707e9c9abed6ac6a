"""values.schema.json rejects wrong types and unknown keys, naming the offending key in helm's message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .chart_helpers import BAD_VALUES_DIR, CHART, run_helm

pytestmark = pytest.mark.helm

BAD = sorted(BAD_VALUES_DIR.glob("*.yaml"))


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), (
        f"{path.name}: first line must be '# expect: <text in helm's error>'"
    )
    return first.removeprefix("# expect: ").strip()


def test_there_are_enough_bad_values_files() -> None:
    assert len(BAD) >= 8


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_values_are_rejected_with_the_offending_key(helm: str, path: Path) -> None:
    result = run_helm(helm, "template", "ftop", str(CHART), "--values", str(path), check=False)
    assert result.returncode != 0, f"{path.name} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert expected_message(path) in result.stderr, result.stderr


def _objects(schema: object, where: str = "#"):
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            yield where, schema
        for key, value in schema.items():
            if key not in {"if", "then", "else"}:  # conditions constrain, they declare no keys
                yield from _objects(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _objects(value, f"{where}/{i}")


# Free-form by nature: Kubernetes objects passed through verbatim, label/annotation maps, helm's globals.
OPEN_OBJECTS = {
    "#/properties/global",
    "#/properties/affinity",
    "#/definitions/labelMap",
    "#/definitions/annotationMap",
    "#/properties/extraEnv/items/properties/valueFrom/properties/configMapKeyRef",
    "#/properties/extraEnv/items/properties/valueFrom/properties/fieldRef",
    "#/properties/extraEnv/items/properties/valueFrom/properties/resourceFieldRef",
    "#/properties/config/properties/gpuTypes",
}


def test_every_structured_object_in_the_schema_closes_its_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = [
        where
        for where, node in _objects(schema)
        if "properties" in node and node.get("additionalProperties") is not False
    ]
    assert open_objects == []
    free_form = [
        where
        for where, node in _objects(schema)
        if "properties" not in node
        and "additionalProperties" not in node
        and where not in OPEN_OBJECTS
        and node.get("type") == "object"
    ]
    assert free_form == []


def test_config_defaults_schema_mirrors_the_operator_model() -> None:
    from finetune_operator.config import Defaults

    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = set(schema["properties"]["config"]["properties"]["defaults"]["properties"])
    aliases = {field.alias or name for name, field in Defaults.model_fields.items()}
    assert keys == aliases
