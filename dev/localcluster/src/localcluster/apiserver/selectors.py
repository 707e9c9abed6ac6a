"""Label selectors, field selectors and the JSONPath subset used by printer columns."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import bad_request

Predicate = Callable[[dict[str, Any]], bool]

_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ_RE = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|=|!=)\s*([A-Za-z0-9_.-]*)\s*$")


def _split_requirements(text: str) -> list[str]:
    """Split on commas that are not inside `in (...)` parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def parse_label_selector(text: str | None) -> Predicate | None:
    """`a=b,c!=d,e in (f,g),h notin (i),j,!k` → predicate on an object's labels."""
    if not text:
        return None
    checks: list[Callable[[dict[str, str]], bool]] = []
    for requirement in _split_requirements(text):
        eq = _EQ_RE.match(requirement)
        if eq:
            key, op, value = eq.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
            continue
        match = _SET_RE.match(requirement)
        if not match:
            raise bad_request(
                f"unable to parse requirement: found '{requirement}', expected a label selector"
            )
        negated, key, op, values_text = match.groups()
        if op:
            if negated:
                raise bad_request(f"unable to parse requirement: {requirement}")
            values = {v.strip() for v in values_text.split(",") if v.strip()}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif negated:
            checks.append(lambda labels, k=key: k not in labels)
        else:
            checks.append(lambda labels, k=key: k in labels)

    def predicate(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return predicate


def field_value(obj: dict[str, Any], path: str) -> str:
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, dict):
            return ""
        current = current.get(part)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


def parse_field_selector(
    text: str | None, supported: Callable[[str], bool] | None = None
) -> Predicate | None:
    """`metadata.name=x,status.phase!=Failed` → predicate. Unknown fields are a 400 like kube-apiserver."""
    if not text:
        return None
    checks: list[Callable[[dict[str, Any]], bool]] = []
    for requirement in _split_requirements(text):
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", requirement)
        if not match:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{requirement}'")
        field, op, value = match.groups()
        if supported is not None and not supported(field):
            raise bad_request(f"field label not supported: {field}")
        if op == "!=":
            checks.append(lambda o, f=field, v=value: field_value(o, f) != v)
        else:
            checks.append(lambda o, f=field, v=value: field_value(o, f) == v)
    return lambda obj: all(check(obj) for check in checks)


# --- JSONPath (the subset CRD printer columns and kubectl use) -------------------------------------------

_TOKEN_RE = re.compile(r"\.\.|\.|\[[^\]]*\]|[^.\[]+")


def jsonpath(obj: Any, expression: str) -> list[Any]:
    """Evaluate `.a.b[0].c`, `.a[*].b`, `.a[?(@.type=="Ready")].status`, `{.a.b}` against obj."""
    expr = expression.strip()
    if expr.startswith("{") and expr.endswith("}"):
        expr = expr[1:-1]
    if expr.startswith("$"):
        expr = expr[1:]
    nodes = [obj]
    for token in _TOKEN_RE.findall(expr):
        if token == ".":
            continue
        next_nodes: list[Any] = []
        if token.startswith("["):
            inner = token[1:-1].strip()
            for node in nodes:
                next_nodes.extend(_index(node, inner))
        else:
            for node in nodes:
                if isinstance(node, dict) and token in node:
                    next_nodes.append(node[token])
        nodes = next_nodes
    return nodes


def _index(node: Any, inner: str) -> list[Any]:
    if not isinstance(node, list):
        if isinstance(node, dict) and inner.strip("'\"") in node:
            return [node[inner.strip("'\"")]]
        return []
    if inner == "*":
        return list(node)
    if inner.startswith("?(") and inner.endswith(")"):
        match = re.match(r"^\?\(@\.([A-Za-z0-9_.]+)\s*(==|!=)\s*['\"]?(.*?)['\"]?\)$", inner)
        if not match:
            return []
        path, op, value = match.groups()
        return [
            item
            for item in node
            if isinstance(item, dict) and ((field_value(item, path) == value) == (op == "=="))
        ]
    if ":" in inner:
        start_text, _, end_text = inner.partition(":")
        start = int(start_text) if start_text else None
        end = int(end_text) if end_text else None
        return node[start:end]
    try:
        index = int(inner)
    except ValueError:
        return []
    try:
        return [node[index]]
    except IndexError:
        return []


def label_selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels + matchExpressions) against labels; empty matches all."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = set(expression.get("values") or [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True
