"""Issue 23: spec.objective, spec.rewards and the preference hyperparameters. Every combination that cannot
work is refused by the API server (CEL) and by the operator's models with the same message, naming the field;
the valid dpo, kto and grpo specs pass both."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from finetune_operator.api import schema
from finetune_operator.api.crdgen import build_crd
from finetune_operator.api.finetunejob import SpecError, check_update, parse_finetunejob, spec_to_dict
from localcluster.crdvalidation import CRDValidator, InvalidError

from .test_invalid_manifests import valid_job

Mutation = Callable[[dict[str, Any]], None]
EXACT = {"name": "exact", "type": "stringCheck", "stringCheck": {"operation": "equals"}}
REWARD_NAMED = {"name": "reward", "type": "stringCheck", "stringCheck": {"operation": "contains"}}


@pytest.fixture(scope="module")
def validator() -> CRDValidator:
    return CRDValidator(build_crd(), "v1alpha1")


def job(objective: str | None = None, **spec: Any) -> dict[str, Any]:
    """The valid job of test_invalid_manifests with `objective` and `spec` fields merged in (a section
    given as a dict is merged into the job's own)."""
    obj = valid_job()
    if objective is not None:
        obj["spec"]["objective"] = objective
    for key, value in spec.items():
        current = obj["spec"].get(key)
        obj["spec"][key] = {**current, **value} if isinstance(current, dict) else value
    return obj


def grpo(**spec: Any) -> dict[str, Any]:
    """A valid grpo job: a deterministic grader rewarding the expected answer."""
    return job(
        "grpo",
        **{"evaluation": {"graders": [EXACT]}, "rewards": [{"grader": "exact"}], **spec},
    )


def prompt_only() -> dict[str, Any]:
    return {"train": "s3://data-bucket/sets/prompts.jsonl", "format": "prompt-only"}


# (id, object, the field named, the message)
REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "rewards-without-grpo",
        job("dpo", evaluation={"graders": [EXACT]}, rewards=[{"grader": "exact"}]),
        "spec.rewards",
        schema.REWARDS_NEED_GRPO,
    ),
    (
        "grpo-without-rewards",
        job("grpo", evaluation={"graders": [EXACT]}),
        "spec.rewards",
        schema.GRPO_NEEDS_REWARDS,
    ),
    ("grpo-with-empty-rewards", grpo(rewards=[]), "spec.rewards", schema.GRPO_NEEDS_REWARDS),
    (
        "reward-grader-not-in-graders",
        grpo(rewards=[{"grader": "exact"}, {"grader": "relevance", "weight": 0.5}]),
        "spec.rewards",
        schema.REWARD_GRADER_UNKNOWN,
    ),
    (
        "grpo-with-evaluation-disabled",
        grpo(evaluation={"graders": [EXACT], "enabled": False}),
        "spec.evaluation.enabled",
        schema.GRPO_NEEDS_EVALUATION,
    ),
    (
        "grpo-with-a-grader-named-reward",
        grpo(evaluation={"graders": [EXACT, REWARD_NAMED]}),
        "spec.evaluation.graders",
        schema.GRPO_GRADER_NAMED_REWARD,
    ),
    (
        "dpo-on-chat-records",
        job("dpo", dataset={"format": "chat"}),
        "spec.dataset.format",
        schema.FORMAT_NOT_FOR_OBJECTIVE,
    ),
    (
        "kto-on-preference-pairs",
        job("kto", dataset={"format": "preference"}),
        "spec.dataset.format",
        schema.FORMAT_NOT_FOR_OBJECTIVE,
    ),
    (
        "sft-on-prompts",
        job(dataset={"format": "prompt-only"}),
        "spec.dataset.format",
        schema.FORMAT_NOT_FOR_OBJECTIVE,
    ),
    (
        "grpo-on-unpaired-preference",
        grpo(dataset={"format": "unpaired-preference"}),
        "spec.dataset.format",
        schema.FORMAT_NOT_FOR_OBJECTIVE,
    ),
    (
        "num-generations-without-grpo",
        job("dpo", hyperparameters={"numGenerations": 4}),
        "spec.hyperparameters",
        schema.GRPO_ONLY_HYPERPARAMETERS,
    ),
    (
        "max-completion-length-without-grpo",
        job(hyperparameters={"maxCompletionLength": 64}),
        "spec.hyperparameters",
        schema.GRPO_ONLY_HYPERPARAMETERS,
    ),
    (
        "beta-with-sft",
        job("sft", hyperparameters={"beta": 0.1}),
        "spec.hyperparameters.beta",
        schema.BETA_NEEDS_PREFERENCE,
    ),
    (
        "packing-with-dpo",
        job("dpo", hyperparameters={"packing": True}),
        "spec.hyperparameters.packing",
        schema.PACKING_NEEDS_SFT,
    ),
    (
        "preference-threshold-with-sft",
        job(evaluation={"thresholds": [{"metric": "preference_accuracy", "min": 0.9}]}),
        "spec.evaluation.thresholds",
        schema.THRESHOLD_NOT_MEASURED,
    ),
    (
        "reward-threshold-with-dpo",
        job("dpo", evaluation={"thresholds": [{"metric": "reward", "min": 0.5}]}),
        "spec.evaluation.thresholds",
        schema.THRESHOLD_NOT_MEASURED,
    ),
    (
        "margin-threshold-with-grpo",
        grpo(evaluation={"graders": [EXACT], "thresholds": [{"metric": "reward_margin", "min": 0}]}),
        "spec.evaluation.thresholds",
        schema.THRESHOLD_NOT_MEASURED,
    ),
    (
        "preference-primary-metric-with-grpo",
        grpo(evaluation={"graders": [EXACT], "primaryMetric": "preference_accuracy", "minImprovement": 0.1}),
        "spec.evaluation.primaryMetric",
        schema.PRIMARY_NOT_MEASURED,
    ),
    (
        "reward-primary-metric-with-sft",
        job(evaluation={"primaryMetric": "reward"}),
        "spec.evaluation.primaryMetric",
        schema.PRIMARY_NOT_MEASURED,
    ),
    (
        "retention-on-preference-accuracy",
        job(
            "dpo",
            evaluation={
                "retention": {"dataset": "s3://data-bucket/general.jsonl", "metric": "preference_accuracy"}
            },
        ),
        "spec.evaluation.retention.metric",
        schema.RETENTION_METRIC_UNKNOWN,
    ),
    ("objective-unknown", job("ppo"), "spec.objective", ""),
    ("beta-negative", job("dpo", hyperparameters={"beta": -0.1}), "spec.hyperparameters.beta", ""),
    (
        "one-generation",
        grpo(hyperparameters={"numGenerations": 1}),
        "spec.hyperparameters.numGenerations",
        "",
    ),
    (
        "too-many-rewards",
        grpo(rewards=[{"grader": "exact"}] * 9),
        "spec.rewards",
        "",
    ),
    ("dataset-format-unknown", job("dpo", dataset={"format": "pairs"}), "spec.dataset.format", ""),
]


