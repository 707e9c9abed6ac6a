"""ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) as kube-apiserver enforces it: params by name
and by selector, parameterNotFoundAction, messageExpression, reason, matchConditions, variables, namespace and
object selectors, CREATE and UPDATE (oldObject), Deny and Warn. ConfigMaps are both the checked objects and
the params, so the tests need nothing but a cluster (kind, a real one, or the embedded emulator)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .conftest import REPO, Raw, wait_for

ADMISSION = "/apis/admissionregistration.k8s.io/v1"


def policy(name: str, label: str) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["configmaps"],
                    }
                ],
                "objectSelector": {"matchExpressions": [{"key": label, "operator": "Exists"}]},
            },
            "matchConditions": [
                {"name": "not-exempt", "expression": "!('exempt' in object.metadata.labels)"},
            ],
            "variables": [
                {"name": "keys", "expression": "has(object.data) ? size(object.data) : 0"},
                {"name": "limit", "expression": "int(params.data.maxKeys)"},
            ],
            "validations": [
                {
                    "expression": "variables.keys <= variables.limit",
                    "messageExpression": (
                        "'configmap ' + object.metadata.name + ' has ' + string(variables.keys) + "
                        "' keys, the limit is ' + string(variables.limit)"
                    ),
                    "reason": "Forbidden",
                },
                {
                    "expression": (
                        "!has(object.data) || !has(object.data.mode) || object.data.mode in ['fast', 'safe']"
                    ),
                    "message": "data.mode must be fast or safe",
                },
                {
                    "expression": (
                        "oldObject == null || !has(oldObject.data) || !has(oldObject.data.owner) || "
                        "(has(object.data) && has(object.data.owner) && "
                        "object.data.owner == oldObject.data.owner)"
                    ),
                    "message": "data.owner is immutable",
                },
                {"expression": "request.operation != 'CREATE' || object.metadata.name != 'forbidden-name'"},
            ],
        },
    }


def binding(
    name: str, policy_name: str, param_ref: dict[str, Any], team: str, actions: list[str]
) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": policy_name,
            "validationActions": actions,
            "paramRef": param_ref,
            "matchResources": {"namespaceSelector": {"matchLabels": {"conformance.example.com/team": team}}},
        },
    }


def cm(name: str, label: str, data: dict[str, str], **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {label: "yes", **labels}}, "data": data}


@pytest.fixture
def setup(raw: Raw, namespace: str) -> Iterator[dict[str, str]]:
    """A policy + a Deny binding for namespaces labelled team=<id>, its params in `namespace`, and a team
    namespace to test in."""
    tag = uuid.uuid4().hex[:6]
    label = f"conformance.example.com/vap-{tag}"
    names = {
        "label": label,
        "policy": f"conformance-keys-{tag}",
        "binding": f"conformance-keys-{tag}-deny",
        "team": f"team-{tag}",
        "params_ns": namespace,
        "ns": f"conf-vap-{tag}",
    }
    created: list[str] = []
    status, body, _ = raw.request(
        "POST",
        "/api/v1/namespaces",
        {"metadata": {"name": names["ns"], "labels": {"conformance.example.com/team": names["team"]}}},
    )
    assert status == 201, body
    status, body, _ = raw.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"metadata": {"name": "limits"}, "data": {"maxKeys": "2"}},
    )
    assert status == 201, body
    for path, obj in (
        (f"{ADMISSION}/validatingadmissionpolicies", policy(names["policy"], label)),
        (
            f"{ADMISSION}/validatingadmissionpolicybindings",
            binding(
                names["binding"],
                names["policy"],
                {"name": "limits", "namespace": namespace, "parameterNotFoundAction": "Deny"},
                names["team"],
                ["Deny"],
            ),
        ),
    ):
        status, body, _ = raw.request("POST", path, obj)
        assert status == 201, body
        created.append(f"{path}/{obj['metadata']['name']}")
    try:
        yield names
    finally:
        for path in reversed(created):
            raw.request("DELETE", path)
        raw.request("DELETE", f"/api/v1/namespaces/{names['ns']}")


def until_enforced(raw: Raw, namespace: str, label: str) -> None:
    """A real API server picks a new policy (or param) up asynchronously: wait until it denies a probe."""

    def denied() -> bool:
        probe = cm(f"probe-{uuid.uuid4().hex[:6]}", label, {"mode": "reckless"})
        return raw.request("POST", f"/api/v1/namespaces/{namespace}/configmaps", probe)[0] == 422

    wait_for(denied, "the policy to take effect")


def denied_prefix(names: dict[str, str], name: str) -> str:
    return (
        f"configmaps \"{name}\" is forbidden: ValidatingAdmissionPolicy '{names['policy']}' with binding "
        f"'{names['binding']}' denied request: "
    )


def test_policy_with_params_denies_with_message_expression_and_reason(
    raw: Raw, setup: dict[str, str]
) -> None:
    names, label = setup, setup["label"]
    cms = f"/api/v1/namespaces/{names['ns']}/configmaps"
    until_enforced(raw, names["ns"], label)
    status, body, _ = raw.request("POST", cms, cm("big", label, {"a": "1", "b": "2", "c": "3"}))
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == denied_prefix(names, "big") + "configmap big has 3 keys, the limit is 2"
    assert status == body["code"]

    status, body, _ = raw.request("POST", cms, cm("modes", label, {"mode": "reckless"}))
    assert (status, body["reason"]) == (422, "Invalid")  # no reason given: Invalid, 422
    assert body["message"] == denied_prefix(names, "modes") + "data.mode must be fast or safe"

    status, body, _ = raw.request("POST", cms, cm("forbidden-name", label, {}))
    assert status == 422
    assert body["message"] == denied_prefix(names, "forbidden-name") + (
        "failed expression: request.operation != 'CREATE' || object.metadata.name != 'forbidden-name'"
    )

    # Admitted: within the limit; exempt by matchCondition; not selected by the objectSelector.
    assert raw.request("POST", cms, cm("small", label, {"a": "1", "owner": "ann"}))[0] == 201
    assert (
        raw.request("POST", cms, cm("exempt", label, {"a": "1", "b": "2", "c": "3"}, exempt="true"))[0] == 201
    )
    assert (
        raw.request(
            "POST", cms, {"metadata": {"name": "unlabelled"}, "data": {"a": "1", "b": "2", "c": "3"}}
        )[0]
        == 201
    )


def test_policy_checks_updates_against_the_old_object(raw: Raw, setup: dict[str, str]) -> None:
    names, label = setup, setup["label"]
    cms = f"/api/v1/namespaces/{names['ns']}/configmaps"
    until_enforced(raw, names["ns"], label)
    assert raw.request("POST", cms, cm("owned", label, {"owner": "ann"}))[0] == 201
    status, body, _ = raw.request(
        "PATCH", f"{cms}/owned", {"data": {"owner": "bob"}}, content_type="application/merge-patch+json"
    )
    assert status == 422 and body["message"] == denied_prefix(names, "owned") + "data.owner is immutable"
    status, body, _ = raw.request(
        "PATCH", f"{cms}/owned", {"data": {"x": "1", "y": "2"}}, content_type="application/merge-patch+json"
    )
    assert status == 403 and body["message"].endswith("configmap owned has 3 keys, the limit is 2")
    status, body, _ = raw.request(
        "PATCH", f"{cms}/owned", {"data": {"x": "1"}}, content_type="application/merge-patch+json"
    )
    assert status == 200, body


def test_params_follow_their_object_and_parameter_not_found_action(raw: Raw, setup: dict[str, str]) -> None:
    names, label = setup, setup["label"]
    cms = f"/api/v1/namespaces/{names['ns']}/configmaps"
    three = cm("three", label, {"a": "1", "b": "2", "c": "3"})
    until_enforced(raw, names["ns"], label)
    assert raw.request("POST", cms, three)[0] == 403
    limits = f"/api/v1/namespaces/{names['params_ns']}/configmaps/limits"
    status, body, _ = raw.request(
        "PATCH", limits, {"data": {"maxKeys": "5"}}, content_type="application/merge-patch+json"
    )
    assert status == 200, body
    wait_for(lambda: raw.request("POST", cms, three)[0] == 201, "the raised limit")
    assert raw.request("DELETE", limits)[0] == 200
    wait_for(
        lambda: raw.request("POST", cms, cm(f"one-{uuid.uuid4().hex[:4]}", label, {"a": "1"}))[0] == 422,
        "the missing params",
    )
    status, body, _ = raw.request("POST", cms, cm("two", label, {"a": "1"}))
    assert body["message"] == denied_prefix(names, "two") + (
        "no params found for policy binding with `Deny` parameterNotFoundAction"
    )


def test_binding_with_param_selector_and_warn(raw: Raw, setup: dict[str, str]) -> None:
    """A Warn binding selecting its params by label: every selected param is checked, and the client gets a
    Warning instead of a denial."""
    names, label = setup, setup["label"]
    tag = uuid.uuid4().hex[:6]
    team = f"warned-{tag}"
    ns = f"conf-warn-{tag}"
    params_ns = names["params_ns"]
    selector_label = f"conformance.example.com/limits-{tag}"
    for name, limit in (("loose", "9"), ("tight", "1")):
        status, body, _ = raw.request(
            "POST",
            f"/api/v1/namespaces/{params_ns}/configmaps",
            {"metadata": {"name": name, "labels": {selector_label: "yes"}}, "data": {"maxKeys": limit}},
        )
        assert status == 201, body
    bound = binding(
        f"conformance-warn-{tag}",
        names["policy"],
        {
            "namespace": params_ns,
            "selector": {"matchLabels": {selector_label: "yes"}},
            "parameterNotFoundAction": "Allow",
        },
        team,
        ["Warn"],
    )
    path = f"{ADMISSION}/validatingadmissionpolicybindings"
    assert raw.request("POST", path, bound)[0] == 201
    assert (
        raw.request(
            "POST",
            "/api/v1/namespaces",
            {"metadata": {"name": ns, "labels": {"conformance.example.com/team": team}}},
        )[0]
        == 201
    )
    try:
        cms = f"/api/v1/namespaces/{ns}/configmaps"

        def warning_for(name: str) -> str:
            status, body, headers = raw.request("POST", cms, cm(name, label, {"a": "1", "b": "2"}))
            assert status == 201, body  # Warn never denies
            return (
                " ".join(headers.getlist("Warning"))
                if hasattr(headers, "getlist")
                else str(headers.get("Warning", ""))
            )

        text = wait_for(lambda: warning_for(f"w-{uuid.uuid4().hex[:4]}"), "the warning")
        policy_name, binding_name = names["policy"], bound["metadata"]["name"]
        assert (
            f"Validation failed for ValidatingAdmissionPolicy '{policy_name}' with binding '{binding_name}'"
            in text
        )
        assert "has 2 keys, the limit is 1" in text  # the tight param failed; the loose one passed
    finally:
        raw.request("DELETE", f"{path}/{bound['metadata']['name']}")
        raw.request("DELETE", f"/api/v1/namespaces/{ns}")


def test_match_conditions_read_each_param_and_the_namespace_labels(raw: Raw, namespace: str) -> None:
    """The pattern the chart's FineTunePolicy admission uses: one binding selecting every param, each param
    naming the namespaces it applies to, checked by a matchCondition against `namespaceObject`'s labels; the
    Kubernetes string library (split, lowerAscii, substring) in validations and messageExpression."""
    tag = uuid.uuid4().hex[:6]
    team_label, param_label = f"conformance.example.com/tier-{tag}", f"conformance.example.com/rules-{tag}"
    for name, tier, suffix in (("gold", "gold", ".gold.example"), ("silver", "silver", ".silver.example")):
        status, body, _ = raw.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/configmaps",
            {
                "metadata": {"name": name, "labels": {param_label: "yes"}},
                "data": {"tier": tier, "host": suffix},
            },
        )
        assert status == 201, body
    host = "object.data.url.split('/')[2].split(':')[0].lowerAscii()"
    checked = f"!has(object.data) || !has(object.data.url) || {host}.endsWith(params.data.host)"
    policy_name, binding_name = f"conformance-hosts-{tag}", f"conformance-hosts-{tag}"
    vap = {
        "metadata": {"name": policy_name},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["configmaps"],
                    }
                ],
                "objectSelector": {"matchLabels": {f"conformance.example.com/checked-{tag}": "yes"}},
            },
            "matchConditions": [
                {
                    "name": "param-selects-namespace",
                    "expression": f"has(namespaceObject.metadata.labels) && '{team_label}' in "
                    f"namespaceObject.metadata.labels && namespaceObject.metadata.labels['{team_label}'] == "
                    "params.data.tier",
                }
            ],
            "validations": [
                {
                    "expression": checked,
                    "messageExpression": f"'denied by ' + params.metadata.name + ': host ' + {host} + "
                    "' is not under ' + params.data.host.substring(1)",
                    "reason": "Forbidden",
                }
            ],
        },
    }
    bound = {
        "metadata": {"name": binding_name},
        "spec": {
            "policyName": policy_name,
            "validationActions": ["Deny"],
            "paramRef": {
                "namespace": namespace,
                "selector": {"matchLabels": {param_label: "yes"}},
                "parameterNotFoundAction": "Allow",
            },
        },
    }
    created = []
    try:
        for path, obj in (
            (f"{ADMISSION}/validatingadmissionpolicies", vap),
            (f"{ADMISSION}/validatingadmissionpolicybindings", bound),
        ):
            status, body, _ = raw.request("POST", path, obj)
            assert status == 201, body
            created.append(f"{path}/{obj['metadata']['name']}")
        namespaces = {tier: f"conf-{tier}-{tag}" for tier in ("gold", "silver", "none")}
        for tier, ns in namespaces.items():
            labels = {team_label: tier} if tier != "none" else {}
            assert (
                raw.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns, "labels": labels}})[0]
                == 201
            )
            created.append(f"/api/v1/namespaces/{ns}")

        def post(ns: str, url: str) -> tuple[int, Any]:
            obj = {
                "metadata": {
                    "name": f"c-{uuid.uuid4().hex[:6]}",
                    "labels": {f"conformance.example.com/checked-{tag}": "yes"},
                },
                "data": {"url": url},
            }
            status, body, _ = raw.request("POST", f"/api/v1/namespaces/{ns}/configmaps", obj)
            return status, body

        gold = namespaces["gold"]
        wait_for(lambda: post(gold, "https://x.silver.example/v1")[0] == 403, "the policy to take effect")
        status, body = post(gold, "https://API.Other.example:8443/v1")
        assert status == 403
        assert body["message"].endswith(
            "denied request: denied by gold: host api.other.example is not under gold.example"
        )
        assert post(gold, "https://api.gold.example/v1")[0] == 201
        status, body = post(namespaces["silver"], "https://api.gold.example/v1")
        assert status == 403 and "denied by silver:" in body["message"]  # only the silver param applies
        assert post(namespaces["none"], "https://anything.example/v1")[0] == 201  # no param selects it
    finally:
        for path in reversed(created):
            raw.request("DELETE", path)


def test_kubectl_applies_policies_and_reports_denials(
    kubectl: Any, raw: Raw, setup: dict[str, str], tmp_path: Any
) -> None:
    names = setup
    until_enforced(raw, names["ns"], names["label"])
    listed = kubectl("get", "validatingadmissionpolicies", "-o", "name").stdout.split()
    assert f"validatingadmissionpolicy.admissionregistration.k8s.io/{names['policy']}" in listed
    # `kubectl apply` of a policy (discovery, OpenAPI, server-side field validation) re-applies it unchanged.
    current = json.loads(kubectl("get", "validatingadmissionpolicy", names["policy"], "-o", "json").stdout)
    manifest = {k: current[k] for k in ("apiVersion", "kind", "spec")}
    manifest["metadata"] = {"name": names["policy"]}
    out = kubectl("apply", "-f", "-", input=json.dumps(manifest)).stdout
    assert names["policy"] in out
    big = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        **cm("kubectl-big", names["label"], {"a": "1", "b": "2", "c": "3"}),
    }
    result = wait_for(
        lambda: (
            (
                r := kubectl("apply", "-n", names["ns"], "-f", "-", input=json.dumps(big), check=False)
            ).returncode
            and r
        ),
        "the denial",
    )
    assert (
        denied_prefix(names, "kubectl-big") + "configmap kubectl-big has 3 keys, the limit is 2"
        in result.stderr
    )


@pytest.mark.emulator
def test_emulator_refuses_a_policy_that_does_not_compile(raw: Raw) -> None:
    bad = policy(f"conformance-bad-{uuid.uuid4().hex[:6]}", "x")
    bad["spec"]["validations"] = [{"expression": "object.spec.("}]
    status, body, _ = raw.request("POST", f"{ADMISSION}/validatingadmissionpolicies", bad)
    assert status == 422 and body["reason"] == "Invalid"
    assert "spec.validations[0].expression" in body["message"] and "compilation failed" in body["message"]


FINETUNE = "/apis/finetune.dev/v1alpha1"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
PLURALS = {
    "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
    "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
}


@pytest.fixture
def finetune_crds(raw: Raw) -> Iterator[None]:
    """The project's CRDs (crds/): created when the cluster lacks them, and then removed again."""
    created = []
    for plural in ("finetunepolicies", "modelservers", "finetunejobs"):
        crd = yaml.safe_load((REPO / "crds" / f"finetune.dev_{plural}.yaml").read_text())
        status, body, _ = raw.request("POST", CRDS, crd)
        assert status in (201, 409), body
        if status == 201:
            created.append(f"{CRDS}/{crd['metadata']['name']}")
    wait_for(
        lambda: (
            {"finetunepolicies", "modelservers", "finetunejobs"}
            <= {r["name"] for r in (raw.request("GET", FINETUNE)[1] or {}).get("resources", [])}
        ),
        "the CRDs to be served",
    )
    yield
    for path in created:
        raw.request("DELETE", path)


