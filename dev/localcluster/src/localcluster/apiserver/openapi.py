"""Just enough OpenAPI v3 for kubectl: which patch types and query parameters each kind accepts
(kubectl uses this to choose server-side field validation and the patch type of `apply`), and CRD
schemas so `kubectl explain` works for custom resources."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .resources import ResourceType

# Strategic merge patch is deliberately not advertised: kubectl then computes apply patches for built-in
# kinds from its compiled-in types (exact patch metadata) instead of from a schema we would have to copy.
_PATCH_TYPES = ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]
_QUERY = [
    {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
    for name in ("dryRun", "fieldManager", "fieldValidation", "force", "pretty")
]


def gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _schema_name(rtype: ResourceType) -> str:
    group = ".".join(reversed(rtype.group.split("."))) if rtype.group else "io.k8s.api.core"
    return f"{group}.{rtype.version}.{rtype.kind}"


def _gvk(rtype: ResourceType) -> dict[str, str]:
    return {"group": rtype.group, "version": rtype.version, "kind": rtype.kind}


def _crd_schema(rtype: ResourceType) -> dict[str, Any]:
    assert rtype.crd is not None
    for version in rtype.crd.get("spec", {}).get("versions", []):
        if version.get("name") == rtype.version:
            schema = dict((version.get("schema") or {}).get("openAPIV3Schema") or {"type": "object"})
            properties = dict(schema.get("properties") or {})
            properties.setdefault("apiVersion", {"type": "string"})
            properties.setdefault("kind", {"type": "string"})
            properties["metadata"] = {"type": "object"}
            schema["properties"] = properties
            return schema
    return {"type": "object"}


def group_version_document(group: str, version: str, types: list[ResourceType]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    prefix = "/" + gv_path(group, version)
    for rtype in types:
        if "/" in rtype.plural:
            continue
        name = _schema_name(rtype)
        ref = {"$ref": f"#/components/schemas/{name}"}
        if rtype.crd is not None:
            schema = _crd_schema(rtype)
        else:
            schema = {"type": "object", "description": f"{rtype.kind} ({rtype.group_version})"}
        schemas[name] = {**schema, "x-kubernetes-group-version-kind": [_gvk(rtype)]}
        scope = (
            f"{prefix}/namespaces/{{namespace}}/{rtype.plural}"
            if rtype.namespaced
            else f"{prefix}/{rtype.plural}"
        )
        body = {"content": {"application/json": {"schema": ref}}}
        paths[scope] = {
            "get": {
                "x-kubernetes-group-version-kind": _gvk(rtype),
                "x-kubernetes-action": "list",
                "responses": {"200": {"description": "OK"}},
            },
            "post": {
                "x-kubernetes-group-version-kind": _gvk(rtype),
                "x-kubernetes-action": "post",
                "parameters": _QUERY,
                "requestBody": body,
                "responses": {"201": {"description": "Created"}},
            },
        }
        item: dict[str, Any] = {
            "get": {
                "x-kubernetes-group-version-kind": _gvk(rtype),
                "x-kubernetes-action": "get",
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}},
            },
            "put": {
                "x-kubernetes-group-version-kind": _gvk(rtype),
                "x-kubernetes-action": "put",
                "parameters": _QUERY,
                "requestBody": body,
                "responses": {"200": {"description": "OK"}},
            },
            "patch": {
                "x-kubernetes-group-version-kind": _gvk(rtype),
                "x-kubernetes-action": "patch",
                "parameters": _QUERY,
                "requestBody": {"content": {t: {"schema": {"type": "object"}} for t in _PATCH_TYPES}},
                "responses": {"200": {"description": "OK"}},
            },
            "delete": {
                "x-kubernetes-group-version-kind": _gvk(rtype),
                "x-kubernetes-action": "delete",
                "parameters": _QUERY,
                "responses": {"200": {"description": "OK"}},
            },
        }
        paths[f"{scope}/{{name}}"] = item
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.34.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def document_hash(document: dict[str, Any]) -> str:
    return hashlib.sha512(json.dumps(document, sort_keys=True).encode()).hexdigest()[:64].upper()
