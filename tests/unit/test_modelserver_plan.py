"""The ModelServer planner (modelserver_plan.py): version registry, promotion, pins, maxLoras, pushes to ready
replicas, deleted jobs, and the status the job planner reads."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.api.modelserver import ModelServerStatus, parse_modelserver_spec
from finetune_operator.config import load_config
from finetune_operator.modelserver.builders import PoolRef, pool_deployment
from finetune_operator.modelserver.planner import PoolObserved, plan_pool
from finetune_operator.modelserver.status import merge_patch
from finetune_operator.serving_contract import pool_report

CONFIG = load_config(env={})
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def pool(**spec: Any) -> PoolRef:
    raw = {
        "baseModel": {"uri": "s3://models/tiny-llama"},
        "adapterSources": ["s3://runs"],
        "gpus": 0,
        "gpuType": "cpu",
        **spec,
    }
    return PoolRef("team-a", "shared", "pool-uid", parse_modelserver_spec(raw))


def job(
    name: str,
    *,
    accepted: bool = True,
    checked: bool = True,
    model: str = "bot",
    created: str = "2026-11-01T10:00:00Z",
) -> dict[str, Any]:
    """A job on the pool; accepted and (unless `checked=False`) past its serving check."""
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "namespace": "team-a", "creationTimestamp": created},
        "spec": {"deployment": {"server": "shared", "modelName": model}},
        "status": {
            "artifacts": {"adapter": f"s3://runs/{name}/adapter"},
            "serving": {"state": "Accepted", **({"checked": True} if checked else {})} if accepted else {},
        },
    }


def ready_pod(name: str, ip: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def observe(
    jobs: list[dict[str, Any]],
    status: dict[str, Any] | None = None,
    replicas: dict[str, Any] | None = None,
    pods: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> PoolObserved:
    return PoolObserved(
        pool=pool(**spec),
        status=status or {},
        deployment=None,
        service=None,
        configmap=None,
        pods=pods or [],
        replicas=replicas or {},
        jobs=jobs,
        now=NOW,
    )


def test_an_accepted_job_gets_the_next_version_and_is_promoted_with_an_event() -> None:
    plan = plan_pool(observe([job("a"), job("b", accepted=False)]), CONFIG)
    model = plan.status["models"]["bot"]
    assert [(v["name"], v["job"]) for v in model["versions"]] == [("bot-v1", "a")]
    assert model["promoted"] == 1 and model["serving"] == 1 and model["lastVersion"] == 1
    assert plan.state == {"adapters": {"bot-v1": "s3://runs/a/adapter"}, "routes": {"bot": "bot-v1"}}
    assert plan.registry_changed
    assert [(e.reason, e.job) for e in plan.events] == [("Promoted", "a")]
    assert {m["kind"] for m in plan.create} == {"ConfigMap", "Service", "Deployment", "NetworkPolicy"}
    ModelServerStatus.model_validate(plan.status)  # the status fits the CRD's schema


def test_a_second_version_is_promoted_and_the_first_stays_loaded_for_rollback() -> None:
    first = plan_pool(observe([job("a")]), CONFIG).status
    plan = plan_pool(observe([job("a"), job("b")], first), CONFIG)
    model = plan.status["models"]["bot"]
    assert model["promoted"] == 2 and [v["name"] for v in model["versions"]] == ["bot-v1", "bot-v2"]
    assert plan.state["adapters"].keys() == {"bot-v1", "bot-v2"} and plan.state["routes"] == {"bot": "bot-v2"}
    assert "was bot-v1" in plan.events[0].message


def test_version_numbers_are_never_reused_after_a_deletion() -> None:
    status = plan_pool(observe([job("a")]), CONFIG).status
    status = plan_pool(observe([job("a"), job("b")], status), CONFIG).status
    status = plan_pool(observe([job("a")], status), CONFIG).status  # b deleted while promoted: kept
    assert [v["name"] for v in status["models"]["bot"]["versions"]] == ["bot-v1", "bot-v2"]
    plan = plan_pool(observe([job("a"), job("c")], status), CONFIG)
    assert [v["name"] for v in plan.status["models"]["bot"]["versions"]] == ["bot-v1", "bot-v3"]
    assert any(e.reason == "Unloaded" and "bot-v2" in e.message for e in plan.events)


def test_a_deleted_jobs_version_is_unloaded_unless_promoted_or_pinned() -> None:
    status = plan_pool(observe([job("a")]), CONFIG).status
    status = plan_pool(observe([job("a"), job("b")], status), CONFIG).status
    pinned = plan_pool(observe([job("b")], status, models={"bot": {"pin": 1}}), CONFIG)
    assert "bot-v1" in pinned.state["adapters"] and pinned.state["routes"] == {"bot": "bot-v1"}
    dropped = plan_pool(observe([job("b")], status), CONFIG)
    assert dropped.state["adapters"].keys() == {"bot-v2"}
    assert [e.reason for e in dropped.events] == [
        "Unloaded"
    ] and "stays at s3://runs/a/adapter" in dropped.events[0].message


def test_a_pin_routes_the_stable_name_and_unpinning_returns_with_events() -> None:
    status = plan_pool(observe([job("a")]), CONFIG).status
    status = plan_pool(observe([job("a"), job("b")], status), CONFIG).status
    pinned = plan_pool(observe([job("a"), job("b")], status, models={"bot": {"pin": 1}}), CONFIG)
    assert pinned.state["routes"] == {"bot": "bot-v1"} and pinned.status["models"]["bot"]["pinned"] == 1
    assert [e.reason for e in pinned.events] == ["RolledBack"]
    back = plan_pool(observe([job("a"), job("b")], pinned.status), CONFIG)
    assert back.state["routes"] == {"bot": "bot-v2"} and "pinned" not in back.status["models"]["bot"]
    # the API keeps a merge patch's missing keys: the status patch removes the pin explicitly
    assert merge_patch(pinned.status, back.status)["models"]["bot"]["pinned"] is None
    assert [e.reason for e in back.events] == ["Unpinned"]


def test_an_unknown_pin_is_a_warning_and_the_promoted_version_keeps_serving() -> None:
    status = plan_pool(observe([job("a")]), CONFIG).status
    plan = plan_pool(observe([job("a")], status, models={"bot": {"pin": 7}}), CONFIG)
    assert plan.state["routes"] == {"bot": "bot-v1"}
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "PinUnknown")]


def test_max_loras_unloads_the_least_recently_promoted_unpinned_versions_with_an_event() -> None:
    status: dict[str, Any] = {}
    names = ["a", "b", "c", "d"]
    for i, _name in enumerate(names):
        stamp = datetime(2026, 11, 1, 12, i, tzinfo=UTC)
        jobs = [job(n) for n in names[: i + 1]]
        observed = observe(jobs, status, maxLoras=2, models={"bot": {"pin": 1}} if i == 3 else None)
        status = plan_pool(PoolObserved(**{**observed.__dict__, "now": stamp}), CONFIG).status
    versions = {v["name"]: v for v in status["models"]["bot"]["versions"]}
    # v1 pinned and v4 promoted fill maxLoras 2: v2 and v3 are unloaded, reasons recorded.
    assert {n for n, v in versions.items() if v["loaded"]} == {"bot-v1", "bot-v4"}
    assert "maxLoras 2" in versions["bot-v3"]["unloadedReason"]


def test_only_ready_replicas_that_differ_get_the_state_pushed() -> None:
    status = plan_pool(observe([job("a")]), CONFIG).status
    pods = [ready_pod("p1", "10.0.0.1"), ready_pod("p2", "10.0.0.2"), ready_pod("p3", "10.0.0.3")]
    replicas = {
        "p1": {"ready": True, "loaded": {"bot-v1": "s3://runs/a/adapter"}, "routes": {"bot": "bot-v1"}},
        "p2": {"ready": True, "loaded": {}, "routes": {}},
        "p3": {"ready": False, "loaded": {}, "routes": {}},  # still loading from the ConfigMap
    }
    plan = plan_pool(observe([job("a")], status, replicas, pods), CONFIG)
    assert plan.push == {"p2": "10.0.0.2"}
    assert plan.status["readyReplicas"] == 1
    assert pool_report({"status": plan.status}).loaded_everywhere("bot-v1") == (1, 2)


def test_a_changed_network_policy_is_patched_back_and_an_equal_one_left_alone() -> None:
    first = plan_pool(observe([]), CONFIG)
    (policy,) = [m for m in first.create if m["kind"] == "NetworkPolicy"]
    same = dataclasses.replace(observe([]), network_policy=policy)
    assert not [p for p in plan_pool(same, CONFIG).patch if p.kind == "NetworkPolicy"]
    opened = {**policy, "spec": {**policy["spec"], "ingress": [{}]}}  # someone admitted every port
    (patch,) = [
        p
        for p in plan_pool(dataclasses.replace(same, network_policy=opened), CONFIG).patch
        if p.kind == "NetworkPolicy"
    ]
    assert patch.patch == {"spec": policy["spec"]}


def test_a_version_outside_the_adapter_sources_is_never_sent_to_the_replicas() -> None:
    registered = plan_pool(observe([job("a")]), CONFIG).status
    narrowed = plan_pool(observe([job("a")], status=registered, adapterSources=["s3://runs/b"]), CONFIG)
    assert narrowed.state == {"adapters": {}, "routes": {}}
    (version,) = narrowed.status["models"]["bot"]["versions"]
    assert version["loaded"] is False and "spec.adapterSources" in version["unloadedReason"]
    assert ("Warning", "Unloaded") in [(e.type, e.reason) for e in narrowed.events]


def _conditions(plan: Any) -> dict[str, dict[str, Any]]:
    ModelServerStatus.model_validate(plan.status)  # built through the typed status models
    return {c["type"]: c for c in plan.status["conditions"]}


def _ready(plan: Any) -> tuple[str, str]:
    ready = _conditions(plan)["Ready"]
    return ready["status"], ready["reason"]


def _seen(
    status: dict[str, Any],
    states: dict[str, Any],
    pods: int,
    wanted: int,
    generation: int = 1,
    now: datetime = NOW,
) -> Any:
    """Pool of `wanted` replicas at `generation`: the first `pods` pods, their routers reporting `states`."""
    running = [ready_pod(f"p{i}", f"10.0.0.{i}") for i in range(1, pods + 1)]
    observed = observe([job("a")], status, states, running)
    return dataclasses.replace(observed, pool=pool(replicas=wanted), generation=generation, now=now)


def test_ready_says_available_progressing_degraded_or_scaled_to_zero_and_keeps_its_transition_time() -> None:
    in_sync = {"ready": True, "loaded": {"bot-v1": "s3://runs/a/adapter"}, "routes": {"bot": "bot-v1"}}
    starting = plan_pool(_seen({}, {}, 0, wanted=2), CONFIG)
    assert _ready(starting) == ("False", "Progressing")
    both = {"p1": in_sync, "p2": in_sync}
    later = NOW + timedelta(minutes=5)
    up = plan_pool(_seen(starting.status, both, 2, wanted=2, now=later), CONFIG)
    assert _ready(up) == ("True", "Available") and up.status["readyReplicas"] == 2
    assert _conditions(up)["Ready"]["lastTransitionTime"] == "2026-11-01T12:05:00Z"
    again = plan_pool(_seen(up.status, both, 2, wanted=2, now=later + timedelta(hours=1)), CONFIG)
    assert _conditions(again)["Ready"]["lastTransitionTime"] == "2026-11-01T12:05:00Z"  # unchanged: kept
    lost = plan_pool(_seen(up.status, {"p1": in_sync}, 1, wanted=2), CONFIG)
    assert _ready(lost) == ("False", "Degraded")
    assert "1/2 replicas ready" in _conditions(lost)["Ready"]["message"]
    scaled = plan_pool(_seen(up.status, {"p1": in_sync}, 1, wanted=3, generation=2), CONFIG)
    assert _ready(scaled) == ("False", "Progressing")  # a new generation is rolling out, not degraded
    assert _ready(plan_pool(_seen(up.status, {}, 0, wanted=0, generation=3), CONFIG)) == (
        "False",
        "ScaledToZero",
    )


def test_adapters_outside_the_sources_turn_adapters_allowed_false_naming_them() -> None:
    registered = plan_pool(observe([job("a")]), CONFIG)
    assert _conditions(registered)["AdaptersAllowed"]["status"] == "True"
    assert _conditions(registered)["PinsResolved"]["status"] == "True"
    narrowed = plan_pool(observe([job("a")], registered.status, adapterSources=["s3://runs/b"]), CONFIG)
    allowed = _conditions(narrowed)["AdaptersAllowed"]
    assert (allowed["status"], allowed["reason"]) == ("False", "AdapterOutsideSources")
    assert "bot-v1" in allowed["message"]


def test_a_changed_pool_deployment_rolls_out_replicas_strategy_and_template_like_a_jobs() -> None:
    """One rollout patch for every serving Deployment: a pool Deployment whose strategy was edited (or that an
    older operator created with another one) gets the desired strategy back, not only its template."""
    wanted = pool_deployment(pool(replicas=2), CONFIG)
    running = {**wanted, "metadata": {**wanted["metadata"], "annotations": {}}}
    observed = dataclasses.replace(observe([]), pool=pool(replicas=2), deployment=running)
    (patch,) = [p for p in plan_pool(observed, CONFIG).patch if p.kind == "Deployment"]
    assert patch.patch_type == "json"
    replaced = {op["path"]: op["value"] for op in patch.patch if op["op"] == "replace"}
    assert replaced == {
        "/spec/replicas": 2,
        "/spec/strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        "/spec/template": wanted["spec"]["template"],
    }


def test_a_jobs_own_server_registers_its_job_only_when_the_jobs_status_records_creating_it() -> None:
    """Issue 21: a ModelServer a job created (its controller, recorded in the job's status.children) serves
    that job without spec.deployment.server; a forged ownerReference naming the job gets nothing."""
    owner = [
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "own",
            "uid": "uid-own",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    mine = job("own")
    mine["spec"] = {"deployment": {}}
    mine["status"]["serving"] = {"state": "Accepted", "modelName": "own", "checked": True}
    base = observe([mine])
    meta = {"name": "shared", "namespace": "team-a", "uid": "pool-uid", "ownerReferences": owner}
    forged = dataclasses.replace(base, pool=dataclasses.replace(base.pool, meta=meta))
    assert plan_pool(forged, CONFIG).status["models"] is None
    mine["status"]["children"] = {"ModelServer/shared": {"uid": "pool-uid"}}
    plan = plan_pool(forged, CONFIG)
    assert [v["name"] for v in plan.status["models"]["own"]["versions"]] == ["own-v1"]
    assert plan.state["routes"] == {"own": "own-v1"}


def test_an_unchecked_version_is_loaded_for_its_check_but_promoted_only_once_its_job_says_checked() -> None:
    """Issue 22: the stable name routes to a version only after its serving check passed."""
    status = plan_pool(observe([job("a")]), CONFIG).status
    waiting = plan_pool(observe([job("a"), job("b", checked=False)], status, maxLoras=1), CONFIG)
    model = waiting.status["models"]["bot"]
    assert [v["name"] for v in model["versions"]] == ["bot-v1", "bot-v2"]
    assert model["promoted"] == 1 and waiting.state["routes"] == {"bot": "bot-v1"}
    # loaded under its versioned name for the check, even past maxLoras (the serving one stays too)
    assert waiting.state["adapters"].keys() == {"bot-v1", "bot-v2"}
    assert "Promoted" not in [e.reason for e in waiting.events]
    checked = plan_pool(observe([job("a"), job("b")], waiting.status, maxLoras=1), CONFIG)
    assert checked.status["models"]["bot"]["promoted"] == 2 and checked.state["routes"] == {"bot": "bot-v2"}
    assert [(e.reason, e.job) for e in checked.events if e.reason == "Promoted"] == [("Promoted", "b")]


def test_a_version_whose_check_failed_is_dropped_and_the_champion_keeps_serving() -> None:
    """The job no longer asks (ServingMismatch cleared status.serving.state): its unpromoted version goes."""
    status = plan_pool(observe([job("a")]), CONFIG).status
    status = plan_pool(observe([job("a"), job("b", checked=False)], status), CONFIG).status
    plan = plan_pool(observe([job("a"), job("b", accepted=False)], status), CONFIG)
    assert [v["name"] for v in plan.status["models"]["bot"]["versions"]] == ["bot-v1"]
    assert plan.state == {"adapters": {"bot-v1": "s3://runs/a/adapter"}, "routes": {"bot": "bot-v1"}}
    assert [e.reason for e in plan.events] == ["Unloaded"]
    assert "serving check failed" in plan.events[0].message


def test_the_first_version_of_a_name_serves_nothing_until_checked() -> None:
    plan = plan_pool(observe([job("a", checked=False)]), CONFIG)
    model = plan.status["models"]["bot"]
    assert model.get("promoted") is None and model.get("serving") is None
    assert plan.state == {"adapters": {"bot-v1": "s3://runs/a/adapter"}, "routes": {}}
