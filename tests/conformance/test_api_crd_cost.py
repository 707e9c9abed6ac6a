"""CEL cost of CRD validation rules, as kube-apiserver estimates it: a CRD whose rule could cost more than
the per-rule budget is refused with 422 and kube's message; bounding the fields makes it acceptable."""

from __future__ import annotations

import copy
from typing import Any

from .conftest import Raw, wait_for

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
NAME = "hostlists.cost.conformance.example.com"

# 20 hosts x matches() over a string without maxLength (3 MiB to the estimator):
# 20 x (3 + ceil(3,145,727 x 0.1) x ceil(14 x 0.25) + 1) + 2 = 25,165,922, 2.5 times the 10,000,000 budget
HOSTLIST_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": NAME},
    "spec": {
        "group": "cost.conformance.example.com",
        "scope": "Namespaced",
        "names": {"plural": "hostlists", "singular": "hostlist", "kind": "HostList"},
        "versions": [{
            "name": "v1",
            "served": True,
            "storage": True,
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {"type": "object", "properties": {"hosts": {
                    "type": "array",
                    "maxItems": 20,
                    "items": {"type": "string"},
                    "x-kubernetes-validations": [{
                        "rule": "self.all(h, h.matches('^[a-z0-9.-]+$'))",
                        "message": "hosts must be DNS names",
                    }],
                }}}},
            }},
        }],
    },
}
RULE = "spec.validation.openAPIV3Schema.properties[spec].properties[hosts].x-kubernetes-validations[0].rule"


def test_crd_over_the_cel_cost_budget_is_refused_and_a_bounded_one_accepted(raw: Raw) -> None:
    status, body, _ = raw.request("POST", CRDS, HOSTLIST_CRD)
    if status == 201:  # a server that does not estimate cost: clean up before failing
        raw.request("DELETE", f"{CRDS}/{NAME}")
    assert (status, body["reason"]) == (422, "Invalid"), body
    detail = (
        "estimated rule cost exceeds budget by factor of 2.5x (try simplifying the rule, or adding maxItems, "
        "maxProperties, and maxLength where arrays, maps, and strings are declared)"
    )
    assert body["message"] == (
        f'CustomResourceDefinition.apiextensions.k8s.io "{NAME}" is invalid: {RULE}: Forbidden: {detail}'
    )
    assert body["details"]["causes"] == [
        {"reason": "FieldValueForbidden", "message": f"Forbidden: {detail}", "field": RULE}
    ]
    assert raw.request("GET", f"{CRDS}/{NAME}")[0] == 404

    bounded = copy.deepcopy(HOSTLIST_CRD)
    schema = bounded["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"]["properties"]["hosts"]["items"]["maxLength"] = 253
    status, body, _ = raw.request("POST", CRDS, bounded)
    try:
        assert status == 201, body
    finally:
        raw.request("DELETE", f"{CRDS}/{NAME}")
    wait_for(lambda: raw.request("GET", f"{CRDS}/{NAME}")[0] == 404, "CRD deleted", timeout=30)
