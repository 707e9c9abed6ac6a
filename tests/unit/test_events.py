"""Exactly one Event per transition when the Events API throttles, fails or the operator restarts
(issue 9, item 4): deterministic names, backoff, and the Events still owed kept in the status."""

from __future__ import annotations

import collections
import copy
import logging
import re
from collections.abc import Mapping
from typing import Any

import pytest
from finetune_operator.config import load_config
from finetune_operator.context import Children, Context
from finetune_operator.finetunejob.controller import reconcile
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import events

from .ftj_factory import UID
from .test_reconcile import FakeApi, controlled_by, new_job, setup

CONFIG = load_config(env={})
THROTTLED = kube.ApiError(429, {"reason": "TooManyRequests"}, "POST", "/events", retry_after=1)
SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@pytest.fixture(autouse=True)
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    monkeypatch.setattr(events, "MAX_RETRY_AFTER", 0.0)


def test_event_names_are_deterministic_valid_and_distinct() -> None:
    name = events.event_name("demo", UID, "41", 0, "Training")
    assert name == events.event_name("demo", UID, "41", 0, "Training")
    others = {
        events.event_name("demo", UID, "42", 0, "Training"),
        events.event_name("demo", UID, "41", 1, "Training"),
        events.event_name("demo", UID, "41", 0, "Retrying"),
        events.event_name("demo", "another-uid", "41", 0, "Training"),
    }
    assert name not in others and len(others) == 4
    for job_name in ("demo", "a" * 253, "a" * 199 + ".b" * 27, "x-" * 100 + "y"):
        made = events.event_name(job_name, UID, "1", 0, "Pending")
        assert len(made) <= 253 and SUBDOMAIN.match(made), made


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (THROTTLED, True),
        (kube.ApiError(500, {}, "POST", "/e"), True),
        (kube.ApiError(503, {}, "POST", "/e"), True),
        (kube.ApiError(409, {"reason": "Conflict"}, "POST", "/e"), True),
        (TimeoutError(), True),
        (kube.ApiError(403, {"reason": "Forbidden"}, "POST", "/e"), False),
        (kube.ApiError(422, {"reason": "Invalid"}, "POST", "/e"), False),
    ],
)
def test_which_errors_are_retried(error: Exception, transient: bool) -> None:
    assert events.is_transient(error) is transient


class Recorder:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.posted: list[str] = []
        self.calls = 0

    async def __call__(self, record: Mapping[str, Any]) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        if record["name"] in self.posted:
            raise kube.ApiError(409, {"reason": "AlreadyExists"}, "POST", "/events")
        self.posted.append(str(record["name"]))


RECORD = {"name": "demo.0123456789abcdef", "type": "Normal", "reason": "Training", "message": "Training"}


async def test_transient_errors_are_retried_within_the_pass() -> None:
    post = Recorder([THROTTLED, THROTTLED])
    assert await events.post_all(post, [RECORD]) == []
    assert post.posted == [RECORD["name"]] and post.calls == 3


async def test_a_lasting_outage_leaves_the_events_owed_in_order() -> None:
    second = {**RECORD, "name": "demo.fedcba9876543210", "reason": "Succeeded"}
    post = Recorder([THROTTLED] * 4)
    assert await events.post_all(post, [RECORD, second]) == [RECORD, second]
    assert post.calls == 4  # the second is not tried while the API refuses the first
    assert await events.post_all(post, [RECORD, second]) == []
    assert await events.post_all(post, [RECORD, second]) == []  # already there: 409, not a duplicate
    assert post.posted == [RECORD["name"], second["name"]]


async def test_a_permanent_refusal_is_logged_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    post = Recorder([kube.ApiError(403, {"reason": "Forbidden"}, "POST", "/events")])
    with caplog.at_level(logging.WARNING):
        assert await events.post_all(post, [RECORD]) == []
    assert post.calls == 1 and "dropping Event" in caplog.text


def _complete(api: FakeApi, stage: str) -> None:
    child = api.objects[("Job", "team-a", f"demo-{stage}")]
    child["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    pod = {
        "kind": "Pod",
        "metadata": {"name": f"{stage}-1", "namespace": "team-a", "labels": child["metadata"]["labels"]}
        | controlled_by(child),
        "status": {"phase": "Succeeded"},
    }
    api.objects[("Pod", "team-a", f"{stage}-1")] = pod


