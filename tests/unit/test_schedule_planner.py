"""The FineTuneSchedule planner (pure): when a run starts (cron, missed runs, startingDeadlineSeconds, the
trigger's count), what its data Job and FineTuneJob are, concurrency, history, suspend, and template errors
named before any Job exists."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from finetune_operator.api.finetunejob import parse_spec
from finetune_operator.config import load_config
from finetune_operator.finetuneschedule import builders
from finetune_operator.finetuneschedule.controller import data_view, run_view
from finetune_operator.finetuneschedule.planner import (
    DataJobView,
    RunView,
    ScheduleObserved,
    SchedulePlan,
    plan_schedule,
)

from .ftj_factory import terminated_pod

CONFIG = load_config(env={})
NOW = datetime(2026, 12, 7, 3, 0, 20, tzinfo=UTC)  # a Monday, 20 s after 03:00
UID = "5c4f0e7a-0000-4000-8000-000000000001"
SERVER = {
    "metadata": {"name": "support", "namespace": "team-a"},
    "spec": {"capture": {"destination": "s3://capture/", "redact": ["email"]}},
}


def spec(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "schedule": "0 3 * * 1",
        "dataset": {
            "base": "s3://data/train.jsonl",
            "fromCapture": {"modelServer": "support", "model": "support-bot"},
        },
        "jobTemplate": {
            "metadata": {"labels": {"team": "a"}},
            "spec": {
                "baseModel": {"uri": "s3://models/tiny"},
                "dataset": {"test": "s3://data/test.jsonl"},
                "storage": {"output": "s3://runs/out", "credentialsSecret": "s3-creds"},
                "resources": {"gpus": 0, "gpuType": "cpu"},
                "deployment": {"server": "support", "modelName": "support-bot"},
            },
        },
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None}


def observe(
    raw: Mapping[str, Any] | None = None,
    *,
    status: Mapping[str, Any] | None = None,
    now: datetime = NOW,
    created: datetime = NOW - timedelta(days=1),
    data_jobs: tuple[DataJobView, ...] = (),
    runs: tuple[RunView, ...] = (),
    server: Mapping[str, Any] | None = SERVER,
) -> ScheduleObserved:
    return ScheduleObserved(
        namespace="team-a",
        name="nightly",
        uid=UID,
        generation=1,
        created=created,
        spec=raw if raw is not None else spec(),
        status=status or {},
        now=now,
        data_jobs=data_jobs,
        runs=runs,
        server=server,
    )


def plan(observed: ScheduleObserved) -> SchedulePlan:
    return plan_schedule(observed, CONFIG)


def ftj_config(job: Mapping[str, Any]) -> dict[str, Any]:
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    found: dict[str, Any] = json.loads(next(e["value"] for e in env if e["name"] == "FTJ_CONFIG"))
    return found


def run(n: int, phase: str | None, uid: str | None = None) -> RunView:
    return RunView(f"nightly-{n}", n, uid or f"uid-{n}", "2026-12-01T00:00:00Z", phase, None, 10)


def ready_data(n: int = 1, **summary: Any) -> DataJobView:
    document = {
        "ready": True,
        "newExamples": 600,
        "train": f"s3://runs/out/schedules/team-a/nightly/{n}/train.jsonl",
        "cutoff": "2026-12-07T03:00:20Z",
        "examples": {
            "base": 100,
            "captured": 600,
            "corrected": 3,
            "duplicates": 2,
            "heldOut": 1,
            "total": 700,
        },
        **summary,
    }
    return DataJobView(f"nightly-{n}-data", n, "trigger", None, "2026-12-07T03:00:20Z", "succeeded", document)


# ------------------------------------------------------------------------------------------------ cron
def test_a_due_cron_run_creates_the_data_job() -> None:
    planned = plan(observe())
    assert [m["kind"] for m in planned.create] == ["Job"]
    job = planned.create[0]
    assert job["metadata"]["name"] == "nightly-1-data"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneSchedule"
    assert job["metadata"]["ownerReferences"][0]["uid"] == UID
    assert job["metadata"]["labels"][builders.LABEL_SCHEDULE_UID] == UID
    assert ftj_config(job) == {
        "stage": "assemble",
        "assemble": {
            "base": "s3://data/train.jsonl",
            "test": "s3://data/test.jsonl",
            "capture": {
                "prefix": "s3://capture/team-a/support",
                "model": "support-bot",
                "minRating": 1,
                "redact": ["email"],
            },
            "since": None,
            "until": "2026-12-07T03:00:20Z",
            "minNewExamples": 0,
            "objective": "sft",
            "output": "s3://runs/out/schedules/team-a/nightly/1/train.jsonl",
            "baseModel": {"uri": "s3://models/tiny", "revision": None},
            "maxSeqLength": 2048,  # the template's default: validate's budget
            "maxCompletionLength": None,
        },
    }
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][-1] == "assemble"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]  # by reference, never read
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert pod["automountServiceAccountToken"] is False
    assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {}))
    assert planned.status["lastScheduleTime"] == "2026-12-07T03:00:00Z"
    assert planned.status["nextScheduleTime"] == "2026-12-14T03:00:00Z"
    assert planned.status["missedRuns"] == 0


def test_the_data_job_gets_the_templates_token_budget_and_its_base_models_claim() -> None:
    """assemble leaves out a captured chat the run's validate stage would refuse: it needs the template's
    tokenizer (a pvc:// one mounted, as for validate) and budget."""
    raw = spec()
    exact = {"name": "exact", "type": "stringCheck", "stringCheck": {"operation": "equals"}}
    raw["jobTemplate"]["spec"] |= {
        "objective": "grpo",
        "evaluation": {"graders": [exact]},
        "rewards": [{"grader": "exact"}],
        "baseModel": {"uri": "pvc://models/tiny", "revision": "v2"},
        "hyperparameters": {"maxSeqLength": 512, "maxCompletionLength": 128},
    }
    job = plan(observe(raw)).create[0]
    section = ftj_config(job)["assemble"]
    assert section["baseModel"] == {"uri": "pvc://models/tiny", "revision": "v2"}
    assert (section["maxSeqLength"], section["maxCompletionLength"]) == (512, 128)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    claim = {"claimName": "models", "readOnly": True}
    mounted = [v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim") == claim]
    assert len(mounted) == 1
    assert {"name": mounted[0], "mountPath": "/mnt/pvc/models", "readOnly": True} in container["volumeMounts"]
    assert {"name": "FTJ_PVC_MODELS", "value": "/mnt/pvc/models"} in container["env"]


def test_not_due_creates_nothing_and_wakes_at_the_next_fire_time() -> None:
    status = {"lastScheduleTime": "2026-12-07T03:00:00Z"}
    planned = plan(observe(status=status, now=NOW + timedelta(hours=1)))
    assert planned.create == []
    assert planned.requeue_at == NOW + timedelta(hours=1, minutes=10)  # resync: next run in a week


def test_next_wake_is_the_fire_time_when_it_comes_first() -> None:
    raw = spec(schedule="*/5 * * * *")
    planned = plan(observe(raw, status={"lastScheduleTime": "2026-12-07T03:00:00Z"}))
    assert planned.create == [] and planned.requeue_at == datetime(2026, 12, 7, 3, 5, tzinfo=UTC)


def test_missed_runs_without_a_deadline_run_the_newest_once() -> None:
    raw = spec(schedule="0 3 * * *")
    planned = plan(observe(raw, created=NOW - timedelta(days=5)))
    assert [m["metadata"]["name"] for m in planned.create] == ["nightly-1-data"]
    assert planned.status["lastScheduleTime"] == "2026-12-07T03:00:00Z"
    assert planned.status["missedRuns"] == 4
    assert any(e[1] == "MissedSchedule" for e in planned.events)


def test_a_run_missed_by_more_than_the_starting_deadline_is_skipped() -> None:
    raw = spec(schedule="0 3 * * *", startingDeadlineSeconds=600)
    late = NOW + timedelta(hours=2)
    planned = plan(observe(raw, created=NOW - timedelta(days=2), now=late))
    assert planned.create == []
    assert planned.status["missedRuns"] == 2 and planned.status["lastScheduleTime"] == "2026-12-07T03:00:00Z"
    assert [(e[0], e[1]) for e in planned.events] == [("Warning", "MissedSchedule")]
    # within the deadline it runs
    within = plan(observe(raw, created=NOW - timedelta(days=2), now=NOW + timedelta(minutes=5)))
    assert [m["kind"] for m in within.create] == ["Job"]


def test_cron_in_a_time_zone() -> None:
    raw = spec(schedule="0 3 * * 1", timeZone="Europe/Berlin")  # 03:00 Berlin = 02:00 UTC in December
    planned = plan(observe(raw, now=datetime(2026, 12, 7, 2, 0, 5, tzinfo=UTC)))
    assert planned.status["lastScheduleTime"] == "2026-12-07T02:00:00Z" and len(planned.create) == 1


# --------------------------------------------------------------------------------------------- trigger
def trigger_spec(**overrides: Any) -> dict[str, Any]:
    return spec(schedule=None, trigger={"newExamples": 500, "checkSeconds": 60}, **overrides)


def test_the_trigger_counts_with_a_data_job_every_check_seconds() -> None:
    planned = plan(observe(trigger_spec()))
    assert len(planned.create) == 1
    assert ftj_config(planned.create[0])["assemble"]["minNewExamples"] == 500
    assert planned.status["lastTriggerCheck"] == "2026-12-07T03:00:20Z"
    soon = plan(observe(trigger_spec(), status={"lastTriggerCheck": "2026-12-07T03:00:00Z"}))
    assert soon.create == [] and soon.requeue_at == datetime(2026, 12, 7, 3, 1, tzinfo=UTC)


def test_not_enough_new_examples_only_updates_the_count() -> None:
    data = DataJobView(
        "nightly-1-data", 1, "trigger", None, "t", "succeeded", {"ready": False, "newExamples": 42}
    )
    planned = plan(
        observe(trigger_spec(), data_jobs=(data,), status={"lastTriggerCheck": "2026-12-07T03:00:00Z"})
    )
    assert planned.create == [] and planned.delete == [("Job", "nightly-1-data")]
    assert planned.status["newExamples"] == 42 and planned.status["lastRun"] == 0


def test_a_ready_data_job_becomes_the_runs_finetunejob() -> None:
    status = {"cutoff": "2026-12-01T00:00:00Z", "lastTriggerCheck": "2026-12-07T03:00:00Z"}
    planned = plan(observe(trigger_spec(), data_jobs=(ready_data(),), status=status))
    assert [m["kind"] for m in planned.create] == ["FineTuneJob"] and planned.delete == []
    job = planned.create[0]
    meta = job["metadata"]
    assert meta["name"] == "nightly-1" and meta["labels"][builders.LABEL_SCHEDULE] == "nightly"
    assert meta["labels"]["team"] == "a"  # the template's metadata
    assert meta["ownerReferences"][0]["uid"] == UID and meta["ownerReferences"][0]["controller"] is True
    sources = json.loads(meta["annotations"][builders.ANNOTATION_SOURCES])
    assert sources == {
        "base": 100,
        "captured": 600,
        "corrected": 3,
        "duplicates": 2,
        "heldOut": 1,
        "total": 700,
    }
    parsed = parse_spec(job["spec"])
    assert parsed.dataset.train == "s3://runs/out/schedules/team-a/nightly/1/train.jsonl"
    assert parsed.dataset.test == "s3://data/test.jsonl"
    assert planned.status["cutoff"] == "2026-12-07T03:00:20Z" and planned.status["lastRun"] == 1
    # once the FineTuneJob exists, the data Job goes
    after = plan(
        observe(trigger_spec(), data_jobs=(ready_data(),), runs=(run(1, "Validating"),), status=status)
    )
    assert after.create == [] and after.delete == [("Job", "nightly-1-data")]


def test_the_next_run_assembles_since_the_last_cutoff() -> None:
    status = {"cutoff": "2026-12-01T00:00:00Z", "lastRun": 3}
    planned = plan(observe(trigger_spec(), status=status, runs=(run(3, "Serving"),)))
    assert planned.create[0]["metadata"]["name"] == "nightly-4-data"
    assert ftj_config(planned.create[0])["assemble"]["since"] == "2026-12-01T00:00:00Z"


def test_a_failed_data_job_is_reported_and_removed() -> None:
    data = DataJobView(
        "nightly-1-data", 1, "cron", None, "t", "failed", {}, "line 3 of s3://data/train.jsonl: bad"
    )
    planned = plan(observe(data_jobs=(data,)))
    assert planned.create == [] and planned.delete == [("Job", "nightly-1-data")]
    assert ("Warning", "AssembleFailed") in [(e[0], e[1]) for e in planned.events]
    assert "line 3" in planned.status["message"]


def test_nothing_starts_while_a_data_job_is_in_flight() -> None:
    data = DataJobView("nightly-1-data", 1, "trigger", None, "t", "running")
    planned = plan(observe(data_jobs=(data,)))
    assert planned.create == [] and planned.delete == [] and planned.status["active"] == ["nightly-1-data"]


# ---------------------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("phase", ["Training", "Suspended"])
def test_forbid_waits_while_a_run_is_active(phase: str) -> None:
    # Suspended: a run over the FineTunePolicy budget waits for it, so the next run waits too (no pile-up)
    planned = plan(observe(runs=(run(1, phase),), status={"lastRun": 1}))
    assert planned.create == [] and planned.delete == []
    assert "nightly-1 is active" in planned.status["message"] and "lastScheduleTime" not in planned.status
    trigger = plan(observe(trigger_spec(), runs=(run(1, "Evaluating"),), status={"lastRun": 1}))
    assert trigger.create == []


def test_replace_deletes_the_active_run_first() -> None:
    raw = spec(concurrencyPolicy="Replace")
    planned = plan(observe(raw, runs=(run(1, "Training"), run(0, "Serving")), status={"lastRun": 1}))
    assert planned.delete == [("FineTuneJob", "nightly-1")]  # never an ended one
    assert [m["metadata"]["name"] for m in planned.create] == ["nightly-2-data"]
    assert ("Normal", "RunReplaced") in [(e[0], e[1]) for e in planned.events]


def test_replace_on_a_ready_trigger() -> None:
    raw = trigger_spec(concurrencyPolicy="Replace")
    planned = plan(
        observe(raw, data_jobs=(ready_data(2),), runs=(run(1, "Training"),), status={"lastRun": 1})
    )
    assert planned.delete == [("FineTuneJob", "nightly-1")]
    assert [m["metadata"]["name"] for m in planned.create] == ["nightly-2"]


@pytest.mark.parametrize("phase", ["Succeeded", "Failed", "Rejected", "Serving"])
def test_ended_runs_do_not_block(phase: str) -> None:
    planned = plan(observe(runs=(run(1, phase),), status={"lastRun": 1}))
    assert [m["metadata"]["name"] for m in planned.create] == ["nightly-2-data"]


# ---------------------------------------------------------------------------------------------- history
def served_by(uid: str) -> dict[str, Any]:
    versions = [{"version": 1, "name": "support-bot-v1", "adapter": "s3://runs/a", "jobUid": uid}]
    return {
        **SERVER,
        "status": {"models": {"support-bot": {"versions": versions, "promoted": 1, "serving": 1}}},
    }


def test_history_keeps_the_newest_and_never_the_serving_run() -> None:
    runs = (run(1, "Serving"), run(2, "Rejected"), run(3, "Failed"), run(4, "Succeeded"), run(5, "Training"))
    raw = spec(historyLimit=1, suspend=True)
    planned = plan(observe(raw, runs=runs, server=served_by("uid-1"), status={"lastRun": 5}))
    assert sorted(planned.delete) == [("FineTuneJob", "nightly-2"), ("FineTuneJob", "nightly-3")]
    assert planned.status["serving"] == "nightly-1"
    assert [(r["name"], r["serving"]) for r in planned.status["runs"]] == [
        ("nightly-5", False),
        ("nightly-4", False),
        ("nightly-3", False),
        ("nightly-2", False),
        ("nightly-1", True),
    ]
    assert planned.status["latest"] == "nightly-5"
    zero = plan(observe(spec(historyLimit=0, suspend=True), runs=runs, server=served_by("uid-4")))
    assert ("FineTuneJob", "nightly-4") not in zero.delete and len(zero.delete) == 3


# ---------------------------------------------------------------------------------------------- suspend
def test_suspend_starts_nothing() -> None:
    planned = plan(observe(spec(suspend=True)))
    assert planned.create == []
    assert planned.status["conditions"][0]["reason"] == "Suspended"
    ready = plan(observe(spec(suspend=True), data_jobs=(ready_data(),)))
    assert ready.create == [] and ready.delete == [("Job", "nightly-1-data")]


# ------------------------------------------------------------------------------------------ bad specs
def template_with(**changes: Any) -> dict[str, Any]:
    raw = spec()
    template = json.loads(json.dumps(raw["jobTemplate"]))
    for key, value in changes.items():
        template["spec"][key] = value
    return {**raw, "jobTemplate": template}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (
            template_with(dataset={"train": "s3://d/t.jsonl", "test": "s3://d/x.jsonl"}),
            "jobTemplate.spec.dataset.train",
        ),
        (template_with(dataset={}), "spec.jobTemplate.spec.dataset.test"),
        (template_with(hyperparameters={"epochs": 0}), "spec.jobTemplate.spec.hyperparameters.epochs"),
        (template_with(bogus=1), "spec.jobTemplate.spec.bogus"),
        (spec(schedule="0 25 * * *"), "spec.schedule: hour field: 25 is outside 0-23"),
        (spec(timeZone="Mars/Olympus"), "spec.timeZone"),
        (spec(schedule=None), "set schedule, trigger or both"),
        (
            spec(trigger={"newExamples": 5}, dataset={"base": "s3://data/train.jsonl"}),
            "needs dataset.fromCapture",
        ),
    ],
)
def test_spec_errors_are_named_before_any_job(raw: dict[str, Any], field: str) -> None:
    planned = plan(observe(raw))
    assert planned.create == [] and planned.delete == []
    assert field in planned.status["message"]
    assert planned.status["conditions"][0]["status"] == "False"
    assert planned.status["conditions"][0]["reason"] == "InvalidSpec"
    assert [(e[0], e[1]) for e in planned.events] == [("Warning", "InvalidSpec")]
    again = plan(observe(raw, status={"message": planned.status["message"]}))
    assert again.events == []  # the Event is posted once per error