@pytest.mark.parametrize(("obj", "path", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_by_cel_and_by_the_models_with_the_same_message(
    obj: dict[str, Any], path: str, message: str, validator: CRDValidator
) -> None:
    with pytest.raises(InvalidError) as cel:
        validator.admit(copy.deepcopy(obj))
    assert path in [c.field for c in cel.value.causes], cel.value.message()
    with pytest.raises(SpecError) as models:
        parse_finetunejob(copy.deepcopy(obj))
    assert path in [p for p, _ in models.value.errors], str(models.value)
    if message:
        # the API server prefixes `Invalid value: "<type>": `
        assert any(c.field == path and c.message.endswith(f": {message}") for c in cel.value.causes)
        assert (path, message) in models.value.errors


VALID: list[tuple[str, dict[str, Any]]] = [
    ("sft-default", job()),
    (
        "dpo-lora-on-preference-pairs",
        job(
            "dpo",
            dataset={"format": "preference"},
            hyperparameters={"beta": 0.2},
            evaluation={"thresholds": [{"metric": "preference_accuracy", "min": 0.9}], "minImprovement": 0.2},
        ),
    ),
    (
        "dpo-full-fsdp-on-two-nodes",
        job(
            "dpo",
            method="full",
            resources={"gpus": 4, "nodes": 2},
            hyperparameters={"strategy": "fsdp"},
            evaluation={"primaryMetric": "reward_margin"},
        ),
    ),
    ("kto-qlora", job("kto", method="qlora", dataset={"format": "unpaired-preference"})),
    (
        "grpo-with-generation-settings",
        grpo(
            dataset=prompt_only(),
            hyperparameters={"beta": 0.04, "numGenerations": 4, "maxCompletionLength": 64},
            evaluation={"graders": [EXACT], "thresholds": [{"metric": "reward", "min": 0.5}]},
        ),
    ),
    (
        "sft-with-a-grader-named-reward",
        job(evaluation={"graders": [REWARD_NAMED], "primaryMetric": "reward"}),
    ),
]


@pytest.mark.parametrize("obj", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_objective_specs_pass_both(obj: dict[str, Any], validator: CRDValidator) -> None:
    stored = validator.admit(copy.deepcopy(obj))
    spec = parse_finetunejob(stored).spec
    assert spec.objective == obj["spec"].get("objective", "sft")
    assert stored["spec"]["objective"] == spec.objective  # the API server defaults it like the models
    # What the operator passes in FTJ_CONFIG (spec_to_dict) carries the objective's fields, camelCase.
    dumped = spec_to_dict(spec)
    assert dumped["objective"] == spec.objective
    for key in ("beta", "numGenerations", "maxCompletionLength"):
        assert dumped["hyperparameters"].get(key) == obj["spec"].get("hyperparameters", {}).get(key)
    assert dumped.get("rewards") == (
        [{"weight": 1.0, **r} for r in obj["spec"]["rewards"]] if "rewards" in obj["spec"] else None
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("objective", "dpo"), ("rewards", [{"grader": "exact", "weight": 2.0}])],
)
def test_objective_and_rewards_are_immutable(field: str, value: Any, validator: CRDValidator) -> None:
    stored = validator.admit(grpo())
    changed = copy.deepcopy(stored)
    changed["spec"][field] = value
    if field == "objective":  # a dpo job without rewards, so that only immutability is in question
        del changed["spec"]["rewards"]
    with pytest.raises(InvalidError) as cel:
        validator.admit(changed, old=stored)
    immutable = schema.IMMUTABLE.format(field=field)
    assert any(c.field == f"spec.{field}" and c.message.endswith(f": {immutable}") for c in cel.value.causes)
    with pytest.raises(SpecError) as models:
        check_update(parse_finetunejob(stored).spec, parse_finetunejob(changed).spec)
    assert (f"spec.{field}", immutable) in models.value.errors


async def test_the_embedded_api_server_refuses_each_combination_with_a_422_naming_the_field() -> None:
    """The same table through the embedded cluster's HTTP API, as kubectl would send it."""
    aiohttp = pytest.importorskip("aiohttp")
    apiserver = pytest.importorskip("localcluster.apiserver")
    server = apiserver.ApiServer()
    await server.start()
    base = f"{server.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs"
    try:
        async with aiohttp.ClientSession() as http:
            crds = f"{server.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
            async with http.post(crds, json=build_crd()) as response:
                assert response.status == 201, await response.text()
            for case_id, obj, path, message in REFUSED:
                async with http.post(base, json=obj) as response:
                    body = await response.json()
                assert response.status == 422, (case_id, body)
                causes = [(c["field"], c["message"]) for c in body["details"]["causes"]]
                assert any(f == path and m.endswith(message) for f, m in causes), (case_id, causes)
            async with http.post(base, json=grpo(dataset=prompt_only())) as response:
                assert response.status == 201, await response.text()
    finally:
        await server.stop()
