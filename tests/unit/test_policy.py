"""FineTunePolicy: the static rules (and that the chart's admission policy words and decides them the same),
namespace selection, the month's GPU-hours and concurrency, what the planner does with them, defaults in
status, the policies' status and the budget metrics."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api import crdgen
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.api.finetunepolicy import FineTunePolicy, parse_policy, uri_allowed
from finetune_operator.finetunejob.controller import reconcile
from finetune_operator.finetunepolicy import (
    admission as policy_admission,
)
from finetune_operator.finetunepolicy import (
    enforcement as policy,
)
from finetune_operator.finetunepolicy import (
    ledger as policy_ledger,
)
from finetune_operator.finetunepolicy.enforcement import PolicyView, Usage
from finetune_operator.k8s import observe
from localcluster.apiserver.policy import PolicyEvaluator, Request

from .ftj_factory import job, spec
from .test_reconcile import new_job, setup
from .test_state import NOW, VALID, World

ROOT = Path(__file__).resolve().parents[2]


def make_policy(name: str = "team-defaults", **spec: Any) -> FineTunePolicy:
    return parse_policy({"metadata": {"name": name}, "spec": spec})


def view(*policies: FineTunePolicy, used: float = 0.0, active: int = 0) -> PolicyView:
    return PolicyView(tuple(policies), Usage(used, active))


# --- static rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "patterns", "allowed"),
    [
        ("s3://approved/llama", ["s3://approved/*"], True),
        ("s3://approved-evil/llama", ["s3://approved/*"], False),  # the prefix includes the slash
        ("hf://meta-llama/Llama-3", ["hf://meta-llama/*"], True),
        ("hf://x/y", ["s3://approved/*", "hf://x/y"], True),  # exact
        ("hf://x/yz", ["hf://x/y"], False),
        ("s3://a/b", [], False),
    ],
)
def test_uri_globs_are_exact_or_a_prefix_before_a_trailing_star(
    uri: str, patterns: list[str], allowed: bool
) -> None:
    assert uri_allowed(uri, patterns) is allowed


def test_a_pattern_with_a_star_inside_is_refused() -> None:
    with pytest.raises(ValueError, match="allowedBaseModels"):
        make_policy(allowedBaseModels=["s3://*/models"])


RUBRIC = "Is the answer relevant?"
POOL_JUDGE = {
    "name": "tone",
    "type": "judge",
    "judge": {"modelServer": "llm", "model": "m", "rubric": RUBRIC},
}
EXTERNAL_JUDGE = {
    "name": "relevance",
    "type": "judge",
    "judge": {"url": "https://API.example.com/v1", "model": "m", "rubric": RUBRIC},
}
SAFETY = {"prompts": "s3://data/redteam.jsonl", "judge": {"modelServer": "llm", "model": "m"}}
RULES: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    (
        {"allowedBaseModels": ["s3://approved/*"]},
        {"baseModel": {"uri": "hf://x/y"}},
        "spec.baseModel.uri hf://x/y is not in allowedBaseModels",
    ),
    (
        {"allowedDatasets": ["s3://data/toy/*"]},
        {"dataset": {"train": "s3://data/toy/train.jsonl", "test": "s3://other/test.jsonl"}},
        "spec.dataset.test s3://other/test.jsonl is not in allowedDatasets",
    ),
    (
        {"allowedOutputs": ["s3://runs/team-a/*"]},
        {},
        "spec.storage.output s3://runs/out is not in allowedOutputs",
    ),
    (
        {"allowedGpuTypes": ["h100-80gb"]},
        {"resources": {"gpuType": "a100-40gb"}},
        "spec.resources.gpuType a100-40gb is not in allowedGpuTypes",
    ),
    (
        {"maxGpusPerJob": 2},
        {"resources": {"gpus": 4}},
        "spec.resources.gpus 4 is more than maxGpusPerJob 2",
    ),
    (
        {"maxGpusPerJob": 4},
        {"resources": {"gpus": 2, "nodes": 4}},
        "spec.resources.gpus 2 x spec.resources.nodes 4 = 8 GPUs is more than maxGpusPerJob 4",
    ),
    ({"allowedMethods": ["lora", "qlora"]}, {"method": "full"}, "spec.method full is not in allowedMethods"),
    ({"maxLoraRank": 16}, {"lora": {"rank": 64}}, "spec.lora.rank 64 is more than maxLoraRank 16"),
    # issue 23
    (
        {"allowedObjectives": ["sft", "dpo"]},
        {"objective": "kto"},
        "spec.objective kto is not in allowedObjectives",
    ),
    ({"allowedObjectives": ["dpo"]}, {}, "spec.objective sft is not in allowedObjectives"),
    (
        {"allowReference": False},
        {"evaluation": {"reference": {"url": "https://api.example.com/v1", "model": "gpt"}}},
        "spec.evaluation.reference is not allowed (allowReference is false)",
    ),
    (
        {"allowedReferenceHosts": ["*.internal.example.com"]},
        {"evaluation": {"reference": {"url": "https://API.example.com:8443/v1", "model": "gpt"}}},
        "spec.evaluation.reference.url host api.example.com is not in allowedReferenceHosts",
    ),
    (
        {"requireThresholds": True},
        {},
        "spec.evaluation.thresholds must gate on at least one metric (requireThresholds)",
    ),
    # issue 22: a judge receives the held-out data like the reference does; the safety and retention sets
    # are data like the training set
    (
        {"allowReference": False},
        {"evaluation": {"graders": [POOL_JUDGE, EXTERNAL_JUDGE]}},
        "spec.evaluation.graders[1].judge.url is not allowed (allowReference is false)",
    ),
    (
        {"allowedReferenceHosts": ["*.internal.example.com"]},
        {"evaluation": {"graders": [POOL_JUDGE, EXTERNAL_JUDGE]}},
        "spec.evaluation.graders[1].judge.url host api.example.com is not in allowedReferenceHosts",
    ),
    (  # the last of the 8 graders a job may have
        {"allowedReferenceHosts": ["*.internal.example.com"]},
        {"evaluation": {"graders": [*({**POOL_JUDGE, "name": f"g{i}"} for i in range(7)), EXTERNAL_JUDGE]}},
        "spec.evaluation.graders[7].judge.url host api.example.com is not in allowedReferenceHosts",
    ),
    (
        {"allowReference": False},
        {
            "evaluation": {
                "safety": {**SAFETY, "judge": {"url": "https://guard.example.com/v1", "model": "g"}}
            }
        },
        "spec.evaluation.safety.judge.url is not allowed (allowReference is false)",
    ),
    (
        {"allowedReferenceHosts": ["api.example.com"]},
        {
            "evaluation": {
                "safety": {**SAFETY, "judge": {"url": "https://Guard.example.com:8443/v1", "model": "g"}}
            }
        },
        "spec.evaluation.safety.judge.url host guard.example.com is not in allowedReferenceHosts",
    ),
    (
        {"allowedDatasets": ["s3://data/toy/*"]},
        {"evaluation": {"safety": SAFETY}},
        "spec.evaluation.safety.prompts s3://data/redteam.jsonl is not in allowedDatasets",
    ),
    (
        {"allowedDatasets": ["s3://data/toy/*"]},
        {"evaluation": {"retention": {"dataset": "s3://other/general.jsonl"}}},
        "spec.evaluation.retention.dataset s3://other/general.jsonl is not in allowedDatasets",
    ),
    # issue 20 defect 6: the job's own serving Deployment
    (
        {"allowedGpuTypes": ["a100-80gb"]},
        {"deployment": {"replicas": 16, "gpus": 8, "gpuType": "h100-80gb"}},
        "spec.deployment.gpuType h100-80gb is not in allowedGpuTypes",
    ),
    (
        {"maxServingGpus": 8},
        {"deployment": {"replicas": 16, "gpus": 8, "gpuType": "h100-80gb"}},
        "spec.deployment.replicas 16 x spec.deployment.gpus 8 = 128 GPUs is more than maxServingGpus 8",
    ),
    (  # a CPU-trained job served with a GPU of the API's default type
        {"allowedGpuTypes": ["h100-80gb"]},
        {"resources": {"gpus": 0}, "deployment": {"gpus": 1}},
        "spec.resources.gpuType a100-80gb is not in allowedGpuTypes",
    ),
]
ALLOWED: list[tuple[dict[str, Any], dict[str, Any]]] = [
    # a judge on a ModelServer in the namespace sends nothing out
    (
        {"allowReference": False, "allowedReferenceHosts": []},
        {"evaluation": {"graders": [POOL_JUDGE], "safety": SAFETY}},
    ),
    (
        {"allowedReferenceHosts": ["*.example.com"], "allowedDatasets": ["s3://data/*"]},
        {
            "evaluation": {
                "graders": [EXTERNAL_JUDGE],
                "safety": SAFETY,
                "retention": {"dataset": "s3://data/g.jsonl"},
            }
        },
    ),
    ({"allowedBaseModels": ["s3://models/*"]}, {}),
    ({"allowedDatasets": ["s3://data/*"]}, {"dataset": {"test": "s3://data/t.jsonl"}}),
    ({"allowedGpuTypes": ["h100-80gb"]}, {"resources": {"gpus": 0, "gpuType": "cpu"}}),  # CPU runs
    ({"allowedGpuTypes": ["h100-80gb"], "defaults": {"gpuType": "h100-80gb"}}, {}),  # API default replaced
    ({"maxGpusPerJob": 2}, {"resources": {"gpus": 2}}),
    ({"maxGpusPerJob": 4}, {"resources": {"gpus": 2, "nodes": 2}}),
    ({"maxLoraRank": 16}, {"method": "full", "lora": {"rank": 64}}),
    ({"allowedObjectives": ["sft", "kto"]}, {"objective": "kto"}),
    ({"allowedObjectives": ["sft"]}, {}),
    (
        {"allowedReferenceHosts": ["*.example.com"]},
        {"evaluation": {"reference": {"url": "https://api.example.com/v1", "model": "gpt"}}},
    ),
    (
        {"requireThresholds": True},
        {"evaluation": {"metrics": ["loss"], "thresholds": [{"metric": "loss", "max": 2.0}]}},
    ),
    ({}, {"method": "full", "resources": {"gpus": 16}}),  # an empty policy allows anything
    ({"maxServingGpus": 16}, {"deployment": {"replicas": 2, "gpus": 8}}),
    ({"maxServingGpus": 0}, {"deployment": {"enabled": False}}),
    ({"maxServingGpus": 0, "allowedGpuTypes": ["h100-80gb"]}, {"resources": {"gpus": 0, "gpuType": "cpu"}}),
    ({"maxServingGpus": 0}, {"deployment": {"gpus": 0}}),
    ({"maxServingGpus": 0, "allowedGpuTypes": ["h100-80gb"]}, {"resources": {"gpus": 0}}),  # served on CPU
]


@pytest.mark.parametrize(("rules", "overrides", "message"), RULES)
def test_each_static_rule_names_the_policy_and_the_field(
    rules: dict[str, Any], overrides: dict[str, Any], message: str
) -> None:
    found = policy.violation(job(**overrides).spec, view(make_policy("team-defaults", **rules)))
    assert found == f"denied by FineTunePolicy team-defaults: {message}"


@pytest.mark.parametrize(("rules", "overrides"), ALLOWED)
def test_allowed_jobs_pass(rules: dict[str, Any], overrides: dict[str, Any]) -> None:
    assert policy.violation(job(**overrides).spec, view(make_policy(**rules))) is None


def test_every_applicable_policy_must_allow() -> None:
    lenient, strict = make_policy("a-lenient"), make_policy("b-strict", maxGpusPerJob=0)
    found = policy.violation(job().spec, view(lenient, strict))
    assert found is not None and found.startswith("denied by FineTunePolicy b-strict:")


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ({}, {}, True),
        ({"matchLabels": {"tier": "team"}}, {"tier": "team", "x": "y"}, True),
        ({"matchLabels": {"tier": "team"}}, {}, False),
        ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["dev"]}]}, {"env": "dev"}, True),
        ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["dev"]}]}, {"env": "prod"}, False),
        ({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}, {}, True),
        ({"matchExpressions": [{"key": "env", "operator": "Exists"}]}, {"env": ""}, True),
        ({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}, {"env": "x"}, False),
    ],
)
def test_namespace_selector(selector: dict[str, Any], labels: dict[str, str], selected: bool) -> None:
    found = policy.applicable([make_policy(namespaceSelector=selector)], labels)
    assert bool(found) is selected


# --- the chart's ValidatingAdmissionPolicy decides and words the same ---------------------------------------


def _admission(
    policies: list[dict[str, Any]],
    job_spec: dict[str, Any],
    labels: dict[str, str],
    kind: str = "FineTuneJob",
    old_spec: dict[str, Any] | None = None,
) -> str | None:
    """The denial message of the generated admission policies, evaluated by the embedded cluster's engine."""
    documents = policy_admission.manifests()
    plural = {"FineTuneJob": "finetunejobs", "ModelServer": "modelservers"}[kind]
    evaluator = PolicyEvaluator(
        select=lambda wanted: [
            d
            for d in documents
            if d["kind"]
            == (
                "ValidatingAdmissionPolicy"
                if wanted == "validatingadmissionpolicies"
                else "ValidatingAdmissionPolicyBinding"
            )
        ],
        find_params=lambda kind, namespace, name, selector: policies,
        param_namespaced=lambda kind: False,
    )
    obj = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": job_spec,
    }
    old = None if old_spec is None else {**obj, "spec": old_spec}
    request = Request(
        operation="CREATE" if old is None else "UPDATE",
        group="finetune.dev",
        version="v1alpha1",
        kind=kind,
        resource=plural,
        subresource="",
        namespace="team-a",
        name="demo",
        namespaced=True,
        obj=obj,
        old=old,
        user={"username": "alice"},
        namespace_object={"metadata": {"name": "team-a", "labels": labels}},
    )
    outcome = evaluator.admit(request)
    return outcome.denial.message if outcome.denial else None


