"""OpenAI fine-tuning requests → FineTuneJobs the operator accepts, and FineTuneJobs (made by the API or with
kubectl) → OpenAI's job, events, checkpoints and list pages, field by field as docs/openai-api.md says."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from finetune_api.errors import ApiError
from finetune_api.history import to_checkpoints, to_events
from finetune_api.jobs import (
    ERROR_CODES,
    build_finetunejob,
    control_patch,
    new_job_name,
    openai_status,
    page,
    to_openai_job,
)
from finetune_api.mapping import ModelMapping, parse_mappings
from finetune_operator.api.conditions import Reason
from finetune_operator.api.finetunejob import parse_finetunejob, parse_spec
from finetune_operator.api.finetunejob_status import Phase

TINY = (
    "baseModel: {uri: s3://models/tiny-llama}\nstorage: {output: s3://runs/finetune, credentialsSecret: s3}\n"
)
POOL = TINY + "deployment: {server: shared-pool}\nhyperparameters: {learningRate: 0.001}\n"
NAME = "ftjob-0123456789abcdef0123"
T0 = int(datetime(2026, 12, 7, 1, tzinfo=UTC).timestamp())  # creationTimestamp of the jobs below
TRAIN = "s3://finetune-api/files/team-a/files/file-aaaaaaaaaaaaaaaaaaaaaaaa.jsonl"


def mapping(text: str = TINY) -> ModelMapping:
    valid, problems = parse_mappings({"m": text})
    assert not problems
    return valid["m"]


def build(
    request: dict[str, Any], text: str = TINY, objectives: tuple[str, ...] = ("sft",)
) -> dict[str, Any]:
    return build_finetunejob(
        {"model": "tiny-llama", "training_file": "file-aaaaaaaaaaaaaaaaaaaaaaaa", **request},
        "tiny-llama",
        mapping(text),
        namespace="team-a",
        name=NAME,
        training_uri=TRAIN,
        validation_uri=None,
        training_objectives=objectives,
    )


def refused(request: dict[str, Any], **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as exc:
        build(request, **kwargs)
    assert exc.value.status == 400
    return exc.value


# ---------------------------------------------------------------------------------------------- requests
def test_a_plain_request_builds_a_job_the_operator_accepts() -> None:
    job = build({"suffix": "support", "seed": 7, "metadata": {"team": "support"}})
    assert parse_finetunejob(job).spec.dataset.train == TRAIN
    assert job["metadata"]["name"] == NAME and job["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["labels"] == {"finetune.dev/api": "openai"}
    annotations = job["metadata"]["annotations"]
    assert annotations["finetune.dev/openai-model"] == "tiny-llama"
    assert annotations["finetune.dev/openai-training-file"] == "file-aaaaaaaaaaaaaaaaaaaaaaaa"
    assert annotations["finetune.dev/openai-suffix"] == "support"
    assert json.loads(annotations["finetune.dev/openai-metadata"]) == {"team": "support"}
    spec = job["spec"]
    assert spec["objective"] == "sft" and spec["hyperparameters"] == {"seed": 7}
    assert spec["deployment"] == {"servedModelName": "ft-tiny-llama-support-cdef0123"}
    assert spec["storage"] == {"output": "s3://runs/finetune", "credentialsSecret": "s3"}


def test_hyperparameters_map_and_the_multiplier_scales_the_base_rate() -> None:
    spec = build({"hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2}})["spec"]
    assert spec["hyperparameters"] == {"epochs": 2, "batchSize": 8, "learningRate": 2 * 2e-4}
    # the mapping's own rate is the base: 2 doubles it
    assert build({"hyperparameters": {"learning_rate_multiplier": 2}}, POOL)["spec"]["hyperparameters"] == {
        "learningRate": 0.002
    }
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert build({"hyperparameters": auto}, POOL)["spec"]["hyperparameters"] == {"learningRate": 0.001}


def test_method_supervised_and_dpo_with_beta() -> None:
    supervised = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4}}}
    assert build({"method": supervised})["spec"]["hyperparameters"] == {"epochs": 4}
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1}}}
    job = build({"method": dpo}, objectives=("dpo",))
    assert job["spec"]["objective"] == "dpo"
    assert job["spec"]["hyperparameters"] == {"beta": 0.25, "epochs": 1}
    assert parse_spec(job["spec"]).hyperparameters.beta == 0.25


def test_any_configmap_key_gives_a_valid_served_name() -> None:
    job = build_finetunejob(
        {"training_file": "file-1", "suffix": "a"},
        "My_Model.v2" + "x" * 200,
        mapping(),
        namespace="team-a",
        name=NAME,
        training_uri=TRAIN,
        validation_uri=None,
        training_objectives=("sft",),
    )
    served = job["spec"]["deployment"]["servedModelName"]
    assert served.startswith("ft-My-Model.v2xx") and served.endswith("-cdef0123") and len(served) <= 128
    parse_spec(job["spec"])


def test_a_pool_mapping_serves_under_a_stable_name() -> None:
    job = build({"suffix": "v-two"}, POOL)
    assert job["spec"]["deployment"] == {"server": "shared-pool", "modelName": "tiny-llama-v-two"}
    parse_spec(job["spec"])


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 101}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 2.5}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 2000}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"learning_rate_multiplier": 5000}}, "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta"),  # not for supervised
        ({"hyperparameters": {"warmup": 1}}, "hyperparameters.warmup"),
        ({"hyperparameters": [1]}, "hyperparameters"),
        (
            {"method": {"type": "supervised"}, "hyperparameters": {"n_epochs": 1}},
            "hyperparameters",
        ),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"method": {"type": ["dpo"]}}, "method.type"),
        ({"method": "dpo"}, "method"),
        ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo"),
        ({"method": {"type": "supervised", "supervised": {"lr": 1}}}, "method.supervised"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}}},
            "method.supervised.hyperparameters.n_epochs",
        ),
        ({"seed": -1}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"suffix": "Has Spaces"}, "suffix"),
        ({"suffix": "x" * 19}, "suffix"),
        ({"suffix": "-lead"}, "suffix"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
        ({"temperature": 1, "colour": "blue"}, "colour"),
        ({"training_file": None}, "training_file"),
    ],
)
def test_a_bad_request_names_the_openai_param(request_: dict[str, Any], param: str) -> None:
    error = refused(request_)
    assert error.param == param and error.message.startswith(f"{param}: ")
    assert error.body()["error"]["param"] == param


def test_unknown_fields_are_all_named() -> None:
    error = refused({"temperature": 1, "colour": "blue"})
    assert "colour, temperature" in error.message


def test_metadata_at_the_limits_is_accepted() -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    job = build({"metadata": metadata, "suffix": "x" * 18, "seed": 2_147_483_647, "integrations": None})
    assert json.loads(job["metadata"]["annotations"]["finetune.dev/openai-metadata"]) == metadata


def test_a_file_of_the_wrong_objective_is_invalid_training_file() -> None:
    error = refused({"method": {"type": "dpo"}}, objectives=("sft",))
    assert (error.code, error.param) == ("invalid_training_file", "training_file")
    assert "holds data for sft, not for objective dpo" in error.message


def test_a_spec_the_operator_refuses_is_a_400_naming_the_field() -> None:
    # a mapping for preference tuning: its gate measures a figure only dpo has
    text = TINY + "evaluation: {thresholds: [{metric: preference_accuracy, min: 0.6}]}\n"
    assert build({"method": {"type": "dpo"}}, text, ("dpo",))["spec"]["evaluation"]["thresholds"]
    error = refused({}, text=text)
    assert error.message.startswith("spec.evaluation") and "'m'" not in error.message
    assert "platform's settings for model 'tiny-llama'" in error.message


def test_new_job_names_are_valid_and_fresh() -> None:
    names = {new_job_name() for _ in range(50)}
    assert len(names) == 50 and all(re.fullmatch(r"ftjob-[0-9a-f]{20}", n) for n in names)
    parse_finetunejob({"metadata": {"name": names.pop()}, "spec": build({})["spec"]})


# ---------------------------------------------------------------------------------------------- reading jobs
def ftj(
    phase: str | None = None,
    reason: str | None = None,
    message: str = "",
    *,
    trained: bool = False,
    cancel: bool = False,
    suspend: bool = False,
    **status: Any,
) -> dict[str, Any]:
    job = build({"suffix": "s", "metadata": {"a": "b"}, "hyperparameters": {"learning_rate_multiplier": 3}})
    job["metadata"].update(creationTimestamp="2026-12-07T01:00:00Z", uid="u-1")
    if cancel:
        job["spec"]["cancel"] = True
    if suspend:
        job["spec"]["suspend"] = True
    conditions = []
    if reason:
        conditions.append({"type": "Ready", "status": "False", "reason": reason, "message": message})
    if trained:
        conditions.append(
            {
                "type": "Trained",
                "status": "True",
                "reason": "TrainingSucceeded",
                "message": "",
                "lastTransitionTime": "2026-12-07T01:30:00Z",
            }
        )
    job["status"] = {"phase": phase, "conditions": conditions, **status} if phase else status
    return job


@pytest.mark.parametrize(
    ("phase", "status"),
    [
        (None, "validating_files"),
        ("Pending", "validating_files"),
        ("Validating", "validating_files"),
        ("Suspended", "queued"),
        ("Training", "running"),
        ("Evaluating", "running"),
        ("Deploying", "running"),
        ("Serving", "succeeded"),
        ("Succeeded", "succeeded"),
        ("Rejected", "failed"),
        ("Failed", "failed"),
    ],
)
def test_every_phase_has_an_openai_status(phase: str | None, status: str) -> None:
    assert openai_status(ftj(phase)) == status


def test_every_phase_of_the_operator_is_mapped() -> None:
    assert {openai_status(ftj(p.value)) for p in Phase} <= {
        "validating_files",
        "queued",
        "running",
        "succeeded",
        "failed",
    }
    assert len({p.value for p in Phase}) == 10


def test_a_cancelled_job_is_cancelled_without_error() -> None:
    done = ftj(
        "Failed", "Cancelled", "cancelled (spec.cancel) while Training", completionTime="2026-12-07T02:00:00Z"
    )
    assert openai_status(done) == "cancelled"
    job = to_openai_job(done)
    assert job["error"] is None and job["finished_at"] == T0 + 3600
    # asked for, the operator not there yet
    assert openai_status(ftj("Training", cancel=True)) == "cancelled"
    # a job that failed before the cancel stays failed
    assert openai_status(ftj("Failed", "OutOfMemory", cancel=True)) == "failed"
    # the operator ignores a cancel of a job that ended: it stays succeeded
    assert openai_status(ftj("Succeeded", cancel=True)) == "succeeded"


def test_a_paused_job_is_queued_before_the_operator_suspends_it() -> None:
    # spec.suspend set, the phase not caught up yet: the caller sees the pause at once
    assert openai_status(ftj("Training", suspend=True)) == "queued"
    assert openai_status(ftj(None, suspend=True)) == "queued"
    job = to_openai_job(ftj("Training", suspend=True, progress={"etaSeconds": 60}))
    assert job["status"] == "queued" and job["estimated_finish"] is None
    # a job that has finished stays as it ended; a cancel wins over the pause
    assert openai_status(ftj("Succeeded", suspend=True)) == "succeeded"
    assert openai_status(ftj("Failed", "OutOfMemory", suspend=True)) == "failed"
    assert openai_status(ftj("Training", cancel=True, suspend=True)) == "cancelled"


@pytest.mark.parametrize("phase", [None, "Validating", "Training", "Evaluating", "Deploying"])
def test_pause_and_resume_patch_spec_suspend(phase: str | None) -> None:
    assert control_patch(ftj(phase), "pause") == {"spec": {"suspend": True}}
    assert control_patch(ftj(phase, suspend=True), "pause") is None  # already paused: nothing to change
    assert control_patch(ftj(phase, suspend=True), "resume") == {"spec": {"suspend": False}}
    assert control_patch(ftj("Suspended", suspend=True), "resume") == {"spec": {"suspend": False}}
    assert control_patch(ftj(phase), "cancel") == {"spec": {"cancel": True}}


def test_resuming_a_job_that_is_not_paused_is_refused() -> None:
    with pytest.raises(ApiError) as exc:
        control_patch(ftj("Training"), "resume")
    assert (exc.value.status, exc.value.code) == (400, "job_not_resumable")
    assert exc.value.message == f"Job {NAME} is not paused (status running): it cannot be resumed"


@pytest.mark.parametrize(
    ("job", "status"),
    [
        (ftj("Succeeded"), "succeeded"),
        (ftj("Serving", suspend=True), "succeeded"),
        (ftj("Failed", "OutOfMemory"), "failed"),
        (ftj("Rejected", "GateFailed"), "failed"),
        (ftj("Training", cancel=True), "been cancelled"),
        (ftj("Failed", "Cancelled", suspend=True), "been cancelled"),
    ],
)
@pytest.mark.parametrize(
    ("action", "code", "verb"),
    [
        ("pause", "job_not_pausable", "paused"),
        ("resume", "job_not_resumable", "resumed"),
        ("cancel", "job_not_cancellable", "cancelled"),
    ],
)
def test_a_finished_job_cannot_be_paused_resumed_or_cancelled(
    job: dict[str, Any], status: str, action: str, code: str, verb: str
) -> None:
    with pytest.raises(ApiError) as exc:
        control_patch(job, action)
    assert (exc.value.status, exc.value.code) == (400, code)
    assert exc.value.message == f"Job {NAME} has already {status}: it cannot be {verb}"


@pytest.mark.parametrize(
    ("reason", "code", "param"),
    [
        ("InvalidDataset", "invalid_training_file", "training_file"),
        ("GateFailed", "evaluation_failed", None),
        ("SafetyFailed", "evaluation_failed", None),
        ("PolicyViolation", "policy_violation", None),
        ("BudgetExceeded", "policy_violation", None),
        ("OutOfMemory", "server_error", None),
        ("SomethingNew", "server_error", None),
    ],
)
def test_a_failed_jobs_error_comes_from_the_ready_reason(reason: str, code: str, param: str | None) -> None:
    job = to_openai_job(ftj("Failed", reason, "line 3: not JSON"))
    assert job["status"] == "failed"
    assert job["error"] == {"code": code, "message": "line 3: not JSON", "param": param}


def test_every_failure_reason_has_an_error_code() -> None:
    not_failures = {
        "Pending",
        "Validating",
        "DatasetValid",
        "Queued",
        "Suspended",
        "Training",
        "Retrying",
        "TrainingSucceeded",
        "Evaluating",
        "GatePassed",
        "EvaluationDisabled",
        "Exporting",
        "Deploying",
        "DeploymentNotReady",
        "DeploymentAvailable",
        "DeploymentDisabled",
        "Serving",
        "Succeeded",
        "DatasetWarning",
        "LoadingAdapter",
        "AdapterLoaded",
        "AdapterUnloaded",
        "CheckingServing",
        "RollingOut",
        "Cancelled",
    }
    unmapped = {r.value for r in Reason} - set(ERROR_CODES) - not_failures
    assert not unmapped, f"map these Ready reasons to an OpenAI error code (docs/openai-api.md): {unmapped}"


def test_a_running_api_job_maps_every_field() -> None:
    job = to_openai_job(
        ftj(
            "Training",
            progress={"step": 12, "totalSteps": 216, "etaSeconds": 600},
            dataset={"trainTokens": 1000},
        ),
        now=1_000_000,
    )
    assert job == {
        "id": NAME,
        "object": "fine_tuning.job",
        "created_at": T0,
        "error": None,
        "fine_tuned_model": None,
        "finished_at": None,
        "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 3.0},
        "model": "tiny-llama",
        "organization_id": "team-a",
        "result_files": [],
        "seed": 42,
        "status": "running",
        "trained_tokens": None,
        "training_file": "file-aaaaaaaaaaaaaaaaaaaaaaaa",
        "validation_file": None,
        "integrations": None,
        "estimated_finish": 1_000_600,
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 3.0}
            },
        },
        "metadata": {"a": "b"},
        "user_provided_suffix": "s",
    }


def test_a_succeeded_job_names_its_model_and_counts_trained_tokens() -> None:
    done = ftj(
        "Serving",
        "Serving",
        trained=True,
        dataset={"trainTokens": 1000},
        endpoint={"url": "http://x", "model": "ft-tiny-llama-s-cdef0123"},
        completionTime="2026-12-07T02:00:00Z",
    )
    job = to_openai_job(done)
    assert (job["status"], job["fine_tuned_model"], job["trained_tokens"]) == (
        "succeeded",
        "ft-tiny-llama-s-cdef0123",
        3000,
    )
    assert job["finished_at"] == T0 + 3600 and job["estimated_finish"] is None


def test_a_job_made_with_kubectl_maps_too() -> None:
    kubectl = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-b", "creationTimestamp": "2026-12-07T01:00:00Z"},
        "spec": {
            "baseModel": {"uri": "hf://TinyLlama/TinyLlama-1.1B-Chat-v1.0"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "objective": "dpo",
            "hyperparameters": {"epochs": 2, "learningRate": 0.0004, "beta": 0.2, "seed": 0},
            "storage": {"output": "s3://runs/x"},
        },
        "status": {"phase": "Validating"},
    }
    job = to_openai_job(kubectl)
    assert (job["id"], job["model"], job["organization_id"], job["seed"]) == (
        "demo",
        "TinyLlama-1.1B-Chat-v1.0",
        "team-b",
        0,
    )
    assert job["training_file"] == "s3://data/train.jsonl" and job["metadata"] is None
    assert job["method"] == {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0, "beta": 0.2}
        },
    }
    assert job["status"] == "validating_files" and job["user_provided_suffix"] is None
    del kubectl["spec"]["hyperparameters"]["beta"]  # unset: TRL's default, which OpenAI calls "auto"
    assert to_openai_job(kubectl)["hyperparameters"]["beta"] == "auto"


# ---------------------------------------------------------------------------------------------- events
def event(
    name: str, reason: str, message: str, kind: str = "Normal", when: str = "2026-12-07T01:00:10Z"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "reason": reason,
        "message": message,
        "type": kind,
        "lastTimestamp": when,
    }


def test_events_and_progress_lines_newest_first_with_stable_ids() -> None:
    job = ftj("Failed", "OutOfMemory", "out of memory")
    k8s = [
        event("e1", "Validating", "validating the dataset"),
        event("e2", "Retrying", "pod evicted", "Warning", "2026-12-07T01:05:00Z"),
        {
            "metadata": {"name": "e3"},
            "reason": "OutOfMemory",
            "message": "train ran out of memory",
            "type": "Warning",
            "eventTime": "2026-12-07T01:09:00.123456Z",
        },
    ]
    progress = [
        {"event": "progress", "step": 0, "totalSteps": 216, "loss": None, "time": "2026-12-07T01:01:00"},
        {"event": "progress", "step": 12, "totalSteps": 216, "loss": 0.5, "time": "2026-12-07T01:02:00"},
        {
            "event": "progress",
            "step": 12,
            "totalSteps": 216,
            "loss": 0.41,
            "time": "2026-12-07T01:02:15",
        },  # heartbeat
        {"event": "progress", "step": 24, "totalSteps": 216, "loss": 0.3, "time": "2026-12-07T01:03:00"},
    ]
    events = to_events(job, k8s, progress)
    assert [e["message"] for e in events] == [
        "train ran out of memory",
        "pod evicted",
        "Step 24/216: training loss=0.3",
        "Step 12/216: training loss=0.41",
        "validating the dataset",
    ]
    assert [e["level"] for e in events] == ["error", "warn", "info", "info", "info"]
    assert [e["type"] for e in events] == ["message", "message", "metrics", "metrics", "message"]
    assert events[3]["data"] == {"step": 12, "total_steps": 216, "train_loss": 0.41}
    assert events[3]["created_at"] == T0 + 135
    assert all(re.fullmatch(r"ftevent-[0-9a-f]{24}", e["id"]) for e in events)
    assert len({e["id"] for e in events}) == 5
    assert [e["id"] for e in to_events(copy.deepcopy(job), k8s, progress)] == [e["id"] for e in events]
    assert {e["object"] for e in events} == {"fine_tuning.job.event"}


def test_events_k8s_io_events_map_too() -> None:
    new_style = {
        "metadata": {"name": "n", "creationTimestamp": "2026-12-07T01:00:00Z"},
        "reason": "Training",
        "note": "training started",
        "type": "Normal",
        "series": {"count": 2, "lastObservedTime": "2026-12-07T01:00:30.000000Z"},
    }
    [mapped] = to_events(ftj("Training"), [new_style], [])
    assert (mapped["message"], mapped["created_at"], mapped["level"]) == ("training started", T0 + 30, "info")


def test_the_same_warning_on_a_job_that_did_not_fail_is_a_warning() -> None:
    events = to_events(ftj("Training"), [event("e", "OutOfMemory", "retrying with less", "Warning")], [])
    assert events[0]["level"] == "warn"


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_named_never_by_uri() -> None:
    running = ftj(
        "Training",
        artifacts={"checkpoint": "s3://runs/finetune/team-a/x/u/checkpoints/step-00000040"},
        progress={"step": 40, "totalSteps": 216, "loss": 0.4},
    )
    [checkpoint] = to_checkpoints(running)
    assert checkpoint["object"] == "fine_tuning.job.checkpoint" and checkpoint["step_number"] == 40
    assert checkpoint["fine_tuned_model_checkpoint"] == f"{NAME}:ckpt-step-40"
    assert checkpoint["metrics"] == {"step": 40, "train_loss": 0.4}
    assert re.fullmatch(r"ftckpt-[0-9a-f]{24}", checkpoint["id"]) and checkpoint["fine_tuning_job_id"] == NAME
    done = ftj(
        "Serving",
        "Serving",
        trained=True,
        artifacts={"checkpoint": "s3://runs/finetune/team-a/x/u/checkpoints/step-00000200/"},
        progress={"step": 216, "totalSteps": 216, "loss": 0.2},
        endpoint={"model": "ft-tiny-llama-s-cdef0123"},
    )
    final, middle = to_checkpoints(done)
    assert (final["step_number"], final["fine_tuned_model_checkpoint"], final["metrics"]) == (
        216,
        "ft-tiny-llama-s-cdef0123",
        {"step": 216, "train_loss": 0.2},
    )
    assert middle["fine_tuned_model_checkpoint"] == "ft-tiny-llama-s-cdef0123:ckpt-step-200"
    assert all("s3://" not in json.dumps(c) for c in (final, middle))
    assert to_checkpoints(ftj("Validating")) == []


# ---------------------------------------------------------------------------------------------- pages
ITEMS = [{"id": f"ftjob-{i}"} for i in range(5)]


def test_pages_follow_the_after_cursor() -> None:
    first = page(ITEMS, None, 2)
    assert [i["id"] for i in first["data"]] == ["ftjob-0", "ftjob-1"] and first["has_more"] is True
    assert first["object"] == "list" and first["last_id"] == "ftjob-1"
    second = page(ITEMS, first["last_id"], 2)
    assert [i["id"] for i in second["data"]] == ["ftjob-2", "ftjob-3"] and second["has_more"] is True
    last = page(ITEMS, "ftjob-3", 2)
    assert [i["id"] for i in last["data"]] == ["ftjob-4"] and last["has_more"] is False
    assert page(ITEMS, None, 5)["has_more"] is False
    assert page([], None, 20) == {
        "object": "list",
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }


@pytest.mark.parametrize(
    ("after", "limit", "param"),
    [(None, 0, "limit"), (None, 101, "limit"), (None, True, "limit"), ("ftjob-9", 2, "after")],
)
def test_a_bad_page_request_names_the_param(after: str | None, limit: Any, param: str) -> None:
    with pytest.raises(ApiError) as exc:
        page(ITEMS, after, limit)
    assert (exc.value.status, exc.value.param) == (400, param)
