"""The ModelServer controller (modelserver/controller.py) against an in-memory API: its Events exactly once,
when the Events API refuses them or the operator restarts between the Event and the status write, and the
jobs it wakes through the wiring it is handed (it never calls the FineTuneJob controller itself)."""

from __future__ import annotations

import collections
import copy
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from finetune_operator.api.modelserver import ModelServerStatus
from finetune_operator.config import load_config
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import events
from finetune_operator.metrics import Metrics
from finetune_operator.modelserver.controller import PoolReconciler, PoolWiring
from finetune_operator.modelserver.queue import PoolController

CONFIG = load_config(env={})
THROTTLED = kube.ApiError(429, {"reason": "TooManyRequests"}, "POST", "/events")


class Killed(BaseException):
    """The operator process dies here (nothing after it runs)."""


SERVER = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "ModelServer",
    "metadata": {"name": "shared", "namespace": "team-a", "uid": "pool-uid", "generation": 1},
    "spec": {"baseModel": {"uri": "s3://models/tiny"}, "adapterSources": ["s3://runs"], "gpuType": "cpu"},
}


def accepted_job(name: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "uid": f"uid-{name}",
            "creationTimestamp": "2026-11-01T10:00:00Z",
        },
        "spec": {"deployment": {"server": "shared", "modelName": "bot"}},
        "status": {
            "artifacts": {"adapter": f"s3://runs/{name}/adapter"},
            "serving": {"state": "Accepted", "checked": True},
        },
    }


def merged(old: Any, patch: Any) -> Any:
    """RFC 7386, as the API applies a merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(old) if isinstance(old, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merged(out.get(key), value)
    return out


class PoolApi:
    """The calls a pool pass makes, with failures to inject."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.server = copy.deepcopy(SERVER) | {"status": {}}
        self.server["metadata"]["resourceVersion"] = "1"
        self.jobs = jobs
        self.children: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: dict[str, tuple[str, str, str]] = {}  # name → (involved kind/name, reason, message)
        self.event_failures: list[Exception] = []
        self.status_failures: list[Exception] = []
        self.die_after_events: int | None = None  # the process dies when posting the next Event
        self.status_writes = 0

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind == "ModelServer":
            return copy.deepcopy(self.server)
        return copy.deepcopy(self.children.get((kind, name)))

    async def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return copy.deepcopy(self.jobs) if kind == "FineTuneJob" else []

    async def create_or_adopt(self, manifest: Mapping[str, Any], owner_uid: str) -> dict[str, Any]:
        self.children[(str(manifest["kind"]), str(manifest["metadata"]["name"]))] = dict(manifest)
        return dict(manifest)

    async def patch(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def patch_object_status(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], uid: str
    ) -> dict[str, Any]:
        if self.status_failures:
            raise self.status_failures.pop(0)
        self.status_writes += 1
        ModelServerStatus.model_validate(merged(self.server["status"], patch))  # the CRD's schema
        self.server["status"] = merged(self.server["status"], patch)
        self.server["metadata"]["resourceVersion"] = str(int(self.server["metadata"]["resourceVersion"]) + 1)
        return copy.deepcopy(self.server)

    async def post_event(
        self,
        involved: Mapping[str, Any],
        type_: str,
        reason: str,
        message: str,
        name: str | None = None,
        kind: str = "FineTuneJob",
    ) -> None:
        if self.event_failures:
            raise self.event_failures.pop(0)
        if self.die_after_events is not None and len(self.events) >= self.die_after_events:
            self.die_after_events = None
            raise Killed
        assert name is not None, "every ModelServer Event is posted under a deterministic name"
        if name in self.events:
            raise kube.ApiError(409, {"reason": "AlreadyExists"}, "POST", "/events")
        self.events[name] = (f"{kind}/{involved['metadata']['name']}", reason, message)

    def reasons(self) -> collections.Counter[tuple[str, str]]:
        return collections.Counter((involved, reason) for involved, reason, _ in self.events.values())


@pytest.fixture(autouse=True)
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def wiring(woken: list[str] | None = None) -> PoolWiring:
    """A fresh operator process: nothing in memory."""
    return PoolWiring(
        config=CONFIG,
        metrics=Metrics(),
        queue=PoolController(),
        api=lambda: None,
        policy_view=lambda namespace, uid: None,
        known_jobs=lambda namespace: [],
        wake_job=(woken if woken is not None else []).append,
    )


async def one_pass(api: PoolApi, wired: PoolWiring) -> None:
    async with aiohttp.ClientSession() as session:
        await PoolReconciler(wired, api, session).reconcile("team-a", "shared")  # type: ignore[arg-type]