def _stored(name: str, rules: dict[str, Any]) -> dict[str, Any]:
    """A FineTunePolicy as the API server stores it (schema defaults applied)."""
    parsed = make_policy(name, **rules)
    return {
        "metadata": {"name": name},
        "spec": parsed.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


@pytest.mark.parametrize(("rules", "overrides", "message"), RULES)
def test_admission_policy_denies_with_the_operators_message(
    rules: dict[str, Any], overrides: dict[str, Any], message: str
) -> None:
    denial = _admission([_stored("team-defaults", rules)], spec(**overrides), {})
    assert denial == f"denied by FineTunePolicy team-defaults: {message}"


@pytest.mark.parametrize(("rules", "overrides"), ALLOWED)
def test_admission_policy_admits_what_the_operator_allows(
    rules: dict[str, Any], overrides: dict[str, Any]
) -> None:
    assert _admission([_stored("team-defaults", rules)], spec(**overrides), {}) is None


def test_a_policy_tightened_after_admission_does_not_refuse_cancelling_the_job() -> None:
    """spec.cancel (issue 25) stops a job for good, so a policy that now refuses it still lets it be cancelled
    (by kubectl or the OpenAI-compatible API); other updates, or creating it cancelled, are refused."""
    policies = [_stored("team-defaults", {"allowedBaseModels": ["s3://approved/*"]})]
    stored = spec(baseModel={"uri": "hf://x/y"})
    assert _admission(policies, {**stored, "cancel": True}, {}, old_spec=stored) is None
    cancelled = {**stored, "cancel": True}
    assert _admission(policies, {**cancelled, "suspend": True}, {}, old_spec=cancelled) is None
    denied = "denied by FineTunePolicy team-defaults: spec.baseModel.uri hf://x/y is not in allowedBaseModels"
    assert _admission(policies, {**stored, "suspend": True}, {}, old_spec=stored) == denied
    assert _admission(policies, {**stored, "cancel": True}, {}) == denied


@pytest.mark.parametrize(("allowed", "denied"), [(["sft"], False), (["dpo", "grpo"], True)])
def test_admission_reads_a_job_stored_before_objectives_as_sft(allowed: list[str], denied: bool) -> None:
    stored = {k: v for k, v in spec().items() if k != "objective"}
    denial = _admission([_stored("team-defaults", {"allowedObjectives": allowed})], stored, {})
    assert denial == (
        "denied by FineTunePolicy team-defaults: spec.objective sft is not in allowedObjectives"
        if denied
        else None
    )


@pytest.mark.parametrize(
    ("selector", "labels", "denied"),
    [
        ({"matchLabels": {"tier": "team"}}, {"tier": "team"}, True),
        ({"matchLabels": {"tier": "team"}}, {}, False),
        ({"matchLabels": {"tier": "team"}}, {"tier": "other"}, False),
        (
            {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "team"]}]},
            {"tier": "team"},
            True,
        ),
        (
            {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["team"]}]},
            {"tier": "team"},
            False,
        ),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["team"]}]}, {}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {"tier": "x"}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, {"tier": "x"}, False),
    ],
)
def test_admission_policy_honours_each_policys_namespace_selector(
    selector: dict[str, Any], labels: dict[str, str], denied: bool
) -> None:
    stored = _stored("team-defaults", {"namespaceSelector": selector, "maxGpusPerJob": 2})
    denial = _admission([stored], spec(resources={"gpus": 4}), labels)
    assert (denial is not None) is denied
    assert bool(policy.applicable([parse_policy(stored)], labels)) is denied  # the operator agrees


