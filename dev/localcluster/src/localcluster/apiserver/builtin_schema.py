"""Unknown-field detection for built-in kinds (server-side field validation, `fieldValidation=Strict|Warn`).

kube-apiserver finds unknown fields while decoding into its Go types. The emulator stores plain JSON, so it
walks the request against the OpenAPI-derived JSON schemas shipped by `kubernetes-validate` (strict variant,
one file per kind plus shared definitions) and reports every unknown field path as the real server does:
`unknown field "spec.template.spec.containers[0].imagePullPolicyy"`."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any


@functools.cache
def _schema_root(minor: int) -> Path | None:
    try:
        import kubernetes_validate
    except ImportError:
        return None
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    candidates = []
    for entry in base.glob("v1.*-local-strict"):
        match = re.match(r"v1\.(\d+)\.", entry.name)
        if match and int(match.group(1)) <= minor:
            candidates.append((int(match.group(1)), entry))
    return max(candidates)[1] if candidates else None


@functools.cache
def _definitions(root: Path) -> dict[str, Any]:
    data = json.loads((root / "_definitions.json").read_text())
    return data.get("$defs") or data.get("definitions") or {}


@functools.cache
def _kind_schema(root: Path, kind: str, api_version: str) -> dict[str, Any] | None:
    suffix = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = root / f"{kind.lower()}-{suffix}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def patch_meta(kind: str, api_version: str, minor: int) -> Any:
    """The strategic-merge-patch metadata of a built-in kind from its schema, or None without one."""
    from .patch import PatchMeta

    root = _schema_root(minor)
    if root is None:
        return None
    schema = _kind_schema(root, kind, api_version)
    if schema is None:
        return None
    defs = _definitions(root)
    return PatchMeta(schema, lambda node: _resolve(node, defs))


def unknown_fields(obj: dict[str, Any], minor: int, prune: bool = False) -> list[str] | None:
    """Paths of fields the kind's schema does not declare (removed from obj when `prune`, as decoding into
    kube-apiserver's Go types drops them); None when no schema is available."""
    root = _schema_root(minor)
    if root is None:
        return None
    schema = _kind_schema(root, str(obj.get("kind", "")), str(obj.get("apiVersion", "")))
    if schema is None:
        return None
    found: list[str] = []
    _walk(obj, schema, "", _definitions(root), found, 0, prune)
    return found


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    for _ in range(20):
        ref = schema.get("$ref")
        if not ref:
            break
        schema = defs.get(ref.rsplit("/", 1)[-1], {})
    for option in schema.get("allOf") or ():
        if "$ref" in option or "properties" in option:
            merged = dict(_resolve(option, defs))
            merged.update({k: v for k, v in schema.items() if k != "allOf"})
            return merged
    return schema


def _walk(
    value: Any,
    schema: dict[str, Any],
    path: str,
    defs: dict[str, Any],
    found: list[str],
    depth: int,
    prune: bool,
) -> None:
    if depth > 64:
        return
    schema = _resolve(schema, defs)
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        if properties is not None:
            for key, item in list(value.items()):
                child = f"{path}.{key}" if path else key
                if key in properties:
                    _walk(item, properties[key], child, defs, found, depth + 1, prune)
                elif extra is False:
                    found.append(child)
                    if prune:
                        del value[key]
                elif isinstance(extra, dict):
                    _walk(item, extra, child, defs, found, depth + 1, prune)
        elif isinstance(extra, dict):
            for key, item in value.items():
                _walk(item, extra, f"{path}[{key}]" if path else key, defs, found, depth + 1, prune)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _walk(item, schema["items"], f"{path}[{index}]", defs, found, depth + 1, prune)