PROMOTED = {("ModelServer/shared", "Promoted"): 1, ("FineTuneJob/a", "Promoted"): 1}


async def test_events_the_api_refuses_are_owed_in_the_status_and_posted_once_when_it_recovers() -> None:
    api = PoolApi([accepted_job("a")])
    api.event_failures = [THROTTLED] * 100  # the Events API refuses everything for now
    woken: list[str] = []
    await one_pass(api, wiring(woken))
    owed = api.server["status"]["pendingEvents"]
    assert [(e["reason"], e.get("job")) for e in owed] == [("Promoted", None), ("Promoted", "a")]
    assert api.server["status"]["models"]["bot"]["promoted"] == 1 and api.events == {}
    assert woken == ["uid-a"]  # the job reads the pool's status: woken through the wiring
    api.event_failures = []
    await one_pass(api, wiring())  # the next pass (or a restarted operator) posts what is owed
    await one_pass(api, wiring())
    assert api.reasons() == PROMOTED
    assert "pendingEvents" not in api.server["status"]


@pytest.mark.parametrize("dies", ["while posting the Events", "at the status write"])
async def test_an_operator_restart_between_plan_and_status_posts_each_event_exactly_once(dies: str) -> None:
    api = PoolApi([accepted_job("a")])
    if dies == "while posting the Events":
        api.die_after_events = 1  # the pool's Promoted is posted, the job's copy is not
    else:
        api.status_failures = [Killed()]
    with pytest.raises(Killed):
        await one_pass(api, wiring())
    assert api.server["status"] == {}  # nothing recorded: the restarted operator plans the same transition
    await one_pass(api, wiring())  # restarted, from the same resourceVersion: the same Event names
    await one_pass(api, wiring())
    assert api.reasons() == PROMOTED
    assert api.server["status"]["models"]["bot"]["promoted"] == 1


async def test_an_unknown_pin_is_one_warning_event_and_a_condition_not_one_per_pass() -> None:
    api = PoolApi([accepted_job("a")])
    await one_pass(api, wiring())
    api.server["spec"]["models"] = {"bot": {"pin": 7}}
    api.server["metadata"]["generation"] = 2
    for _ in range(3):
        await one_pass(api, wiring())
    assert api.reasons()[("ModelServer/shared", "PinUnknown")] == 1
    conditions = {c["type"]: c for c in api.server["status"]["conditions"]}
    assert (conditions["PinsResolved"]["status"], conditions["PinsResolved"]["reason"]) == (
        "False",
        "PinUnknown",
    )
    assert "bot-v7 is not a registered version" in conditions["PinsResolved"]["message"]
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "Progressing")


async def test_a_spec_the_operator_cannot_parse_is_ready_false_invalid_spec() -> None:
    api = PoolApi([])
    api.server["spec"]["maxLoraRank"] = 12  # a CRD without the rule admitted it
    await one_pass(api, wiring())
    status = api.server["status"]
    (ready,) = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidSpec")
    assert "maxLoraRank" in ready["message"] and status["message"].startswith("invalid spec:")


async def test_a_pool_that_does_not_change_writes_no_status_and_posts_no_event() -> None:
    api = PoolApi([accepted_job("a")])
    await one_pass(api, wiring())
    writes, posted = api.status_writes, dict(api.events)
    for _ in range(3):  # the 5-second resync of a steady pool
        await one_pass(api, wiring())
    assert api.status_writes == writes and api.events == posted


async def test_a_rollout_step_brings_the_next_pass_when_it_is_due_and_the_gauges_show_the_split() -> None:
    import asyncio
    import time

    from prometheus_client import generate_latest

    api = PoolApi([accepted_job("a")])
    rollout = {"steps": [10, 50], "stepSeconds": 1}
    api.server["spec"] = {**api.server["spec"], "models": {"bot": {"rollout": rollout}}}
    wired = wiring()
    await one_pass(api, wired)
    assert not wired.queue.timers  # nothing is due: the resync is enough
    api.jobs.append(accepted_job("b"))
    began = time.monotonic()
    await one_pass(api, wired)
    assert api.server["status"]["models"]["bot"]["rollout"]["state"] == "Progressing"
    wired.queue.wake.clear()
    await asyncio.wait_for(wired.queue.wake.wait(), timeout=3)  # the kick, well before a 5 s resync
    assert ("team-a", "shared") in wired.queue.kicked and time.monotonic() - began < 2.5
    text = generate_latest(wired.metrics.registry).decode()
    labels = 'model="bot",modelserver="shared",namespace="team-a"'
    assert f'finetune_modelserver_version_weight_percent{{{labels},version="bot-v2"}} 10.0' in text
    assert f'finetune_modelserver_version_weight_percent{{{labels},version="bot-v1"}} 90.0' in text
