"""Just enough OpenAPI v3 for kubectl: which patch types and query parameters each kind accepts
(kubectl uses this to choose server-side field validation and the patch type of `apply`), and CRD
schemas so `kubectl explain` works for custom resources.

And an OpenAPI v2 document without definitions: kubectl validates a `kind: List` on the client against
/openapi/v2 (a List has no path to carry server-side field validation) and fails the whole apply when that
document is missing; with no definition for a kind it skips the client-side check, and each item is still
validated by the server (fieldValidation) when it is created or patched."""

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


# What kubectl's Accept asks for, and the Content-Type kube-apiserver answers (Go's mime refuses the '@').
SWAGGER_PROTOBUF = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
SWAGGER_PROTOBUF_RESPONSE = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


def swagger_document() -> dict[str, Any]:
    return {"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.34.0"}, "paths": {}}


def _length_delimited(field: int, payload: bytes) -> bytes:
    out, size = bytearray([field << 3 | 2]), len(payload)
    while size > 0x7F:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out) + payload


def swagger_protobuf() -> bytes:
    """swagger_document() as gnostic's openapi_v2.Document (swagger = 1, info = 2; Info.title = 1): the
    encoding kubectl asks for and unmarshals."""
    info = _length_delimited(1, b"Kubernetes")
    return _length_delimited(1, b"2.0") + _length_delimited(2, info)