def test_chart_template_is_up_to_date() -> None:
    committed = ROOT / "charts" / "finetune-operator" / "templates" / policy_admission.TEMPLATE
    assert committed.read_text() == policy_admission.render_template(), "run `make crds`"


def test_policy_schema_is_bounded_for_cel_cost() -> None:
    """Every list the admission policy iterates has maxItems, every string maxLength (kube-apiserver's CEL
    cost estimate multiplies them)."""
    schema = crdgen.openapi_schema(crdgen.FINETUNEPOLICY)["properties"]["spec"]

    def walk(node: dict[str, Any], path: str) -> None:
        kind = node.get("type")
        if kind == "array":
            assert "maxItems" in node, path
            walk(node["items"], path + "[]")
        elif kind == "string":
            assert "maxLength" in node or "enum" in node, path
        elif kind == "object":
            if "additionalProperties" in node:
                assert "maxProperties" in node, path
                walk(node["additionalProperties"], path + "{}")
            for key, child in (node.get("properties") or {}).items():
                walk(child, f"{path}.{key}")

    walk(schema, "spec")


# --- stateful limits and the planner ------------------------------------------------------------------------


def _validated(world: World) -> None:
    world.step()
    world.finish(Stage.VALIDATE, VALID)
    world.step()


def test_a_violating_job_fails_before_any_pod() -> None:
    world = World(job(baseModel={"uri": "hf://x/y"}))
    world.policy = view(make_policy(allowedBaseModels=["s3://approved/*"]))
    first = world.step()
    assert first.create == []
    assert world.status["phase"] == "Failed"
    assert world.condition["Ready"]["reason"] == "PolicyViolation"
    assert world.status["message"] == (
        "denied by FineTunePolicy team-defaults: spec.baseModel.uri hf://x/y is not in allowedBaseModels"
    )
    assert world.status["policy"] == {"policies": ["team-defaults"]}


def test_exhausted_budget_suspends_before_training_then_starts_when_raised() -> None:
    world = World(job())  # estimate after validation: 0.9 GPU-hours
    world.policy = view(make_policy(gpuHoursPerMonth=10), used=9.5)
    _validated(world)
    assert Stage.TRAIN not in world.children  # no GPU pod
    assert world.status["phase"] == "Suspended"
    assert world.condition["Ready"]["reason"] == "BudgetExceeded"
    assert world.condition["Trained"]["reason"] == "BudgetExceeded"
    assert "used 9.50 of 10 GPU-hours" in world.status["message"]
    assert "needs an estimated 0.90" in world.status["message"]
    assert world.last is not None and world.last.events[-1].reason == "BudgetExceeded"
    assert world.step().writes == 0  # waiting costs nothing
    world.policy = view(make_policy(gpuHoursPerMonth=20), used=9.5)
    world.step()
    assert Stage.TRAIN in world.children
    assert world.status["phase"] == "Training"


