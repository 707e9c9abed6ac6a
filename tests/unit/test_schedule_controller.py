"""The FineTuneSchedule controller around the pure planner: the queue's kicks, and a pass that writes only
what changed (deletes, creates, Events, then the status) against a fake API."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

from finetune_operator.config import load_config
from finetune_operator.finetuneschedule import builders
from finetune_operator.finetuneschedule import controller as schedule
from finetune_operator.finetuneschedule.planner import plan_schedule
from finetune_operator.k8s.client import ApiError

UID = "5c4f0e7a-0000-4000-8000-000000000002"
NOW = datetime(2026, 12, 7, 3, 0, 20, tzinfo=UTC)


class FakeApi:
    """Just the calls a schedule pass makes; objects by (kind, name)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []

    async def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        key, _, value = (selector or "").partition("=")
        return [
            o for (k, _), o in self.objects.items() if k == kind and o["metadata"]["labels"].get(key) == value
        ]

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.body if kind == "FineTuneSchedule" else self.objects.get((kind, name))

    async def create_or_adopt(self, manifest: dict[str, Any], owner_uid: str) -> dict[str, Any]:
        created = copy.deepcopy(manifest)
        created["metadata"]["uid"] = f"uid-{manifest['metadata']['name']}"
        self.objects[(manifest["kind"], manifest["metadata"]["name"])] = created
        self.writes.append(("create", manifest["kind"], manifest["metadata"]["name"]))
        return created

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        self.objects.pop((kind, name), None)
        self.writes.append(("delete", kind, name))

    async def post_event(self, involved: Any, type_: str, reason: str, message: str, kind: str = "") -> None:
        self.writes.append(("event", type_, reason))

    async def patch_object_status(self, kind: str, namespace: str, name: str, patch: Any, uid: str) -> None:
        status = self.body.setdefault("status", {})
        for key, value in patch.items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = copy.deepcopy(value)
        self.writes.append(("patch", kind, name))


def schedule_body() -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneSchedule",
        "metadata": {
            "name": "nightly",
            "namespace": "team-a",
            "uid": UID,
            "generation": 1,
            "creationTimestamp": "2026-12-07T00:00:00Z",
        },
        "spec": {
            "schedule": "0 3 * * *",
            "dataset": {"base": "s3://data/train.jsonl"},
            "jobTemplate": {
                "spec": {
                    "baseModel": {"uri": "s3://models/tiny"},
                    "dataset": {"test": "s3://data/test.jsonl"},
                    "storage": {"output": "s3://runs/out"},
                    "resources": {"gpus": 0, "gpuType": "cpu"},
                }
            },
        },
    }


async def one_pass(api: FakeApi) -> None:
    observed = await schedule.observe(api, api.body, NOW)  # type: ignore[arg-type]
    await schedule.act(api, api.body, plan_schedule(observed, load_config(env={})))  # type: ignore[arg-type]


async def test_a_due_pass_creates_the_data_job_then_an_unchanged_world_costs_no_write() -> None:
    api = FakeApi(schedule_body())
    await one_pass(api)
    assert api.writes == [("create", "Job", "nightly-1-data"), ("patch", "FineTuneSchedule", "nightly")]
    assert api.body["status"]["lastScheduleTime"] == "2026-12-07T03:00:00Z"
    api.writes.clear()
    await one_pass(api)  # the data Job runs: the status lists it as active
    assert api.writes == [("patch", "FineTuneSchedule", "nightly")]
    assert api.body["status"]["active"] == ["nightly-1-data"]
    api.writes.clear()
    await one_pass(api)
    assert api.writes == []


def data_job_reports_ready(api: FakeApi) -> None:
    """The first pass's data Job completed with a ready training set (its pod's termination summary)."""
    job = api.objects[("Job", "nightly-1-data")]
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    summary = {
        "ready": True,
        "newExamples": 3,
        "train": "s3://runs/out/schedules/team-a/nightly/1/train.jsonl",
        "cutoff": "2026-12-07T03:00:20Z",
        "examples": {"base": 5, "captured": 3, "total": 8},
    }
    api.objects[("Pod", "p")] = {
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "labels": {builders.LABEL_SCHEDULE_UID: UID},
            "ownerReferences": [{"uid": job["metadata"]["uid"], "controller": True}],
        },
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": 0, "message": json.dumps({"summary": summary})}},
                }
            ],
        },
    }


async def test_a_ready_data_job_becomes_a_run_and_the_job_goes() -> None:
    api = FakeApi(schedule_body())
    await one_pass(api)
    data_job_reports_ready(api)
    api.writes.clear()
    await one_pass(api)
    assert ("create", "FineTuneJob", "nightly-1") in api.writes
    assert ("delete", "Job", "nightly-1-data") not in api.writes
    await one_pass(api)  # the run exists (owned by the schedule): the data Job goes
    assert ("delete", "Job", "nightly-1-data") in api.writes
    assert api.body["status"]["lastRun"] == 1 and api.body["status"]["latest"] == "nightly-1"
    assert api.body["status"]["runs"] == [{"name": "nightly-1", "serving": False, "examples": 8}]


def test_the_queue_kicks_a_schedule_from_its_childrens_label() -> None:
    queue = schedule.ScheduleQueue()
    body = schedule_body()
    queue.seen(body, deleted=False)
    queue.kicked.clear()
    queue.kick_child({"metadata": {"labels": {builders.LABEL_SCHEDULE_UID: UID}}})
    assert queue.kicked == {("team-a", "nightly")}
    queue.kicked.clear()
    queue.kick_child({"metadata": {"labels": {builders.LABEL_SCHEDULE_UID: "someone-else"}}})
    queue.kick_child({"metadata": {}})
    assert queue.kicked == set()
    queue.seen(body, deleted=True)
    assert queue.schedules == {} and queue.by_uid == {}


async def test_a_run_the_api_server_refuses_is_reported_once_not_retried_every_pass() -> None:
    """A FineTunePolicy admission policy (or quota) refusing the run's FineTuneJob: a Warning Event naming the
    refusal, no RunCreated, the status says why, and the data Job goes (the next due time starts anew)."""
    api = FakeApi(schedule_body())
    await one_pass(api)
    data_job_reports_ready(api)
    create = api.create_or_adopt

    async def refusing(manifest: dict[str, Any], owner_uid: str) -> dict[str, Any]:
        if manifest["kind"] == "FineTuneJob":
            message = "spec.baseModel.uri: s3://models/tiny is not in allowedBaseModels of FineTunePolicy p"
            raise ApiError(422, {"reason": "Invalid", "message": message}, "POST", "/finetunejobs")
        return await create(manifest, owner_uid)

    api.create_or_adopt = refusing  # type: ignore[method-assign]
    api.writes.clear()
    await one_pass(api)
    events = [w for w in api.writes if w[0] == "event"]
    assert events == [("event", "Warning", "RunRefused")]
    assert ("delete", "Job", "nightly-1-data") in api.writes
    assert "allowedBaseModels" in api.body["status"]["message"]
    assert ("FineTuneJob", "nightly-1") not in api.objects
    api.writes.clear()
    await one_pass(api)  # nothing is retried until the next due time
    assert [w for w in api.writes if w[0] in ("create", "event")] == []
