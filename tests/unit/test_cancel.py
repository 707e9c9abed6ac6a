"""spec.cancel (issue 25): a running job stops for good, through the pure job planner. Its unfinished stage
Jobs are deleted (their pods go with them), its serving is withdrawn (its own ModelServer deleted, its request
to a shared pool withdrawn), and it ends Failed with reason Cancelled, one Normal Event; a job that already
ended ignores it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.api.modelserver import parse_modelserver_spec
from finetune_operator.finetunejob.plan import Observed, Plan
from finetune_operator.finetunepolicy.enforcement import job_hours
from finetune_operator.modelserver.builders import PoolRef
from finetune_operator.modelserver.planner import PoolObserved, plan_pool
from finetune_operator.serving_contract import serving_request

from . import test_state
from .ftj_factory import job
from .test_pooljob import SERVER, _checked, server
from .test_state import CONFIG, EVAL_BAD, EVAL_GOOD, NOW, World, _quiet, _to_evaluated, _to_training


def cancel(world: World, **overrides: Any) -> Plan:
    """kubectl patch ftj demo --type merge -p '{"spec":{"cancel":true}}': a new generation."""
    world.ref = job(cancel=True, **overrides)
    world.generation += 1
    return world.step()


def assert_cancelled(world: World, result: Plan, while_phase: str) -> None:
    message = f"cancelled (spec.cancel) while {while_phase}"
    assert world.status["phase"] == "Failed"
    assert world.status["message"] == message
    ready = world.condition["Ready"]
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "Cancelled", message)
    assert world.status["completionTime"] == "2026-01-01T02:00:00Z"
    assert world.status.get("endpoint") is None
    assert [(e.type, e.reason, e.message) for e in result.events] == [
        ("Normal", "Cancelled", f"Failed: {message}")
    ]
    _quiet(world)  # terminal from now on: no more deletes, no second Event


def deleted(result: Plan) -> list[tuple[str, str]]:
    return sorted((d.kind, d.name) for d in result.delete)


def test_cancel_while_validating_deletes_the_validation_job() -> None:
    world = World(job())
    world.step()
    assert world.status["phase"] == "Validating"
    result = cancel(world)
    assert deleted(result) == [("Job", "demo-validate")] and world.children == {}
    assert world.condition["Validated"]["reason"] == "Cancelled"
    assert world.condition["Validated"]["status"] == "False"
    assert_cancelled(world, result, "Validating")


def test_cancel_while_training_deletes_the_train_job_and_charges_gpu_hours_until_now() -> None:
    world = World(job())
    _to_training(world)
    train = world.children[Stage.TRAIN]
    world.children[Stage.TRAIN] = {**train, "status": {"active": 1, "startTime": "2026-01-01T00:30:00Z"}}
    world.pods[Stage.TRAIN] = [{"metadata": {"name": "demo-train-x"}, "status": {"phase": "Running"}}]
    result = cancel(world)
    # the finished validation Job stays (its logs are the record of the data); training and its pods go
    assert deleted(result) == [("Job", "demo-train")]
    assert Stage.VALIDATE in world.children and Stage.TRAIN not in world.children
    assert Stage.TRAIN not in world.pods
    assert world.condition["Trained"]["reason"] == "Cancelled"
    # 1 GPU from 00:30 to the cancel at 02:00; the FineTunePolicy ledger counts a Failed job's gpuHours
    assert world.status["gpuHours"] == pytest.approx(1.5)
    assert job_hours({"status": world.status}) == pytest.approx(1.5)
    assert_cancelled(world, result, "Training")


def test_cancel_while_deploying_deletes_the_jobs_own_modelserver_and_the_check_job() -> None:
    world = World(job(deployment={"servedModelName": "toy-bot"}))
    _to_evaluated(world, EVAL_GOOD)
    world.step()
    world.pool_pass(ready_replicas=1)
    world.step()
    assert world.status["phase"] == "Deploying" and Stage.SERVING_CHECK in world.children
    result = cancel(world, deployment={"servedModelName": "toy-bot"})
    assert deleted(result) == [("Job", "demo-servecheck"), ("ModelServer", "demo-serve")]
    assert world.server is None and Stage.SERVING_CHECK not in world.children
    assert world.status["serving"].get("state") is None  # no longer asks anyone to load it
    assert world.condition["Deployed"]["reason"] == "Cancelled"
    assert_cancelled(world, result, "Deploying")


@pytest.fixture
def pool_world(monkeypatch: pytest.MonkeyPatch) -> Any:
    """World.step with the shared ModelServer the job names (as test_pooljob.py's fixture)."""
    holder: dict[str, Any] = {"server": None}
    real = test_state.plan

    def plan_with_server(observed: Observed, config: Any) -> Plan:
        return real(dataclasses.replace(observed, server=holder["server"]), config)

    monkeypatch.setattr(test_state, "plan", plan_with_server)
    return holder


def pool_job_overrides() -> dict[str, Any]:
    evaluation = {"metrics": ["exact_match"], "primaryMetric": "exact_match"}
    return {"deployment": SERVER, "evaluation": evaluation, "lora": {"rank": 16}}


def as_listed(world: World) -> dict[str, Any]:
    """The job as the ModelServer controller lists it."""
    metadata = {"name": world.ref.name, "uid": world.ref.uid, "namespace": "team-a"}
    spec = {"deployment": SERVER, "cancel": world.ref.spec.cancel}
    return {"metadata": metadata, "spec": spec, "status": world.status}


def test_cancel_on_a_shared_pool_withdraws_the_request_and_the_pool_drops_the_version(
    pool_world: dict[str, Any],
) -> None:
    world, registered = _checked(pool_world)  # bot-v2 loaded and checked, not promoted yet
    assert serving_request(as_listed(world)) is not None
    result = cancel(world, **pool_job_overrides())
    assert deleted(result) == []  # the shared ModelServer is not the job's
    assert serving_request(as_listed(world)) is None
    assert_cancelled(world, result, "Deploying")
    pool = PoolRef("team-a", "shared", "pool-uid", parse_modelserver_spec(server()["spec"]))
    observed = PoolObserved(pool, registered, None, None, None, [], {}, [as_listed(world)], now=NOW)
    planned = plan_pool(observed, CONFIG)
    assert [v["name"] for v in planned.status["models"]["bot"]["versions"]] == ["bot-v1"]
    assert planned.state["routes"] == {"bot": "bot-v1"}
    unloaded = [e.message for e in planned.events if e.reason == "Unloaded"]
    assert len(unloaded) == 1 and "bot-v2 is unloaded" in unloaded[0]
    assert "was cancelled (spec.cancel)" in unloaded[0]


def test_cancel_while_serving_on_a_shared_pool_withdraws_the_request(pool_world: dict[str, Any]) -> None:
    world, registered = _checked(pool_world)
    registered["models"]["bot"].update(promoted=2, serving=2)
    registered["replicas"][0]["routes"] = {"bot": "bot-v2"}
    world.step()
    assert world.status["phase"] == "Serving" and world.status["endpoint"]
    result = cancel(world, **pool_job_overrides())
    assert deleted(result) == []
    assert serving_request(as_listed(world)) is None
    assert world.condition["Deployed"]["status"] == "False"
    assert_cancelled(world, result, "Serving")


def test_a_suspended_job_can_be_cancelled() -> None:
    world = World(job())
    _to_training(world)
    world.ref, world.generation = job(suspend=True), 2
    world.step()
    assert world.status["phase"] == "Suspended"
    result = cancel(world, suspend=True)
    assert deleted(result) == [("Job", "demo-train")]
    assert_cancelled(world, result, "Suspended")


def test_a_job_created_cancelled_runs_nothing() -> None:
    world = World(job(cancel=True))
    result = world.step()
    assert result.create == [] and result.delete == []
    assert_cancelled(world, result, "Pending")


def rejected(world: World) -> None:
    _to_evaluated(world, EVAL_BAD)


def succeeded(world: World) -> None:
    world.ref = job(deployment={"enabled": False})
    _to_evaluated(world, EVAL_GOOD)


@pytest.mark.parametrize(("ended", "phase"), [(rejected, "Rejected"), (succeeded, "Succeeded")])
def test_a_job_that_ended_ignores_cancel(ended: Any, phase: str) -> None:
    world = World(job())
    ended(world)
    assert world.status["phase"] == phase
    before = dict(world.condition["Ready"])
    overrides = {"deployment": {"enabled": False}} if phase == "Succeeded" else {}
    result = cancel(world, **overrides)
    assert world.status["phase"] == phase and world.condition["Ready"] == before
    assert result.create == [] and result.delete == [] and result.patch == [] and result.events == []
    assert set(result.status) == {"observedGeneration"}