def test_concurrency_limit_waits_with_the_figures() -> None:
    world = World(job())
    world.policy = view(make_policy(maxConcurrentJobs=2), active=2)
    _validated(world)
    assert Stage.TRAIN not in world.children
    assert world.condition["Ready"]["reason"] == "ConcurrencyLimit"
    assert "2 jobs of this namespace are running" in world.status["message"]
    world.policy = view(make_policy(maxConcurrentJobs=2), active=1)
    world.step()
    assert world.status["phase"] == "Training"


def test_gpu_hours_per_job_fail_on_the_estimate() -> None:
    world = World(job())
    world.policy = view(make_policy(maxGpuHoursPerJob=0.5))
    _validated(world)
    assert Stage.TRAIN not in world.children
    assert world.status["phase"] == "Failed"
    assert world.status["message"] == (
        "denied by FineTunePolicy team-defaults: "
        "status.gpuHoursEstimate 0.9 is more than maxGpuHoursPerJob 0.5"
    )


def test_a_policy_created_after_training_started_does_not_stop_the_job() -> None:
    world = World(job(baseModel={"uri": "hf://x/y"}))
    _validated(world)
    world.policy = view(make_policy(allowedBaseModels=["s3://approved/*"], gpuHoursPerMonth=0))
    world.step()
    assert world.status["phase"] == "Training"


def test_cpu_jobs_spend_no_budget() -> None:
    world = World(job(resources={"gpus": 0, "gpuType": "cpu"}))
    world.policy = view(make_policy(gpuHoursPerMonth=0), used=3)
    _validated(world)
    assert world.status["phase"] == "Training"


def _body(uid: str, namespace: str, created: str, **status: Any) -> dict[str, Any]:
    meta = {"uid": uid, "namespace": namespace, "creationTimestamp": created}
    return {"metadata": meta, "status": status}


def test_usage_counts_this_months_hours_and_running_estimates() -> None:
    now = datetime(2026, 3, 15, tzinfo=UTC)
    jobs = [
        _body("a", "team-a", "2026-03-01T00:00:00Z", phase="Succeeded", gpuHours=2.0),
        _body("b", "team-a", "2026-02-27T00:00:00Z", phase="Succeeded", gpuHours=50.0),  # last month
        _body("c", "team-a", "2026-03-02T00:00:00Z", phase="Training", gpuHours=0.5, gpuHoursEstimate=3.0),
        _body("d", "team-b", "2026-03-02T00:00:00Z", phase="Training", gpuHours=7.0),  # other namespace
        _body("e", "team-a", "2026-03-03T00:00:00Z", phase="Validating"),
        _body("self", "team-a", "2026-03-03T00:00:00Z", phase="Training", gpuHours=9.0),
    ]
    found = policy.usage(jobs, "team-a", now, exclude_uid="self", starting={"e"})
    assert found == Usage(gpu_hours=5.0, active_jobs=2)


def test_policy_status_shows_selector_and_use_per_namespace() -> None:
    found = make_policy(namespaceSelector={"matchLabels": {"tier": "team"}}, gpuHoursPerMonth=10)
    jobs = [_body("a", "team-a", "2026-01-01T00:00:00Z", phase="Training", gpuHours=1.25)]
    namespaces = {"team-a": {"tier": "team"}, "team-b": {"tier": "team"}, "other": {}}
    status = policy.policy_status(found, namespaces, jobs, NOW)
    assert status == {
        "selector": "tier=team",
        "month": "2026-01",
        "used": [{"namespace": "team-a", "gpuHours": 1.25, "activeJobs": 1}],
        "usedSummary": "team-a 1.25h",
        "ledger": None,  # nothing recorded yet (lifecycle.sync_policy_status records it)
    }


# --- through the reconcile: defaults, status, metrics -------------------------------------------------------


async def test_defaults_are_recorded_in_status_and_used_but_the_spec_is_unchanged() -> None:
    body = new_job(resources={"gpus": 1, "gpuType": "a100-80gb"})
    ctx, api = setup(body)
    ctx.policies["team-defaults"] = make_policy(
        namespaceSelector={"matchLabels": {"tier": "team"}},
        allowedGpuTypes=["h100-80gb"],
        defaults={"queueName": "team-queue", "gpuType": "h100-80gb", "priorityClassName": "batch-low"},
    )
    ctx.namespace_labels["team-a"] = {"tier": "team"}
    stored_spec = copy.deepcopy(body["spec"])
    await reconcile(ctx, copy.deepcopy(body), trigger="test")
    assert api.job["status"]["policy"] == {
        "policies": ["team-defaults"],
        "queueName": "team-queue",
        "gpuType": "h100-80gb",
        "priorityClassName": "batch-low",
    }
    assert api.job["spec"] == stored_spec
    (validate,) = [obj for (kind, _, _), obj in api.objects.items() if kind == "Job"]
    assert validate["spec"]["template"]["spec"].get("priorityClassName") is None  # CPU: validation only


