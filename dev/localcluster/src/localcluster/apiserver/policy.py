"""ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) as kube-apiserver's plugin evaluates it
(k8s.io/apiserver/pkg/admission/plugin/policy/validating), on the CEL engine of crdvalidation.

Per request (CREATE and UPDATE of any resource, subresources only when a rule names them):
1. every binding whose policy exists; the policy's `matchConstraints` and the binding's `matchResources`
   must both match: `resourceRules` (apiGroups, apiVersions, resources incl. `x/status` and `*/*`,
   operations, scope, resourceNames), `excludeResourceRules`, `namespaceSelector` (the namespace's labels),
   `objectSelector` (the object's, or the old object's, labels);
2. params: none without `paramKind`; else the binding's `paramRef` by `name` (+`namespace`, defaulting to the
   request's namespace for a namespaced param kind) or `selector` (each matching param is checked);
   none found → `parameterNotFoundAction` (`Deny`: the request is denied; `Allow`: the binding is skipped);
3. `matchConditions` (all must be true), `variables` (in order, as `variables.<name>`), then each of
   `validations` with `object`, `oldObject`, `params`, `request`, `namespaceObject`;
4. a failed validation: `message`, or `messageExpression` when it yields a non-empty one-line string, or
   `failed expression: <expression>`; with `validationActions` Deny → the error below, Warn → a `Warning`
   header; Audit is accepted and ignored. Evaluation errors follow `failurePolicy` (Fail by default).
Denial: `<resource> "<name>" is forbidden: ValidatingAdmissionPolicy '<policy>' with binding '<binding>'
denied request: <message>`, status reason from the validation's `reason` (default Invalid, HTTP 422;
Forbidden 403). Every expression has the Kubernetes string library (split, substring, lowerAscii, ...).
Not emulated: DELETE/CONNECT requests, `authorizer` in CEL, auditAnnotations, type checking
status, CEL cost limits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .selectors import label_selector_matches

GROUP = "admissionregistration.k8s.io"
REASON_CODES = {"Forbidden": 403, "Invalid": 422, "RequestEntityTooLarge": 413, "Unauthorized": 401}


def kubernetes_functions() -> dict[str, Callable[..., Any]]:
    """The Kubernetes CEL string library (split, substring, lowerAscii, ...), as for CRD rules."""
    from ..crdvalidation import _KUBE_FUNCTIONS

    return _KUBE_FUNCTIONS


@functools.lru_cache(maxsize=2048)
def _program(expression: str) -> Any:
    import cel

    return cel.compile(expression)


def compile_problems(policy: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field, expression, error) for every expression of a policy that does not compile."""
    spec = policy.get("spec") or {}
    problems = []
    for section, key in (
        ("validations", "expression"),
        ("validations", "messageExpression"),
        ("matchConditions", "expression"),
        ("variables", "expression"),
    ):
        for index, item in enumerate(spec.get(section) or []):
            expression = item.get(key)
            if not expression:
                continue
            try:
                _program(expression)
            except Exception as exc:  # the CEL parser's error text
                problems.append((f"spec.{section}[{index}].{key}", expression, f"compilation failed: {exc}"))
    return problems


@dataclass
class Request:
    """An admission request as the policy sees it."""

    operation: str  # CREATE | UPDATE
    group: str
    version: str
    kind: str
    resource: str
    subresource: str
    namespace: str
    name: str
    namespaced: bool
    obj: dict[str, Any] | None
    old: dict[str, Any] | None
    user: dict[str, Any]
    dry_run: bool = False
    namespace_object: dict[str, Any] | None = None

    def cel_request(self) -> dict[str, Any]:
        gvk = {"group": self.group, "version": self.version, "kind": self.kind}
        gvr = {"group": self.group, "version": self.version, "resource": self.resource}
        return {
            "kind": gvk,
            "resource": gvr,
            "subResource": self.subresource,
            "requestKind": gvk,
            "requestResource": gvr,
            "requestSubResource": self.subresource,
            "name": self.name,
            "namespace": self.namespace,
            "operation": self.operation,
            "userInfo": self.user,
            "dryRun": self.dry_run,
        }


