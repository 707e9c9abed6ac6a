"""Canary rollouts (issue 24): the pool planner's rollout state machine (modelserver/rollout.py) on the
routers' reported weights and per-version stats: progression, waiting for minRequests, rollback on errors
and on latency, pins, a newer version waiting, and the cases that still promote at once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from finetune_operator.api.modelserver import ModelServerStatus
from finetune_operator.modelserver.planner import PoolPlan, plan_pool
from finetune_vocabulary.capture import LATENCY_BUCKETS_MS

from .test_modelserver_plan import CONFIG, NOW, job, observe, ready_pod

ROLLOUT = {"steps": [10, 50], "stepSeconds": 60, "maxErrorRate": 0.05, "maxLatencyIncrease": 0.5}
MODELS = {"bot": {"rollout": ROLLOUT}}
PODS = [ready_pod("p1", "10.0.0.1"), ready_pod("p2", "10.0.0.2")]


def latency(ms: float, count: int) -> list[int]:
    """A histogram with `count` requests in the bucket of `ms`."""
    buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    buckets[next((i for i, bound in enumerate(LATENCY_BUCKETS_MS) if ms <= bound), -1)] = count
    return buckets


def report(
    weights: dict[str, int] | None, stats: dict[str, tuple[int, int, float]], routes: str = "bot-v1"
) -> dict[str, Any]:
    """A ready router's GET /state: what it holds and, per version, (requests, errors, latency ms)."""
    return {
        "ready": True,
        "loaded": {"bot-v1": "s3://runs/a/adapter", "bot-v2": "s3://runs/b/adapter"},
        "routes": {"bot": routes},
        **({"weights": {"bot": weights}} if weights else {}),
        "stats": {
            name: {"requests": n, "errors": e, "latencyBuckets": latency(ms, n)}
            for name, (n, e, ms) in stats.items()
        },
    }