def test_the_filled_in_defaults_reach_the_training_pods() -> None:
    ref = job()
    chosen = make_policy(
        allowedGpuTypes=["h100-80gb"],
        defaults={"queueName": "team-queue", "gpuType": "h100-80gb", "priorityClassName": "batch-low"},
    )
    filled = policy.filled_defaults(ref.spec, view(chosen))
    world = World(dataclasses.replace(ref, spec=policy.with_defaults(ref.spec, filled)))
    world.policy = PolicyView((chosen,), Usage(), filled)
    _validated(world)
    train = world.children[Stage.TRAIN]
    pod = train["spec"]["template"]
    assert train["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    assert pod["spec"]["priorityClassName"] == "batch-low"
    assert pod["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert world.status["policy"]["gpuType"] == "h100-80gb"


async def test_no_policy_for_the_namespace_changes_nothing() -> None:
    body = new_job(baseModel={"uri": "hf://x/y"})
    ctx, api = setup(body)
    ctx.policies["team-defaults"] = make_policy(
        namespaceSelector={"matchLabels": {"tier": "team"}}, allowedBaseModels=["s3://approved/*"]
    )
    await reconcile(ctx, copy.deepcopy(body), trigger="test")
    assert api.job["status"]["phase"] == "Validating"
    assert "policy" not in api.job["status"]


def test_gpu_hours_counter_and_budget_gauges() -> None:
    from finetune_operator.metrics import Metrics
    from prometheus_client import generate_latest

    metrics = Metrics()
    metrics.record_gpu_hours("team-a", "u1", 1.5)
    metrics.record_gpu_hours("team-a", "u1", 2.0)
    metrics.record_gpu_hours("team-a", "u2", 1.0)
    metrics.forget("u1")  # a deleted job's hours stay counted
    metrics.budgets = {("team-defaults", "team-a"): (3.0, 10.0)}
    text = generate_latest(metrics.registry).decode()
    assert 'finetune_gpu_hours_total{namespace="team-a"} 3.0' in text
    assert 'finetune_policy_gpu_hours_used{namespace="team-a",policy="team-defaults"} 3.0' in text
    assert 'finetune_policy_gpu_hours_remaining{namespace="team-a",policy="team-defaults"} 7.0' in text


async def test_policy_events_replan_unfinished_jobs_and_status_is_written_once() -> None:
    from finetune_operator import lifecycle

    body = new_job()
    ctx, api = setup(body)
    written: list[tuple[str, dict[str, Any]]] = []

    async def patch_policy_status(name: str, patch: dict[str, Any], resource_version: Any = None) -> None:
        written.append((name, patch))

    api.patch_policy_status = patch_policy_status  # type: ignore[attr-defined]
    await reconcile(ctx, copy.deepcopy(body), trigger="test")
    memo = {"ctx": ctx}
    await lifecycle.on_namespace_event(
        memo, {"metadata": {"name": "team-a", "labels": {"tier": "team"}}}, None
    )
    stored = {
        "metadata": {"name": "team-defaults"},
        "spec": {"namespaceSelector": {"matchLabels": {"tier": "team"}}},
    }
    await lifecycle.on_policy_event(memo, stored, None)
    assert ctx.records[body["metadata"]["uid"]].dirty  # the resync loop plans it again with the policy
    await lifecycle.sync_policy_status(ctx)
    await lifecycle.sync_policy_status(ctx)
    assert [name for name, _ in written] == ["team-defaults"]  # unchanged: not written again
    assert written[0][1]["selector"] == "tier=team"
    assert ctx.metrics.budgets == {("team-defaults", "team-a"): (0.0, None)}
    await lifecycle.on_policy_event(memo, stored, "DELETED")
    assert ctx.policies == {}


def test_jobs_waiting_on_a_policy_are_due_on_every_resync() -> None:
    from finetune_operator import lifecycle
    from finetune_operator.config import load_config
    from finetune_operator.context import Context

    ctx = Context(config=load_config(env={}))
    waiting = new_job()
    waiting["status"] = {
        "phase": "Suspended",
        "conditions": [{"type": "Ready", "status": "False", "reason": "BudgetExceeded"}],
    }
    record = ctx.remember(waiting)
    record.last_run = 1000.0
    assert [job["metadata"]["uid"] for job, _ in lifecycle._due(ctx, 1001.0)] == [waiting["metadata"]["uid"]]
    waiting["status"]["conditions"][0]["reason"] = "Suspended"  # spec.suspend: waits for the user instead
    ctx.remember(waiting)
    assert lifecycle._due(ctx, 1001.0) == []


# --- issue 20 defect 6: serving (ModelServers and a job's own Deployment) -----------------------------------

SERVER_RULES: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    (
        {"allowedBaseModels": ["s3://approved/*"]},
        {"baseModel": {"uri": "hf://x/y"}},
        "spec.baseModel.uri hf://x/y is not in allowedBaseModels",
    ),
    (
        {"allowedGpuTypes": ["a100-80gb"]},
        {"gpuType": "h100-80gb"},
        "spec.gpuType h100-80gb is not in allowedGpuTypes",
    ),
    (
        {"maxServingGpus": 16},
        {"replicas": 64, "gpus": 8, "gpuType": "h100-80gb"},
        "spec.replicas 64 x spec.gpus 8 = 512 GPUs is more than maxServingGpus 16",
    ),
]


def _server(**overrides: Any) -> dict[str, Any]:
    """A defaulted ModelServer spec, as the API server stores it."""
    from finetune_operator.api.modelserver import parse_modelserver_spec

    raw = {"baseModel": {"uri": "s3://approved/base"}, "adapterSources": ["s3://runs"], **overrides}
    return parse_modelserver_spec(raw).model_dump(mode="json", by_alias=True, exclude_none=True)


@pytest.mark.parametrize(("rules", "overrides", "message"), SERVER_RULES)
def test_modelserver_rules_deny_at_admission_and_in_the_operator_with_one_message(
    rules: dict[str, Any], overrides: dict[str, Any], message: str
) -> None:
    from finetune_operator.api.modelserver import parse_modelserver_spec

    stored = _stored("team-defaults", rules)
    denial = _admission([stored], _server(**overrides), {}, kind="ModelServer")
    assert denial == f"denied by FineTunePolicy team-defaults: {message}"
    found = policy.server_violations(parse_modelserver_spec(_server(**overrides)), parse_policy(stored))
    assert found[:1] == [message]


@pytest.mark.parametrize(
    ("rules", "overrides"),
    [
        ({"allowedGpuTypes": ["h100-80gb"], "maxServingGpus": 0}, {"gpus": 0}),
        ({"allowedGpuTypes": ["h100-80gb"], "maxServingGpus": 0}, {"gpuType": "cpu"}),
        ({"maxServingGpus": 16}, {"replicas": 2, "gpus": 8}),
        ({"allowedBaseModels": ["s3://approved/*"]}, {}),
    ],
)
def test_modelservers_the_policy_allows_are_admitted(
    rules: dict[str, Any], overrides: dict[str, Any]
) -> None:
    from finetune_operator.api.modelserver import parse_modelserver_spec

    stored = _stored("team-defaults", rules)
    assert _admission([stored], _server(**overrides), {}, kind="ModelServer") is None
    assert policy.server_violations(parse_modelserver_spec(_server(**overrides)), parse_policy(stored)) == []


def _pool_observed(
    others: int, deployment: dict[str, Any] | None = None, status: Any = None, **spec: Any
) -> Any:
    from finetune_operator.api.modelserver import parse_modelserver_spec
    from finetune_operator.modelserver.builders import PoolRef
    from finetune_operator.modelserver.planner import PoolObserved

    pool = PoolRef("team-a", "shared", "pool-uid", parse_modelserver_spec(_server(**spec)))
    selected = (make_policy(maxServingGpus=16),)
    return PoolObserved(
        pool=pool,
        status=status or {},
        deployment=deployment,
        service=None,
        configmap=None,
        pods=[],
        replicas={},
        jobs=[],
        now=NOW,
        policy=PolicyView(selected, serving_gpus=others),
    )


def test_a_modelserver_over_max_serving_gpus_is_not_created_or_grown_with_a_condition_and_one_event() -> None:
    from finetune_operator.api.modelserver import ModelServerStatus
    from finetune_operator.config import load_config
    from finetune_operator.modelserver.planner import plan_pool

    config = load_config(env={})
    plan = plan_pool(_pool_observed(12, replicas=2, gpus=4), config)  # 8 more on top of 12 held
    assert "Deployment" not in {m["kind"] for m in plan.create}
    condition = next(c for c in plan.status["conditions"] if c["type"] == "PolicyAllowed")
    message = (
        "denied by FineTunePolicy team-defaults: spec.replicas 2 x spec.gpus 4 = 8 GPUs, with 12 held by the "
        "namespace's other servers, is more than maxServingGpus 16"
    )
    assert (condition["status"], condition["reason"], condition["message"]) == (
        "False",
        "ServingGpuLimit",
        message,
    )
    assert plan.status["message"] == message
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "RefusedByPolicy", message)
    assert [(e.type, e.reason, e.message) for e in plan.events] == [("Warning", "ServingGpuLimit", message)]
    ModelServerStatus.model_validate(plan.status)
    again = plan_pool(_pool_observed(12, status=plan.status, replicas=2, gpus=4), config)
    assert again.events == []  # the same refusal: no second Event

    # Running with 1 x 4 GPUs: scaling to 2 x 4 is refused (no patch); with room it is rolled out.
    running = plan_pool(_pool_observed(0, replicas=1, gpus=4), config)
    deployment = next(m for m in running.create if m["kind"] == "Deployment")
    held = plan_pool(_pool_observed(12, deployment=deployment, replicas=2, gpus=4), config)
    assert [p.kind for p in held.patch if p.kind == "Deployment"] == []
    grown = plan_pool(
        _pool_observed(8, deployment=deployment, status=held.status, replicas=2, gpus=4), config
    )
    assert [p.kind for p in grown.patch if p.kind == "Deployment"] == ["Deployment"]
    allowed = next(c for c in grown.status["conditions"] if c["type"] == "PolicyAllowed")
    assert allowed["status"] == "True"


