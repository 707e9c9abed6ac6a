"""Static CEL cost estimation as kube-apiserver does it for CRD `x-kubernetes-validations`.

kube-apiserver refuses a CRD whose rules' estimated worst-case cost is over budget
(k8s.io/apiextensions-apiserver `validation.go`, `cel_validation.go`, `schema/cel/compilation.go`). The
estimate is cel-go's `checker.Cost` (checker/cost.go) with Kubernetes' size estimator and library costs
(k8s.io/apiserver/pkg/cel/library/cost.go, common/schemas.go). This module follows them for the constructs
our CRDs and admission policy use:

- sizes come from the schema: strings `maxLength` x 4 (bytes per rune), enums their longest value, lists
  `maxItems`, maps `maxProperties`; unbounded ones from the 3 MiB request limit and the smallest serialized
  element (`(3 MiB - 2) / (minSize + 1)` items, `(3 MiB - 2) / (minSize + 6)` properties, `3 MiB - 2` chars);
- a rule's cost is multiplied by its node's cardinality: the product of `maxItems` / `maxProperties` of the
  lists and maps above it, or, under an unbounded one, `3 MiB / (minSize + 1)`;
- per rule (and per messageExpression) limit 10,000,000; per schema total 100,000,000, with kube's messages.
- has() costs 0 (Kubernetes keeps cel-go's old presence-test cost); `self`, field selects and identifiers 1;
  literals 0; list literals 10; map literals 30; O(1) functions 1; `startsWith`/`endsWith`/`==` on strings
  0.1 per char; `matches` (chars + 1) x 0.1 x (regex chars x 0.25); `in` on a list its size; comprehensions
  (all, exists, exists_one, map, filter) their range size x (step + loop condition);
- kube's quirks are kept, not corrected: a map key (`self.all(k, ...)` over a map) has size 0, a scalar field
  reached by path has size 0, the iteration variable over a list literal takes the rule node's size.

ValidatingAdmissionPolicy expressions are not estimated by kube-apiserver at creation (their variables are
dynamically typed; cost is limited at runtime: 1,000,000 per expression, 10,000,000 per policy evaluation);
`estimate_expression` with typed roots (e.g. the CRD schemas of `object` and `params`) gives an upper bound of
that runtime cost, which is how tests/emulator/test_celcost.py checks our chart's policy.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_REQUEST_SIZE_BYTES = 3 * 1024 * 1024
STATIC_ESTIMATED_COST_LIMIT = 10_000_000
STATIC_ESTIMATED_CRD_COST_LIMIT = 100_000_000
PER_CALL_LIMIT = 1_000_000
RUNTIME_CEL_COST_BUDGET = 10_000_000
RUNTIME_CEL_COST_BUDGET_MATCH_CONDITIONS = 2_500_000
U64 = 2**64 - 1

_STRING_TRAVERSAL = 0.1
_REGEX_LENGTH = 0.25
_LIST_CREATE = 10
_MAP_CREATE = 30
_STRUCT_CREATE = 40
_ACCU = "__result__"


# ---------------------------------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class Est:
    """A [min, max] cost or size range with cel-go's saturating uint64 arithmetic."""

    lo: int
    hi: int

    def add(self, other: Est) -> Est:
        return Est(min(self.lo + other.lo, U64), min(self.hi + other.hi, U64))

    def mul(self, other: Est) -> Est:
        return Est(min(self.lo * other.lo, U64), min(self.hi * other.hi, U64))

    def factor(self, per_unit: float) -> Est:
        """MultiplyByCostFactor: each bound times the factor, rounded up."""
        return Est(_ceil_factor(self.lo, per_unit), _ceil_factor(self.hi, per_unit))

    def union(self, other: Est) -> Est:
        return Est(min(self.lo, other.lo), max(self.hi, other.hi))


def _ceil_factor(value: int, per_unit: float) -> int:
    product = math.ceil(float(value) * per_unit)
    return U64 if product >= 2.0**64 else int(product)


def fixed(value: int) -> Est:
    return Est(value, value)


UNKNOWN = Est(0, U64)


# ---------------------------------------------------------------------------------------------- types
@dataclass
class Decl:
    """The CEL declaration of a schema node (apiserver/pkg/cel DeclType): kind, children, size bounds."""

    kind: str  # object map list string bytes int uint double bool timestamp duration dyn null type
    fields: dict[str, Decl] = field(default_factory=dict)
    key: Decl | None = None
    elem: Decl | None = None
    max_elements: int = 0
    min_size: int = 0


DYN = Decl("dyn")
_SCALARS = {"bool", "int", "uint", "double", "timestamp", "duration"}


