"""Object metadata validation as kube-apiserver does it for every kind (names, labels, annotations)."""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import cause

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
TOTAL_ANNOTATION_SIZE = 256 * 1024

_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
    "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)

# Kinds whose names must be DNS-1123 labels (they end up in DNS names or hostnames); the rest take subdomains.
LABEL_NAMED = {"namespaces", "services"}


def _quote(value: Any) -> str:
    return json.dumps(value)


PATH_SEGMENT_NAMED = frozenset({"roles", "rolebindings", "clusterroles", "clusterrolebindings"})


def validate_name(plural: str, name: str) -> list[dict[str, Any]]:
    if not name:
        return [
            cause("metadata.name", "FieldValueRequired", "Required value: name or generateName is required")
        ]
    if plural in PATH_SEGMENT_NAMED:  # RBAC objects: any name that is a valid path segment
        for bad in ("/", "%"):
            if bad in name:
                return [
                    cause(
                        "metadata.name",
                        "FieldValueInvalid",
                        f"Invalid value: {_quote(name)}: may not contain '{bad}'",
                    )
                ]
        if name in (".", ".."):
            return [
                cause(
                    "metadata.name",
                    "FieldValueInvalid",
                    f"Invalid value: {_quote(name)}: may not be '{name}'",
                )
            ]
        return []
    if plural in LABEL_NAMED:
        if len(name) > 63:
            return [
                cause(
                    "metadata.name",
                    "FieldValueInvalid",
                    f"Invalid value: {_quote(name)}: must be no more than 63 characters",
                )
            ]
        if not DNS1123_LABEL.match(name):
            return [
                cause("metadata.name", "FieldValueInvalid", f"Invalid value: {_quote(name)}: {_LABEL_MSG}")
            ]
        return []
    if len(name) > 253:
        return [
            cause(
                "metadata.name",
                "FieldValueInvalid",
                f"Invalid value: {_quote(name)}: must be no more than 253 characters",
            )
        ]
    if not DNS1123_SUBDOMAIN.match(name):
        return [
            cause("metadata.name", "FieldValueInvalid", f"Invalid value: {_quote(name)}: {_SUBDOMAIN_MSG}")
        ]
    return []


def _validate_key(field: str, key: str) -> list[dict[str, Any]]:
    prefix, _, name = key.rpartition("/")
    problems = []
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        problems.append(
            cause(field, "FieldValueInvalid", f"Invalid value: {_quote(key)}: prefix part {_SUBDOMAIN_MSG}")
        )
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        problems.append(
            cause(
                field,
                "FieldValueInvalid",
                f"Invalid value: {_quote(key)}: name part must consist of alphanumeric characters, "
                "'-', '_' or '.', and must start and end with an alphanumeric character "
                "(e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
                "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') and must be no more than 63 characters",
            )
        )
    return problems


def validate_metadata(plural: str, obj: dict[str, Any], namespaced: bool) -> list[dict[str, Any]]:
    meta = obj.get("metadata") or {}
    problems = validate_name(plural, str(meta.get("name", "")))
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        problems.append(cause("metadata.labels", "FieldValueInvalid", "Invalid value: must be a map"))
        labels = {}
    for key, value in labels.items():
        problems += _validate_key("metadata.labels", str(key))
        text = "" if value is None else str(value)
        if len(text) > 63 or not _LABEL_VALUE.match(text):
            problems.append(
                cause(
                    "metadata.labels",
                    "FieldValueInvalid",
                    f"Invalid value: {_quote(text)}: a valid label must be an empty string or consist "
                    "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                    "alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used "
                    "for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?') and must be "
                    "no more than 63 characters",
                )
            )
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        problems.append(cause("metadata.annotations", "FieldValueInvalid", "Invalid value: must be a map"))
        annotations = {}
    total = 0
    for key, value in annotations.items():
        problems += _validate_key("metadata.annotations", str(key))
        total += len(str(key)) + len("" if value is None else str(value))
    if total > TOTAL_ANNOTATION_SIZE:
        problems.append(
            cause(
                "metadata.annotations",
                "FieldValueTooLong",
                f"Too long: may not be more than {TOTAL_ANNOTATION_SIZE} bytes",
            )
        )
    for index, ref in enumerate(meta.get("ownerReferences") or []):
        for required in ("apiVersion", "kind", "name", "uid"):
            if not isinstance(ref, dict) or not ref.get(required):
                problems.append(
                    cause(
                        f"metadata.ownerReferences[{index}].{required}",
                        "FieldValueRequired",
                        "Required value",
                    )
                )
    return problems


_POD_UPDATE_MSG = (
    "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
    "`spec.tolerations` (only additions to existing tolerations),"
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"
)


def _pod_spec_mutable_view(spec: dict[str, Any], images_from: dict[str, Any]) -> dict[str, Any]:
    """`spec` with the fields a pod update may change taken from `images_from`."""
    view = json.loads(json.dumps(spec))
    for key in ("containers", "initContainers"):
        theirs = {c.get("name"): c for c in images_from.get(key) or [] if isinstance(c, dict)}
        for container in view.get(key) or []:
            if isinstance(container, dict) and container.get("name") in theirs:
                container["image"] = theirs[container["name"]].get("image")
    for key in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds", "schedulingGates"):
        if key in images_from:
            view[key] = images_from[key]
        else:
            view.pop(key, None)
    return view


def immutable_field_problems(
    group: str, plural: str, old: dict[str, Any], new: dict[str, Any]
) -> list[dict[str, Any]]:
    """Updates kube-apiserver refuses because the field cannot change after creation."""
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    if (group, plural) == ("", "pods"):
        if _pod_spec_mutable_view(old_spec, new_spec) != new_spec:
            return [cause("spec", "FieldValueForbidden", _POD_UPDATE_MSG)]
        return []
    problems = []
    if (group, plural) == ("batch", "jobs"):
        for key in ("template", "selector", "completionMode"):
            if key in old_spec and old_spec.get(key) != new_spec.get(key):
                if key == "template" and old_spec.get("suspend"):
                    continue  # a suspended job's template may change (scheduling directives)
                problems.append(
                    cause(
                        f"spec.{key}",
                        "FieldValueInvalid",
                        f"Invalid value: {json.dumps(new_spec.get(key))}: field is immutable",
                    )
                )
    if (
        group == "apps"
        and plural in ("deployments", "replicasets", "statefulsets", "daemonsets")
        and "selector" in old_spec
        and old_spec.get("selector") != new_spec.get("selector")
    ):
        problems.append(
            cause(
                "spec.selector",
                "FieldValueInvalid",
                f"Invalid value: {json.dumps(new_spec.get('selector'))}: field is immutable",
            )
        )
    return problems
