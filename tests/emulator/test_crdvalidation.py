"""The CRD admission engine on a small hand-written CRD: pruning, defaulting, schema errors worded as
kube-apiserver words them, CEL rules (message, messageExpression, fieldPath, reason, transition rules)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from localcluster.crdvalidation import (
    CRDValidator,
    FieldCause,
    InvalidError,
    go_value,
    validate_value,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["size"],
            "x-kubernetes-validations": [
                {
                    "rule": "self.size <= self.limit",
                    # format(), not '...' + string(n): kube refuses the latter (unbounded estimated cost)
                    "messageExpression": "'size %d exceeds limit %d'.format([self.size, self.limit])",
                    "fieldPath": ".size",
                },
                {
                    "rule": "!has(self.mode) || self.mode != 'fast' || self.replicas >= 2",
                    "message": "fast mode needs two replicas",
                    "reason": "FieldValueForbidden",
                },
            ],
            "properties": {
                "size": {"type": "integer", "minimum": 1, "maximum": 100},
                "limit": {"type": "integer", "default": 10, "minimum": 1, "maximum": 1000},
                "replicas": {"type": "integer", "default": 1, "minimum": 0, "maximum": 8},
                "ratio": {
                    "type": "number",
                    "minimum": 0,
                    "exclusiveMinimum": True,
                    "maximum": 1,
                    "exclusiveMaximum": True,
                },
                "mode": {"type": "string", "enum": ["fast", "safe"]},
                "name": {
                    "type": "string",
                    "maxLength": 8,
                    "minLength": 2,
                    "pattern": "^[a-z]+$",
                    "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "name is immutable"}],
                },
                "when": {"type": "string", "format": "date-time"},
                "note": {"type": "string", "nullable": True, "maxLength": 16},
                "quantity": {
                    "x-kubernetes-int-or-string": True,
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "pattern": "^[0-9]+(m|Gi)?$",
                },
                "tags": {
                    "type": "array",
                    "maxItems": 3,
                    "minItems": 1,
                    "x-kubernetes-list-type": "set",
                    "items": {"type": "string", "maxLength": 5},
                },
                "labels": {"type": "object", "maxProperties": 2, "additionalProperties": {"type": "string"}},
                "nested": {
                    "type": "object",
                    "default": {},
                    "properties": {
                        "depth": {"type": "integer", "default": 3, "maximum": 9},
                        "inner": {
                            "type": "object",
                            "default": {},
                            "properties": {"flag": {"type": "boolean", "default": True}},
                        },
                    },
                },
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "ports": {
                    "type": "array",
                    "maxItems": 4,
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["name"],
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "maxLength": 8},
                            "port": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 65535,
                                "x-kubernetes-validations": [
                                    {"rule": "self >= oldSelf", "message": "port may only grow"}
                                ],
                            },
                        },
                    },
                },
                "steps": {
                    "type": "array",
                    "maxItems": 4,
                    "items": {
                        "type": "object",
                        "properties": {
                            "n": {
                                "type": "integer",
                                "maximum": 9,
                                "x-kubernetes-validations": [{"rule": "self == oldSelf"}],
                            }
                        },
                    },
                },
            },
        },
        "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
    },
}
CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.dev"},
    "spec": {
        "group": "example.dev",
        "names": {"kind": "Widget", "plural": "widgets"},
        "scope": "Namespaced",
        "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": SCHEMA}}],
    },
}


def widget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.dev/v1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 5, **spec},
    }


@pytest.fixture(scope="module")
def validator() -> CRDValidator:
    return CRDValidator(CRD, "v1")


def causes(
    validator: CRDValidator, obj: dict[str, Any], old: dict[str, Any] | None = None
) -> list[FieldCause]:
    with pytest.raises(InvalidError) as info:
        validator.admit(obj, old=old)
    return info.value.causes


def only(validator: CRDValidator, obj: dict[str, Any], old: dict[str, Any] | None = None) -> str:
    found = causes(validator, obj, old)
    assert len(found) == 1, found
    return found[0].error()


# ------------------------------------------------------------------------------------------ pruning, defaults
def test_prunes_unknown_fields_but_keeps_preserved_and_meta(validator: CRDValidator) -> None:
    obj = widget(bogus=1, nested={"depth": 2, "bogus": True}, free={"anything": {"goes": [1]}})
    obj["metadata"].update(labels={"a": "b"}, bogus="x")
    obj["status"] = {"phase": "Ready", "bogus": 1}
    obj["topLevel"] = 1
    out = validator.admit(obj)
    assert "bogus" not in out["spec"] and "bogus" not in out["spec"]["nested"]
    assert out["spec"]["free"] == {"anything": {"goes": [1]}}
    assert out["metadata"] == {"name": "w1", "labels": {"a": "b"}}
    assert out["status"] == {"phase": "Ready"}
    assert "topLevel" not in out and out["apiVersion"] == "example.dev/v1" and out["kind"] == "Widget"
    assert obj["spec"]["bogus"] == 1, "admit must not change its input"


def test_defaults_are_applied_recursively_into_defaulted_objects(validator: CRDValidator) -> None:
    out = validator.admit(widget())
    assert out["spec"]["limit"] == 10 and out["spec"]["replicas"] == 1
    assert out["spec"]["nested"] == {"depth": 3, "inner": {"flag": True}}
    partial = validator.admit(widget(nested={"depth": 7, "inner": {}}))
    assert partial["spec"]["nested"] == {"depth": 7, "inner": {"flag": True}}


def test_nulls_are_defaulted_or_dropped_unless_nullable(validator: CRDValidator) -> None:
    out = validator.admit(widget(limit=None, mode=None, note=None))
    assert out["spec"]["limit"] == 10
    assert "mode" not in out["spec"]
    assert out["spec"]["note"] is None


def test_required_after_null_pruning(validator: CRDValidator) -> None:
    obj = widget()
    obj["spec"]["size"] = None
    found = causes(validator, obj)
    assert found[0].error() == "spec.size: Required value"
    # as on a real API server, a rule reading the missing field then fails at run time
    # (reported where the rule is, not at its fieldPath, and named by the rule since it has no message)
    assert found[1].error() == (
        'spec: Invalid value: "object": no such key: size evaluating rule: self.size <= self.limit'
    )


# ------------------------------------------------------------------------------------------ schema messages
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"size": 0}, "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"),
        (
            {"size": 101, "limit": 1000},
            "spec.size: Invalid value: 101: spec.size in body should be less than or equal to 100",
        ),
        ({"ratio": 0}, "spec.ratio: Invalid value: 0: spec.ratio in body should be greater than 0"),
        ({"ratio": 1.0}, "spec.ratio: Invalid value: 1: spec.ratio in body should be less than 1"),
        ({"ratio": 1.5}, "spec.ratio: Invalid value: 1.5: spec.ratio in body should be less than 1"),
        ({"name": "abcdefghi"}, "spec.name: Too long: may not be more than 8 bytes"),
        ({"name": "a"}, 'spec.name: Invalid value: "a": spec.name in body should be at least 2 chars long'),
        ({"name": "ab1"}, "spec.name: Invalid value: \"ab1\": spec.name in body should match '^[a-z]+$'"),
        (
            {"when": "yesterday"},
            'spec.when: Invalid value: "yesterday": spec.when in body must be of type date-time: "yesterday"',
        ),
        ({"tags": ["a", "b", "c", "d"]}, "spec.tags: Too many: 4: must have at most 3 items"),
        ({"tags": []}, "spec.tags: Invalid value: 0: spec.tags in body should have at least 1 items"),
        ({"tags": ["a", "a"]}, 'spec.tags[1]: Duplicate value: "a"'),
        ({"tags": ["abcdef"]}, "spec.tags[0]: Too long: may not be more than 5 bytes"),
        ({"labels": {"a": "1", "b": "2", "c": "3"}}, "spec.labels: Too many: 3: must have at most 2 items"),
        (
            {"quantity": "4x"},
            "spec.quantity: Invalid value: \"4x\": spec.quantity in body should match '^[0-9]+(m|Gi)?$'",
        ),
        (
            {"ports": [{"name": "a", "port": 1}, {"name": "a", "port": 2}]},
            'spec.ports[1]: Duplicate value: map[string]interface {}{"name":"a"}',
        ),
        ({"ports": [{"port": 80}]}, "spec.ports[0].name: Required value"),
        (
            {"nested": {"depth": 10}},
            "spec.nested.depth: Invalid value: 10: spec.nested.depth in body should be "
            "less than or equal to 9",
        ),
    ],
)
def test_schema_errors_read_like_kube_apiserver(
    validator: CRDValidator, spec: dict[str, Any], expected: str
) -> None:
    assert only(validator, widget(**spec)) == expected


def test_type_errors_skip_cel_with_the_apiserver_notice(validator: CRDValidator) -> None:
    found = causes(validator, widget(size="big", limit=1))
    assert found[0].error() == (
        'spec.size: Invalid value: "string": spec.size in body must be of type integer: "string"'
    )
    assert found[0].type == "FieldValueTypeInvalid"
    assert found[-1].field == "<nil>" and "some validation rules were not checked" in found[-1].message
    assert len(found) == 2, "the CEL rule size <= limit must not have run"


def test_enum_error_lists_supported_values(validator: CRDValidator) -> None:
    found = causes(validator, widget(mode="turbo"))
    assert found[0].error() == 'spec.mode: Unsupported value: "turbo": supported values: "fast", "safe"'
    assert found[0].type == "FieldValueNotSupported"


def test_int_or_string_accepts_both(validator: CRDValidator) -> None:
    assert validator.admit(widget(quantity=4))["spec"]["quantity"] == 4
    assert validator.admit(widget(quantity="500m"))["spec"]["quantity"] == "500m"
    assert causes(validator, widget(quantity=1.5))[0].type == "FieldValueTypeInvalid"


def test_valid_datetime_and_integral_float_pass(validator: CRDValidator) -> None:
    validator.admit(widget(when="2026-11-28T14:00:00Z", size=5.0))


def test_every_error_is_reported_at_once(validator: CRDValidator) -> None:
    fields = {c.field for c in causes(validator, widget(size=0, name="A", tags=["x", "x"]))}
    assert fields == {"spec.size", "spec.name", "spec.tags[1]"}


# ------------------------------------------------------------------------------------------ CEL
def test_cel_message_expression_and_field_path(validator: CRDValidator) -> None:
    assert (
        only(validator, widget(size=50, limit=20))
        == 'spec.size: Invalid value: "object": size 50 exceeds limit 20'
    )


def test_cel_reason_forbidden(validator: CRDValidator) -> None:
    found = causes(validator, widget(mode="fast", replicas=1))
    assert [c.error() for c in found] == ["spec: Forbidden: fast mode needs two replicas"]
    assert found[0].type == "FieldValueForbidden"
    validator.admit(widget(mode="fast", replicas=2))


def test_transition_rules_only_on_update_with_an_old_value(validator: CRDValidator) -> None:
    created = validator.admit(widget(name="abc"))
    changed = copy.deepcopy(created)
    changed["spec"]["name"] = "xyz"
    assert only(validator, changed, created) == 'spec.name: Invalid value: "string": name is immutable'
    # no old value at that location: the rule does not run (set once, then immutable)
    unnamed = validator.admit(widget())
    assert validator.admit(changed, old=unnamed)["spec"]["name"] == "xyz"


def test_transition_rules_correlate_map_lists_by_key_only(validator: CRDValidator) -> None:
    old = validator.admit(widget(ports=[{"name": "http", "port": 8080}], steps=[{"n": 1}]))
    shrunk = copy.deepcopy(old)
    shrunk["spec"]["ports"] = [{"name": "grpc", "port": 9000}, {"name": "http", "port": 80}]
    assert only(validator, shrunk, old) == 'spec.ports[1].port: Invalid value: "integer": port may only grow'
    # items of an atomic list never correlate, so their transition rules do not run
    moved = copy.deepcopy(old)
    moved["spec"]["steps"] = [{"n": 2}]
    validator.admit(moved, old=old)


def test_cel_runtime_error_is_reported_with_the_rule(validator: CRDValidator) -> None:
    crd = copy.deepcopy(CRD)
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["x-kubernetes-validations"] = [{"rule": "self.missing > 1"}]
    found = causes(CRDValidator(crd, "v1"), widget())
    assert found[0].error() == (
        'spec: Invalid value: "object": no such key: missing evaluating rule: self.missing > 1'
    )


def test_numbers_reach_cel_as_doubles(validator: CRDValidator) -> None:
    crd = copy.deepcopy(CRD)
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["x-kubernetes-validations"] = [{"rule": "!has(self.ratio) || self.ratio == 0.5"}]
    CRDValidator(crd, "v1").admit(widget(ratio=0.5))


def test_kubernetes_string_library(validator: CRDValidator) -> None:
    crd = copy.deepcopy(CRD)
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["x-kubernetes-validations"] = [
        {
            "rule": "!has(self.name) || (self.name.upperAscii().lowerAscii() == self.name && "
            "self.name.indexOf('b') == 1 && self.name.split('b').size() == 2)"
        },
    ]
    checker = CRDValidator(crd, "v1")
    checker.admit(widget(name="abc"))
    assert (
        causes(checker, widget(name="cab"))[0].message
        == 'Invalid value: "object": failed rule: ' + spec_schema["x-kubernetes-validations"][0]["rule"]
    )


# ------------------------------------------------------------------------------------------ errors, metadata
def test_invalid_error_message_and_status(validator: CRDValidator) -> None:
    with pytest.raises(InvalidError) as info:
        validator.admit(widget(size=0, name="A"))
    err = info.value
    assert err.message().startswith('Widget.example.dev "w1" is invalid: [spec.size: Invalid value: 0: ')
    status = err.status()
    assert status["code"] == 422 and status["reason"] == "Invalid"
    assert status["details"] == {
        "name": "w1",
        "group": "example.dev",
        "kind": "Widget",
        "causes": [{"reason": c.type, "message": c.message, "field": c.field} for c in err.causes],
    }
    single = InvalidError("Widget", "w1", err.causes[:1], group="example.dev")
    assert "[" not in single.message()


def test_metadata_name_is_validated(validator: CRDValidator) -> None:
    obj = widget()
    obj["metadata"]["name"] = "Bad_Name"
    assert causes(validator, obj)[0].field == "metadata.name"
    obj["metadata"] = {"generateName": "w-"}
    validator.admit(obj)
    obj["metadata"] = {}
    assert only(validator, obj) == "metadata.name: Required value: name or generateName is required"


def test_go_value_rendering() -> None:
    assert go_value(0) == "0" and go_value(1.5) == "1.5" and go_value(2.0) == "2"
    assert go_value("x") == '"x"' and go_value(True) == "true" and go_value(None) == '"null"'


def test_validate_value_checks_a_default_against_its_schema() -> None:
    schema = {"type": "integer", "minimum": 1}
    assert validate_value(3, schema) == []
    assert validate_value(0, schema, "spec.x")[0].field == "spec.x"


def _crd_with(spec_schema: dict[str, Any]) -> dict[str, Any]:
    crd = copy.deepcopy(CRD)
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] = spec_schema
    return crd


@pytest.mark.parametrize(
    ("spec_schema", "field", "text"),
    [
        ({"properties": {"a": {"type": "string"}}}, "properties[spec].type", "Required value"),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "additionalProperties": {"type": "string"},
            },
            "properties[spec].additionalProperties",
            "mutual exclusive",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "integer", "default": "x"}}},
            "properties[a].default",
            "type",
        ),
        (
            {
                "type": "object",
                "properties": {"o": {"type": "object", "properties": {}, "default": {"z": 1}}},
            },
            "properties[o].default",
            "unknown fields",
        ),
        (
            {"type": "object", "x-kubernetes-validations": [{"rule": "self.a ==", "message": "m"}]},
            "x-kubernetes-validations[0].rule",
            "compilation failed",
        ),
    ],
)
def test_non_structural_or_broken_schemas_are_refused(
    spec_schema: dict[str, Any], field: str, text: str
) -> None:
    with pytest.raises(InvalidError) as info:
        CRDValidator(_crd_with(spec_schema), "v1")
    assert info.value.qualified_kind == "CustomResourceDefinition.apiextensions.k8s.io"
    (cause,) = info.value.causes
    assert cause.field.startswith("spec.versions[0].schema.openAPIV3Schema.properties[spec]")
    assert cause.field.endswith(field) and text in cause.message


def test_preserve_unknown_and_int_or_string_need_no_type() -> None:
    free = {"type": "object", "properties": {"any": {"x-kubernetes-preserve-unknown-fields": True}}}
    CRDValidator(_crd_with(free), "v1").admit(widget(any={"k": [1, "x"]}))


def test_validation_ratcheting_lets_unchanged_invalid_values_through(validator: CRDValidator) -> None:
    # stored under an older, looser schema: size 500 is now out of range, tags have a now-too-long item
    old = validator.normalize(widget(size=500, limit=1000, tags=["ok", "toolong"]))
    touched = copy.deepcopy(old)
    touched["spec"]["replicas"] = 2
    touched["metadata"]["labels"] = {"a": "b"}
    assert validator.admit(touched, old=old)["spec"]["replicas"] == 2
    changed = copy.deepcopy(old)
    changed["spec"]["size"] = 600
    assert only(validator, changed, old).startswith("spec.size: Invalid value: 600: ")
    changed_tag = copy.deepcopy(old)
    changed_tag["spec"]["tags"] = ["toolong", "sixsix"]  # set items correlate by value: "toolong" ratchets
    assert only(validator, changed_tag, old) == "spec.tags[1]: Too long: may not be more than 5 bytes"
    # a create is never ratcheted
    assert causes(validator, copy.deepcopy(old))


def test_ratcheting_skips_unchanged_cel_rules_but_not_transition_rules(validator: CRDValidator) -> None:
    old = validator.normalize(widget(size=50, limit=20, name="abc"))  # size > limit: violates a spec rule
    touched = copy.deepcopy(old)
    touched["status"] = {"phase": "Ready"}
    validator.admit(touched, old=old)
    renamed = copy.deepcopy(old)
    renamed["spec"]["name"] = "xyz"  # spec changed: its rules run again, and the transition rule too
    messages = [c.error() for c in causes(validator, renamed, old)]
    assert messages == [
        'spec.size: Invalid value: "object": size 50 exceeds limit 20',
        'spec.name: Invalid value: "string": name is immutable',
    ]


# ---------------------------------------------------------------------------------------------- CEL cost
def _string(max_length: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra, **({} if max_length is None else {"maxLength": max_length})}


def _array(items: dict[str, Any], max_items: int | None = None) -> dict[str, Any]:
    return {"type": "array", "items": items, **({} if max_items is None else {"maxItems": max_items})}


def _map(values: dict[str, Any], max_properties: int | None = None) -> dict[str, Any]:
    extra = {} if max_properties is None else {"maxProperties": max_properties}
    return {"type": "object", "additionalProperties": values, **extra}


def _object(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


NUMBER, BOOLEAN, INTEGER = {"type": "number"}, {"type": "boolean"}, {"type": "integer"}
DATE_TIME = _string(format="date-time")
INT_OR_STRING = {"x-kubernetes-int-or-string": True}

# Expected costs from kube-apiserver's own table (apiextensions-apiserver schema/cel compilation_test.go,
# TestCostEstimation): each rule's estimated max cost for one evaluation, with and without bounds.
KUBE_COSTS = [
    (_string(), "self.contains('test')", 314574),
    (_string(10), "self.contains('test')", 5),
    (_string(), "self.startsWith('test')", 2),
    (_string(), 'size(self + "hello") > size("hello")', 314578),
    (_string(4), 'size(self + "hello") > size("hello")', 7),
    (_array(NUMBER), "self[1] == 0.0", 2),
    (_array(_string(), 8), "self[1] == self[1]", 314577),
    (_string(), 'self.matches("x")', 314574),
    (_string(50), 'self.matches("x")', 22),
    (_string(), '"".matches("(((((((((())))))))))[0-9]")', 7),
    (_string(0), 'self == "x"', 1),
    (_array(NUMBER), "self.all(x, x == 0.0)", 6291454),
    (_array(NUMBER, 3 * 1024 * 2048), "self.all(x, x == 0.0)", 25165826),
    (_array(NUMBER, 10), "self.all(x, self.all(y, self.all(z, true)))", 3552),
    (_map(NUMBER), "self.all(x, true)", 1348169),
    (_map(NUMBER, 10), "self.all(x, true)", 32),
    (_map(_string()), "self.all(x, true)", 1179647),
    (_map(BOOLEAN), "self.all(x, true)", 943718),
    (_map(INTEGER), "oldSelf.size() == self.size()", 5),
    (_map(DATE_TIME), 'self["a"] == self["b"]', 8),
    (_map(DATE_TIME), "self.all(x, true)", 349526),
    (_array(DATE_TIME, 25), "self.all(x, true)", 77),
    (_array(INT_OR_STRING), "self.all(x, true)", 4718591),
    (_string(), "self.lowerAscii() == 'lower!'", 314575),
    (_object(str=_string(), separator=_string()), "self.str.split(self.separator) == []", 629160),
    (_object(str=_string(), before=_string(2), after=_string(4)),
     "self.str.replace(self.before, self.after) == 'does not matter'", 629154),
    (_string(), "self.find('[0-9]+') == ''", 629147),
    (_array(_string()), "self.join(' ') == 'aa bb'", 329853068905),
    (_array(_string(10), 10), "self.isSorted() == true", 52),
    (_string(enum=["A", "B", "C", "LongValue"]), "self.contains('A')", 2),
    (_string(1000, enum=["A", "B", "C", "LongValue"]), "self.contains('A')", 401),
]


@pytest.mark.parametrize(("schema", "rule", "cost"), KUBE_COSTS, ids=[f"{c[1]}-{c[2]}" for c in KUBE_COSTS])
def test_estimated_rule_cost_is_kube_apiservers(schema: dict[str, Any], rule: str, cost: int) -> None:
    from localcluster.celcost import rule_cost, schema_decl

    decl = schema_decl(schema)
    assert decl is not None
    assert rule_cost(rule, decl) == cost


ALL_DNS = "self.all(h, h.matches('^[a-z0-9.-]+$'))"


def _hosts_crd(hosts: dict[str, Any], rule: str = ALL_DNS) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"spec": _object(hosts={**hosts, "x-kubernetes-validations": [
        {"rule": rule, "message": "hosts are DNS names"}]})}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "hosts.example.dev"},
        "spec": {
            "group": "example.dev",
            "names": {"kind": "Hosts", "plural": "hosts"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": True, "storage": True,
                          "schema": {"openAPIV3Schema": schema}}],
        },
    }


RULE_PATH = ("spec.validation.openAPIV3Schema.properties[spec].properties[hosts]"
             ".x-kubernetes-validations[0].rule")
ADVICE = ("(try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, "
          "and strings are declared)")


def test_unbounded_list_of_unbounded_strings_with_all_and_matches_is_refused() -> None:
    crd = _hosts_crd(_array(_string()))
    with pytest.raises(InvalidError) as refused:
        CRDValidator(crd, "v1")
    # ~1.3e12: 1,048,575 items (3 MiB / 3 bytes) x matches() over 3 MiB strings; the total is over too
    assert refused.value.message() == (
        'CustomResourceDefinition.apiextensions.k8s.io "hosts.example.dev" is invalid: ['
        f"{RULE_PATH}: Forbidden: estimated rule cost exceeds budget by factor of more than 100x {ADVICE}, "
        f"{RULE_PATH}: Forbidden: contributed to estimated rule cost total exceeding cost limit for entire "
        "OpenAPIv3 schema, "
        "spec.validation.openAPIV3Schema: Forbidden: x-kubernetes-validations estimated rule cost total for "
        f"entire OpenAPIv3 schema exceeds budget by factor of more than 100x {ADVICE}]"
    )
    assert refused.value.status()["code"] == 422
    assert [c.type for c in refused.value.causes] == ["FieldValueForbidden"] * 3


def test_bounded_list_and_strings_are_accepted_at_their_estimated_cost() -> None:
    from localcluster.celcost import crd_rule_costs

    crd = _hosts_crd(_array(_string(253), 16))
    CRDValidator(crd, "v1")  # accepted
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    [rule] = crd_rule_costs(schema)
    # 16 x (loop 2 + && 1 + h 1 + ceil((253*4 + 1) * 0.1) * ceil(14 * 0.25)) + range 1 + result 1
    assert (rule.raw, rule.cardinality, rule.cost) == (6594, 1, 6594)


def test_a_rule_under_a_list_is_multiplied_by_its_cardinality() -> None:
    crd = _hosts_crd(_array(_string(253), 16), rule="true")
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    items = {**_string(), "x-kubernetes-validations": [{"rule": "self.matches('^[a-z]+$')"}]}
    spec["hosts"] = _array(items, 16)
    with_bound = crd_cost(crd)
    spec["hosts"] = _array(items)  # unbounded list: kube assumes 3 MiB / (2 + 1) items
    assert (with_bound, crd_cost(crd)) == (16 * 629147, 1048576 * 629147)


def crd_cost(crd: dict[str, Any]) -> int:
    from localcluster.celcost import crd_rule_costs

    [rule] = crd_rule_costs(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return rule.cost


def test_total_cost_of_a_schema_is_limited_even_when_each_rule_fits() -> None:
    # matches() over a 3 MiB string with a 120-char regex: 314,573 x 30 + 1 = 9,437,191 (under 10,000,000)
    rule = {"rule": "self.matches('^" + "a" * 118 + "$')"}
    props = {f"f{i}": {**_string(), "x-kubernetes-validations": [rule]} for i in range(11)}
    crd = _hosts_crd(_string(), rule="true")
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] = _object(**props)
    with pytest.raises(InvalidError) as refused:
        CRDValidator(crd, "v1")
    causes = [c.error() for c in refused.value.causes]
    contributed = [c for c in causes if "contributed to estimated rule cost total" in c]
    assert len(contributed) == 4 and len(causes) == 5  # kube names the 4 most expensive rules
    assert causes[-1] == (
        "spec.validation.openAPIV3Schema: Forbidden: x-kubernetes-validations estimated rule cost total for "
        f"entire OpenAPIv3 schema exceeds budget by factor of 1.038091x {ADVICE}"
    )
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"].pop("f10")  # ten such rules: 94,371,910, under 100,000,000
    CRDValidator(crd, "v1")