def test_deployment_gpus_counts_replicas_times_gpu_limits() -> None:
    deployment = {
        "spec": {
            "replicas": 3,
            "template": {"spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": "2"}}}, {}]}},
        }
    }
    assert observe.deployment_gpus(deployment, ["nvidia.com/gpu"]) == 6
    assert observe.deployment_gpus({"spec": {"replicas": 3}}, ["nvidia.com/gpu"]) == 0


def test_a_jobs_deployment_over_max_serving_gpus_waits_without_a_deployment_then_serves() -> None:
    from .test_state import EVAL_GOOD
    from .test_state import _to_evaluated as to_evaluated

    world = World(job(deployment={"replicas": 2, "gpus": 4}))
    selected = (make_policy(maxServingGpus=16),)
    world.policy = PolicyView(selected, serving_gpus=12)
    to_evaluated(world, EVAL_GOOD)
    assert world.server is None and Stage.SERVE not in world.children and world.service is None
    assert world.status["phase"] == "Deploying"
    assert world.condition["Deployed"]["reason"] == "ServingGpuLimit"
    assert world.status["message"] == (
        "denied by FineTunePolicy team-defaults: spec.deployment.replicas 2 x spec.deployment.gpus 4 = "
        "8 GPUs, with 12 held by the namespace's other servers, is more than maxServingGpus 16"
    )
    assert [(e.type, e.reason) for e in world.events][-1] == ("Warning", "ServingGpuLimit")
    world.policy = PolicyView(selected, serving_gpus=8)  # another server scaled down
    world.step()
    assert world.server is not None  # the job's own ModelServer


# --- issue 20 defect 7: the GPU-hour ledger remembers deleted jobs ------------------------------------------

MARCH = datetime(2026, 3, 15, tzinfo=UTC)


def _hours(ledger: list[dict[str, Any]], namespace: str = "team-a", month: str = "2026-03") -> float:
    entry = policy_ledger.ledger_entry(ledger, namespace, month)
    return float(entry["gpuHours"]) if entry else 0.0


def test_the_ledger_records_hours_as_they_accrue_and_a_repeated_pass_adds_nothing() -> None:
    a = _body("a", "team-a", "2026-03-01T00:00:00Z", phase="Training", gpuHours=1.0)
    ledger = policy_ledger.record([], ["team-a"], [a], MARCH)
    assert _hours(ledger) == 1.0
    assert policy_ledger.record(ledger, ["team-a"], [a], MARCH) == ledger  # idempotent
    a["status"]["gpuHours"] = 2.5  # a later pass: 1.5 more hours
    ledger = policy_ledger.record(ledger, ["team-a"], [a], MARCH)
    assert _hours(ledger) == 2.5
    other = _body(
        "o", "other", "2026-03-01T00:00:00Z", gpuHours=9.0
    )  # a namespace the policy does not select
    assert policy_ledger.record(ledger, ["team-a"], [a, other], MARCH) == ledger


def test_a_deleted_job_keeps_its_hours_and_one_not_listed_yet_is_not_counted_twice() -> None:
    a = _body("a", "team-a", "2026-03-01T00:00:00Z", phase="Succeeded", gpuHours=4.0)
    b = _body("b", "team-a", "2026-03-02T00:00:00Z", phase="Training", gpuHours=1.0, gpuHoursEstimate=3.0)
    ledger = policy_ledger.record([], ["team-a"], [a, b], MARCH)
    assert _hours(ledger) == 5.0

    # A restarted operator that has not listed the jobs yet: nothing dropped, nothing added.
    assert policy_ledger.unconfirmed(ledger, [], MARCH) == {"team-a": {"a", "b"}}
    restarted = policy_ledger.record(ledger, ["team-a"], [], MARCH)
    assert restarted == ledger
    assert policy_ledger.record(restarted, ["team-a"], [a, b], MARCH) == ledger

    # `a` deleted (the API confirms it): its 4 hours stay, only `b` is tracked per job.
    after = policy_ledger.record(ledger, ["team-a"], [b], MARCH, gone={"a"})
    assert _hours(after) == 5.0
    assert policy_ledger.recorded(policy_ledger.ledger_entry(after, "team-a", "2026-03")) == {"b": 1.0}
    entry = policy_ledger.ledger_entry(after, "team-a", "2026-03")
    # The budget: the ledger plus b's running estimate beyond what was recorded of it.
    assert policy.usage([b], "team-a", MARCH, entry=entry).gpu_hours == 7.0
    assert policy.usage([b], "team-a", MARCH, exclude_uid="b", entry=entry).gpu_hours == 4.0
    assert policy.usage([b], "team-a", MARCH).gpu_hours == 3.0  # without the ledger `a` would be forgotten


def test_months_roll_over_and_the_ledger_keeps_only_the_last_three() -> None:
    old = [
        {"namespace": "team-a", "month": month, "gpuHours": 1.0, "jobs": [{"uid": "x", "gpuHours": 1.0}]}
        for month in ("2025-11", "2025-12", "2026-01", "2026-02")
    ]
    a = _body("a", "team-a", "2026-03-01T00:00:00Z", gpuHours=2.0)
    late = _body("x", "team-a", "2026-02-28T00:00:00Z", phase="Training", gpuHours=5.0)  # February's job
    ledger = policy_ledger.record(old, ["team-a"], [a, late], MARCH)
    assert [e["month"] for e in ledger] == ["2026-03", "2026-02", "2026-01"]
    assert "jobs" not in ledger[1]  # a past month is frozen: February's job no longer adds to it
    assert _hours(ledger) == 2.0 and _hours(ledger, month="2026-02") == 1.0
    april = datetime(2026, 4, 1, tzinfo=UTC)
    entry = policy_ledger.ledger_entry(ledger, "team-a", "2026-04")
    assert policy.usage([a], "team-a", april, entry=entry).gpu_hours == 0.0  # a new month's budget