@dataclass
class Denial:
    policy: str
    binding: str
    message: str
    reason: str = "Invalid"


@dataclass
class Outcome:
    denial: Denial | None = None
    warnings: list[str] = field(default_factory=list)


def _rule_matches(rule: dict[str, Any], req: Request, with_operations: bool = True) -> bool:
    def has(values: list[str] | None, value: str) -> bool:
        return bool(values) and ("*" in values or value in values)  # type: ignore[operator]

    if with_operations and not has(rule.get("operations"), req.operation):
        return False
    if not has(rule.get("apiGroups"), req.group) or not has(rule.get("apiVersions"), req.version):
        return False
    resources = rule.get("resources") or []
    if req.subresource:
        wanted = f"{req.resource}/{req.subresource}"
        if not any(r in ("*/*", wanted, f"*/{req.subresource}", f"{req.resource}/*") for r in resources):
            return False
    elif not any(r in ("*", req.resource) or r == "*/*" or r == f"{req.resource}/*" for r in resources):
        return False
    scope = rule.get("scope") or "*"
    if (scope == "Namespaced" and not req.namespaced) or (scope == "Cluster" and req.namespaced):
        return False
    names = rule.get("resourceNames") or []
    return not names or req.name in names


def _labels(obj: dict[str, Any] | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("labels") or {})


def matches(constraints: dict[str, Any] | None, req: Request) -> bool:
    """MatchResources: resource rules, exclusions, namespace and object selectors."""
    if not constraints:
        return True
    rules = constraints.get("resourceRules")
    if rules is not None and not any(_rule_matches(r, req) for r in rules):
        return False
    if any(_rule_matches(r, req) for r in constraints.get("excludeResourceRules") or []):
        return False
    ns_selector = constraints.get("namespaceSelector")
    if _selects(ns_selector):
        if req.namespaced:
            namespace_labels = _labels(req.namespace_object)
        elif req.resource == "namespaces":
            namespace_labels = _labels(req.obj or req.old)
        else:
            namespace_labels = None  # cluster-scoped objects are not filtered by namespace
        if namespace_labels is not None and not label_selector_matches(ns_selector, namespace_labels):
            return False
    obj_selector = constraints.get("objectSelector")
    return not _selects(obj_selector) or (
        label_selector_matches(obj_selector, _labels(req.obj))
        or (req.old is not None and label_selector_matches(obj_selector, _labels(req.old)))
    )


def _selects(selector: dict[str, Any] | None) -> bool:
    """Whether a label selector restricts anything (an empty one matches everything)."""
    return bool(selector and (selector.get("matchLabels") or selector.get("matchExpressions")))


class _EvalError(Exception):
    pass


def _evaluate(expression: str, context: Any) -> Any:
    try:
        return _program(expression).execute(context)
    except Exception as exc:
        raise _EvalError(f"expression '{expression}' resulted in error: {exc}") from exc


