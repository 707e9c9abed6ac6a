"""Generate the CRDs (apiextensions.k8s.io/v1) of every kind in `KINDS` from the pydantic models.

`python -m finetune_operator.api.crdgen crds/` writes one `crds/<group>_<plural>.yaml` per kind.

pydantic's JSON Schema (draft 2020-12) is turned into a Kubernetes *structural* schema: `$ref`s inlined,
`Optional[X]` collapsed to X (absent rather than null), `exclusiveMinimum: n` rewritten to OpenAPI v3.0's
boolean form, `additionalProperties: false`/`propertyNames`/`title` dropped, and only the keywords the
API server understands kept. We do not use kube-custom-resource: it needs the models to inherit its own base
classes and cannot express our int-or-string quantities, CEL rules or list types.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from finetune_operator.api import (
    finetunejob as models,
)
from finetune_operator.api import (
    finetunepolicy as policy_models,
)
from finetune_operator.api import (
    finetuneschedule as schedule_models,
)
from finetune_operator.api import (
    modelserver as modelserver_models,
)
from finetune_operator.api.finetunejob_status import FineTuneJobStatus

# Keywords a structural schema may carry, copied as they are.
_PASSTHROUGH = (
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
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "required",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-map-type",
)

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Base model", "type": "string", "jsonPath": ".spec.baseModel.uri"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.display"},
    {"name": "Eval", "type": "string", "jsonPath": ".status.evaluation.summary"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint.url"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class SchemaError(ValueError):
    """The models produced a JSON Schema construct that has no structural-schema equivalent."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref`; keywords next to it (the field's description, default, rules) win."""
    if "$ref" not in node:
        return node
    target = defs[node["$ref"].rsplit("/", 1)[-1]]
    resolved = _resolve(target, defs)
    merged = {**resolved, **{k: v for k, v in node.items() if k != "$ref"}}
    rules = resolved.get("x-kubernetes-validations", []) + node.get("x-kubernetes-validations", [])
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _collapse_optional(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, {type: null}]` (pydantic's Optional) becomes X with the outer keywords."""
    variants = node.get("anyOf")
    if not variants or node.get("x-kubernetes-int-or-string"):
        return node
    non_null = [v for v in variants if v.get("type") != "null"]
    if len(non_null) != 1:
        raise SchemaError(f"unions are not structural: {node}")
    inner = _collapse_optional(_resolve(non_null[0], defs), defs)
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    if outer.get("default", 0) is None:
        del outer["default"]
    rules = inner.get("x-kubernetes-validations", []) + outer.get("x-kubernetes-validations", [])
    merged = {**inner, **outer}
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def to_structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON Schema node (and its children) to a structural OpenAPI v3 schema."""
    node = _collapse_optional(_resolve(node, defs), defs)
    out: dict[str, Any] = {k: copy.deepcopy(node[k]) for k in _PASSTHROUGH if k in node}
    if "const" in node:
        out["enum"] = [node["const"]]
    for bound in ("Minimum", "Maximum"):
        exclusive = node.get(f"exclusive{bound}")
        if exclusive is not None:
            out[bound.lower()] = exclusive
            out[f"exclusive{bound}"] = True
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out.pop("type", None)
        return out
    if "enum" in out and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "number"
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {name: to_structural(prop, defs) for name, prop in node["properties"].items()}
    elif node.get("type") == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = to_structural(extra, defs)
        elif not node.get("x-kubernetes-preserve-unknown-fields"):
            raise SchemaError(f"object without properties or a value schema: {node}")
    if node.get("type") == "array":
        out["items"] = to_structural(node["items"], defs)
    if "type" not in out:
        raise SchemaError(f"untyped schema node: {node}")
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(raw, raw.get("$defs", {}))


@dataclass(frozen=True)
class Kind:
    """One custom resource kind: its names, its spec and status models and how kubectl shows it."""

    kind: str
    plural: str
    singular: str
    description: str
    spec: type[BaseModel]
    status: type[BaseModel]
    printer_columns: list[dict[str, Any]]
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = models.CATEGORIES
    scope: str = "Namespaced"
    spec_required: bool = True
    extra_properties: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{models.GROUP}_{self.plural}.yaml"


FINETUNEJOB = Kind(
    kind=models.KIND,
    plural=models.PLURAL,
    singular=models.SINGULAR,
    short_names=models.SHORT_NAMES,
    description="FineTuneJob fine-tunes a base model on a dataset, evaluates it against the base "
    "model and serves it on vLLM when it passes.",
    spec=models.FineTuneJobSpec,
    status=FineTuneJobStatus,
    printer_columns=PRINTER_COLUMNS,
)

FINETUNEPOLICY = Kind(
    kind=policy_models.KIND,
    plural=policy_models.PLURAL,
    singular=policy_models.SINGULAR,
    short_names=policy_models.SHORT_NAMES,
    description="FineTunePolicy says, once for the namespaces it selects, which models, data, outputs and "
    "GPUs FineTuneJobs may use and how many GPU-hours and concurrent jobs a namespace may spend.",
    spec=policy_models.FineTunePolicySpec,
    status=policy_models.FineTunePolicyStatus,
    printer_columns=[
        {"name": "Selector", "type": "string", "jsonPath": ".status.selector"},
        {"name": "Budget", "type": "number", "jsonPath": ".spec.gpuHoursPerMonth"},
        {"name": "Used", "type": "string", "jsonPath": ".status.usedSummary"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    scope="Cluster",
)

MODELSERVER = Kind(
    kind=modelserver_models.KIND,
    plural=modelserver_models.PLURAL,
    singular=modelserver_models.SINGULAR,
    short_names=modelserver_models.SHORT_NAMES,
    description="ModelServer is a shared vLLM pool of one base model; FineTuneJobs that name it hot-load "
    "their adapters into every replica under versioned names, promoted only when better than what serves.",
    spec=modelserver_models.ModelServerSpec,
    status=modelserver_models.ModelServerStatus,
    printer_columns=modelserver_models.PRINTER_COLUMNS,
)

FINETUNESCHEDULE = Kind(
    kind=schedule_models.KIND,
    plural=schedule_models.PLURAL,
    singular=schedule_models.SINGULAR,
    short_names=schedule_models.SHORT_NAMES,
    description="FineTuneSchedule retrains on a cron schedule or when enough new captured examples exist: "
    "each run assembles base + captured data and creates a FineTuneJob from jobTemplate that challenges "
    "the version serving.",
    spec=schedule_models.FineTuneScheduleSpec,
    status=schedule_models.FineTuneScheduleStatus,
    printer_columns=schedule_models.PRINTER_COLUMNS,
)

# Every kind the operator defines; `make crds` writes one file for each.
KINDS: tuple[Kind, ...] = (FINETUNEJOB, FINETUNEPOLICY, MODELSERVER, FINETUNESCHEDULE)

CRD_FILENAME = FINETUNEJOB.filename


def openapi_schema(kind: Kind = FINETUNEJOB) -> dict[str, Any]:
    """The CRD version's openAPIV3Schema."""
    return {
        "type": "object",
        "description": kind.description,
        **({"required": ["spec"]} if kind.spec_required else {}),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(kind.spec),
            "status": model_schema(kind.status),
            **kind.extra_properties,
        },
    }


def build_crd(kind: Kind = FINETUNEJOB) -> dict[str, Any]:
    """The whole CustomResourceDefinition of one kind as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{models.GROUP}"},
        "spec": {
            "group": models.GROUP,
            "scope": kind.scope,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                **({"shortNames": list(kind.short_names)} if kind.short_names else {}),
                "categories": list(kind.categories),
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": kind.printer_columns,
                    "schema": {"openAPIV3Schema": openapi_schema(kind)},
                }
            ],
        },
    }


def render_crd(kind: Kind = FINETUNEJOB) -> str:
    """The CRD as the YAML text committed under crds/."""
    header = "# Generated from operator/finetune_operator/api/ by `make crds`: do not edit.\n"
    return header + yaml.safe_dump(build_crd(kind), sort_keys=False, width=120)


def write_crd(directory: Path, kind: Kind = FINETUNEJOB) -> Path:
    """Write one kind's CRD into `directory` atomically; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / kind.filename
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(render_crd(kind), encoding="utf-8")
    tmp.replace(path)
    return path


def write_crds(directory: Path) -> list[Path]:
    """Write the CRD of every kind in `KINDS`."""
    return [write_crd(directory, kind) for kind in KINDS]


def main(argv: list[str] | None = None) -> int:
    """CLI: write every CRD into the directory given (default crds/)."""
    args = sys.argv[1:] if argv is None else argv
    for path in write_crds(Path(args[0] if args else "crds")):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
