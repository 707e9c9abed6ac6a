"""spec.tracking.mlflow on the operator's side: defaults resolved once, credentials by reference only, the
trainer's `tracking` summaries copied into status.tracking (degraded stays visible), and one gate rule for the
operator and the evaluator."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from finetune_operator.api.finetunejob import parse_spec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.api.schema import SpecError
from finetune_operator.config import load_config
from finetune_operator.finetunejob import builders, tracking
from finetune_operator.finetunejob.gate import evaluate_gate
from finetune_trainer import tracking as trainer_tracking
from finetune_trainer.config import parse_config

from .ftj_factory import job
from .test_state import EVAL_BAD, EVAL_GOOD, TRAINED, VALID, World, _to_training

URI = "http://mlflow.mlflow.svc:5000"
CONFIG = load_config(env={})


def _ftj_config(ref: Any, config: Any = CONFIG) -> dict[str, Any]:
    env = builders.training_job(ref, config)["spec"]["template"]["spec"]["containers"][0]["env"]
    document: dict[str, Any] = json.loads(next(e["value"] for e in env if e["name"] == "FTJ_CONFIG"))
    return document


def test_defaults_are_resolved_for_the_trainer_experiment_namespace_and_model_name() -> None:
    ref = job(namespace="team-a", name="shout", tracking={"mlflow": {"trackingUri": URI}})
    assert _ftj_config(ref)["tracking"]["mlflow"] == {
        "trackingUri": URI,
        "experiment": "team-a",
        "registerModel": "shout",
        "image": CONFIG.images.trainer,
        "allowPlainHttpHosts": [],
    }
    served = job(deployment={"servedModelName": "shout-bot"}, tracking={"mlflow": {"trackingUri": URI}})
    assert _ftj_config(served)["tracking"]["mlflow"]["registerModel"] == "shout-bot"
    pooled = job(
        deployment={"servedModelName": "x", "server": "pool", "modelName": "support-bot"},
        tracking={"mlflow": {"trackingUri": URI}},
    )
    assert _ftj_config(pooled)["tracking"]["mlflow"]["registerModel"] == "support-bot"
    named = job(tracking={"mlflow": {"trackingUri": URI, "experiment": "x/y", "registerModel": "m"}})
    assert _ftj_config(named)["tracking"]["mlflow"]["experiment"] == "x/y"
    assert _ftj_config(named)["tracking"]["mlflow"]["registerModel"] == "m"


def test_plain_http_for_the_token_goes_only_where_the_platform_allows_it() -> None:
    """The reference's allow-list, plus the host of the platform's own http defaultTrackingUri."""
    tracked = job(tracking={"mlflow": {"trackingUri": "http://192.0.2.7:5000"}})
    platform = load_config(
        env={"FTO_REFERENCE_PLAIN_HTTP_HOSTS": "10.0.0.0/8", "FTO_MLFLOW_TRACKING_URI": URI}
    )
    settings = parse_config(_ftj_config(tracked, platform)).tracking.mlflow
    assert settings is not None and settings.allow_plain_http_hosts == ["10.0.0.0/8", "mlflow.mlflow.svc"]
    refusal = trainer_tracking.egress_refusal(settings)
    assert (refusal or "").startswith("spec.tracking.mlflow.trackingUri: http://192.0.2.7: plain http")
    https = load_config(env={"FTO_MLFLOW_TRACKING_URI": "https://mlflow.example.com"})
    assert _ftj_config(tracked, https)["tracking"]["mlflow"]["allowPlainHttpHosts"] == []


def test_untracked_jobs_carry_no_tracking_unless_the_operator_tracks_all() -> None:
    assert "tracking" not in _ftj_config(job())
    config = load_config(env={"FTO_MLFLOW_TRACKING_URI": URI})
    assert config.tracking.mlflow.default_tracking_uri == URI
    assert "tracking" not in _ftj_config(job(), config)
    assert _ftj_config(job(tracking={"mlflow": {}}), config)["tracking"]["mlflow"]["trackingUri"] == URI
    everyone = config.model_copy(
        update={
            "tracking": config.tracking.model_copy(
                update={"mlflow": config.tracking.mlflow.model_copy(update={"track_all_jobs": True})}
            )
        }
    )
    assert _ftj_config(job(), everyone)["tracking"]["mlflow"]["trackingUri"] == URI
    # Asked for, but no URI anywhere: the trainer is told (null) and reports tracking degraded.
    assert _ftj_config(job(tracking={"mlflow": {}}))["tracking"]["mlflow"]["trackingUri"] is None


def test_credentials_reach_every_stage_by_secret_reference_only() -> None:
    ref = job(tracking={"mlflow": {"trackingUri": URI, "credentialsSecret": "mlflow-creds"}})
    for build in (builders.validation_job, builders.training_job, builders.evaluation_job):
        env = build(ref, CONFIG)["spec"]["template"]["spec"]["containers"][0]["env"]
        credentials = {e["name"]: e for e in env if e["name"].startswith("MLFLOW_")}
        assert set(credentials) == set(tracking.CREDENTIAL_KEYS)
        for item in credentials.values():
            assert "value" not in item
            assert item["valueFrom"]["secretKeyRef"] == {
                "name": "mlflow-creds",
                "key": item["name"],
                "optional": True,
            }
    plain = builders.training_job(job(tracking={"mlflow": {"trackingUri": URI}}), CONFIG)
    assert not [e for e in plain["spec"]["template"]["spec"]["containers"][0]["env"] if "MLFLOW" in e["name"]]


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"trackingUri": "file:///etc/passwd"}, "spec.tracking.mlflow.trackingUri"),
        ({"trackingUri": "http://x y"}, "spec.tracking.mlflow.trackingUri"),
        ({"registerModel": "../evil"}, "spec.tracking.mlflow.registerModel"),
        ({"credentialsSecret": "Not_A_Name"}, "spec.tracking.mlflow.credentialsSecret"),
        ({"tokn": "x"}, "spec.tracking.mlflow.tokn"),
    ],
)
def test_bad_tracking_sections_are_refused_naming_the_field(section: dict[str, Any], field: str) -> None:
    raw = copy.deepcopy(job().spec.model_dump(by_alias=True, exclude_none=True, mode="json"))
    raw["tracking"] = {"mlflow": section}
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    assert field in str(caught.value)


def _with_tracking(document: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(document)
    out["summary"]["tracking"] = block
    return out


RUN = {
    "runId": "abc123",
    "experimentId": "1",
    "runUrl": f"{URI}/#/experiments/1/runs/abc123",
    "degraded": False,
}


def test_status_tracking_follows_the_stage_summaries_and_degraded_stays_visible() -> None:
    world = World(job(tracking={"mlflow": {"trackingUri": URI}}))
    world.step()
    world.finish(Stage.VALIDATE, _with_tracking(VALID, RUN))
    world.step()
    assert world.status["tracking"] == RUN
    degraded = {**RUN, "degraded": True, "message": "log metrics failed: ConnectionError"}
    world.finish(Stage.TRAIN, _with_tracking(TRAINED, degraded))
    world.step()
    world.finish(
        Stage.EVALUATE,
        _with_tracking(
            EVAL_GOOD, {"degraded": False, "registeredModel": "demo", "registeredVersion": "3", **RUN}
        ),
    )
    world.step()
    status = world.status["tracking"]
    assert status["registeredVersion"] == "3" and status["registeredModel"] == "demo"
    assert status["degraded"] is True and "log metrics failed" in status["message"]
    world.step()  # later passes (serving) keep it
    assert world.status["tracking"] == status


def test_a_rejected_job_shows_its_run_and_no_version() -> None:
    world = World(job(tracking={"mlflow": {"trackingUri": URI}}))
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    world.finish(Stage.EVALUATE, _with_tracking(EVAL_BAD, RUN))
    world.step()
    assert world.status["phase"] == "Rejected"
    assert world.status["tracking"]["runId"] == "abc123"
    assert "registeredVersion" not in world.status["tracking"]


def test_untracked_jobs_have_no_status_tracking() -> None:
    world = World(job())
    _to_training(world)
    assert "tracking" not in world.status


@pytest.mark.parametrize(
    ("evaluation", "tuned", "base"),
    [
        ({}, {"loss": 0.5, "exact_match": 0.8}, {"loss": 2.0, "exact_match": 0.1}),
        ({}, {"loss": 2.5, "exact_match": 0.0}, {"loss": 2.0, "exact_match": 0.1}),
        ({"thresholds": [{"metric": "exact_match", "min": 0.9}]}, {"exact_match": 0.8}, {"exact_match": 0.1}),
        ({"minImprovement": 0.5, "primaryMetric": "loss"}, {"loss": 1.2}, {"loss": 2.0}),
        ({"minImprovement": 0.3, "primaryMetric": "loss"}, {"loss": 1.2}, {"loss": 2.0}),
        ({"compareToBase": False, "thresholds": [{"metric": "loss", "max": 1}]}, {"loss": 0.9}, None),
    ],
)
def test_the_evaluator_decides_registration_with_the_operators_gate(
    evaluation: dict[str, Any], tuned: dict[str, float], base: dict[str, float] | None
) -> None:
    ref = job(evaluation=evaluation, tracking={"mlflow": {"trackingUri": URI}})
    operator = evaluate_gate(ref.spec.evaluation, tuned, base)
    trainer = trainer_tracking.gate_decision(parse_config(_ftj_config(ref)), tuned, base)
    assert (trainer.passed, trainer.reasons) == (operator.passed, operator.reasons)


@pytest.mark.parametrize(
    ("evaluation", "summary"),
    [
        (
            {
                "safety": {
                    "prompts": "s3://data/red.jsonl",
                    "judge": {"url": "https://j.example/v1", "model": "m"},
                }
            },
            {"safety": {"tuned": 0.2, "base": 0.0, "prompts": 10}},
        ),
        (
            {"retention": {"dataset": "s3://data/general.jsonl", "metric": "loss", "maxDrop": 0.05}},
            {"retention": {"metric": "loss", "base": 1.0, "tuned": 1.5, "examples": 8}},
        ),
    ],
)
def test_a_model_rejected_for_safety_or_retention_is_not_registered(
    evaluation: dict[str, Any], summary: dict[str, Any]
) -> None:
    """The evaluator's registration decision applies the operator's safety and retention verdicts too."""
    ref = job(evaluation=evaluation, tracking={"mlflow": {"trackingUri": URI}})
    tuned, base = {"token_f1": 0.9, "loss": 0.5}, {"token_f1": 0.5, "loss": 0.9}
    operator = evaluate_gate(ref.spec.evaluation, tuned, base, summary)
    trainer = trainer_tracking.gate_decision(parse_config(_ftj_config(ref)), tuned, base, summary)
    assert not operator.passed
    assert (trainer.passed, trainer.reasons) == (operator.passed, operator.reasons)


def test_the_operator_install_stays_free_of_mlflow() -> None:
    """Only the trainer image and the dev environment get MLflow; the operator never imports it."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in dependencies if "mlflow" in d.lower()]
    trainer = (root / "trainer-image" / "requirements.txt").read_text()
    assert "mlflow-skinny==3.17.2" in trainer.splitlines()
    probe = (
        "import sys, finetune_operator.__main__, finetune_operator.finetunejob.controller, "
        "finetune_operator.finetunejob.tracking; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'mlflow_skinny')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