class PolicyEvaluator:
    """Evaluates the stored policies and bindings against one request.

    `select(plural, namespace or None)` lists stored admissionregistration objects; `find_params(paramKind,
    namespace, name, selector)` returns the param objects a paramRef names."""

    def __init__(
        self,
        select: Callable[[str], list[dict[str, Any]]],
        find_params: Callable[
            [dict[str, Any], str | None, str | None, dict[str, Any] | None], list[dict[str, Any]]
        ],
        param_namespaced: Callable[[dict[str, Any]], bool | None],
    ) -> None:
        self.select = select
        self.find_params = find_params
        self.param_namespaced = param_namespaced

    def admit(self, req: Request) -> Outcome:
        outcome = Outcome()
        bindings = self.select("validatingadmissionpolicybindings")
        if not bindings:
            return outcome
        policies = {p["metadata"]["name"]: p for p in self.select("validatingadmissionpolicies")}
        for binding in sorted(bindings, key=lambda b: b["metadata"]["name"]):
            bspec = binding.get("spec") or {}
            policy = policies.get(bspec.get("policyName", ""))
            if policy is None:
                continue
            pspec = policy.get("spec") or {}
            if not matches(pspec.get("matchConstraints"), req) or not matches(
                bspec.get("matchResources"), req
            ):
                continue
            actions = bspec.get("validationActions") or []
            policy_name, binding_name = policy["metadata"]["name"], binding["metadata"]["name"]
            for message, reason in self._check(policy, binding, req):
                if "Deny" in actions:
                    outcome.denial = Denial(policy_name, binding_name, message, reason)
                    return outcome
                if "Warn" in actions:
                    outcome.warnings.append(
                        f"Validation failed for ValidatingAdmissionPolicy '{policy_name}' with "
                        f"binding '{binding_name}': {message}"
                    )
        return outcome

    def _params(self, policy: dict[str, Any], binding: dict[str, Any], req: Request) -> list[Any] | str:
        """The params to evaluate with ([None] without paramKind), or a denial message."""
        kind = (policy.get("spec") or {}).get("paramKind")
        if not kind:
            return [None]
        ref = (binding.get("spec") or {}).get("paramRef")
        if not ref:
            return "failed to configure binding: paramRef is required when paramKind is set"
        namespaced = self.param_namespaced(kind)
        if namespaced is None:
            return (
                "failed to configure policy: failed to find resource referenced by paramKind: "
                f"'{kind.get('apiVersion')}, Kind={kind.get('kind')}'"
            )
        namespace: str | None = None
        if namespaced:
            namespace = ref.get("namespace") or (req.namespace if req.namespaced else None)
            if namespace is None:
                return (
                    "cannot use namespaced paramRef in policy binding that matches cluster-scoped resources"
                )
        found = self.find_params(kind, namespace, ref.get("name"), ref.get("selector"))
        if found:
            return list(found)
        if ref.get("parameterNotFoundAction") == "Deny":
            return "no params found for policy binding with `Deny` parameterNotFoundAction"
        return []

    def _check(self, policy: dict[str, Any], binding: dict[str, Any], req: Request) -> list[tuple[str, str]]:
        """(message, reason) of each failure of this binding (empty: admitted)."""
        import cel

        pspec = policy.get("spec") or {}
        failure_policy = pspec.get("failurePolicy") or "Fail"
        params = self._params(policy, binding, req)
        if isinstance(params, str):
            return [(params, "Invalid")]
        failures: list[tuple[str, str]] = []
        for param in params:
            context = cel.Context(functions=dict(kubernetes_functions()))
            context.add_variable("object", req.obj)
            context.add_variable("oldObject", req.old)
            context.add_variable("params", param)
            context.add_variable("request", req.cel_request())
            context.add_variable("namespaceObject", req.namespace_object)
            try:
                if not self._conditions_hold(pspec, context):
                    continue
                variables: dict[str, Any] = {}
                context.add_variable("variables", variables)
                for variable in pspec.get("variables") or []:
                    variables[variable["name"]] = _evaluate(variable["expression"], context)
                    context.add_variable("variables", dict(variables))
                for validation in pspec.get("validations") or []:
                    result = _evaluate(validation["expression"], context)
                    if result is True:
                        continue
                    if result is not False:
                        raise _EvalError(
                            f"expression '{validation['expression']}' did not evaluate to a bool"
                        )
                    failures.append(
                        (self._message(validation, context), validation.get("reason") or "Invalid")
                    )
                    break
            except _EvalError as exc:
                if failure_policy == "Fail":
                    failures.append((str(exc), "Invalid"))
            if failures:
                break
        return failures

    @staticmethod
    def _conditions_hold(pspec: dict[str, Any], context: Any) -> bool:
        for condition in pspec.get("matchConditions") or []:
            result = _evaluate(condition["expression"], context)
            if result is not True:
                return False
        return True

    @staticmethod
    def _message(validation: dict[str, Any], context: Any) -> str:
        expression = validation.get("messageExpression")
        if expression:
            try:
                text = _program(expression).execute(context)
            except Exception:  # kube-apiserver falls back to message
                text = None
            if isinstance(text, str) and text.strip() and "\n" not in text:
                return text
        return validation.get("message") or f"failed expression: {validation['expression']}"
