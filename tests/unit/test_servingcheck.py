"""Served equals evaluated (issue 22, finetunejob/servingcheck.py) through the pure job planner and the real
pool planner: the check runs once the version is loaded and before it takes traffic; a mismatch rejects
the job and takes the version away; examples 0 and a job without evaluation serve without a check."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.serving_contract import serving_request

from .ftj_factory import job
from .test_pooljob import a_job, champion_status, pool_world, server
from .test_state import TRAINED, World, _pass_serving_check, _to_evaluated, _to_training

__all__ = ["pool_world"]

EVALUATED = {
    "stage": "evaluate",
    "exitCode": 0,
    "summary": {"tuned": {"loss": 0.5, "token_f1": 0.8}, "base": {"loss": 2.0, "token_f1": 0.3}, "n": 100},
}


def _loaded(world: World, **deployment: Any) -> None:
    """Evaluated, the job's own ModelServer created and holding the version on its ready replica."""
    _to_evaluated(world, EVALUATED)
    world.step()
    world.pool_pass(ready_replicas=1)
    world.step()


def test_a_served_score_below_evaluated_minus_tolerance_rejects_and_deletes_the_jobs_server() -> None:
    world = World(job(deployment={"servedModelName": "toy-bot"}))
    _loaded(world)
    assert world.status["phase"] == "Deploying" and Stage.SERVING_CHECK in world.children
    summary = {"metric": "token_f1", "value": 0.41, "examples": 100, "refused": 37}
    world.finish(Stage.SERVING_CHECK, {"stage": "servecheck", "exitCode": 0, "summary": summary})
    result = world.step()
    assert world.status["phase"] == "Rejected"
    deployed = world.condition["Deployed"]
    assert (deployed["status"], deployed["reason"]) == ("False", "ServingMismatch")
    message = world.status["message"]
    for part in (
        "served token_f1 0.41",
        "evaluated 0.8",
        "37 refused",
        "chat template",
        "dtype",
        "maxModelLen",
    ):
        assert part in message, message
    assert world.status["evaluation"]["served"] == {"token_f1": 0.41, "examples": 100, "refused": 37}
    assert [(d.kind, d.name) for d in result.delete] == [("ModelServer", "demo-serve")]
    assert world.server is None and world.status.get("endpoint") is None
    asked = {"metadata": {"name": "demo", "uid": world.ref.uid}, "status": world.status}
    assert serving_request(asked) is None  # status.serving.state cleared: it no longer asks to be loaded
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "ServingMismatch")]


def test_within_tolerance_passes_and_the_pool_promotes_it() -> None:
    world = World(job(deployment={"servedModelName": "toy-bot", "servingCheck": {"tolerance": 0.1}}))
    _loaded(world)
    _pass_serving_check(world, value=0.71)  # 0.8 - 0.1 < 0.71
    assert world.status["serving"]["checked"] is True and world.status["phase"] == "Deploying"
    world.pool_pass(ready_replicas=1)
    assert world.server is not None and world.server["status"]["models"]["toy-bot"]["promoted"] == 1
    world.step()
    assert world.status["phase"] == "Serving"
    assert world.status["endpoint"]["model"] == "toy-bot"