def test_capture_off_waits_naming_the_pool() -> None:
    planned = plan(observe(server={"metadata": {"name": "support"}, "spec": {}}))
    assert planned.create == [] and "spec.capture" in planned.status["message"]
    missing = plan(observe(server=None))
    assert missing.create == [] and "support" in missing.status["message"]


# ------------------------------------------------------------------------------------- observed views
def test_the_data_jobs_summary_is_read_from_the_termination_message() -> None:
    job = {
        "metadata": {
            "name": "nightly-1-data",
            "uid": "job-uid",
            "annotations": {
                builders.ANNOTATION_RUN: "1",
                builders.ANNOTATION_PURPOSE: "trigger",
                builders.ANNOTATION_UNTIL: "2026-12-07T03:00:20Z",
            },
        },
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    pod = terminated_pod("assemble", 0, {"summary": {"ready": False, "newExamples": 7}})
    pod["metadata"]["ownerReferences"] = [{"uid": "job-uid", "controller": True}]
    view = data_view(job, [pod])
    assert view is not None and view.state == "succeeded" and view.summary["newExamples"] == 7
    assert view.run == 1 and view.purpose == "trigger"


def test_a_runs_view() -> None:
    job = {
        "metadata": {
            "name": "nightly-2",
            "uid": "u2",
            "creationTimestamp": "2026-12-07T03:00:00Z",
            "annotations": {builders.ANNOTATION_RUN: "2", builders.ANNOTATION_SOURCES: '{"total": 9}'},
        },
        "status": {"phase": "Rejected", "conditions": [{"type": "Ready", "reason": "GateFailed"}]},
    }
    view = run_view(job)
    assert view is not None and (view.run, view.phase, view.reason, view.examples) == (
        2,
        "Rejected",
        "GateFailed",
        9,
    )
    assert view.ended