def _string_decl(schema: dict[str, Any]) -> Decl:
    fmt = schema.get("format")
    request = MAX_REQUEST_SIZE_BYTES - 2
    if fmt == "byte":
        return Decl("bytes", max_elements=max(schema.get("maxLength", request), 0), min_size=2)
    if fmt == "duration":
        return Decl("duration", max_elements=32, min_size=3)
    if fmt == "date":
        return Decl("timestamp", max_elements=12, min_size=12)
    if fmt == "date-time":
        return Decl("timestamp", max_elements=32, min_size=21)
    if "maxLength" in schema:
        return Decl("string", max_elements=max(schema["maxLength"], 0) * 4, min_size=2)
    if schema.get("enum"):
        longest = max((len(v.encode()) for v in schema["enum"] if isinstance(v, str)), default=0)
        return Decl("string", max_elements=longest, min_size=2)
    return Decl("string", max_elements=request, min_size=2)


def schema_decl(schema: dict[str, Any], resource_root: bool = False) -> Decl | None:
    """SchemaDeclType: the declaration CEL sees for a structural schema node (None: not visible to CEL)."""
    if schema.get("x-kubernetes-int-or-string"):
        limit = schema["maxLength"] * 4 if "maxLength" in schema else MAX_REQUEST_SIZE_BYTES - 2
        return Decl("dyn", max_elements=limit, min_size=1)
    kind = schema.get("type")
    if resource_root or schema.get("x-kubernetes-embedded-resource"):
        schema = _with_type_and_object_meta(schema)
        kind = "object"
    if kind == "array":
        return _list_decl(schema)
    if kind == "object":
        return _object_decl(schema)
    if kind == "string":
        return _string_decl(schema)
    simple = {"boolean": ("bool", 4), "number": ("double", 1), "integer": ("int", 1)}
    if kind in simple:
        name, min_size = simple[kind]
        return Decl(name, min_size=min_size)
    return None


def _list_decl(schema: dict[str, Any]) -> Decl | None:
    items = schema.get("items")
    elem = schema_decl(items) if isinstance(items, dict) else None
    if elem is None:
        return None
    if "maxItems" in schema:
        limit = max(schema["maxItems"], 0)
    else:
        limit = (MAX_REQUEST_SIZE_BYTES - 2) // (elem.min_size + 1)
    return Decl("list", elem=elem, max_elements=limit, min_size=2)


def _object_decl(schema: dict[str, Any]) -> Decl | None:
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        value = schema_decl(extra)
        if value is None:
            return None
        if "maxProperties" in schema:
            limit = max(schema["maxProperties"], 0)
        else:
            limit = (MAX_REQUEST_SIZE_BYTES - 2) // (value.min_size + 6)
        # kube's map key is the plain string declaration, whose MaxElements is 0
        return Decl("map", key=Decl("string", min_size=2), elem=value, max_elements=limit, min_size=2)
    required = set(schema.get("required") or [])
    decl = Decl("object", min_size=2)
    for name, prop in (schema.get("properties") or {}).items():
        child = schema_decl(prop)
        if child is None:
            continue
        decl.fields[name] = child
        if name in required and "default" not in prop:
            decl.min_size += len(name) + child.min_size + 4
    return decl


def _with_type_and_object_meta(schema: dict[str, Any]) -> dict[str, Any]:
    props = dict(schema.get("properties") or {})
    props["kind"] = {"type": "string"}
    props["apiVersion"] = {"type": "string"}
    props["metadata"] = {"type": "object", "properties": {"name": {"type": "string"},
                                                          "generateName": {"type": "string"}}}
    return {**schema, "type": "object", "properties": props}


def max_cardinality(min_size: int) -> int:
    """How many times a node under an unbounded list or map can occur in one request (kube's estimate)."""
    return MAX_REQUEST_SIZE_BYTES // (min_size + 1)


# ---------------------------------------------------------------------------------------------- parse
@dataclass
class Node:
    """A parsed CEL expression: lit, ident, select, call, list, map or comp (an expanded macro)."""

    op: str
    name: str = ""  # identifier, field, function, or macro name
    value: Any = None
    lit: str = ""  # literal kind
    target: Node | None = None
    args: list[Node] = field(default_factory=list)
    test_only: bool = False


_BINARY = {
    "relation_lt": "_<_", "relation_le": "_<=_", "relation_gt": "_>_", "relation_ge": "_>=_",
    "relation_eq": "_==_", "relation_ne": "_!=_", "relation_in": "@in", "addition_add": "_+_",
    "addition_sub": "_-_", "multiplication_mul": "_*_", "multiplication_div": "_/_",
    "multiplication_mod": "_%_",
}
_MACROS = {"all", "exists", "exists_one", "map", "filter"}
_PARSER: Any = None


def parse(expression: str) -> Node:
    """Parse with cel-python's Lark grammar and convert to Node (macros kept as `comp` nodes)."""
    global _PARSER
    if _PARSER is None:
        from celpy.celparser import CELParser

        _PARSER = CELParser()
    return _convert(_PARSER.parse(expression))


def _children(tree: Any) -> list[Any]:
    return [c for c in tree.children if c is not None]