def test_a_mismatch_on_a_shared_pool_makes_the_pool_drop_the_unpromoted_version(
    pool_world: dict[str, Any],
) -> None:
    from finetune_operator.modelserver.builders import PoolRef
    from finetune_operator.modelserver.planner import PoolObserved, plan_pool

    from .test_modelserver_plan import CONFIG, NOW

    registered = champion_status()
    model = registered["models"]["bot"]
    world = World(a_job())
    model["versions"].append(
        {"version": 2, "name": "bot-v2", "adapter": TRAINED["summary"]["adapter"], "jobUid": world.ref.uid}
    )
    model["lastVersion"] = 2
    registered["endpoint"] = "http://shared-pool.team-a.svc:8000/v1"
    registered["replicas"] = [{"pod": "p1", "ready": True, "loaded": ["bot-v1", "bot-v2"]}]
    pool_world["server"] = server(status=registered)
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    evaluated = {"tuned": {"exact_match": 0.9}, "base": {"exact_match": 0.1}, "n": 20}
    world.finish(Stage.EVALUATE, {"stage": "evaluate", "exitCode": 0, "summary": evaluated})
    world.step()
    assert Stage.SERVING_CHECK in world.children
    summary = {"metric": "exact_match", "value": 0.5, "examples": 20, "refused": 0}
    world.finish(Stage.SERVING_CHECK, {"stage": "servecheck", "exitCode": 0, "summary": summary})
    world.step()
    assert world.status["phase"] == "Rejected" and world.condition["Deployed"]["reason"] == "ServingMismatch"

    # The pool, seeing the job no longer accepted, unloads bot-v2; bot-v1 keeps serving.
    from finetune_operator.api.modelserver import parse_modelserver_spec

    spec = parse_modelserver_spec(server()["spec"])
    me = {
        "metadata": {"name": world.ref.name, "uid": world.ref.uid, "namespace": "team-a"},
        "spec": {"deployment": {"server": "shared", "modelName": "bot"}},
        "status": world.status,
    }
    observed = PoolObserved(
        PoolRef("team-a", "shared", "pool-uid", spec), registered, None, None, None, [], {}, [me], now=NOW
    )
    plan = plan_pool(observed, CONFIG)
    assert [v["name"] for v in plan.status["models"]["bot"]["versions"]] == ["bot-v1"]
    assert plan.state["routes"] == {"bot": "bot-v1"}


def test_examples_zero_serves_without_a_check() -> None:
    world = World(job(deployment={"servedModelName": "toy-bot", "servingCheck": {"examples": 0}}))
    _to_evaluated(world, EVALUATED)
    world.step()
    assert (
        world.status["serving"]["checked"] is True
    )  # asked together with Accepted: promoted on registration
    world.pool_pass(ready_replicas=1)
    world.step()
    assert world.status["phase"] == "Serving" and Stage.SERVING_CHECK not in world.children
    assert "serving check off" in world.condition["Deployed"]["message"]
    assert "served" not in world.status["evaluation"]


def test_a_job_without_evaluation_serves_without_a_check_and_says_why() -> None:
    world = World(job(evaluation={"enabled": False}, deployment={"servedModelName": "toy-bot"}))
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    world.step()
    world.pool_pass(ready_replicas=1)
    world.step()
    assert world.status["phase"] == "Serving" and Stage.SERVING_CHECK not in world.children
    assert "evaluation is disabled" in world.condition["Deployed"]["message"]


def test_a_failed_check_job_fails_the_job_and_serves_nothing() -> None:
    world = World(job(deployment={"servedModelName": "toy-bot"}))
    _loaded(world)
    world.fail(
        Stage.SERVING_CHECK,
        "BackoffLimitExceeded",
        11,
        {"stage": "servecheck", "exitCode": 11, "message": "servingCheck.metric: bad"},
    )
    world.step()
    assert world.status["phase"] == "Failed" and world.status.get("endpoint") is None


def test_a_job_serving_before_the_check_existed_is_not_checked_again() -> None:
    """Upgrade: a Serving job without status.serving.checked keeps serving; no check Job, no flap."""
    world = World(job(deployment={"servedModelName": "toy-bot"}))
    _loaded(world)
    _pass_serving_check(world, value=0.8)
    world.pool_pass(ready_replicas=1)
    world.step()
    assert world.status["phase"] == "Serving"
    del world.status["serving"]["checked"]  # as an operator before issue 22 left it
    world.children.pop(Stage.SERVING_CHECK)
    result = world.step()
    assert world.status["phase"] == "Serving" and Stage.SERVING_CHECK not in world.children
    assert world.status["serving"]["checked"] is True and not result.create
