"""Custom resource admission as kube-apiserver does it: prune, default, validate (OpenAPI v3 + CEL).

`CRDValidator(crd, version).admit(obj, old=None)` returns the pruned and defaulted object or raises
`InvalidError` whose causes and message read like the API server's (HTTP 422 `Invalid`).

What it follows from k8s.io/apiextensions-apiserver:
- pruning (`structural/pruning`): unknown fields dropped except under `x-kubernetes-preserve-unknown-fields`;
  at the root `apiVersion`, `kind` and `metadata` are kept, and unknown `metadata` fields are dropped
  (ObjectMeta coercion);
- defaulting (`structural/defaulting`): `null` in a non-nullable field without a default is removed, then
  defaults are set for missing fields recursively (a defaulted `{}` gets its own children's defaults). The
  old object of an update is pruned and defaulted the same way, as when it is read from etcd;
- schema validation with kube-openapi's messages converted to field errors (`Required value`,
  `Unsupported value`, `Too long`, `Too many`, `Duplicate value`, `... in body should ...`);
- `x-kubernetes-validations` (CEL, via the `common-expression-language` package): `message`,
  `messageExpression`, `fieldPath`, `reason`; transition rules (those using `oldSelf`) run only on update
  where the old value correlates (object properties, map values, `x-kubernetes-list-type: map` items); a
  type error anywhere skips CEL as the API server does; numbers typed `number` reach CEL as doubles.
- validation ratcheting (default since 1.30): on update, a value equal to its correlated old value is not
  validated again (schema errors and non-transition CEL rules), so objects stored under an older, looser
  schema can still be updated elsewhere;
- CRD schemas themselves: `CRDValidator(...)` raises InvalidError (kind CustomResourceDefinition) for a
  non-structural schema, a default that fails its schema or is pruned, or a CEL rule that does not compile.
- CEL cost: a CRD whose rules' estimated cost is over kube-apiserver's budget is refused
  (`localcluster.celcost`: per rule, per messageExpression and per schema, with kube's messages).
Not emulated: `x-kubernetes-embedded-resource`, `allOf`/`oneOf`/`not` value validations.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import cel

from localcluster.celcost import crd_cost_problems

OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
    "ownerReferences", "finalizers", "managedFields",
})
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and "
    "must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")

# field.ErrorType: (cause type, text).
ERROR_TYPES = {
    "Required": ("FieldValueRequired", "Required value"),
    "NotFound": ("FieldValueNotFound", "Not found"),
    "Duplicate": ("FieldValueDuplicate", "Duplicate value"),
    "Invalid": ("FieldValueInvalid", "Invalid value"),
    "TypeInvalid": ("FieldValueTypeInvalid", "Invalid value"),
    "NotSupported": ("FieldValueNotSupported", "Unsupported value"),
    "Forbidden": ("FieldValueForbidden", "Forbidden"),
    "TooLong": ("FieldValueTooLong", "Too long"),
    "TooMany": ("FieldValueTooMany", "Too many"),
    "Internal": ("InternalError", "Internal error"),
}
_NO_VALUE_TYPES = {"FieldValueRequired", "FieldValueForbidden", "FieldValueTooLong", "InternalError"}
_TEXT_BY_CAUSE = {cause: text for cause, text in ERROR_TYPES.values()}
_REASONS = {
    "FieldValueInvalid": "Invalid",
    "FieldValueForbidden": "Forbidden",
    "FieldValueRequired": "Required",
    "FieldValueDuplicate": "Duplicate",
}
_OMIT = object()
_ABSENT = object()  # no correlated old value


def go_value(value: Any) -> str:
    """Render a bad value as field.Error does (%v for numbers and bools, %q for strings)."""
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "map[string]interface {}{" + ", ".join(
            f"{json.dumps(k)}:{_go_raw(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[]interface {}{" + ", ".join(_go_raw(v) for v in value) + "}"
    return repr(value)


def _go_raw(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return _go_float(value)
    return go_value(value)


def _go_float(value: float) -> str:
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    return text.replace("e-0", "e-").replace("e+0", "e+") if "e" in text else text


@dataclass(frozen=True)
class FieldCause:
    """One field error (a `StatusCause` of the 422 response)."""

    field: str
    type: str
    message: str
    value: Any = None

    def error(self) -> str:
        """`field: body`, as field.Error.Error()."""
        return f"{self.field}: {self.message}" if self.field else self.message


def field_error(kind: str, path: str, value: Any = _OMIT, detail: str = "") -> FieldCause:
    """Build a cause as the k8s.io/apimachinery field package does; `message` is ErrorBody()."""
    cause, text = ERROR_TYPES[kind]
    body = text
    if cause not in _NO_VALUE_TYPES and value is not _OMIT:
        body = f"{text}: {go_value(value)}"
    if detail:
        body += f": {detail}"
    return FieldCause(field=path, type=cause, message=body, value=None if value is _OMIT else value)


class InvalidError(Exception):
    """422 Invalid: the object does not satisfy the CRD's schema or rules."""

    def __init__(self, kind: str, name: str, causes: list[FieldCause], group: str = "") -> None:
        self.kind = kind
        self.group = group
        self.name = name
        self.causes = causes
        super().__init__(self.message())

    @property
    def qualified_kind(self) -> str:
        """Kind.group as schema.GroupKind.String()."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def message(self) -> str:
        """kube-apiserver's text: `Kind.group "name" is invalid: [a, b]` (one error: no brackets)."""
        seen: list[str] = []
        for cause in self.causes:
            text = cause.error()
            if text not in seen:
                seen.append(text)
        head = f"{self.qualified_kind} {json.dumps(self.name)} is invalid"
        if not seen:
            return head
        return f"{head}: {seen[0]}" if len(seen) == 1 else f"{head}: [{', '.join(seen)}]"

    def status(self) -> dict[str, Any]:
        """The metav1.Status body of the 422 response."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message(),
            "reason": "Invalid",
            "details": {
                "name": self.name,
                "group": self.group,
                "kind": self.kind,
                "causes": [{"reason": c.type, "message": c.message, "field": c.field} for c in self.causes],
            },
            "code": 422,
        }


# ---------------------------------------------------------------------------------------------- CEL
def _kubernetes_library() -> dict[str, Callable[..., Any]]:
    """Kubernetes CEL string-library functions not built into the CEL engine."""

    def split(s: str, sep: str, limit: int | None = None) -> list[str]:
        if limit is None or limit < 0:
            return s.split(sep)
        return [] if limit == 0 else s.split(sep, limit - 1)

    def join(items: list[str], sep: str = "") -> str:
        return sep.join(items)

    def index_of(s: str, sub: str, start: int = 0) -> int:
        return s.find(sub, start)

    def last_index_of(s: str, sub: str, end: int | None = None) -> int:
        return s.rfind(sub) if end is None else s.rfind(sub, 0, end + len(sub))

    def replace(s: str, old: str, new: str, count: int = -1) -> str:
        return s.replace(old, new, count)

    def substring(s: str, start: int, end: int | None = None) -> str:
        stop = len(s) if end is None else end
        if not 0 <= start <= stop <= len(s):
            raise ValueError(f"index out of range: {start}, {stop}")
        return s[start:stop]

    return {
        "format": _format,
        "lowerAscii": lambda s: "".join(c.lower() if c.isascii() else c for c in s),
        "upperAscii": lambda s: "".join(c.upper() if c.isascii() else c for c in s),
        "trim": lambda s: s.strip(),
        "split": split,
        "join": join,
        "indexOf": index_of,
        "lastIndexOf": last_index_of,
        "replace": replace,
        "charAt": lambda s, i: s[i] if i < len(s) else "",
        "substring": substring,
    }


_VERB = re.compile(r"%(?:\.(\d+))?([sdfeoxXb%])")


def _format(template: str, args: list[Any]) -> str:
    """The strings extension's `'%s has %d'.format([a, b])`: what messageExpressions use to show numbers
    (kube refuses `'...' + string(n)` there: string() has no size estimate, so the cost is unbounded)."""
    values = iter(args)

    def verb(match: re.Match[str]) -> str:
        precision, kind = match.group(1), match.group(2)
        if kind == "%":
            return "%"
        value = next(values)
        if kind == "s":
            return _cel_text(value)
        if kind in "fe":
            return f"{float(value):.{int(precision or 6)}{kind}}"
        return format(int(value), {"d": "d", "o": "o", "x": "x", "X": "X", "b": "b"}[kind])

    return _VERB.sub(verb, template)


def _cel_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_cel_text(v) for v in value) + "]"
    return str(value)


_KUBE_FUNCTIONS = _kubernetes_library()
_OLD_SELF = re.compile(r"\boldSelf\b")


@dataclass
class _Rule:
    rule: str
    program: Any
    message: str | None
    message_expression: Any
    field_path: str
    reason: str
    transition: bool


def _compile_rules(schema: dict[str, Any]) -> list[_Rule]:
    rules = []
    for spec in schema.get("x-kubernetes-validations", []):
        message_expression = spec.get("messageExpression")
        rules.append(_Rule(
            rule=spec["rule"],
            program=cel.compile(spec["rule"]),
            message=spec.get("message"),
            message_expression=cel.compile(message_expression) if message_expression else None,
            field_path=spec.get("fieldPath", ""),
            reason=spec.get("reason", "FieldValueInvalid"),
            transition=bool(_OLD_SELF.search(spec["rule"])),
        ))
    return rules


def _schema_type(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return ""
    return str(schema.get("type", ""))


def _to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """The value CEL sees: `number` fields as doubles, objects and lists converted recursively."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            return {k: _to_cel(v, props.get(k, {})) for k, v in value.items()}
        extra = schema.get("additionalProperties")
        return {k: _to_cel(v, extra if isinstance(extra, dict) else {}) for k, v in value.items()}
    if isinstance(value, list):
        items = schema.get("items", {})
        return [_to_cel(v, items) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------- validator
@dataclass
class _Walk:
    causes: list[FieldCause] = field(default_factory=list)
    type_error: bool = False

    def add(self, cause: FieldCause) -> None:
        self.causes.append(cause)
        if cause.type == "FieldValueTypeInvalid" or cause.type == "FieldValueNotSupported":
            self.type_error = True


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class CRDValidator:
    """Admission of one served version of a CRD: prune, default, validate."""

    def __init__(self, crd: dict[str, Any], version: str) -> None:
        spec = crd["spec"]
        self.group: str = spec["group"]
        self.kind: str = spec["names"]["kind"]
        self.version = version
        matches = [v for v in spec.get("versions", []) if v.get("name") == version]
        if not matches:
            raise ValueError(f"CRD {crd.get('metadata', {}).get('name')} has no version {version}")
        schema = (matches[0].get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            preserve = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            schema = spec.get("validation", {}).get("openAPIV3Schema", preserve)
        self.schema: dict[str, Any] = schema
        index = next(i for i, v in enumerate(spec.get("versions", [])) if v.get("name") == version)
        problems = schema_errors(schema, f"spec.versions[{index}].schema.openAPIV3Schema")
        if not problems:
            problems = cost_errors(schema, _schema_path(spec, index))
        if problems:
            raise InvalidError("CustomResourceDefinition", str(crd.get("metadata", {}).get("name", "")),
                               problems, group="apiextensions.k8s.io")
        self._rules: dict[int, list[_Rule]] = {}
        for node in _walk_schemas(schema):
            if node.get("x-kubernetes-validations"):
                self._rules[id(node)] = _compile_rules(node)

    # ------------------------------------------------------------------ public
    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return `obj` pruned and defaulted, or raise InvalidError (create when old is None, else update)."""
        new = self.normalize(obj)
        old_normalized = self.normalize(old) if old is not None else None
        causes = self.validate(new, old_normalized)
        if causes:
            name = str((new.get("metadata") or {}).get("name") or "")
            raise InvalidError(self.kind, name, causes, group=self.group)
        return new

    def normalize(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Prune unknown fields and apply defaults, as when decoding a request or reading from etcd."""
        out = copy.deepcopy(obj)
        self.prune(out)
        _prune_nulls_and_default(out, self.schema)
        return out

    def prune(self, obj: dict[str, Any]) -> None:
        """Drop fields the schema does not know (in place)."""
        for key in list(obj):
            if key in ("apiVersion", "kind"):
                continue
            if key == "metadata":
                if isinstance(obj[key], dict):
                    for meta_key in [k for k in obj[key] if k not in OBJECT_META_FIELDS]:
                        del obj[key][meta_key]
                continue
            props = self.schema.get("properties", {})
            if key in props:
                _prune(obj[key], props[key])
            elif not self.schema.get("x-kubernetes-preserve-unknown-fields"):
                del obj[key]

    def validate(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[FieldCause]:
        """Field errors of an already normalized object: metadata name, schema, then CEL rules."""
        walk = _Walk()
        self._validate_name(obj, walk)
        root = {k: v for k, v in obj.items() if k != "metadata"}
        root_schema = {k: v for k, v in self.schema.items() if k != "x-kubernetes-validations"}
        root_schema["properties"] = {
            k: v for k, v in self.schema.get("properties", {}).items() if k != "metadata"}
        old_root = {k: v for k, v in old.items() if k != "metadata"} if old is not None else _ABSENT
        _validate_schema(root, root_schema, "", walk, old_root)
        if walk.type_error:
            walk.causes.append(field_error(
                "Invalid", "<nil>", None,
                "some validation rules were not checked because the object was invalid; correct the existing "
                "errors to complete validation"))
        else:
            self._validate_rules(obj, old, self.schema, "", walk)
        return walk.causes

    # ------------------------------------------------------------------ internals
    def _validate_name(self, obj: dict[str, Any], walk: _Walk) -> None:
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            walk.add(field_error("Required", "metadata", detail="name or generateName is required"))
            return
        name = meta.get("name")
        if not name:
            if not meta.get("generateName"):
                walk.add(field_error("Required", "metadata.name", detail="name or generateName is required"))
            return
        if not isinstance(name, str):
            walk.add(field_error("Invalid", "metadata.name", name, "must be a string"))
            return
        if len(name) > 253:
            walk.add(field_error("Invalid", "metadata.name", name, "must be no more than 253 characters"))
        if not DNS1123_SUBDOMAIN.match(name):
            walk.add(field_error("Invalid", "metadata.name", name, DNS1123_SUBDOMAIN_MESSAGE))

    def _validate_rules(self, value: Any, old: Any, schema: dict[str, Any], path: str, walk: _Walk) -> None:
        rules = self._rules.get(id(schema), [])
        if rules:
            if old is not None and _same(old, value):  # ratcheting: unchanged values keep passing
                rules = [rule for rule in rules if rule.transition]
            self._evaluate(rules, value, old, schema, path, walk)
        if isinstance(value, dict):
            props = schema.get("properties")
            extra = schema.get("additionalProperties")
            for key, child in value.items():
                if path == "" and key == "metadata":
                    continue
                child_old = old.get(key) if isinstance(old, dict) else None
                if props is not None and key in props:
                    self._validate_rules(child, child_old, props[key], _join(path, key), walk)
                elif isinstance(extra, dict):
                    self._validate_rules(child, child_old, extra, _join(path, key), walk)
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            items = schema["items"]
            old_items = _correlate_list(value, old, schema)
            for i, child in enumerate(value):
                self._validate_rules(child, old_items[i], items, f"{path}[{i}]", walk)

    def _evaluate(self, rules: list[_Rule], value: Any, old: Any, schema: dict[str, Any], path: str,
                  walk: _Walk) -> None:
        context = cel.Context(functions=dict(_KUBE_FUNCTIONS))
        context.add_variable("self", _to_cel(value, schema))
        if old is not None:
            context.add_variable("oldSelf", _to_cel(old, schema))
        type_name = _schema_type(schema)
        for rule in rules:
            if rule.transition and old is None:
                continue
            target = path + rule.field_path if rule.field_path else path
            label = rule.message or rule.rule
            try:
                result = rule.program.execute(context)
            except Exception as exc:  # CEL runtime errors (no such key, overflow, ...) are field errors
                walk.add(field_error("Invalid", path, type_name,
                                     f"{_cel_error(exc)} evaluating rule: {label}"))
                continue
            if result is True:
                continue
            if result is not False:
                walk.add(field_error("Invalid", path, type_name,
                                     f"rule did not evaluate to a bool: {label}"))
                continue
            message = rule.message or f"failed rule: {rule.rule}"
            if rule.message_expression is not None:
                try:
                    text = rule.message_expression.execute(context)
                    if isinstance(text, str) and text.strip() and "\n" not in text:
                        message = text
                except Exception:  # as the API server: fall back to message
                    pass
            walk.add(_rule_error(rule.reason, target, type_name, message))


def _rule_error(reason: str, path: str, type_name: str, message: str) -> FieldCause:
    if reason == "FieldValueForbidden":
        return field_error("Forbidden", path, detail=message)
    if reason == "FieldValueRequired":
        return field_error("Required", path, detail=message)
    if reason == "FieldValueDuplicate":
        return field_error("Duplicate", path, type_name, message)
    return field_error("Invalid", path, type_name, message)


def _cel_error(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, KeyError):
        return f"no such key: {text.strip(chr(39))}"
    return text


def _correlate_list(value: list[Any], old: Any, schema: dict[str, Any]) -> list[Any]:
    """Old items matching new ones: only `x-kubernetes-list-type: map` lists correlate (by their keys)."""
    none: list[Any] = [None] * len(value)
    if not isinstance(old, list) or schema.get("x-kubernetes-list-type") != "map":
        return none
    keys = schema.get("x-kubernetes-list-map-keys", [])

    def key_of(item: Any) -> tuple[Any, ...] | None:
        return tuple(item.get(k) for k in keys) if isinstance(item, dict) else None

    by_key = {key_of(item): item for item in old}
    return [by_key.get(key_of(item)) for item in value]


def _walk_schemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield schema
    for child in schema.get("properties", {}).values():
        yield from _walk_schemas(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _walk_schemas(schema[key])


# ---------------------------------------------------------------------------------------------- pruning
def _prune(value: Any, schema: dict[str, Any]) -> None:
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema \
            and "additionalProperties" not in schema and "items" not in schema:
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(value):
            if props is not None and key in props:
                _prune(value[key], props[key])
            elif isinstance(extra, dict):
                _prune(value[key], extra)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _prune(item, schema["items"])


def _prune_nulls_and_default(value: Any, schema: dict[str, Any]) -> None:
    """structuraldefaulting: drop non-nullable nulls without default, then set defaults, recursively."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, prop in props.items():
            if key in value and value[key] is None and not prop.get("nullable"):
                if "default" in prop:
                    value[key] = copy.deepcopy(prop["default"])
                else:
                    del value[key]
            elif key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
        extra = schema.get("additionalProperties")
        for key in list(value):
            if key in props:
                _prune_nulls_and_default(value[key], props[key])
            elif isinstance(extra, dict):
                if value[key] is None and not extra.get("nullable"):
                    del value[key]
                else:
                    _prune_nulls_and_default(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _prune_nulls_and_default(item, schema["items"])


# ---------------------------------------------------------------------------------------------- schema
_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _type_ok(value: Any, expected: str) -> bool:
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


def _number_text(value: float | int) -> str:
    return _go_float(float(value)) if isinstance(value, float) else str(value)


def _same(a: Any, b: Any) -> bool:
    """Deep equality that, like Go's reflect.DeepEqual on JSON values, tells 1 from 1.0 and True."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _old_items(value: list[Any], old: Any, schema: dict[str, Any]) -> list[Any]:
    """Ratcheting correlation of list items: map lists by key, set lists by value, atomic lists never."""
    if not isinstance(old, list):
        return [_ABSENT] * len(value)
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        return [_ABSENT if item is None else item for item in _correlate_list(value, old, schema)]
    if list_type == "set":
        return [item if any(_same(item, o) for o in old) else _ABSENT for item in value]
    return [_ABSENT] * len(value)


def _validate_schema(value: Any, schema: dict[str, Any], path: str, walk: _Walk, old: Any = None) -> None:
    """Schema errors of one value. `old` is the correlated old value on update (`_ABSENT` if none): an
    unchanged value is not validated again (validation ratcheting, on by default since Kubernetes 1.30)."""
    if old is None:
        old = _ABSENT
    if old is not _ABSENT and _same(old, value):
        return
    name = path or "body"
    if value is None:
        if not schema.get("nullable"):
            walk.add(field_error("TypeInvalid", path, "null",
                                 f"{name} in body must be of type {schema.get('type', 'object')}: \"null\""))
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or _type_ok(value, "integer")):
            walk.add(field_error("TypeInvalid", path, _json_type(value),
                                 f"{name} in body must be of type integer,string: \"{_json_type(value)}\""))
            return
    elif "type" in schema and not _type_ok(value, schema["type"]):
        actual = _json_type(value)
        walk.add(field_error("TypeInvalid", path, actual,
                             f"{name} in body must be of type {schema['type']}: \"{actual}\""))
        return
    if "enum" in schema and value not in schema["enum"]:
        walk.add(FieldCause(
            field=path, type="FieldValueNotSupported",
            message=f"Unsupported value: {go_value(value)}: supported values: "
                    + ", ".join(_go_raw(v) for v in schema["enum"]),
            value=value))
        walk.type_error = True
    if isinstance(value, str):
        _validate_string(value, schema, path, name, walk)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        _validate_number(value, schema, path, name, walk)
    elif isinstance(value, list):
        _validate_array(value, schema, path, name, walk, old)
    elif isinstance(value, dict):
        _validate_object(value, schema, path, name, walk, old)


def _validate_string(value: str, schema: dict[str, Any], path: str, name: str, walk: _Walk) -> None:
    length = len(value)  # kube-openapi counts characters (utf8.RuneCountInString)
    if "maxLength" in schema and length > schema["maxLength"]:
        walk.add(FieldCause(field=path, type="FieldValueTooLong",
                            message=f"Too long: may not be more than {schema['maxLength']} bytes",
                            value=value))
    if "minLength" in schema and length < schema["minLength"]:
        walk.add(field_error("Invalid", path, value,
                             f"{name} in body should be at least {schema['minLength']} chars long"))
    if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
        walk.add(field_error("Invalid", path, value, f"{name} in body should match '{schema['pattern']}'"))
    fmt = schema.get("format")
    if fmt == "date-time" and not _is_datetime(value):
        walk.add(field_error("Invalid", path, value, f"{name} in body must be of type date-time: "
                                                     f"{json.dumps(value)}"))


def _is_datetime(value: str) -> bool:
    if not RFC3339.match(value):
        return False
    try:
        datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    except ValueError:
        return False
    return True


_PATTERNS: dict[str, Any] = {}


def _pattern(pattern: str) -> Any:
    """Compile with RE2 (Go's regexp syntax and semantics: `$` is the end of text, no look-around)."""
    if pattern not in _PATTERNS:
        try:
            import re2  # google-re2

            _PATTERNS[pattern] = re2.compile(pattern)
        except ImportError:  # pragma: no cover - google-re2 is in the dev requirements
            _PATTERNS[pattern] = re.compile(pattern)
    return _PATTERNS[pattern]


def _validate_number(value: float | int, schema: dict[str, Any], path: str, name: str, walk: _Walk) -> None:
    if "minimum" in schema:
        low = schema["minimum"]
        if schema.get("exclusiveMinimum") and value <= low:
            walk.add(field_error("Invalid", path, value,
                                 f"{name} in body should be greater than {_number_text(low)}"))
        elif value < low:
            walk.add(field_error("Invalid", path, value,
                                 f"{name} in body should be greater than or equal to {_number_text(low)}"))
    if "maximum" in schema:
        high = schema["maximum"]
        if schema.get("exclusiveMaximum") and value >= high:
            walk.add(field_error("Invalid", path, value,
                                 f"{name} in body should be less than {_number_text(high)}"))
        elif value > high:
            walk.add(field_error("Invalid", path, value,
                                 f"{name} in body should be less than or equal to {_number_text(high)}"))
    if "multipleOf" in schema and value % schema["multipleOf"] != 0:
        walk.add(field_error("Invalid", path, value,
                             f"{name} in body should be a multiple of {_number_text(schema['multipleOf'])}"))


def _child(old: Any, key: str) -> Any:
    return old.get(key, _ABSENT) if isinstance(old, dict) else _ABSENT


def _validate_array(value: list[Any], schema: dict[str, Any], path: str, name: str, walk: _Walk,
                    old: Any = _ABSENT) -> None:
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        walk.add(FieldCause(field=path, type="FieldValueTooMany",
                            message=f"Too many: {len(value)}: must have at most {schema['maxItems']} items",
                            value=len(value)))
    if "minItems" in schema and len(value) < schema["minItems"]:
        walk.add(field_error("Invalid", path, len(value),
                             f"{name} in body should have at least {schema['minItems']} items"))
    list_type = schema.get("x-kubernetes-list-type")
    if schema.get("uniqueItems") or list_type == "set":
        seen: list[Any] = []
        for i, item in enumerate(value):
            if item in seen:
                walk.add(field_error("Duplicate", f"{path}[{i}]", item))
            else:
                seen.append(item)
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen_keys: list[Any] = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            key = {k: item.get(k) for k in keys if k in item}
            if key in seen_keys:
                walk.add(field_error("Duplicate", f"{path}[{i}]", key))
            else:
                seen_keys.append(key)
    items = schema.get("items")
    if isinstance(items, dict):
        old_items = _old_items(value, old, schema)
        for i, item in enumerate(value):
            _validate_schema(item, items, f"{path}[{i}]", walk, old_items[i])


def _validate_object(value: dict[str, Any], schema: dict[str, Any], path: str, name: str,
                     walk: _Walk, old: Any = _ABSENT) -> None:
    for key in schema.get("required", []):
        if key not in value:
            walk.add(field_error("Required", _join(path, key)))
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        walk.add(FieldCause(field=path, type="FieldValueTooMany",
                            message=f"Too many: {len(value)}: must have at most "
                                    f"{schema['maxProperties']} items", value=len(value)))
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        walk.add(field_error("Invalid", path, len(value),
                             f"{name} in body should have at least {schema['minProperties']} properties"))
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    for key, child in value.items():
        if key in props:
            _validate_schema(child, props[key], _join(path, key), walk, _child(old, key))
        elif isinstance(extra, dict):
            _validate_schema(child, extra, _join(path, key), walk, _child(old, key))


def schema_errors(schema: dict[str, Any], path: str = "openAPIV3Schema") -> list[FieldCause]:
    """Why kube-apiserver would refuse this CRD schema: not structural, a default that does not validate
    or is pruned, a CEL rule that does not compile. Paths as the API server's (`properties[spec].type`)."""
    causes: list[FieldCause] = []
    _check_structural(schema, path, causes, root=True)
    return causes


def _check_structural(node: dict[str, Any], path: str, causes: list[FieldCause], root: bool = False) -> None:
    if "$ref" in node:
        causes.append(field_error("Forbidden", f"{path}.$ref", detail="$ref is not supported"))
    int_or_string = bool(node.get("x-kubernetes-int-or-string"))
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if not node.get("type") and not int_or_string and not preserve:
        what = "object root" if root else "specified object fields"
        causes.append(field_error("Required", f"{path}.type", detail=f"must not be empty for {what}"))
    if int_or_string and node.get("type"):
        causes.append(field_error("Invalid", f"{path}.type", node["type"],
                                  "must be empty if x-kubernetes-int-or-string is true"))
    extra = node.get("additionalProperties")
    if extra is False:
        causes.append(field_error("Forbidden", f"{path}.additionalProperties",
                                  detail="additionalProperties cannot be set to false"))
    if "properties" in node and extra not in (None, False):
        causes.append(field_error("Forbidden", f"{path}.additionalProperties",
                                  detail="additionalProperties and properties are mutual exclusive"))
    for keyword in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(node.get(keyword) or []):
            if isinstance(sub, dict) and "type" in sub and not (int_or_string and keyword == "anyOf"):
                causes.append(field_error("Forbidden", f"{path}.{keyword}[{i}].type",
                                          detail="must be empty to be structural"))
    for name, child in (node.get("properties") or {}).items():
        _check_structural(child, f"{path}.properties[{name}]", causes)
    if isinstance(node.get("items"), dict):
        _check_structural(node["items"], f"{path}.items", causes)
    if isinstance(extra, dict):
        _check_structural(extra, f"{path}.additionalProperties", causes)
    if "default" in node:
        default = node["default"]
        problems = validate_value(copy.deepcopy(default), node, f"{path}.default")
        pruned = copy.deepcopy(default)
        _prune(pruned, node)
        if problems:
            causes.extend(problems)
        elif pruned != default:
            causes.append(field_error("Invalid", f"{path}.default", default, "must not have unknown fields"))
    for i, rule in enumerate(node.get("x-kubernetes-validations") or []):
        for key in ("rule", "messageExpression"):
            if key not in rule:
                continue
            try:
                cel.compile(rule[key])
            except Exception as exc:  # the CEL engine's syntax errors
                causes.append(field_error("Invalid", f"{path}.x-kubernetes-validations[{i}].{key}", rule[key],
                                          f"compilation failed: {exc}"))


def _schema_path(spec: dict[str, Any], index: int) -> str:
    """Where kube-apiserver reports a schema's errors: CRDs whose versions all share one schema are
    converted to the internal `spec.validation` form, others keep the per-version path."""
    schemas = [(v.get("schema") or {}).get("openAPIV3Schema") for v in spec.get("versions", [])]
    if all(s == schemas[0] for s in schemas):
        return "spec.validation.openAPIV3Schema"
    return f"spec.versions[{index}].schema.openAPIV3Schema"


def cost_errors(schema: dict[str, Any], path: str) -> list[FieldCause]:
    """Forbidden causes for rules whose estimated CEL cost is over kube-apiserver's budget
    (localcluster.celcost): per rule 10,000,000, per schema 100,000,000."""
    problems = crd_cost_problems(schema, path)
    return [field_error("Forbidden", where, detail=detail) for where, detail in problems]


def validate_value(value: Any, schema: dict[str, Any], path: str = "") -> list[FieldCause]:
    """Schema (not CEL) errors of one value, e.g. to check a CRD's defaults against their own schema."""
    walk = _Walk()
    _validate_schema(value, schema, path, walk)
    return walk.causes


def crd_validator_for(crd: dict[str, Any]) -> dict[str, CRDValidator]:
    """A validator for every served version of a CRD, keyed by version name."""
    versions = crd["spec"].get("versions", [])
    return {v["name"]: CRDValidator(crd, v["name"]) for v in versions if v.get("served")}


__all__ = [
    "CRDValidator", "FieldCause", "InvalidError", "cost_errors", "crd_validator_for", "field_error",
    "go_value", "schema_errors", "validate_value",
]
