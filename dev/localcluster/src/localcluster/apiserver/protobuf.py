"""Decoding of the Kubernetes protobuf request bodies kubectl's typed clients send.

`kubectl create configmap|secret|namespace|serviceaccount|token|role|rolebinding|clusterrole|
clusterrolebinding` and `kubectl auth can-i|whoami` post `application/vnd.kubernetes.protobuf` (a `k8s\\0`
magic, then a runtime.Unknown envelope around the object). The field tables below cover those
kinds; other kinds get 415 so the caller knows to send JSON or YAML (`kubectl apply -f`)."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from .errors import ApiError

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"

# field number -> (json name, kind); kind: "string", "bytes", "int", "bool", a message table name,
# "map:string", "map:bytes", "repeated:string", "repeated:<table>", "time".
_TABLES: dict[str, dict[int, tuple[str, str]]] = {
    "Unknown": {
        1: ("typeMeta", "TypeMeta"),
        2: ("raw", "bytes"),
        3: ("contentEncoding", "string"),
        4: ("contentType", "string"),
    },
    "TypeMeta": {1: ("apiVersion", "string"), 2: ("kind", "string")},
    "ObjectMeta": {
        1: ("name", "string"),
        2: ("generateName", "string"),
        3: ("namespace", "string"),
        4: ("selfLink", "string"),
        5: ("uid", "string"),
        6: ("resourceVersion", "string"),
        7: ("generation", "int"),
        8: ("creationTimestamp", "time"),
        9: ("deletionTimestamp", "time"),
        10: ("deletionGracePeriodSeconds", "int"),
        11: ("labels", "map:string"),
        12: ("annotations", "map:string"),
        13: ("ownerReferences", "repeated:OwnerReference"),
        14: ("finalizers", "repeated:string"),
    },
    "OwnerReference": {
        1: ("kind", "string"),
        3: ("name", "string"),
        4: ("uid", "string"),
        5: ("apiVersion", "string"),
        6: ("controller", "bool"),
        7: ("blockOwnerDeletion", "bool"),
    },
    "ConfigMap": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:string"),
        3: ("binaryData", "map:bytes"),
        4: ("immutable", "bool"),
    },
    "Secret": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:bytes"),
        3: ("type", "string"),
        4: ("stringData", "map:string"),
        5: ("immutable", "bool"),
    },
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec")},
    "NamespaceSpec": {1: ("finalizers", "repeated:string")},
    "ServiceAccount": {
        1: ("metadata", "ObjectMeta"),
        2: ("secrets", "repeated:ObjectReference"),
        3: ("imagePullSecrets", "repeated:LocalObjectReference"),
        4: ("automountServiceAccountToken", "bool"),
    },
    "ObjectReference": {
        1: ("kind", "string"),
        2: ("namespace", "string"),
        3: ("name", "string"),
        4: ("uid", "string"),
        5: ("apiVersion", "string"),
        6: ("resourceVersion", "string"),
        7: ("fieldPath", "string"),
    },
    "LocalObjectReference": {1: ("name", "string")},
    "Time": {1: ("seconds", "int"), 2: ("nanos", "int")},
    "DeleteOptions": {
        1: ("gracePeriodSeconds", "int"),
        2: ("preconditions", "Preconditions"),
        3: ("orphanDependents", "bool"),
        4: ("propagationPolicy", "string"),
        5: ("dryRun", "repeated:string"),
    },
    "Preconditions": {1: ("uid", "string"), 2: ("resourceVersion", "string")},
    "Eviction": {1: ("metadata", "ObjectMeta"), 2: ("deleteOptions", "DeleteOptions")},
    # rbac.authorization.k8s.io/v1 (`kubectl create role|clusterrole|rolebinding|clusterrolebinding`)
    "Role": {1: ("metadata", "ObjectMeta"), 2: ("rules", "repeated:PolicyRule")},
    "ClusterRole": {
        1: ("metadata", "ObjectMeta"),
        2: ("rules", "repeated:PolicyRule"),
        3: ("aggregationRule", "AggregationRule"),
    },
    "PolicyRule": {
        1: ("verbs", "repeated:string"),
        2: ("apiGroups", "repeated:string"),
        3: ("resources", "repeated:string"),
        4: ("resourceNames", "repeated:string"),
        5: ("nonResourceURLs", "repeated:string"),
    },
    "AggregationRule": {1: ("clusterRoleSelectors", "repeated:LabelSelector")},
    "LabelSelector": {
        1: ("matchLabels", "map:string"),
        2: ("matchExpressions", "repeated:LabelSelectorRequirement"),
    },
    "LabelSelectorRequirement": {
        1: ("key", "string"),
        2: ("operator", "string"),
        3: ("values", "repeated:string"),
    },
    "RoleBinding": {
        1: ("metadata", "ObjectMeta"),
        2: ("subjects", "repeated:Subject"),
        3: ("roleRef", "RoleRef"),
    },
    "ClusterRoleBinding": {
        1: ("metadata", "ObjectMeta"),
        2: ("subjects", "repeated:Subject"),
        3: ("roleRef", "RoleRef"),
    },
    "Subject": {
        1: ("kind", "string"),
        2: ("apiGroup", "string"),
        3: ("name", "string"),
        4: ("namespace", "string"),
    },
    "RoleRef": {1: ("apiGroup", "string"), 2: ("kind", "string"), 3: ("name", "string")},
    # authorization.k8s.io/v1 and authentication.k8s.io/v1 (`kubectl auth can-i|whoami`, `create token`)
    "SelfSubjectAccessReview": {1: ("metadata", "ObjectMeta"), 2: ("spec", "SelfSubjectAccessReviewSpec")},
    "SelfSubjectAccessReviewSpec": {
        1: ("resourceAttributes", "ResourceAttributes"),
        2: ("nonResourceAttributes", "NonResourceAttributes"),
    },
    "ResourceAttributes": {
        1: ("namespace", "string"),
        2: ("verb", "string"),
        3: ("group", "string"),
        4: ("version", "string"),
        5: ("resource", "string"),
        6: ("subresource", "string"),
        7: ("name", "string"),
    },
    "NonResourceAttributes": {1: ("path", "string"), 2: ("verb", "string")},
    "SubjectAccessReview": {1: ("metadata", "ObjectMeta"), 2: ("spec", "SubjectAccessReviewSpec")},
    "LocalSubjectAccessReview": {1: ("metadata", "ObjectMeta"), 2: ("spec", "SubjectAccessReviewSpec")},
    "SubjectAccessReviewSpec": {
        1: ("resourceAttributes", "ResourceAttributes"),
        2: ("nonResourceAttributes", "NonResourceAttributes"),
        3: ("user", "string"),
        4: ("groups", "repeated:string"),
        6: ("uid", "string"),
    },
    "SelfSubjectRulesReview": {1: ("metadata", "ObjectMeta"), 2: ("spec", "SelfSubjectRulesReviewSpec")},
    "SelfSubjectRulesReviewSpec": {1: ("namespace", "string")},
    "SelfSubjectReview": {1: ("metadata", "ObjectMeta")},
    "TokenRequest": {1: ("metadata", "ObjectMeta"), 2: ("spec", "TokenRequestSpec")},
    "TokenRequestSpec": {
        1: ("audiences", "repeated:string"),
        3: ("boundObjectRef", "BoundObjectReference"),
        4: ("expirationSeconds", "int"),
    },
    "BoundObjectReference": {
        1: ("kind", "string"),
        2: ("apiVersion", "string"),
        3: ("name", "string"),
        4: ("uid", "string"),
    },
}
SUPPORTED_KINDS = {
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "DeleteOptions"),
    ("meta.k8s.io/v1", "DeleteOptions"),
    ("policy/v1", "Eviction"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"),
    ("authorization.k8s.io/v1", "SubjectAccessReview"),
    ("authorization.k8s.io/v1", "LocalSubjectAccessReview"),
    ("authorization.k8s.io/v1", "SelfSubjectRulesReview"),
    ("authentication.k8s.io/v1", "SelfSubjectReview"),
    ("authentication.k8s.io/v1", "TokenRequest"),
}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    out = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value = data[pos : pos + length]
            if len(value) != length:
                raise ValueError("truncated field")
            pos += length
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _decode(data: bytes, table: str) -> dict[str, Any]:
    spec = _TABLES[table]
    obj: dict[str, Any] = {}
    for number, _, value in _fields(data):
        if number not in spec:
            continue
        name, kind = spec[number]
        if kind == "string":
            if value:  # gogo-protobuf writes empty strings that JSON would omit
                obj[name] = value.decode()
        elif kind == "bytes":
            obj[name] = value
        elif kind == "int":
            if value or name not in ("generation",):
                obj[name] = value - (1 << 64) if value >= 1 << 63 else value
        elif kind == "bool":
            obj[name] = bool(value)
        elif kind == "time":
            stamp = _decode(value, "Time")
            if stamp.get("seconds"):
                moment = dt.datetime.fromtimestamp(stamp["seconds"], dt.UTC)
                obj[name] = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        elif kind.startswith("map:"):
            entry = {n: v for n, _, v in _fields(value)}
            key = entry.get(1, b"").decode()
            raw = entry.get(2, b"")
            obj.setdefault(name, {})[key] = (
                base64.b64encode(raw).decode() if kind == "map:bytes" else raw.decode()
            )
        elif kind.startswith("repeated:"):
            item_kind = kind.split(":", 1)[1]
            item = value.decode() if item_kind == "string" else _decode(value, item_kind)
            obj.setdefault(name, []).append(item)
        else:
            obj[name] = _decode(value, kind)
    return obj


def decode_object(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded built-in object, or 415 for kinds this emulator cannot read."""
    if not body.startswith(MAGIC):
        raise ApiError(
            400, "BadRequest", "provided protobuf data does not start with the Kubernetes magic prefix"
        )
    try:
        envelope = _decode(body[len(MAGIC) :], "Unknown")
        type_meta = envelope.get("typeMeta", {})
        key = (type_meta.get("apiVersion", ""), type_meta.get("kind", ""))
        if key not in SUPPORTED_KINDS:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the emulated API server cannot decode protobuf for {key[1]} ({key[0]}); "
                "send application/json "
                "or application/yaml (for example `kubectl apply -f`)",
            )
        obj = _decode(envelope.get("raw", b""), key[1])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "BadRequest", f"protobuf body could not be decoded: {exc}") from exc
    return {"apiVersion": key[0], "kind": key[1], **obj}
