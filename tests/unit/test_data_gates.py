"""Data gates and serving limits, operator side: the defaults the spec carries, OOM in every stage's
podFailurePolicy, validation failures that read as validation (never a training hint), dataset warnings as a
condition message and an Event, and messages that never print '?' for a number."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator.api.finetunejob import DatasetSpec, parse_spec
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.config import load_config
from finetune_operator.finetunejob import builders
from finetune_operator.finetunejob.stages import trained_message, validated_message

from .ftj_factory import job, pending_pod, terminated_pod, with_status
from .test_state import VALID, World

CONFIG = load_config(env={})


def test_dataset_gate_defaults_follow_the_seed_guide() -> None:
    dataset = parse_spec(
        {
            "baseModel": {"uri": "s3://models/tiny"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "storage": {"output": "s3://runs/out"},
        }
    ).dataset
    assert dataset.max_error_rate == 0  # any invalid line fails
    assert dataset.max_line_bytes == 1024 * 1024
    assert dataset.min_train_examples == 20
    assert dataset.recommended_train_examples == 500
    assert dataset.max_test_fraction == 0.2
    # ... and a user may raise them explicitly.
    raised = DatasetSpec.model_validate({"train": "s3://data/train.jsonl", "maxErrorRate": 0.05})
    assert raised.max_error_rate == 0.05


def test_every_stage_job_fails_at_once_on_oom_kill_and_ignores_disruptions() -> None:
    ref = job()
    manifests = {
        Stage.VALIDATE: builders.validation_job(ref, CONFIG),
        Stage.TRAIN: builders.training_job(ref, CONFIG),
        Stage.EVALUATE: builders.evaluation_job(ref, CONFIG),
        Stage.EXPORT: builders.export_job(ref, CONFIG),
    }
    for stage, manifest in manifests.items():
        rules = manifest["spec"]["podFailurePolicy"]["rules"]
        assert rules[0]["action"] == "Ignore", stage  # a preempted pod killed after its grace period: not OOM
        fail = [r for r in rules if r["action"] == "FailJob"]
        codes = {c for r in fail for c in r["onExitCodes"]["values"]}
        assert {10, 11, 12, 137} <= codes, stage
        assert all(r["onExitCodes"]["containerName"] == "trainer" for r in fail)


def test_the_validate_job_has_its_own_memory_limit_and_no_gpu() -> None:
    manifest = builders.validation_job(job(resources={"gpus": 8, "memory": "500Gi"}), CONFIG)
    limits = manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"memory": CONFIG.defaults.validate_memory}


@pytest.mark.parametrize(
    ("exit_code", "pod_reason", "document"),
    [
        (137, "OOMKilled", ""),  # the kernel's OOM killer, as kubelet reports it
        (12, "Error", {"exitCode": 12, "message": "out of memory (MemoryError)"}),  # the trainer's own code
    ],
)
def test_validate_oom_fails_at_once_with_a_validation_message(
    exit_code: int, pod_reason: str, document: Any
) -> None:
    world = World(job())
    world.step()
    world.fail(Stage.VALIDATE, "PodFailurePolicy", exit_code, document, pod_reason=pod_reason)
    world.step()
    assert world.status["phase"] == "Failed"
    validated = world.condition["Validated"]
    assert validated["status"] == "False" and validated["reason"] == "OutOfMemory"
    message = world.status["message"]
    assert "validat" in message and "validateMemory" in message and "maxLineBytes" in message
    for training_hint in ("batchSize", "qlora", "gradientCheckpointing", "checkpoint"):
        assert training_hint not in message
    assert not any("checkpoint" in e.message for e in world.events)
    assert set(world.children) == {Stage.VALIDATE}


def test_a_retried_validate_pod_does_not_claim_to_resume_from_a_checkpoint() -> None:
    world = World(job())
    world.step()
    world.children[Stage.VALIDATE] = with_status(world.children[Stage.VALIDATE], failed_pods=1)
    world.pods[Stage.VALIDATE] = [
        terminated_pod("validate", 20, {"exitCode": 20, "message": "S3 unreachable"}, reason="Error"),
        pending_pod(created="2026-01-01T00:05:00Z"),
    ]
    result = world.step()
    retrying = [e for e in result.events if e.reason == "Retrying"]
    assert len(retrying) == 1
    assert "checkpoint" not in retrying[0].message and "validating" in retrying[0].message


def test_dataset_warnings_reach_the_validated_condition_and_an_event() -> None:
    world = World(job())
    world.step()
    small = {
        **VALID,
        "summary": {
            **VALID["summary"],
            "train": 32,
            "test": 8,
            "warnings": [
                "only 32 training examples; at least 500 are recommended (dataset.recommendedTrainExamples)",
                "testSize 100 reduced to 8 (dataset.maxTestFraction 20% of 40 valid examples)",
            ],
        },
    }
    world.finish(Stage.VALIDATE, small)
    result = world.step()
    validated = world.condition["Validated"]
    assert validated["status"] == "True"
    assert "32 training examples, 8 held out" in validated["message"]
    assert "at least 500" in validated["message"] and "reduced to 8" in validated["message"]
    warnings = [e for e in result.events if e.reason == "DatasetWarning"]
    assert [e.type for e in warnings] == ["Warning", "Warning"]
    assert "only 32 training examples" in warnings[0].message
    assert world.status["phase"] == "Training"  # a warning, not a failure
    again = world.step()
    assert not [e for e in again.events if e.reason == "DatasetWarning"]  # once, not on every reconcile


def test_trained_condition_never_prints_a_question_mark() -> None:
    world = World(job())
    world.step()
    world.finish(Stage.VALIDATE, {**VALID, "summary": {"format": "chat"}})  # no counts at all
    world.step()
    world.finish(Stage.TRAIN, {"stage": "train", "exitCode": 0, "summary": {"adapter": "s3://runs/a/"}})
    world.step()
    for condition in world.status["conditions"]:
        assert "?" not in condition["message"], condition
    assert world.condition["Trained"]["message"] == "training finished"
    assert world.condition["Validated"]["message"] == "dataset validated"


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        ({"step": 20, "loss": 0.41234}, "trained 20 steps, final loss 0.4123"),
        ({"step": 20}, "trained 20 steps"),
        ({"step": 20, "loss": float("nan")}, "trained 20 steps"),
        ({"loss": 1.5}, "training finished, final loss 1.5"),
        ({}, "training finished"),
    ],
)
def test_trained_message(progress: dict[str, Any], expected: str) -> None:
    assert trained_message(progress) == expected


def test_validated_message_names_only_known_numbers() -> None:
    assert validated_message({"train": 32, "test": 8}) == "32 training examples, 8 held out"
    assert validated_message({}, ["few"]) == "dataset validated; warning: few"