def _reasons(api: FakeApi) -> collections.Counter[str]:
    return collections.Counter(reason for _, reason, _ in api.events)


async def test_throttled_events_are_posted_once_when_the_api_recovers() -> None:
    """The probe of issue 9: 429s on Event creation dropped 3 of 4 transition Events for good."""
    job = new_job(evaluation={"enabled": False}, deployment={"enabled": False})
    ctx, api = setup(job)
    api.event_failures = [THROTTLED] * 1000  # the Events API refuses everything for now
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    _complete(api, "validate")
    await reconcile(ctx, copy.deepcopy(job), trigger="child-event")
    _complete(api, "train")
    await reconcile(ctx, copy.deepcopy(job), trigger="child-event")
    assert job["status"]["phase"] == "Succeeded"  # the status is not held back by the Events API
    assert [e["reason"] for e in job["status"]["pendingEvents"]] == ["Validating", "Training", "Succeeded"]
    assert ctx.records[UID].dirty and api.events == []
    api.event_failures = []  # the API recovers; the resync loop revisits dirty jobs
    await reconcile(ctx, copy.deepcopy(job), trigger="resync")
    await reconcile(ctx, copy.deepcopy(job), trigger="resync")
    assert _reasons(api) == {"Validating": 1, "Training": 1, "Succeeded": 1}
    assert "pendingEvents" not in job["status"] and not ctx.records[UID].dirty


async def test_an_operator_restart_while_events_are_owed_loses_none() -> None:
    """The status patch recorded the transition and the Event it still owes in one write; a new process
    (nothing in memory) posts it once."""
    job = new_job()
    ctx, api = setup(job)
    api.event_failures = [THROTTLED] * 4
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    assert job["status"]["phase"] == "Validating" and api.events == []
    restarted = Context(config=CONFIG, api=api, children_of=api.children)
    await reconcile(restarted, copy.deepcopy(job), trigger="resume")
    await reconcile(restarted, copy.deepcopy(job), trigger="resync")
    assert _reasons(api) == {"Validating": 1}
    assert "pendingEvents" not in job["status"]


async def test_a_crash_between_the_event_and_the_status_patch_does_not_duplicate() -> None:
    """The Event is posted first; if the status patch then fails (or the process dies), the next pass plans
    the same transition from the same resourceVersion, so the same Event name: AlreadyExists, not a copy."""
    job = new_job()
    ctx, api = setup(job)
    patch_status = _killed_at_the_status_patch(api)
    assert await reconcile(ctx, copy.deepcopy(job), trigger="test") is False  # left to the resync loop
    assert _reasons(api) == {"Validating": 1} and "phase" not in job["status"]
    api.patch_status = patch_status  # type: ignore[method-assign]
    restarted = Context(config=CONFIG, api=api, children_of=api.children)
    await reconcile(restarted, copy.deepcopy(job), trigger="resume")
    assert job["status"]["phase"] == "Validating"
    assert _reasons(api) == {"Validating": 1}


async def test_a_restart_before_the_new_caches_show_the_child_does_not_duplicate_the_event() -> None:
    """As above, but the restarted operator's watch cache has not listed the created Job yet: it plans the
    create again, records a fresh nonce (a new resourceVersion) and adopts its Job. The Event is keyed by
    the status the transition starts from, not by the resourceVersion, so it is still posted once."""
    job = new_job()
    ctx, api = setup(job)
    patch_status = _killed_at_the_status_patch(api)
    assert await reconcile(ctx, copy.deepcopy(job), trigger="test") is False
    api.patch_status = patch_status  # type: ignore[method-assign]
    restarted = Context(config=CONFIG, api=api, children_of=lambda uid: Children())  # nothing listed yet
    await reconcile(restarted, copy.deepcopy(job), trigger="resume")
    assert job["status"]["phase"] == "Validating"
    assert _reasons(api) == {"Validating": 1}


def _killed_at_the_status_patch(api: FakeApi) -> Any:
    """The operator dies at the status patch of a transition (after its Events were posted); the record of
    the child about to be created (ownership.py) still goes through. Returns the real patch_status."""
    patch_status = api.patch_status

    async def dies(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if set(args[2]) == {"children"}:
            return await patch_status(*args, **kwargs)
        raise TimeoutError("the operator was killed here")

    api.patch_status = dies  # type: ignore[method-assign]
    return patch_status