def test_the_charts_finetunepolicy_admission_refuses_serving_it_does_not_allow(
    raw: Raw, finetune_crds: None
) -> None:
    """Issue 20 defect 6: the generated ValidatingAdmissionPolicies (policy_admission.py, the chart's
    templates/policy-admission.yaml) refuse a ModelServer with a disallowed base model, GPU type or more
    than maxServingGpus, and a FineTuneJob whose own Deployment asks for the same, naming the policy and the
    field exactly as the operator does. Server-side dry runs: nothing is stored, no operator is needed."""
    from finetune_operator.finetunepolicy import admission as policy_admission

    tag = uuid.uuid4().hex[:6]
    label, policy_name = f"conformance.example.com/ftp-{tag}", f"conformance-serving-{tag}"
    namespace = f"conf-ftp-{tag}"
    ftp = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTunePolicy",
        "metadata": {"name": policy_name},
        "spec": {
            "namespaceSelector": {"matchLabels": {label: "yes"}},
            "allowedBaseModels": ["s3://approved/*"],
            "allowedGpuTypes": ["a100-80gb", "cpu"],
            "maxServingGpus": 16,
        },
    }
    created = []
    try:
        for document in policy_admission.manifests(f"conformance-ftp-{tag}"):
            path = f"{ADMISSION}/{PLURALS[document['kind']]}"
            status, body, _ = raw.request("POST", path, document)
            assert status == 201, json.dumps(body)
            created.append(f"{path}/{document['metadata']['name']}")
        status, body, _ = raw.request("POST", f"{FINETUNE}/finetunepolicies", ftp)
        assert status == 201, json.dumps(body)
        created.append(f"{FINETUNE}/finetunepolicies/{policy_name}")
        status, body, _ = raw.request(
            "POST", "/api/v1/namespaces", {"metadata": {"name": namespace, "labels": {label: "yes"}}}
        )
        assert status == 201, json.dumps(body)
        created.append(f"/api/v1/namespaces/{namespace}")

        def post(plural: str, kind: str, spec: dict[str, Any]) -> tuple[int, Any]:
            obj = {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": kind,
                "metadata": {"name": f"x-{uuid.uuid4().hex[:6]}"},
                "spec": spec,
            }
            path = f"{FINETUNE}/namespaces/{namespace}/{plural}?dryRun=All"
            status, body, _ = raw.request("POST", path, obj)
            return status, body

        def server(**spec: Any) -> tuple[int, Any]:
            base = {"baseModel": {"uri": "s3://approved/base"}, "adapterSources": ["s3://runs"]}
            return post("modelservers", "ModelServer", {**base, **spec})

        def job(**deployment: Any) -> tuple[int, Any]:
            spec = {
                "baseModel": {"uri": "s3://approved/base"},
                "dataset": {"train": "s3://data/toy/train.jsonl"},
                "resources": {"gpus": 1, "gpuType": "a100-80gb"},
                "storage": {"output": "s3://runs/policy", "credentialsSecret": "s3"},
                "deployment": deployment,
            }
            return post("finetunejobs", "FineTuneJob", spec)

        last: list[Any] = []

        def enforced() -> bool:
            last[:] = server(baseModel={"uri": "hf://x/y"})
            return bool(last[0] == 403)

        try:
            wait_for(enforced, "the policy to take effect")
        except AssertionError as error:
            raise AssertionError(f"{error}; last answer: {last}") from None
        denied = f"denied request: denied by FineTunePolicy {policy_name}: "
        for found, message in (
            (
                server(baseModel={"uri": "hf://x/y"}),
                "spec.baseModel.uri hf://x/y is not in allowedBaseModels",
            ),
            (server(gpuType="h100-80gb", gpus=8), "spec.gpuType h100-80gb is not in allowedGpuTypes"),
            (
                server(replicas=64, gpus=8),
                "spec.replicas 64 x spec.gpus 8 = 512 GPUs is more than maxServingGpus 16",
            ),
            (
                job(replicas=16, gpus=8, gpuType="h100-80gb"),
                "spec.deployment.gpuType h100-80gb is not in allowedGpuTypes",
            ),
            (
                job(replicas=16, gpus=8),
                "spec.deployment.replicas 16 x spec.deployment.gpus 8 = 128 GPUs is more than "
                "maxServingGpus 16",
            ),
        ):
            status, body = found
            assert status == 403, body
            assert body["reason"] == "Forbidden"
            assert f"ValidatingAdmissionPolicy 'conformance-ftp-{tag}" in body["message"]
            assert body["message"].endswith(denied + message), body["message"]
        for status, body in (
            server(replicas=2, gpus=8),
            server(replicas=64, gpuType="cpu"),  # the CPU type holds no GPU (gpus unset, as users write it)
            job(replicas=2, gpus=8),
            job(enabled=False, replicas=16, gpus=8),
        ):
            assert status == 201, json.dumps(body)
    finally:
        for path in reversed(created):
            raw.request("DELETE", path)