def _convert(tree: Any) -> Node:
    rule = tree.data
    kids = _children(tree)
    if rule == "expr":
        if len(kids) == 3:
            return Node("call", "_?_:_", args=[_convert(k) for k in kids])
        return _convert(kids[0])
    if rule in ("conditionalor", "conditionaland"):
        if len(kids) == 2:
            name = "_||_" if rule == "conditionalor" else "_&&_"
            return Node("call", name, args=[_convert(kids[0]), _convert(kids[1])])
        return _convert(kids[0])
    if rule in ("relation", "addition", "multiplication"):
        if len(kids) == 2:
            op = kids[0]
            return Node("call", _BINARY[op.data], args=[_convert(_children(op)[0]), _convert(kids[1])])
        return _convert(kids[0])
    if rule == "unary":
        if len(kids) == 2:
            operand = _convert(kids[1])
            if kids[0].data == "unary_neg" and operand.op == "lit" and operand.lit in ("int", "double"):
                return Node("lit", value=-operand.value, lit=operand.lit)
            return Node("call", "!_" if kids[0].data == "unary_not" else "-_", args=[operand])
        return _convert(kids[0])
    if rule in ("member", "primary", "paren_expr"):
        return _convert(kids[0])
    return _convert_member(rule, kids)


def _convert_member(rule: str, kids: list[Any]) -> Node:
    if rule == "member_dot":
        return Node("select", str(kids[1]), target=_convert(kids[0]))
    if rule == "member_dot_arg":
        args = [_convert(k) for k in _children(kids[2])] if len(kids) > 2 else []
        return _call(str(kids[1]), _convert(kids[0]), args)
    if rule == "member_index":
        return Node("call", "_[_]", args=[_convert(kids[0]), _convert(kids[1])])
    if rule == "ident":
        return Node("ident", str(kids[0]))
    if rule == "ident_arg":
        args = [_convert(k) for k in _children(kids[1])] if len(kids) > 1 else []
        if str(kids[0]) == "has" and len(args) == 1 and args[0].op == "select":
            return Node("select", args[0].name, target=args[0].target, test_only=True)
        return _call(str(kids[0]), None, args)
    if rule == "list_lit":
        return Node("list", args=[_convert(k) for k in _children(kids[0])] if kids else [])
    if rule == "map_lit":
        entries = [_convert(k) for k in _children(kids[0])] if kids else []
        return Node("map", args=entries)
    if rule == "literal":
        return _literal(kids[0])
    if rule == "member_object":
        return Node("call", "@struct", args=[])
    raise ValueError(f"unsupported CEL construct {rule}")


def _call(name: str, target: Node | None, args: list[Node]) -> Node:
    if target is not None and name in _MACROS and args and args[0].op == "ident":
        return Node("comp", name, value=args[0].name, target=target, args=args[1:])
    return Node("call", name, target=target, args=args)


def _literal(token: Any) -> Node:
    text = str(token)
    kind = token.type
    if kind == "BOOL_LIT":
        return Node("lit", value=text == "true", lit="bool")
    if kind == "NULL_LIT":
        return Node("lit", value=None, lit="null")
    if kind == "INT_LIT":
        return Node("lit", value=int(text, 0), lit="int")
    if kind == "UINT_LIT":
        return Node("lit", value=int(text[:-1], 0), lit="uint")
    if kind == "FLOAT_LIT":
        return Node("lit", value=float(text), lit="double")
    return Node("lit", value=_string_value(text), lit="bytes" if kind == "BYTES_LIT" else "string")


def _string_value(text: str) -> str:
    raw = text[:1] in "rR"
    body = text.lstrip("bBrR")
    quote = 3 if body[:3] in ('"""', "'''") else 1
    body = body[quote:-quote]
    if raw or "\\" not in body:
        return body
    try:
        return codecs.decode(body.encode("utf-8", "backslashreplace"), "unicode_escape")
    except UnicodeDecodeError:  # an escape only kube's parser would understand: count the characters
        return body


# ---------------------------------------------------------------------------------------------- estimate
Resolver = Callable[[list[str]], Decl | None]


@dataclass(frozen=True)
class _Entry:
    """Sizes of a list's items (key: index) or a map's keys and values, known from literals."""

    container: str
    key: Est
    val: Est

    def union(self, other: _Entry | None) -> _Entry | None:
        if other is None:
            return None
        return _Entry(self.container, self.key.union(other.key), self.val.union(other.val))


@dataclass
class _Local:
    path: list[str]
    size: Est | None
    entry: _Entry | None
    type: Decl


_BOOL = Decl("bool")
_INT = Decl("int")
_STRING = Decl("string")
_BOOL_FUNCTIONS = {
    "_<_", "_<=_", "_>_", "_>=_", "_==_", "_!=_", "@in", "_&&_", "_||_", "!_", "@not_strictly_false",
    "startsWith", "endsWith", "matches", "contains", "isSorted", "isURL", "isIP", "isCIDR", "isQuantity",
}
_STRING_FUNCTIONS = {"string", "lowerAscii", "upperAscii", "trim", "substring", "replace", "join", "charAt",
                     "format", "quote"}
