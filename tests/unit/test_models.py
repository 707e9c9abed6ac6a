"""The pydantic models: camelCase API, defaults identical to the CRD's, errors naming field paths, status
that the CRD accepts, and the immutability check the transition rules mirror."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from finetune_operator.api.crdgen import build_crd
from finetune_operator.api.finetunejob import (
    FineTuneJobSpec,
    SpecError,
    check_update,
    parse_finetunejob,
    parse_spec,
    spec_to_dict,
)
from finetune_operator.api.finetunejob_status import (
    Condition,
    EvaluationStatus,
    FineTuneJobStatus,
    Phase,
    ProgressStatus,
)
from localcluster.crdvalidation import CRDValidator

MINIMAL_SPEC: dict[str, Any] = {
    "baseModel": {"uri": "hf://acme/base-7b"},
    "dataset": {"train": "s3://acme-data/train.jsonl"},
    "storage": {"output": "s3://acme-runs"},
}


@pytest.fixture(scope="module")
def validator() -> CRDValidator:
    return CRDValidator(build_crd(), "v1alpha1")


def job(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u-1", "generation": 2},
        "spec": copy.deepcopy(spec),
    }
    if status is not None:
        obj["status"] = status
    return obj


def derived(parsed: dict[str, Any]) -> dict[str, Any]:
    """A parsed spec less deployment.gpus: its default follows the GPU type, so the model fills it in and
    the API server (which cannot) leaves it unset."""
    out = copy.deepcopy(parsed)
    out["deployment"].pop("gpus")
    return out


def test_model_defaults_equal_the_api_servers(validator: CRDValidator) -> None:
    stored = validator.admit(job(MINIMAL_SPEC))["spec"]
    assert derived(spec_to_dict(parse_spec(MINIMAL_SPEC))) == stored
    assert "gpus" not in stored["deployment"] and parse_spec(stored).deployment.gpus == 1
    assert stored["method"] == "lora" and stored["resources"]["gpus"] == 1
    assert stored["resources"]["gpuType"] == "a100-80gb" and stored["evaluation"]["compareToBase"] is True
    assert stored["deployment"]["enabled"] is True and stored["dataset"]["format"] == "auto"


def test_partial_objects_get_the_same_defaults_in_both(validator: CRDValidator) -> None:
    spec = {
        **MINIMAL_SPEC,
        "lora": {"rank": 4},
        "evaluation": {"thresholds": [{"metric": "loss", "max": 2}]},
        "deployment": {"mode": "merged", "extraArgs": ["--enforce-eager"]},
    }
    stored = validator.admit(job(spec))["spec"]
    assert derived(spec_to_dict(parse_spec(spec))) == stored
    assert stored["lora"] == {"rank": 4, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]}


def test_camel_case_in_and_out_and_snake_case_by_name() -> None:
    spec = parse_spec({**MINIMAL_SPEC, "hyperparameters": {"maxSteps": 10, "learningRate": 0.001}})
    assert spec.hyperparameters.max_steps == 10 and spec.hyperparameters.learning_rate == 0.001
    by_name = FineTuneJobSpec(base_model=spec.base_model, dataset=spec.dataset, storage=spec.storage)
    assert spec_to_dict(by_name)["baseModel"] == {"uri": "hf://acme/base-7b"}


def test_error_names_the_field_path() -> None:
    bad = {**MINIMAL_SPEC, "hyperparameters": {"epochs": 0}}
    with pytest.raises(SpecError) as info:
        parse_finetunejob(job(bad))
    assert str(info.value) == "spec.hyperparameters.epochs: Input should be greater than or equal to 1"
    assert isinstance(info.value, ValueError)


def test_every_error_is_reported() -> None:
    bad = {
        "baseModel": {"uri": "file:///etc"},
        "dataset": {},
        "storage": {"output": "s3://x"},
        "method": "prefix",
        "evaluation": {"thresholds": [{"metric": "loss"}]},
    }
    with pytest.raises(SpecError) as info:
        parse_spec(bad)
    paths = {path for path, _ in info.value.errors}
    assert paths == {
        "spec.baseModel.uri",
        "spec.dataset.train",
        "spec.storage.output",
        "spec.method",
        "spec.evaluation.thresholds[0]",
    }


def test_types_are_strict_like_the_api_server() -> None:
    for field, value in [("epochs", "3"), ("packing", "true"), ("learningRate", "0.1"), ("seed", 1.5)]:
        with pytest.raises(SpecError) as info:
            parse_spec({**MINIMAL_SPEC, "hyperparameters": {field: value}})
        assert info.value.errors[0][0] == f"spec.hyperparameters.{field}"
    # an integer is a valid number, as in JSON
    parsed = parse_spec({**MINIMAL_SPEC, "hyperparameters": {"warmupRatio": 0}})
    assert parsed.hyperparameters.warmup_ratio == 0


@pytest.mark.parametrize(
    "uri",
    [
        "s3://my.bucket-1/models/llama",
        "s3://abc/x/",
        "s3://bucket/.config/x",
        "s3://bucket/..hidden/x",
        "hf://Qwen/Qwen2.5-0.5B-Instruct",
        "hf://meta-llama/Llama-3.1-8B",
        "pvc://model-cache",
        "pvc://model-cache/llama-3/",
        f"s3://{'b' * 63}/k",
    ],
)
def test_valid_uris_pass_both(uri: str, validator: CRDValidator) -> None:
    spec = {**MINIMAL_SPEC, "baseModel": {"uri": uri}}
    assert parse_spec(spec).base_model.uri == uri
    assert validator.admit(job(spec))["spec"]["baseModel"]["uri"] == uri


@pytest.mark.parametrize("output", ["s3://acme-runs", "s3://acme-runs/", "s3://acme-runs/team-a/finetune"])
def test_valid_outputs(output: str, validator: CRDValidator) -> None:
    spec = {**MINIMAL_SPEC, "storage": {"output": output}}
    assert parse_spec(spec).storage.output == output
    validator.admit(job(spec))


def test_output_next_to_the_data_is_fine(validator: CRDValidator) -> None:
    # a sibling prefix that merely starts with the same characters is not "under" it
    spec = {
        **MINIMAL_SPEC,
        "baseModel": {"uri": "s3://acme-data/model"},
        "storage": {"output": "s3://acme-data/model-runs"},
    }
    parse_spec(spec)
    validator.admit(job(spec))


def test_quantities_accept_ints_and_strings() -> None:
    spec = parse_spec({**MINIMAL_SPEC, "resources": {"cpu": 4, "memory": "16Gi"}})
    assert spec.resources.cpu == 4 and spec.resources.memory == "16Gi"


def test_status_round_trip_is_accepted_by_the_crd(validator: CRDValidator) -> None:
    now = datetime(2026, 11, 28, 14, 0, tzinfo=UTC)
    status = FineTuneJobStatus(
        phase=Phase.TRAINING,
        observed_generation=2,
        conditions=[
            Condition(
                type="Trained",
                status="False",
                reason="Running",
                message="step 40/200",
                last_transition_time=now,
                observed_generation=2,
            )
        ],
        progress=ProgressStatus(
            step=40,
            total_steps=200,
            epoch=0.8,
            loss=1.23,
            tokens_per_second=1234.5,
            eta_seconds=96,
            display="40/200 (20%)",
        ),
        evaluation=EvaluationStatus(
            passed=True,
            tuned={"exact_match": 0.62},
            base={"exact_match": 0.4},
            reasons=["exact_match 0.62 >= 0.5"],
            summary="passed",
        ),
        start_time=now,
        gpu_hours_estimate=1.5,
    )
    body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert body["progress"]["totalSteps"] == 200 and body["conditions"][0]["lastTransitionTime"].endswith("Z")
    admitted = validator.admit(job(MINIMAL_SPEC, body))
    assert admitted["status"] == body
    parsed = parse_finetunejob(admitted)
    assert parsed.status is not None and parsed.status.phase is Phase.TRAINING
    assert parsed.status.conditions is not None and parsed.status.conditions[0].last_transition_time == now


def test_status_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    parsed = parse_finetunejob(job(MINIMAL_SPEC, {"phase": "Serving", "newField": 1}))
    assert parsed.status is not None and parsed.status.phase is Phase.SERVING


def test_check_update_lists_every_immutable_change() -> None:
    old = parse_spec(MINIMAL_SPEC)
    changed = parse_spec(
        {**MINIMAL_SPEC, "method": "full", "hyperparameters": {"epochs": 1}, "deployment": {"replicas": 2}}
    )
    with pytest.raises(SpecError) as info:
        check_update(old, changed)
    assert [p for p, _ in info.value.errors] == ["spec.method", "spec.hyperparameters"]
    check_update(old, parse_spec({**MINIMAL_SPEC, "suspend": True, "deployment": {"replicas": 2}}))


def _uri_candidates() -> list[str]:
    schemes = ["s3://", "hf://", "pvc://", "s3:/", "S3://", "gs://", ""]
    hosts = [
        "acme-data",
        "ab",
        "a" * 63,
        "a" * 64,
        "my.bucket",
        "my..bucket",
        "-bad",
        "Org",
        "org_x",
        "x.y-z",
    ]
    paths = [
        "",
        "/",
        "/k",
        "/k/",
        "/a/b.jsonl",
        "//k",
        "/./k",
        "/../k",
        "/..k",
        "/.k",
        "/k/..",
        "/k k",
        "/k\n",
    ]
    return [s + h + p for s in schemes for h in hosts for p in paths]


def test_models_and_crd_agree_on_every_uri(validator: CRDValidator) -> None:
    from localcluster.crdvalidation import InvalidError

    accepted = 0
    for uri in _uri_candidates():
        spec = {**MINIMAL_SPEC, "dataset": {"train": uri}}
        try:
            parse_spec(spec)
            model_ok = True
        except SpecError:
            model_ok = False
        try:
            validator.admit(job(spec))
            crd_ok = True
        except InvalidError:
            crd_ok = False
        assert model_ok == crd_ok, uri
        accepted += model_ok
        if model_ok:
            assert "/../" not in uri + "/" and "/./" not in uri + "/" and "//" not in uri.split("://", 1)[1]
    assert 20 < accepted < len(_uri_candidates()) // 2
