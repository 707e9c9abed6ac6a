"""Our CRDs and our chart's admission policy stay far inside kube-apiserver's CEL cost budgets.

kube-apiserver refuses a CRD whose rules' estimated cost is over budget (10,000,000 per rule, 100,000,000 per
schema); `localcluster.celcost` estimates as it does (tests/emulator/test_crdvalidation.py checks it against
kube's own table). Margin asserted: every rule and every schema total under 10% of its limit, so a change
that makes a field unbounded (a rule over a string without maxLength, a list without maxItems) fails here
long before a real cluster would refuse the chart. `pytest -s` prints the table.

ValidatingAdmissionPolicy cost is only limited at runtime (1,000,000 per expression, 10,000,000 per
evaluation, 2,500,000 for matchConditions); the static estimate with `object` and `params` typed from our
CRDs is an upper bound of that runtime cost, asserted under 10% of each limit for the matchConditions and
validations. The estimator gives no bound for `split(...)[i]` and `string(n)` (cel-go has no size for them),
and `metadata.name` is an unbounded string to it, so the `referenceHost` variable and the messageExpressions
are printed, not asserted: at runtime they cost about the size of the strings they read (a few hundred).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from localcluster.celcost import (
    DYN,
    PER_CALL_LIMIT,
    RUNTIME_CEL_COST_BUDGET,
    RUNTIME_CEL_COST_BUDGET_MATCH_CONDITIONS,
    STATIC_ESTIMATED_COST_LIMIT,
    STATIC_ESTIMATED_CRD_COST_LIMIT,
    U64,
    Decl,
    crd_rule_costs,
    estimate,
    roots_resolver,
    schema_decl,
)

REPO = Path(__file__).resolve().parents[2]
CRDS = sorted((REPO / "crds").glob("*.yaml"))
MARGIN = 0.10
NAMESPACE_SCHEMA = {  # what the policy reads of a Namespace (labels: no maxProperties in kube's OpenAPI)
    "type": "object",
    "properties": {"metadata": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    }}},
}


def _schema(path: Path) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    [version] = crd["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


def _share(cost: int, limit: int) -> str:
    return "unbounded" if cost >= U64 // 10 else f"{cost:,} ({cost / limit:.2%})"


@pytest.mark.parametrize("path", CRDS, ids=[p.name for p in CRDS])
def test_our_crd_rules_use_under_a_tenth_of_kubes_budgets(path: Path) -> None:
    costs = crd_rule_costs(_schema(path))
    total = sum(rule.cost for rule in costs)
    print(f"\n{path.name}: total {_share(total, STATIC_ESTIMATED_CRD_COST_LIMIT)} "
          f"of {STATIC_ESTIMATED_CRD_COST_LIMIT:,}")
    for rule in costs:
        where = rule.path.removeprefix("openAPIV3Schema.")
        share = _share(rule.cost, STATIC_ESTIMATED_COST_LIMIT)
        print(f"  {share:>22} = {rule.raw:,} x {rule.cardinality}  {where}")
    over = [r.path for r in costs if r.cost > MARGIN * STATIC_ESTIMATED_COST_LIMIT]
    assert not over, f"rules above {MARGIN:.0%} of the per-rule budget: {over}"
    assert total <= MARGIN * STATIC_ESTIMATED_CRD_COST_LIMIT


def _policy_roots() -> dict[str, Decl]:
    job = schema_decl(_schema(REPO / "crds/finetune.dev_finetunejobs.yaml"), resource_root=True)
    policy = schema_decl(_schema(REPO / "crds/finetune.dev_finetunepolicies.yaml"), resource_root=True)
    namespace = schema_decl(NAMESPACE_SCHEMA)
    assert job and policy and namespace
    return {"object": job, "oldObject": job, "params": policy, "namespaceObject": namespace, "request": DYN}


def test_our_admission_policy_expressions_use_under_a_tenth_of_the_runtime_limits() -> None:
    from finetune_operator.finetunepolicy.admission import policy_spec

    spec = policy_spec()
    roots = _policy_roots()
    resolve = roots_resolver(roots)
    variables = Decl("object")
    for variable in spec.get("variables") or []:
        cost, size = estimate(variable["expression"], resolve, roots)
        variables.fields[variable["name"]] = Decl("string", max_elements=size.hi if size else U64)
        print(f"\nvariable {variable['name']}: {_share(cost.hi, PER_CALL_LIMIT)} (not asserted)")
    roots["variables"] = variables
    for condition in spec.get("matchConditions") or []:
        cost = estimate(condition["expression"], resolve, roots)[0].hi
        print(f"matchCondition {condition['name']}: {_share(cost, RUNTIME_CEL_COST_BUDGET_MATCH_CONDITIONS)}")
        assert cost <= MARGIN * RUNTIME_CEL_COST_BUDGET_MATCH_CONDITIONS
    total = 0
    for i, validation in enumerate(spec["validations"]):
        cost = estimate(validation["expression"], resolve, roots)[0].hi
        message = estimate(validation.get("messageExpression", "''"), resolve, roots)[0].hi
        total += cost
        print(f"validations[{i}]: {_share(cost, PER_CALL_LIMIT)}; "
              f"messageExpression (not asserted) {_share(message, PER_CALL_LIMIT)}")
        assert cost <= MARGIN * PER_CALL_LIMIT
    print(f"validations total: {_share(total, RUNTIME_CEL_COST_BUDGET)}")
    assert total <= MARGIN * RUNTIME_CEL_COST_BUDGET