def champion_serving(models: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status once bot-v1 (job a) is promoted."""
    return plan_pool(observe([job("a")], models=models or MODELS), CONFIG).status


def started(**spec: Any) -> PoolPlan:
    """Job b's version passed its check: the canary starts."""
    return plan_pool(observe([job("a"), job("b")], champion_serving(), models=MODELS, **spec), CONFIG)


def step(
    status: dict[str, Any],
    seconds: float,
    stats: dict[str, tuple[int, int, float]],
    weights: dict[str, int] | None = None,
    models: dict[str, Any] | None = None,
    jobs: list[dict[str, Any]] | None = None,
) -> PoolPlan:
    """A pass `seconds` after NOW with both replicas reporting `stats` under `weights` (default: desired)."""
    held = weights if weights is not None else status["models"]["bot"]["rollout"]["weights"]
    replicas = {"p1": report(held, stats), "p2": report(held, stats)}
    observed = observe(
        jobs or [job("a"), job("b")], status, replicas=replicas, pods=PODS, models=models or MODELS
    )
    observed = type(observed)(**{**observed.__dict__, "now": NOW + timedelta(seconds=seconds)})
    return plan_pool(observed, CONFIG)


def test_a_checked_version_starts_a_canary_and_the_champion_stays_promoted() -> None:
    plan = started()
    model = plan.status["models"]["bot"]
    assert model["promoted"] == 1 and model["serving"] == 1
    rollout = model["rollout"]
    assert (rollout["state"], rollout["step"], rollout["weight"]) == ("Progressing", 1, 10)
    assert plan.state["weights"] == {"bot": {"bot-v1": 90, "bot-v2": 10}}
    assert plan.state["routes"] == {"bot": "bot-v1"}  # the champion: the routers' fallback
    assert plan.registry_changed and [e.reason for e in plan.events] == ["RolloutStarted"]
    assert plan.requeue_after == 60
    ModelServerStatus.model_validate(plan.status)


def test_the_canary_goes_10_then_50_then_100_over_step_seconds() -> None:
    status = started().status
    early = step(status, 30, {"bot-v1": (180, 0, 40), "bot-v2": (20, 0, 40)})
    assert early.status["models"]["bot"]["rollout"]["step"] == 1
    assert early.requeue_after == 30  # the next pass comes when the step is due, not at the next resync
    second = step(early.status, 60, {"bot-v1": (180, 0, 40), "bot-v2": (20, 0, 40)})
    rollout = second.status["models"]["bot"]["rollout"]
    assert (rollout["step"], rollout["weight"]) == (2, 50)
    assert second.state["weights"] == {"bot": {"bot-v1": 50, "bot-v2": 50}}
    assert second.registry_changed and [e.reason for e in second.events] == ["RolloutStep"]
    # the replicas still hold the old weights: their stats are of the old split and do not count
    stale = step(second.status, 200, {"bot-v2": (500, 0, 40)}, weights={"bot-v1": 90, "bot-v2": 10})
    assert stale.status["models"]["bot"]["rollout"]["step"] == 2
    assert "waiting for 20 requests" in stale.status["models"]["bot"]["rollout"]["message"]
    assert set(stale.push) == {"p1", "p2"}  # and get the new weights pushed
    done = step(second.status, 130, {"bot-v1": (30, 0, 40), "bot-v2": (30, 0, 40)})
    model = done.status["models"]["bot"]
    assert model["promoted"] == 2 and model["serving"] == 2 and model["rollout"]["state"] == "Completed"
    assert "weights" not in done.state and done.state["routes"] == {"bot": "bot-v2"}
    assert [(e.reason, e.job) for e in done.events] == [("Promoted", "b")]


def test_a_step_waits_for_min_requests_past_step_seconds() -> None:
    plan = step(started().status, 600, {"bot-v1": (500, 0, 40), "bot-v2": (9, 0, 40)})
    rollout = plan.status["models"]["bot"]["rollout"]
    assert rollout["step"] == 1 and rollout["state"] == "Progressing"
    assert "waiting for 20 requests" in rollout["message"] and rollout["challenger"]["requests"] == 18
    plan = step(started().status, 600, {"bot-v1": (500, 0, 40), "bot-v2": (10, 0, 40)})
    assert plan.status["models"]["bot"]["rollout"]["step"] == 2  # 2 replicas of 10 each = 20


def test_errors_beyond_the_limit_roll_back_with_the_figures() -> None:
    plan = step(started().status, 5, {"bot-v1": (100, 0, 40), "bot-v2": (10, 3, 40)})
    model = plan.status["models"]["bot"]
    assert model["rollout"]["state"] == "RolledBack" and model["promoted"] == 1
    assert "weights" not in plan.state and plan.state["routes"] == {"bot": "bot-v1"}
    failed = next(v for v in model["versions"] if v["version"] == 2)["rolloutFailed"]
    # 6 errors of 20 requests (min 20): 30% > 5%; both versions' figures and the limits are named
    assert "error rate 30.0% > maxErrorRate 5.0%" in failed
    assert "bot-v2: 20 requests, 6 errors" in failed and "bot-v1: 200 requests, 0 errors" in failed
    assert "limits:" in failed
    assert [(e.type, e.reason, e.job) for e in plan.events] == [("Warning", "RolloutFailed", "b")]
    assert plan.registry_changed
    # the version is not canaried again while its job still asks
    again = step(plan.status, 10, {}, weights={})
    assert again.status["models"]["bot"]["promoted"] == 1 and "weights" not in again.state
    assert again.events == []


def test_one_early_error_counts_against_min_requests_not_against_one_request() -> None:
    # errors count against max(requests, minRequests): 1 error of 2 requests is 1/20, within 5%; 2 are 10%
    plan = step(started().status, 5, {"bot-v1": (10, 0, 40), "bot-v2": (1, 0, 40)})
    plan = step(plan.status, 6, {"bot-v1": (10, 0, 40), "bot-v2": (1, 1, 40)}, weights=None)
    assert plan.status["models"]["bot"]["rollout"]["state"] == "RolledBack"  # 2/20 = 10%
    calm = step(started().status, 5, {"bot-v1": (10, 0, 40), "bot-v2": (1, 0, 40)})
    ok = {"p1": (1, 1, 40), "p2": (1, 0, 40)}
    replicas = {
        pod: report(calm.status["models"]["bot"]["rollout"]["weights"], {"bot-v2": ok[pod]}) for pod in ok
    }
    observed = observe([job("a"), job("b")], calm.status, replicas=replicas, pods=PODS, models=MODELS)
    assert plan_pool(observed, CONFIG).status["models"]["bot"]["rollout"]["state"] == "Progressing"  # 1/20


def test_latency_beyond_the_allowed_increase_rolls_back_once_min_requests_are_in() -> None:
    few = step(started().status, 5, {"bot-v1": (100, 0, 40), "bot-v2": (5, 0, 900)})
    assert few.status["models"]["bot"]["rollout"]["state"] == "Progressing"  # 10 < minRequests 20
    plan = step(started().status, 5, {"bot-v1": (100, 0, 40), "bot-v2": (10, 0, 900)})
    model = plan.status["models"]["bot"]
    assert model["rollout"]["state"] == "RolledBack" and model["promoted"] == 1
    failed = next(v for v in model["versions"] if v["version"] == 2)["rolloutFailed"]
    assert "p95 latency 1000 ms > 50 ms of the champion + maxLatencyIncrease 50%" in failed
    within = step(started().status, 5, {"bot-v1": (100, 0, 30), "bot-v2": (10, 0, 45)})
    rollout = within.status["models"]["bot"]["rollout"]
    assert rollout["state"] == "Progressing"  # both in the 50 ms bucket
    assert rollout["championFigures"]["p95Ms"] == 50 and rollout["challenger"]["p95Ms"] == 50


def test_a_pin_during_a_rollout_ends_it_as_rolled_back() -> None:
    pinned = {"bot": {"rollout": ROLLOUT, "pin": 1}}
    plan = step(started().status, 5, {"bot-v2": (5, 0, 40)}, models=pinned)
    model = plan.status["models"]["bot"]
    assert model["rollout"]["state"] == "RolledBack" and "pinned" in model["rollout"]["message"]
    assert "weights" not in plan.state and plan.state["routes"] == {"bot": "bot-v1"}
    assert any(e.reason == "RolloutFailed" and e.job == "b" for e in plan.events)


def test_a_newer_version_waits_for_the_rollout_then_canaries_against_the_new_champion() -> None:
    status = started().status
    jobs = [job("a"), job("b"), job("c")]
    waiting = step(status, 5, {"bot-v1": (10, 0, 40), "bot-v2": (2, 0, 40)}, jobs=jobs)
    model = waiting.status["models"]["bot"]
    assert model["rollout"]["version"] == 2 and model["promoted"] == 1
    assert "bot-v3" in waiting.state["adapters"] and waiting.state["weights"]["bot"].keys() == {
        "bot-v1",
        "bot-v2",
    }
    second = step(waiting.status, 61, {"bot-v1": (100, 0, 40), "bot-v2": (20, 0, 40)}, jobs=jobs)
    done = step(second.status, 122, {"bot-v1": (100, 0, 40), "bot-v2": (20, 0, 40)}, jobs=jobs)
    assert done.status["models"]["bot"]["promoted"] == 2
    nxt = step(done.status, 123, {}, weights={}, jobs=jobs)
    rollout = nxt.status["models"]["bot"]["rollout"]
    assert (rollout["version"], rollout["champion"], rollout["state"]) == (3, 2, "Progressing")


def test_without_a_rollout_spec_or_a_champion_a_version_is_promoted_at_once() -> None:
    status = plan_pool(observe([job("a")]), CONFIG).status
    plain = plan_pool(observe([job("a"), job("b")], status), CONFIG)
    assert plain.status["models"]["bot"]["promoted"] == 2 and "rollout" not in plain.status["models"]["bot"]
    assert "weights" not in plain.state
    first = plan_pool(observe([job("a")], models=MODELS), CONFIG)  # no champion: nothing to compare with
    assert first.status["models"]["bot"]["promoted"] == 1 and "rollout" not in first.status["models"]["bot"]


def test_the_operator_gauges_show_each_versions_weight_and_figures() -> None:
    plan = step(started().status, 5, {"bot-v1": (90, 0, 40), "bot-v2": (20, 1, 40)})
    assert plan.versions[("bot", "bot-v2")] == (10, 40, 2, 50.0)  # 5%: at the limit, not beyond
    assert plan.versions[("bot", "bot-v1")][:3] == (90, 180, 0)


def test_capture_counters_are_summed_over_the_replicas_and_capture_goes_in_the_state() -> None:
    status = champion_serving()
    replicas = {
        pod: {
            **report(None, {}, "bot-v1"),
            "capture": {"records": 3, "feedback": 1, "failures": 0, "dropped": 2},
        }
        for pod in ("p1", "p2")
    }
    capture = {"destination": "s3://runs/capture"}
    observed = observe([job("a")], status, replicas=replicas, pods=PODS, models=MODELS, capture=capture)
    plan = plan_pool(observed, CONFIG)
    assert plan.status["capture"] == {"records": 6, "feedback": 2, "failures": 0, "dropped": 4}
    assert plan.state["capture"]["prefix"] == "s3://runs/capture/team-a/shared"
    assert (
        plan_pool(observe([job("a")], status, replicas=replicas, pods=PODS), CONFIG).status["capture"] is None
    )


def test_turning_capture_on_pushes_the_state_to_every_ready_pod() -> None:
    """A router's GET /state does not echo capture settings: a changed ConfigMap is pushed to every pod."""
    from finetune_operator.modelserver.builders import state_configmap

    status = champion_serving()
    replicas = {pod: report(None, {}, "bot-v1") | {"loaded": {"bot-v1": "x"}} for pod in ("p1", "p2")}
    before = observe([job("a")], status, replicas=replicas, pods=PODS, models=MODELS)
    same = plan_pool(before, CONFIG)
    in_sync = type(before)(**{**before.__dict__, "configmap": state_configmap(before.pool, same.state)})
    assert plan_pool(in_sync, CONFIG).push == {}
    capture = {"destination": "s3://runs/capture"}
    on = observe([job("a")], status, replicas=replicas, pods=PODS, models=MODELS, capture=capture)
    on = type(on)(**{**on.__dict__, "configmap": in_sync.configmap})
    plan = plan_pool(on, CONFIG)
    assert set(plan.push) == {"p1", "p2"} and plan.state["capture"]["sampleRate"] == 0.1
