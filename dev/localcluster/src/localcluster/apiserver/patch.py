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


class PatchMeta:
    """Where a strategic merge patch learns how each list merges: the kind's OpenAPI schema
    (`x-kubernetes-patch-strategy` / `x-kubernetes-patch-merge-key`) when one is known, else a table of the
    common built-in merge keys."""

    def __init__(self, schema: dict[str, Any] | None, resolve: Any = None, context: str = "") -> None:
        self.schema = resolve(schema) if schema is not None and resolve is not None else schema
        self.resolve = resolve
        self.context = context

    def child(self, key: str) -> PatchMeta:
        if self.schema is None:
            return PatchMeta(None, None, _child_context(self.context, key))
        properties = self.schema.get("properties") or {}
        if key in properties:
            return PatchMeta(properties[key], self.resolve)
        extra = self.schema.get("additionalProperties")
        return PatchMeta(extra if isinstance(extra, dict) else {}, self.resolve)

    def list_rule(self, key: str) -> tuple[str, str | None, PatchMeta]:
        """("merge" | "set" | "replace", merge key, meta of the items) for the list field `key`."""
        if self.schema is None:
            if key in _MERGE_SCALARS:
                return "set", None, PatchMeta(None, None, key)
            merge_key = _merge_key(key, self.context)
            return ("merge" if merge_key else "replace"), merge_key, PatchMeta(None, None, key)
        prop = (self.schema.get("properties") or {}).get(key) or {}
        strategy = str(prop.get("x-kubernetes-patch-strategy", ""))
        merge_key = prop.get("x-kubernetes-patch-merge-key")
        items = PatchMeta(prop.get("items") or {}, self.resolve)
        if "merge" not in strategy.split(","):
            return "replace", None, items
        return ("merge", merge_key, items) if merge_key else ("set", None, items)


# Merge keys of built-in list fields (the `patchMergeKey` tags of k8s.io/api), used when no schema is
# available. Looked up by field name, qualified by its parent where the same name means different things.
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
    "resourceClaims": "name",
    "schedulingGates": "name",
}
# Lists of scalars that merge as sets (patchStrategy=merge).
_MERGE_SCALARS = {"finalizers"}


def _merge_key(field: str, parent: str) -> str | None:
    if field == "ports":
        return "port" if parent == "service-spec" else "containerPort"
    return _MERGE_KEYS.get(field)


def _child_context(context: str, key: str) -> str:
    if context == "kind:Service" and key == "spec":
        return "service-spec"
    return key


def strategic_merge_patch(target: Any, patch: Any, kind: str = "", meta: PatchMeta | None = None) -> Any:
    """Apply a strategic merge patch (including $patch, $setElementOrder, $retainKeys,
    $deleteFromPrimitiveList) to a built-in object."""
    if not isinstance(patch, dict):
        raise bad_request("strategic merge patch must be a JSON object")
    return _smp_map(
        target if isinstance(target, dict) else {}, patch, meta or PatchMeta(None, None, "kind:" + kind)
    )


def _smp_map(target: dict[str, Any], patch: dict[str, Any], meta: PatchMeta) -> Any:
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
        current = result.get(key)
        if isinstance(value, dict):
            merged = _smp_map(current if isinstance(current, dict) else {}, value, meta.child(key))
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _smp_list(current if isinstance(current, list) else [], value, *meta.list_rule(key))
        else:
            result[key] = copy.deepcopy(value)
    for key, order in patch.items():
        if key.startswith("$setElementOrder/") and isinstance(order, list):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = _apply_order(result[field], order, meta.list_rule(field)[1])
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _smp_list(
    current: list[Any], patch: list[Any], mode: str, key: str | None, items: PatchMeta
) -> list[Any]:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and i.get("$patch") == "replace")]
    if mode == "set":
        merged = list(current)
        for item in patch:
            if item not in merged:
                merged.append(item)
        return merged
    if mode != "merge" or key is None or not all(isinstance(i, dict) for i in patch):
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
            merged.append(_smp_map({}, item, items))
        else:
            merged[index] = _smp_map(merged[index], item, items)
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
