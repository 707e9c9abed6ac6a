"""JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge patch as kubectl sends it."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from .errors import ApiError, bad_request


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    try:
        return jsonpatch.JsonPatch(operations).apply(target)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise ApiError(
            422, "Invalid", f"the server rejected our request due to an error in our request: {exc}"
        ) from exc
    except (
        jsonpatch.JsonPatchException,
        jsonpatch.JsonPointerException,
        KeyError,
        IndexError,
        TypeError,
    ) as exc:
        raise ApiError(
            422, "Invalid", f"the server rejected our request due to an error in our request: {exc}"
        ) from exc


# Merge keys of built-in list fields (the `patchMergeKey` tags of k8s.io/api). Looked up by the field name,
# qualified by its parent where the same name means different things (a Service's ports vs a container's).
_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "ownerReferences": "uid",
    "secrets": "name",
    "addresses": "type",
    "resourceClaims": "name",
    "schedulingGates": "name",
}
# Lists of scalars that merge as sets (patchStrategy=merge).
_MERGE_SCALARS = {"finalizers"}


def _merge_key(field: str, parent: str) -> str | None:
    if field == "ports":
        return "port" if parent == "service-spec" else "containerPort"
    return _MERGE_KEYS.get(field)


def strategic_merge_patch(target: Any, patch: Any, kind: str = "") -> Any:
    """Apply a strategic merge patch (including $patch, $setElementOrder, $retainKeys,
    $deleteFromPrimitiveList) to a built-in object."""
    if not isinstance(patch, dict):
        raise bad_request("strategic merge patch must be a JSON object")
    return _smp_map(target if isinstance(target, dict) else {}, patch, "kind:" + kind)


def _smp_map(target: dict[str, Any], patch: dict[str, Any], context: str) -> Any:
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    result = dict(target)
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list) and isinstance(value, list):
                result[field] = [v for v in result[field] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
            continue
        child_context = _child_context(context, key)
        current = result.get(key)
        if isinstance(value, dict):
            merged = _smp_map(current if isinstance(current, dict) else {}, value, child_context)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _smp_list(current if isinstance(current, list) else [], value, key, context)
        else:
            result[key] = copy.deepcopy(value)
    for key, order in patch.items():
        if key.startswith("$setElementOrder/") and isinstance(order, list):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = _apply_order(result[field], order, _merge_key(field, context))
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _child_context(context: str, key: str) -> str:
    if context == "kind:Service" and key == "spec":
        return "service-spec"
    return key


def _smp_list(current: list[Any], patch: list[Any], field: str, context: str) -> list[Any]:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and i.get("$patch") == "replace")]
    if field in _MERGE_SCALARS:
        merged = list(current)
        for item in patch:
            if item not in merged:
                merged.append(item)
        return merged
    key = _merge_key(field, context)
    if key is None or not all(isinstance(i, dict) for i in patch):
        return copy.deepcopy(patch)
    merged = [copy.deepcopy(i) for i in current]
    for item in patch:
        if key not in item:
            if item.get("$patch") == "delete":
                continue
            raise bad_request(f"map: {item} does not contain declared merge key: {key}")
        index = next(
            (n for n, e in enumerate(merged) if isinstance(e, dict) and e.get(key) == item[key]), None
        )
        if item.get("$patch") == "delete":
            if index is not None:
                merged.pop(index)
            continue
        if index is None:
            merged.append(_smp_map({}, item, field))
        else:
            merged[index] = _smp_map(merged[index], item, field)
    return merged


def _apply_order(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
    """Sort the merged list by the client's `$setElementOrder`; unnamed items keep their place after."""

    def ident(item: Any) -> Any:
        return item.get(key) if key and isinstance(item, dict) else item

    wanted = [ident(o) if isinstance(o, dict) else o for o in order]
    ranked = sorted(
        enumerate(items),
        key=lambda pair: (wanted.index(ident(pair[1])) if ident(pair[1]) in wanted else len(wanted), pair[0]),
    )
    return [item for _, item in ranked]