class _PolicyApi:
    """Just the calls sync_policy_status makes: the policy's status (with its resourceVersion) and jobs."""

    def __init__(self) -> None:
        self.version = 7
        self.status: dict[str, Any] = {}
        self.jobs: list[dict[str, Any]] = []
        self.preconditions: list[str | None] = []

    async def patch_policy_status(
        self, name: str, patch: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any]:
        self.preconditions.append(resource_version)
        self.version += 1
        self.status = patch
        return {"metadata": {"name": name, "resourceVersion": str(self.version)}, "status": patch}

    async def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return [j for j in self.jobs if j["metadata"]["namespace"] == namespace]


async def test_run_then_delete_does_not_escape_the_budget_across_an_operator_restart() -> None:
    from finetune_operator import lifecycle
    from finetune_operator.config import load_config
    from finetune_operator.context import Context

    api = _PolicyApi()
    stored = {
        "metadata": {"name": "team-defaults", "resourceVersion": "7"},
        "spec": {"namespaceSelector": {"matchLabels": {"tier": "team"}}, "gpuHoursPerMonth": 10},
    }

    async def operator(jobs: list[dict[str, Any]]) -> Context:
        ctx = Context(config=load_config(env={}), api=api)  # type: ignore[arg-type]
        memo = {"ctx": ctx}
        await lifecycle.on_namespace_event(
            memo, {"metadata": {"name": "team-a", "labels": {"tier": "team"}}}, None
        )
        await lifecycle.on_policy_event(memo, stored, None)
        for body in jobs:
            ctx.remember(body)
        return ctx

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    spent = _body("spent", "team-a", now, phase="Training", gpuHours=6.0)
    spent["metadata"]["name"] = "spent"
    api.jobs = [spent]
    ctx = await operator([spent])
    await lifecycle.sync_policy_status(ctx)
    await lifecycle.sync_policy_status(ctx)  # nothing new: not written again
    assert api.preconditions == ["7"]  # read-modify-write at the version it read
    assert api.status["used"][0]["gpuHours"] == 6.0

    # The user deletes the job mid-training; the operator restarts and reads the ledger back.
    await lifecycle.on_job_event({"ctx": ctx}, spent, "DELETED")
    api.jobs = []
    stored = {**stored, "metadata": {"name": "team-defaults", "resourceVersion": "8"}, "status": api.status}
    ctx = await operator([])
    await lifecycle.sync_policy_status(ctx)
    assert api.status["ledger"][0]["gpuHours"] == 6.0 and "jobs" not in api.status["ledger"][0]
    assert api.preconditions[-1] == "8"

    # The next job: 6 of 10 GPU-hours are spent, so an estimate of 5 waits.
    view = policy.view_for(
        job().spec,
        ctx.policies.values(),
        {"tier": "team"},
        [],
        "team-a",
        "next",
        datetime.now(UTC),
        ledgers={name: ledger for name, (_, ledger) in ctx.ledgers.items()},
    )
    waiting = policy.wait(5.0, view)
    assert waiting is not None and waiting[0] == "BudgetExceeded"
    assert "used 6.00 of 10 GPU-hours" in waiting[1]


async def _until(check: Any, seconds: float = 5.0) -> None:
    """Wait for `check()` to hold, failing after `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


TEAM_A = {"metadata": {"name": "team-a", "labels": {"tier": "team"}}}
BUDGET = {
    "metadata": {"name": "team-defaults", "resourceVersion": "7"},
    "spec": {"namespaceSelector": {"matchLabels": {"tier": "team"}}, "gpuHoursPerMonth": 10},
}


async def test_a_new_policy_gets_its_status_on_its_own_trigger_with_no_job_resync() -> None:
    """The status sync used to ride on the FineTuneJob resync loop: here that loop waits an hour."""
    from finetune_operator import lifecycle
    from finetune_operator.config import load_config
    from finetune_operator.context import Context

    api = _PolicyApi()
    config = load_config(env={"FTO_RESYNC_SECONDS": "3600", "FTO_PROGRESS_SECONDS": "3600"})
    ctx = Context(config=config, api=api)  # type: ignore[arg-type]
    memo = {"ctx": ctx}
    await lifecycle.startup(memo, {})
    try:
        await lifecycle.on_namespace_event(memo, TEAM_A, None)
        await lifecycle.on_policy_event(memo, BUDGET, None)
        await _until(lambda: api.status.get("selector") == "tier=team")
        assert api.preconditions == ["7"]
    finally:
        await lifecycle.cleanup(memo)


async def test_the_ledger_follows_a_jobs_gpu_hours_on_the_policy_controllers_own_period() -> None:
    from finetune_operator import lifecycle
    from finetune_operator.config import load_config
    from finetune_operator.context import Context
    from finetune_operator.finetunepolicy import controller as policy_controller

    api = _PolicyApi()
    ctx = Context(config=load_config(env={}), api=api)  # type: ignore[arg-type]
    memo = {"ctx": ctx}
    await lifecycle.on_namespace_event(memo, TEAM_A, None)
    await lifecycle.on_policy_event(memo, BUDGET, None)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    training = _body("training", "team-a", now, phase="Training", gpuHours=1.0)
    training["metadata"]["name"] = "training"
    ctx.remember(training)

    def used() -> float | None:
        return next((u["gpuHours"] for u in api.status.get("used") or []), None)

    sync = policy_controller.run(lambda: lifecycle.sync_policy_status(ctx), ctx.policy_queue, period=0.01)
    task = asyncio.get_running_loop().create_task(sync)
    try:
        await _until(lambda: used() == 1.0)
        ctx.remember(training | {"status": {"phase": "Training", "gpuHours": 3.0}})  # the job's reconcile
        await _until(lambda: used() == 3.0)
        assert api.status["ledger"][0]["gpuHours"] == 3.0
        assert ctx.metrics.budgets == {("team-defaults", "team-a"): (3.0, 10)}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_the_namespace_serving_sum_reads_the_watch_cache_of_jobs_and_modelservers() -> None:
    """Context.serving_gpus: the Deployments the watch caches hold (snapshots), by their owner's uid."""
    from finetune_operator.config import load_config
    from finetune_operator.context import Children, Context, snapshot
    from finetune_operator.lifecycle import index_deployment

    def deployment(name: str, owner: str, replicas: int, gpus: int, **labels: str) -> dict[str, Any]:
        container = {"name": "vllm", "resources": {"limits": {"nvidia.com/gpu": str(gpus), "cpu": "4"}}}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": name,
                "namespace": "team-a",
                "labels": labels,
                "ownerReferences": [{"uid": owner, "controller": True, "kind": "X", "name": "x"}],
            },
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [container]}}},
        }

    served = deployment("job-serve", "job-uid", 2, 1, **{"finetune.dev/job-uid": "job-uid"})
    served["metadata"]["uid"] = "deployment-uid"
    pool = deployment("shared-pool", "pool-uid", 3, 2, **{"finetune.dev/modelserver-uid": "pool-uid"})
    index: dict[str, list[dict[str, Any]]] = {}
    for body in (served, pool):
        for uid, snap in (index_deployment(body) or {}).items():
            index.setdefault(uid, []).append(snap)
    ctx = Context(config=load_config(env={}))
    ctx.children_of = lambda uid: Children(deployments=list(index.get(uid, [])))
    recorded = {"children": {"Deployment/job-serve": {"uid": "deployment-uid"}}}  # created by the operator
    ctx.remember(
        new_job()
        | {"metadata": {"name": "demo", "namespace": "team-a", "uid": "job-uid"}, "status": recorded}
    )
    ctx.pools.by_uid["pool-uid"] = ("team-a", "shared")
    assert ctx.serving_gpus("team-a", exclude_uid="other") == 2 + 6
    assert ctx.serving_gpus("team-a", exclude_uid="pool-uid") == 2
    assert ctx.serving_gpus("team-b", exclude_uid="other") == 0
    assert observe.deployment_gpus(snapshot(pool), ["nvidia.com/gpu"]) == 6


