"""A FineTuneJob served on a ModelServer (pooljob.py), driven through the pure job planner: checks CEL cannot
make, the champion snapshot and comparison, and serving once the pool holds the adapter everywhere."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.finetunejob.plan import Observed, Plan

from . import test_state
from .ftj_factory import job
from .test_state import TRAINED, World, _to_training

SERVER = {"server": "shared", "modelName": "bot"}
CHAMPION_ADAPTER = "s3://runs/out/older/model/adapter/"


def server(
    *,
    base: str = "s3://models/tiny-llama",
    rank: int = 64,
    sources: tuple[str, ...] = ("s3://runs",),
    status: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "shared", "namespace": "team-a"},
        "spec": {"baseModel": {"uri": base}, "maxLoraRank": rank, "adapterSources": list(sources)},
        "status": status or {},
    }


def champion_status() -> dict[str, Any]:
    version = {"version": 1, "name": "bot-v1", "adapter": CHAMPION_ADAPTER, "jobUid": "other", "loaded": True}
    return {"models": {"bot": {"versions": [version], "promoted": 1, "serving": 1, "lastVersion": 1}}}


@pytest.fixture
def pool_world(monkeypatch: pytest.MonkeyPatch) -> Any:
    """World.step with the ModelServer the job names (Observed.server)."""
    holder: dict[str, Any] = {"server": None}
    real = test_state.plan

    def plan_with_server(observed: Observed, config: Any) -> Plan:
        return real(dataclasses.replace(observed, server=holder["server"]), config)

    monkeypatch.setattr(test_state, "plan", plan_with_server)
    return holder


def evaluated(tuned: float, champion: float | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"tuned": {"exact_match": tuned}, "base": {"exact_match": 0.0}, "n": 20}
    if champion is not None:
        summary |= {"champion": {"exact_match": champion}, "championName": "bot-v1"}
    return {"stage": "evaluate", "exitCode": 0, "summary": summary}


def a_job(**deployment: Any) -> Any:
    return job(
        deployment={**SERVER, **deployment},
        evaluation={"metrics": ["exact_match"], "primaryMetric": "exact_match"},
        lora={"rank": 16},
    )


@pytest.mark.parametrize(
    ("pool", "field"),
    [
        (server(base="s3://models/other"), "spec.baseModel.uri"),
        (server(rank=8), "spec.lora.rank"),
        # s3://runs/out is the job's output: a sibling prefix is no match, a deeper one does not cover it
        (server(sources=("s3://runs/out-other", "s3://runs/out/team-b")), "spec.storage.output"),
    ],
)
def test_a_job_the_server_cannot_serve_fails_before_any_stage_runs(
    pool_world: dict[str, Any], pool: dict[str, Any], field: str
) -> None:
    pool_world["server"] = pool
    world = World(a_job())
    first = world.step()
    assert world.status["phase"] == "Failed" and not first.create  # no Job, no GPU asked for
    assert world.status["message"].startswith(f"{field}:")
    assert world.condition["Validated"]["reason"] == "InvalidConfig"


def test_the_evaluation_scores_the_champion_and_a_worse_job_is_rejected_naming_both(
    pool_world: dict[str, Any],
) -> None:
    pool_world["server"] = server(status=champion_status())
    world = World(a_job())
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    evaluate = world.children[Stage.EVALUATE]
    config = json.loads(evaluate["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"])
    assert config["champion"] == {"name": "bot-v1", "adapter": CHAMPION_ADAPTER}
    assert world.status["serving"]["champion"]["name"] == "bot-v1"
    world.finish(Stage.EVALUATE, evaluated(0.4, 0.9))
    world.step()
    assert world.status["phase"] == "Rejected"
    evaluation = world.status["evaluation"]
    assert evaluation["champion"] == {"exact_match": 0.9} and evaluation["championVersion"] == "bot-v1"
    assert evaluation["tuned"] and evaluation["base"] and evaluation["passed"] is False
    message = world.condition["Evaluated"]["message"]
    assert world.condition["Evaluated"]["reason"] == "NotBetterThanServing"
    assert "0.4" in message and "0.9" in message and "bot-v1" in message
    assert not any(c["kind"] == "Deployment" for c in world.children.values())


def test_the_champion_is_frozen_once_the_evaluate_job_exists(pool_world: dict[str, Any]) -> None:
    pool_world["server"] = server(status=champion_status())
    world = World(a_job())
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    newer = champion_status()
    newer["models"]["bot"]["versions"].append({"version": 2, "name": "bot-v2", "adapter": "s3://x/adapter/"})
    newer["models"]["bot"]["promoted"] = 2
    pool_world["server"] = server(status=newer)
    world.step()
    assert world.status["serving"]["champion"]["name"] == "bot-v1"


def test_a_better_job_is_accepted_and_serves_once_every_ready_replica_holds_it(
    pool_world: dict[str, Any],
) -> None:
    pool_world["server"] = server(status=champion_status())
    world = World(a_job())
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    world.finish(Stage.EVALUATE, evaluated(0.9, 0.9))  # not worse is enough
    world.step()
    assert world.status["phase"] == "Deploying" and world.status["serving"]["state"] == "Accepted"
    assert world.condition["Deployed"]["reason"] == "LoadingAdapter"
    assert Stage.SERVE not in world.children and world.service is None  # no Deployment of its own

    registered = champion_status()
    model = registered["models"]["bot"]
    mine = {"version": 2, "name": "bot-v2", "adapter": TRAINED["summary"]["adapter"], "jobUid": world.ref.uid}
    model["versions"].append({**mine, "loaded": True})
    model.update(lastVersion=2)  # registered and loading; bot-v1 keeps serving until bot-v2 is checked
    registered["endpoint"] = "http://shared-pool.team-a.svc:8000/v1"
    registered["replicas"] = [
        {"pod": "p1", "ready": True, "loaded": ["bot-v1", "bot-v2"]},
        {"pod": "p2", "ready": True, "loaded": ["bot-v1"]},
    ]
    pool_world["server"] = server(status=registered)
    world.step()
    assert world.status["phase"] == "Deploying" and "1/2 ready replicas" in world.status["message"]
    assert Stage.SERVING_CHECK not in world.children  # not before the version is loaded everywhere
    registered["replicas"][1]["loaded"].append("bot-v2")
    world.step()
    assert world.status["phase"] == "Deploying" and world.status.get("endpoint") is None
    check = world.children[Stage.SERVING_CHECK]
    config = json.loads(check["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"])
    assert config["servingCheck"] == {
        "url": "http://shared-pool.team-a.svc:8000/v1",
        "model": "bot-v2",  # the immutable version name, not the stable one
        "metric": "exact_match",
        "examples": 200,
    }
    summary = {"metric": "exact_match", "value": 0.89, "examples": 20, "refused": 0}  # within 0.02
    world.finish(Stage.SERVING_CHECK, {"stage": "servecheck", "exitCode": 0, "summary": summary})
    world.step()
    assert world.status["serving"]["checked"] is True and world.status["phase"] == "Deploying"
    assert world.status["evaluation"]["served"] == {"exact_match": 0.89, "examples": 20, "refused": 0}
    model.update(promoted=2, serving=2)  # the pool promotes it (modelserver planner)
    registered["replicas"][0]["routes"] = {"bot": "bot-v2"}  # one router switched its route so far
    registered["replicas"][1]["routes"] = {"bot": "bot-v1"}
    world.step()
    assert world.status["phase"] == "Deploying" and "1/2 ready replicas" in world.status["message"]
    assert world.status.get("endpoint") is None  # the stable name may still answer with bot-v1
    registered["replicas"][1]["routes"] = {"bot": "bot-v2"}
    world.step()
    assert world.status["phase"] == "Serving"
    assert world.status["endpoint"] == {"url": "http://shared-pool.team-a.svc:8000/v1", "model": "bot"}
    assert world.status["serving"]["versionName"] == "bot-v2" and world.status["serving"]["serving"] is True


def test_a_job_waits_for_a_missing_server(pool_world: dict[str, Any]) -> None:
    world = World(a_job())
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    world.finish(Stage.EVALUATE, evaluated(0.9, None))
    world.step()
    assert world.status["phase"] == "Deploying"
    assert world.condition["Deployed"]["reason"] == "ServerNotFound"
    assert "ModelServer shared" in world.condition["Deployed"]["message"]


def _checked(pool_world: dict[str, Any]) -> tuple[World, dict[str, Any]]:
    """A better job whose version bot-v2 is loaded everywhere and passed its serving check."""
    pool_world["server"] = server(status=champion_status())
    world = World(a_job())
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    world.finish(Stage.EVALUATE, evaluated(0.9, 0.9))
    world.step()
    registered = champion_status()
    mine = {"version": 2, "name": "bot-v2", "adapter": TRAINED["summary"]["adapter"], "jobUid": world.ref.uid}
    registered["models"]["bot"]["versions"].append({**mine, "loaded": True})
    registered["models"]["bot"]["lastVersion"] = 2
    registered["endpoint"] = "http://shared-pool.team-a.svc:8000/v1"
    registered["replicas"] = [{"pod": "p1", "ready": True, "loaded": ["bot-v1", "bot-v2"]}]
    pool_world["server"] = server(status=registered)
    world.step()
    summary = {"metric": "exact_match", "value": 0.9, "examples": 20, "refused": 0}
    world.finish(Stage.SERVING_CHECK, {"stage": "servecheck", "exitCode": 0, "summary": summary})
    world.step()
    assert world.status["serving"]["checked"] is True
    return world, registered


CANARY = {
    "version": 2,
    "name": "bot-v2",
    "champion": 1,
    "championName": "bot-v1",
    "state": "Progressing",
    "step": 1,
    "steps": [10, 50],
    "weight": 10,
    "weights": {"bot-v1": 90, "bot-v2": 10},
    "stepStartedAt": "2026-11-01T12:00:00Z",
    "message": "step 1/2 (10%), 40 s left: bot-v2: 3 requests, 0 errors",
}


def test_a_job_in_a_canary_waits_rolling_out_then_serves_once_it_completes(
    pool_world: dict[str, Any],
) -> None:
    world, registered = _checked(pool_world)
    registered["models"]["bot"]["rollout"] = dict(CANARY)
    world.step()
    assert world.status["phase"] == "Deploying" and world.status.get("endpoint") is None
    assert world.condition["Deployed"]["reason"] == "RollingOut"
    assert world.status["message"] == (
        "canary: bot-v2 takes 10% of bot (step 1 of 2): "
        "step 1/2 (10%), 40 s left: bot-v2: 3 requests, 0 errors"
    )
    registered["models"]["bot"].update(promoted=2, serving=2)
    registered["models"]["bot"]["rollout"] = {**CANARY, "state": "Completed", "weight": 100, "weights": {}}
    registered["replicas"][0]["routes"] = {"bot": "bot-v2"}
    world.step()
    assert world.status["phase"] == "Serving" and world.status["serving"]["serving"] is True


def test_a_rolled_back_canary_rejects_the_job_naming_the_figures(pool_world: dict[str, Any]) -> None:
    world, registered = _checked(pool_world)
    failed = "bot-v2 rolled back at step 1/2 (10%): error rate 30.0% > maxErrorRate 2.0%; bot-v2: 20 requests"
    registered["models"]["bot"]["versions"][1]["rolloutFailed"] = failed
    registered["models"]["bot"]["rollout"] = {**CANARY, "state": "RolledBack", "weights": {}}
    world.step()
    assert world.status["phase"] == "Rejected" and world.condition["Ready"]["reason"] == "RolloutFailed"
    assert world.status["serving"]["state"] == "RolledBack"  # no longer asked for: the pool drops it
    assert "error rate 30.0% > maxErrorRate 2.0%" in world.status["message"]
    assert world.condition["Deployed"]["reason"] == "RolloutFailed"
    assert (world.events[-1].type, world.events[-1].reason) == ("Warning", "RolloutFailed")
    world.step()  # terminal: stays so
    assert world.status["phase"] == "Rejected" and world.status["serving"]["state"] == "RolledBack"