_INT_FUNCTIONS = {"size", "int", "indexOf", "lastIndexOf"}
_AUTHZ_NOMINAL = {
    "serviceAccount", "path", "group", "resource", "subresource", "namespace", "name", "allowed", "reason",
    "error", "errored", "sign", "asInteger", "isInteger", "asApproximateFloat", "isGreaterThan", "isLessThan",
    "compareTo", "add", "sub", "masked", "prefixLength", "family", "isUnspecified", "isLoopback",
    "isLinkLocalMulticast", "isLinkLocalUnicast",
}
_STRING_COMPARE = {"_<_", "_<=_", "_>_", "_>=_"}


class _Coster:
    """cel-go's checker.coster over our Node tree, with Kubernetes' size estimator and library costs."""

    def __init__(self, resolve: Resolver, roots: dict[str, Decl], presence_cost: int = 0) -> None:
        self.resolve = resolve
        self.roots = roots
        self.presence = fixed(presence_cost)
        self.sizes: dict[int, Est] = {}
        self.entries: dict[int, _Entry] = {}
        self.paths: dict[int, list[str]] = {}
        self.types: dict[int, Decl] = {}
        self.scopes: dict[str, list[_Local]] = {}
        self.keep: list[Node] = []  # synthetic macro nodes, kept alive so their ids stay unique

    # ------------------------------------------------------------------ bookkeeping
    def local(self, name: str) -> _Local | None:
        stack = self.scopes.get(name)
        return stack[-1] if stack else None

    def push(self, name: str, local: _Local) -> None:
        self.scopes.setdefault(name, []).append(local)

    def pop(self, name: str) -> None:
        self.scopes[name].pop()

    def type_of(self, e: Node) -> Decl:
        return self.types.get(id(e), DYN)

    def path(self, e: Node) -> list[str]:
        if e.op == "ident":
            var = self.local(e.name)
            if var is not None:
                return list(var.path)
        return list(self.paths.get(id(e), []))

    def size(self, e: Node) -> Est | None:
        """computeSize: recorded sizes, literal sizes, the schema by path, scalar types, local variables."""
        if id(e) in self.sizes:
            return self.sizes[id(e)]
        if e.op == "lit":
            if e.lit == "string":
                return fixed(len(e.value))
            return fixed(len(e.value) if e.lit == "bytes" else 1)
        if e.op == "list":
            return fixed(len(e.args))
        if e.op == "map":
            return fixed(len(e.args) // 2)
        path = self.path(e)
        decl = self.resolve(path) if path else None
        if decl is not None:
            self.sizes[id(e)] = Est(0, decl.max_elements)
            return self.sizes[id(e)]
        if self.type_of(e).kind in _SCALARS:
            return fixed(1)
        if e.op == "ident":
            var = self.local(e.name)
            if var is not None and var.size is not None:
                return var.size
        return None

    def size_or_unknown(self, e: Node) -> Est:
        found = self.size(e)
        return UNKNOWN if found is None else found

    def entry(self, e: Node) -> _Entry | None:
        if id(e) in self.entries:
            return self.entries[id(e)]
        if e.op == "ident":
            var = self.local(e.name)
            if var is not None:
                return var.entry
        return None

    # ------------------------------------------------------------------ expressions
    def cost(self, e: Node) -> Est:
        if e.op == "lit":
            self.types[id(e)] = Decl(e.lit if e.lit != "null" else "null")
            return fixed(0)
        if e.op == "ident":
            var = self.local(e.name)
            self.types[id(e)] = var.type if var is not None else self.roots.get(e.name, DYN)
            if var is None:
                self.paths[id(e)] = [e.name]
            return fixed(1)
        if e.op == "select":
            return self.cost_select(e)
        if e.op == "call":
            return self.cost_call(e)
        if e.op in ("list", "map"):
            return self.cost_create(e)
        return self.cost_comprehension(e)

    def cost_select(self, e: Node) -> Est:
        assert e.target is not None
        operand = self.cost(e.target)
        if e.test_only:
            self.types[id(e)] = _BOOL
            return self.presence.add(operand)
        target_type = self.type_of(e.target)
        self.types[id(e)] = _field_type(target_type, e.name)
        self.paths[id(e)] = [*self.path(e.target), e.name]
        if target_type.kind in ("map", "object"):
            return operand.add(fixed(1))
        return operand

    def cost_create(self, e: Node) -> Est:
        total = fixed(0)
        if e.op == "list":
            item = Est(U64, 0) if e.args else Est(0, 0)
            for arg in e.args:
                total = total.add(self.cost(arg))
                item = item.union(self.size_or_unknown(arg))
            elem = self.type_of(e.args[0]) if e.args else DYN
            self.types[id(e)] = Decl("list", elem=elem)
            self.entries[id(e)] = _Entry("list", fixed(1), item)
            return total.add(fixed(_LIST_CREATE))
        keys = Est(U64, 0) if e.args else Est(0, 0)
        vals = Est(U64, 0) if e.args else Est(0, 0)
        for i, arg in enumerate(e.args):
            total = total.add(self.cost(arg))
            if i % 2 == 0:
                keys = keys.union(self.size_or_unknown(arg))
            else:
                vals = vals.union(self.size_or_unknown(arg))
        self.types[id(e)] = Decl("map", key=_STRING, elem=self.type_of(e.args[1]) if e.args else DYN)
        self.entries[id(e)] = _Entry("map", keys, vals)
        return total.add(fixed(_MAP_CREATE))

    def cost_call(self, e: Node) -> Est:
        if e.name == "dyn" and e.target is None and len(e.args) == 1:
            inner = self.cost(e.args[0])
            self.types[id(e)] = DYN
            if (size := self.size(e.args[0])) is not None:
                self.sizes[id(e)] = size
            if (entry := self.entry(e.args[0])) is not None:
                self.entries[id(e)] = entry
            return fixed(1).add(inner)
        arg_costs = [self.cost(arg) for arg in e.args]
        total = fixed(0)
        if e.target is not None:
            total = total.add(self.cost(e.target))
        self.types[id(e)] = self.result_type(e)
        fn_cost, result_size = self.function_cost(e, arg_costs)
        if e.name == "_[_]":
            indexed = self.type_of(e.args[0]).kind
            entry = self.entry(e.args[0])
            result_size = entry.val if entry is not None else None
            self.paths[id(e)] = [*self.path(e.args[0]), "@items" if indexed == "list" else "@values"]
        if result_size is None:
            result_size = self.size(e)
        if result_size is not None:
            self.sizes[id(e)] = result_size
        return total.add(fn_cost)

    def result_type(self, e: Node) -> Decl:
        name = e.name
        types = [self.type_of(a) for a in e.args]
        if name in _BOOL_FUNCTIONS:
            return _BOOL
        if name in _INT_FUNCTIONS:
            return _INT
        if name in _STRING_FUNCTIONS:
            return _STRING
        if name == "split":
            return Decl("list", elem=_STRING)
        if name in ("_+_", "_-_", "_*_", "_/_", "_%_", "-_"):
            return types[0] if types[0].kind != "dyn" or len(types) == 1 else types[1]
        if name == "_?_:_":
            return types[1] if types[1].kind != "dyn" else types[2]
        if name == "_[_]":
            container = types[0]
            return (container.elem or DYN) if container.kind in ("list", "map") else DYN
        if name in ("double", "uint", "bytes", "timestamp", "duration"):
            return Decl(name)
        return DYN

    def function_cost(self, e: Node, arg_costs: list[Est]) -> tuple[Est, Est | None]:
        """functionCost: Kubernetes' library estimator first, then cel-go's overload table, else O(1)."""
        arg_sum = fixed(0)
        for cost in arg_costs:
            arg_sum = arg_sum.add(cost)
        kube = self.kube_call_cost(e)
        if kube is not None:
            return kube[0].add(arg_sum), kube[1]
        name, args = e.name, e.args
        if name in ("_&&_", "_||_"):
            return Est(arg_costs[0].lo, arg_costs[0].add(arg_costs[1]).hi), None
        if name == "_?_:_":
            entry = self.entry(args[1])
            if entry is not None and (merged := entry.union(self.entry(args[2]))) is not None:
                self.entries[id(e)] = merged
            size = self.size_or_unknown(args[1]).union(self.size_or_unknown(args[2]))
            return arg_costs[0].add(arg_costs[1].union(arg_costs[2])), size
        if name == "_+_" and self.type_of(e).kind in ("string", "bytes", "list"):
            return self.add_cost(e, arg_sum)
        if name in ("_==_", "_!=_") or (name in _STRING_COMPARE and self._stringish(args[0])):
            lhs, rhs = self.size_or_unknown(args[0]), self.size_or_unknown(args[1])
            smallest = min(lhs.hi, rhs.hi)
            return Est(1 if smallest > 0 else 0, smallest).factor(_STRING_TRAVERSAL).add(arg_sum), None
        target = e.target
        if name in ("startsWith", "endsWith") and target is not None and len(args) == 1:
            return self.size_or_unknown(args[0]).factor(_STRING_TRAVERSAL).add(arg_sum), None
        if name == "@in" and self.type_of(args[1]).kind in ("list", "dyn"):
            return self.size_or_unknown(args[1]).factor(1).add(arg_sum), None
        if name == "matches" and target is not None and len(args) == 1:
            text = self.size_or_unknown(target).add(fixed(1)).factor(_STRING_TRAVERSAL)
            regex = self.size_or_unknown(args[0]).factor(_REGEX_LENGTH)
            return text.mul(regex).add(arg_sum), None
        if name == "contains" and target is not None and len(args) == 1:
            text = self.size_or_unknown(target).factor(_STRING_TRAVERSAL)
            return text.mul(self.size_or_unknown(args[0]).factor(_STRING_TRAVERSAL)).add(arg_sum), None
        return fixed(1).add(arg_sum), None

    def _stringish(self, e: Node) -> bool:
        return self.type_of(e).kind in ("string", "bytes", "dyn")

    def add_cost(self, e: Node, arg_sum: Est) -> tuple[Est, Est | None]:
        lhs, rhs = e.args
        size = self.size_or_unknown(lhs).add(self.size_or_unknown(rhs))
        left = self.entry(lhs)
        if left is not None and (merged := left.union(self.entry(rhs))) is not None:
            self.entries[id(e)] = merged
        if self.type_of(e).kind == "list":
            return fixed(1).add(arg_sum), size
        return size.factor(_STRING_TRAVERSAL).add(arg_sum), size

    def kube_call_cost(self, e: Node) -> tuple[Est, Est | None] | None:
        """k8s.io/apiserver/pkg/cel/library CostEstimator.EstimateCallCost for the functions we may meet."""
        name, target, args = e.name, e.target, e.args
        if name == "check":
            return fixed(350000), None
        if name in _AUTHZ_NOMINAL and target is not None:
            return fixed(1), None
        if target is None:
            if name == "url" and len(args) == 1:
                return self.size_or_unknown(args[0]).factor(_STRING_TRAVERSAL), None
            return None
        size = self.size_or_unknown(target)
        if name in ("lowerAscii", "upperAscii", "substring", "trim"):
            return size.factor(_STRING_TRAVERSAL), size
        if name in ("indexOf", "lastIndexOf", "isSorted", "sum", "max", "min"):
            if self.type_of(target).kind == "list":
                elem = self.type_of(target).elem or DYN
                per_item = fixed(1)
                if elem.kind in ("string", "bytes"):
                    per_item = per_item.add(self._elem_size(target).factor(_STRING_TRAVERSAL))
                return size.mul(per_item), None
            return size.factor(_STRING_TRAVERSAL), None
        if name == "split":
            high = size.hi
            if len(args) > 1 and args[1].op == "lit" and isinstance(args[1].value, int):
                high = max(args[1].value, 0)
            return size.factor(2 * _STRING_TRAVERSAL), Est(0, high)
        if name == "replace" and len(args) >= 2:
            return size.factor(2 * _STRING_TRAVERSAL), self._replace_size(size, args)
        if name == "join":
            joined = size.mul(self._elem_size(target))
            if args:
                separators = Est(max(size.lo - 1, 0), max(size.hi - 1, 0))
                joined = joined.add(self.size_or_unknown(args[0]).mul(separators))
            return joined.factor(_STRING_TRAVERSAL), joined
        if name in ("find", "findAll") and args:
            text = size.add(fixed(1)).factor(_STRING_TRAVERSAL)
            return text.mul(self.size_or_unknown(args[0]).factor(_REGEX_LENGTH)), Est(0, size.hi)
        if name in ("quantity", "isQuantity", "cidr", "isIP", "isCIDR", "ip") and args:
            return self.size_or_unknown(args[0]).factor(_STRING_TRAVERSAL), None
        return None

    def _elem_size(self, target: Node) -> Est:
        entry = self.entry(target)
        if entry is not None:
            return entry.val
        path = self.path(target)
        decl = self.resolve([*path, "@items"]) if path else None
        return Est(0, decl.max_elements) if decl is not None else UNKNOWN

    def _replace_size(self, size: Est, args: list[Node]) -> Est:
        old, new = self.size_or_unknown(args[0]), self.size_or_unknown(args[1])
        if old.lo == 0:
            count_hi, kept_hi = (size.hi + 1 if size.hi < U64 else size.hi), size.hi
        elif new.hi <= old.lo:
            count_hi, kept_hi = 0, size.hi
        else:
            count_hi, kept_hi = math.ceil(size.hi / old.lo), 0
        if old.hi == 0:
            count_lo, kept_lo = (size.lo + 1 if size.lo < U64 else size.lo), size.lo
        elif old.hi <= new.lo:
            count_lo, kept_lo = 0, size.lo
        else:
            count_lo, kept_lo = math.ceil(size.lo / old.hi), 0
        return Est(count_lo, count_hi).mul(new).add(Est(kept_lo, kept_hi))

    def cost_comprehension(self, e: Node) -> Est:
        assert e.target is not None
        init, condition, step, result = self.expand(e)
        total = self.cost(e.target).add(self.cost(init))
        range_type = self.type_of(e.target)
        accu_type = self.accu_type(e, range_type)
        self.push(_ACCU, _Local(self.path(init), self.size(init), self.entry(init), accu_type))
        entry = self.entry(e.target)
        container = entry.container if entry is not None else range_type.kind
        if container == "list":
            var_size, subpath, var_type = (entry.val if entry else None), "@items", range_type.elem or DYN
        else:
            var_size, subpath, var_type = (entry.key if entry else None), "@keys", range_type.key or DYN
        self.push(str(e.value), _Local([*self.path(e.target), subpath], var_size, None, var_type))
        loop = self.cost(condition)
        step_cost = self.cost(step)
        self.pop(str(e.value))
        total = total.add(self.cost(result))
        self.pop(_ACCU)
        count = self.size_or_unknown(e.target)
        total = total.add(count.mul(step_cost.add(loop)))
        self.types[id(e)] = self.type_of(result)
        if init.op == "lit":
            if (size := self.size(init)) is not None:
                self.sizes[id(e)] = size
        else:
            self.sizes[id(e)] = count
            if (step_entry := self.entry(step)) is not None:
                self.entries[id(e)] = step_entry
        return total

    def accu_type(self, e: Node, range_type: Decl) -> Decl:
        if e.name in ("all", "exists"):
            return _BOOL
        if e.name == "exists_one":
            return _INT
        return Decl("list", elem=range_type.elem or DYN)

    def expand(self, e: Node) -> tuple[Node, Node, Node, Node]:
        """The comprehension cel-go's macro expands to: accumulator init, loop condition, step, result."""
        accu = Node("ident", _ACCU)
        pred = e.args[0] if e.args else Node("lit", value=True, lit="bool")
        var = Node("ident", str(e.value))
        if e.name == "all":
            parts = (Node("lit", value=True, lit="bool"), Node("call", "@not_strictly_false", args=[accu]),
                     Node("call", "_&&_", args=[accu, pred]), accu)
        elif e.name == "exists":
            negated = Node("call", "!_", args=[accu])
            loop = Node("call", "@not_strictly_false", args=[negated])
            either = Node("call", "_||_", args=[accu, pred])
            parts = (Node("lit", value=False, lit="bool"), loop, either, accu)
        elif e.name == "exists_one":
            one = Node("lit", value=1, lit="int")
            step = Node("call", "_?_:_", args=[pred, Node("call", "_+_", args=[accu, one]), accu])
            parts = (Node("lit", value=0, lit="int"), Node("lit", value=True, lit="bool"), step,
                     Node("call", "_==_", args=[accu, one]))
        else:  # map(x, t), map(x, p, t), filter(x, p)
            item = var if e.name == "filter" else e.args[-1]
            grow = Node("call", "_+_", args=[accu, Node("list", args=[item])])
            step = grow
            if e.name == "filter" or len(e.args) == 2:
                step = Node("call", "_?_:_", args=[pred, grow, accu])
            parts = (Node("list"), Node("lit", value=True, lit="bool"), step, accu)
        self.keep.extend([accu, var, *parts])
        return parts


def _field_type(target: Decl, name: str) -> Decl:
    if target.kind == "object":
        return target.fields.get(name) or target.fields.get(_unescape(name)) or DYN
    if target.kind == "map":
        return target.elem or DYN
    return DYN


def _unescape(name: str) -> str:
    """CEL field names of properties that are not identifiers (apiserver/pkg/cel/escaping.go)."""
    for escaped, raw in (("__underscores__", "__"), ("__dot__", "."), ("__dash__", "-"), ("__slash__", "/")):
        name = name.replace(escaped, raw)
    return name


def _walk(decl: Decl | None, steps: list[str]) -> Decl | None:
    for step in steps:
        if decl is None:
            return None
        if step in ("@items", "@values"):
            decl = decl.elem
        elif step == "@keys":
            decl = decl.key
        else:
            decl = decl.fields.get(step) or decl.fields.get(_unescape(step))
    return decl


def self_resolver(root: Decl) -> Resolver:
    """Kubernetes' CRD size estimator: the first path element (self, oldSelf, ...) is the rule's node."""
    return lambda path: _walk(root, path[1:])


def roots_resolver(roots: dict[str, Decl]) -> Resolver:
    """Sizes by variable (object, params, ...): for estimating admission policy expressions."""
    return lambda path: _walk(roots.get(path[0]), path[1:])


def estimate(expression: str, resolve: Resolver, roots: dict[str, Decl]) -> tuple[Est, Est | None]:
    """(worst-case cost, result size) of one expression."""
    tree = parse(expression)
    coster = _Coster(resolve, roots)
    cost = coster.cost(tree)
    return cost, coster.size(tree)


def rule_cost(rule: str, node: Decl) -> int:
    """The estimated max cost of one evaluation of an x-kubernetes-validations rule on `node`."""
    return estimate(rule, self_resolver(node), {"self": node, "oldSelf": node})[0].hi


# ---------------------------------------------------------------------------------------------- CRDs
@dataclass(frozen=True)
class RuleCost:
    """One rule (or messageExpression) of a CRD schema: cost of one evaluation x how often it can run."""

    path: str
    expression: str
    raw: int
    cardinality: int
    cost: int


def crd_rule_costs(schema: dict[str, Any], base_path: str = "openAPIV3Schema") -> list[RuleCost]:
    """Every rule's estimated cost, as kube-apiserver computes it when a CRD is created or updated."""
    out: list[RuleCost] = []
    _collect(schema, base_path, 1, out, root=True)
    return out


def _collect(node: dict[str, Any], path: str, cardinality: int | None, out: list[RuleCost],
             root: bool = False) -> None:
    rules = node.get("x-kubernetes-validations") or []
    if rules:
        decl = schema_decl(node, resource_root=root)
        if decl is not None:
            times = cardinality if cardinality is not None else max_cardinality(decl.min_size)
            for i, rule in enumerate(rules):
                for key in ("rule", "messageExpression"):
                    if rule.get(key):
                        raw = _rule_cost_or_zero(rule[key], decl)
                        total = 0 if raw == 0 else min(raw * times, U64)
                        where = f"{path}.x-kubernetes-validations[{i}].{key}"
                        out.append(RuleCost(where, rule[key], raw, times, total))
    step = _child_factor(node)
    below = None if cardinality is None or step is None else min(cardinality * step, U64)
    for name, child in (node.get("properties") or {}).items():
        _collect(child, f"{path}.properties[{name}]", below, out)
    if isinstance(node.get("items"), dict):
        _collect(node["items"], f"{path}.items", below, out)
    if isinstance(node.get("additionalProperties"), dict):
        _collect(node["additionalProperties"], f"{path}.additionalProperties", below, out)


def _rule_cost_or_zero(expression: str, decl: Decl) -> int:
    """An expression this estimator cannot parse (syntax beyond our grammar: optionals, cel.bind, ...) is
    not counted rather than refused: the emulator must never refuse a CRD that kube-apiserver accepts."""
    try:
        return rule_cost(expression, decl)
    except Exception:  # Lark's parse errors and constructs the converter does not know
        return 0


def _child_factor(node: dict[str, Any]) -> int | None:
    """extractMaxElements: how much a node multiplies its children's cardinality (None: unbounded)."""
    if node.get("type") == "object" and node.get("additionalProperties") is not None:
        return max(node["maxProperties"], 0) if "maxProperties" in node else None
    if node.get("type") == "array":
        return max(node["maxItems"], 0) if "maxItems" in node else None
    return 1


def cost_error_message(name: str, cost: int, limit: int) -> str:
    """getCostErrorMessage in apiextensions validation.go."""
    factor = cost / limit
    if factor > 100.0:
        text = "more than 100x"
    elif factor < 1.5:
        text = f"{factor:f}x"
    else:
        text = f"{factor:.1f}x"
    return (f"{name} exceeds budget by factor of {text} (try simplifying the rule, or adding maxItems, "
            "maxProperties, and maxLength where arrays, maps, and strings are declared)")


def crd_cost_problems(schema: dict[str, Any], base_path: str) -> list[tuple[str, str]]:
    """(field path, Forbidden detail) for each over-budget rule and for an over-budget total."""
    costs = crd_rule_costs(schema, base_path)
    problems = []
    for rc in costs:
        if rc.cost > STATIC_ESTIMATED_COST_LIMIT:
            kind = "rule" if rc.path.endswith(".rule") else "messageExpression"
            problems.append((rc.path, cost_error_message(f"estimated {kind} cost", rc.cost,
                                                         STATIC_ESTIMATED_COST_LIMIT)))
    total = min(sum(rc.cost for rc in costs), U64)
    if total > STATIC_ESTIMATED_CRD_COST_LIMIT:
        expensive = [rc for rc in costs if rc.cost >= STATIC_ESTIMATED_CRD_COST_LIMIT // 100]
        for rc in sorted(expensive, key=lambda r: r.cost, reverse=True)[:4]:
            problems.append((rc.path, "contributed to estimated rule cost total exceeding cost limit for "
                                      "entire OpenAPIv3 schema"))
        problems.append((base_path, cost_error_message(
            "x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema", total,
            STATIC_ESTIMATED_CRD_COST_LIMIT)))
    return problems


__all__ = [
    "PER_CALL_LIMIT", "RUNTIME_CEL_COST_BUDGET", "RUNTIME_CEL_COST_BUDGET_MATCH_CONDITIONS",
    "STATIC_ESTIMATED_COST_LIMIT", "STATIC_ESTIMATED_CRD_COST_LIMIT", "Decl", "Est", "RuleCost",
    "cost_error_message", "crd_cost_problems", "crd_rule_costs", "estimate", "max_cardinality", "parse",
    "roots_resolver", "rule_cost", "schema_decl", "self_resolver",
]