@pytest.mark.parametrize(
    ("deployment", "resources", "denied"),
    [
        (
            {"replicas": 3},
            {"gpus": 1, "gpuType": "a100-80gb"},
            "spec.deployment.replicas 3 x spec.deployment.gpus 1 = 3 GPUs",
        ),
        ({"replicas": 3}, {"gpus": 0, "gpuType": "a100-80gb"}, None),  # served on CPU: gpus defaults to 0
        ({"replicas": 3, "gpuType": "a100-80gb"}, {"gpus": 0, "gpuType": "cpu"}, "= 3 GPUs"),
        ({"enabled": False}, {"gpus": 1, "gpuType": "a100-80gb"}, None),
    ],
)
def test_admission_defaults_an_unset_deployment_gpus_as_the_operator_does(
    deployment: dict[str, Any], resources: dict[str, Any], denied: str | None
) -> None:
    """The CRD has no default for deployment.gpus (it depends on other fields): the admission policy must
    not fail on the missing key, and counts what the operator will serve."""
    raw = {
        "baseModel": {"uri": "s3://models/tiny-llama"},
        "dataset": {"train": "s3://data/toy/train.jsonl"},
        "storage": {"output": "s3://runs/out", "credentialsSecret": "s3-creds"},
        "resources": resources,
        "deployment": {"enabled": True, "replicas": 1, **deployment},
        "evaluation": {"enabled": True},
        "method": "lora",
        "lora": {"rank": 16},
    }
    stored = _stored("team-defaults", {"maxServingGpus": 2})
    found = _admission([stored], raw, {})
    if denied is None:
        assert found is None
    else:
        assert found is not None and denied in found
    from finetune_operator.api.finetunejob import parse_spec

    ask = policy.job_serving(parse_spec(raw))
    assert (ask is not None and ask.held > 2) is (denied is not None)  # the operator agrees


def test_admission_defaults_an_unset_modelserver_gpus_as_the_operator_does() -> None:
    from finetune_operator.api.modelserver import parse_modelserver_spec

    stored = _stored("team-defaults", {"maxServingGpus": 2})
    raw = {"baseModel": {"uri": "s3://approved/base"}, "adapterSources": ["s3://runs"], "replicas": 3}
    for gpu_type, denied in (("a100-80gb", True), ("cpu", False)):
        spec = {**raw, "gpuType": gpu_type}
        found = _admission([stored], spec, {}, kind="ModelServer")
        assert (found is not None) is denied, found
        if denied:
            assert found and found.endswith(
                "spec.replicas 3 x spec.gpus 1 = 3 GPUs is more than maxServingGpus 2"
            )
        assert bool(policy.server_violations(parse_modelserver_spec(spec), parse_policy(stored))) is denied


def test_a_jobs_own_modelserver_counts_once_in_the_namespace_serving_sum() -> None:
    """Issue 21: a job's serving GPUs are its own ModelServer's Deployment, counted once (as the pool's, by
    its controller reference), not also as the job's; and the pool's own check leaves itself out."""
    from finetune_operator.config import load_config
    from finetune_operator.context import Children, Context
    from finetune_operator.lifecycle import index_deployment

    container = {"name": "vllm", "resources": {"limits": {"nvidia.com/gpu": "2"}}}
    own_pool = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "demo-serve-pool",
            "namespace": "team-a",
            "uid": "deployment-uid",
            "labels": {"finetune.dev/modelserver-uid": "server-uid"},
            "ownerReferences": [
                {"uid": "server-uid", "controller": True, "kind": "ModelServer", "name": "demo-serve"}
            ],
        },
        "spec": {"replicas": 3, "template": {"spec": {"containers": [container]}}},
    }
    index = index_deployment(own_pool) or {}
    ctx = Context(config=load_config(env={}))
    ctx.children_of = lambda uid: Children(deployments=[index[uid]] if uid in index else [])
    recorded = {"children": {"ModelServer/demo-serve": {"uid": "server-uid"}}}
    ctx.remember(
        new_job()
        | {"metadata": {"name": "demo", "namespace": "team-a", "uid": "job-uid"}, "status": recorded}
    )
    ctx.pools.by_uid["server-uid"] = ("team-a", "demo-serve")
    assert ctx.serving_gpus("team-a", exclude_uid="other") == 3 * 2
    assert ctx.serving_gpus("team-a", exclude_uid="job-uid") == 3 * 2  # not zero: the pool holds them
    assert ctx.serving_gpus("team-a", exclude_uid="server-uid") == 0  # the pool's own check


def test_a_job_serving_on_its_own_modelserver_is_not_refused_for_the_gpus_it_already_holds() -> None:
    """The namespace sum already holds the job's own pool: the job does not ask for its GPUs again (its
    pool's own FineTunePolicy check governs growth); asking again would count them twice."""
    from .test_state import EVAL_GOOD
    from .test_state import _to_evaluated as to_evaluated

    world = World(job(deployment={"replicas": 2, "gpus": 4}))
    selected = (make_policy(maxServingGpus=8),)
    world.policy = PolicyView(selected, serving_gpus=0)
    to_evaluated(world, EVAL_GOOD)
    assert world.server is not None
    world.policy = PolicyView(selected, serving_gpus=8)  # the job's own pool, as the watch cache has it
    world.step()
    assert world.condition["Deployed"]["reason"] != "ServingGpuLimit", world.status["message"]
    assert world.status["phase"] == "Deploying"
