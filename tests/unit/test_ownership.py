"""Children are matched by namespace and controller ownerReference, never by labels alone (issue 9, 1)."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest
from finetune_operator import lifecycle
from finetune_operator.context import Children, Context
from finetune_operator.finetunejob.controller import reconcile
from finetune_operator.k8s.ownership import (
    ANNOTATION_CHILD_NONCE,
    confirmations,
    controller_of,
    intent,
    is_controlled_by,
    nonce_hash,
    owned_children,
    pod_is_owned,
)
from finetune_vocabulary.labels import LABEL_JOB_UID, LABEL_MANAGED_BY, MANAGER

from .ftj_factory import UID
from .test_reconcile import CONFIG, controlled_by, new_job, setup

NS = "team-a"


def obj(
    kind: str, name: str, namespace: str = NS, uid: str = "", owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}", "labels": {}}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {"kind": kind, "metadata": meta, "status": {}}


def ref(kind: str, name: str, uid: str, controller: bool = True) -> dict[str, Any]:
    return {"kind": kind, "name": name, "uid": uid, "controller": controller}


FTJ = ref("FineTuneJob", "demo", UID)


def labelled(pod: dict[str, Any], uid: str = UID) -> dict[str, Any]:
    """A pod with the labels the operator's Job templates give it."""
    pod["metadata"]["labels"].update({LABEL_MANAGED_BY: MANAGER, LABEL_JOB_UID: uid})
    return pod


@pytest.mark.parametrize(
    ("child", "counts"),
    [
        (obj("Job", "demo-train", owner=FTJ), True),
        (obj("Job", "demo-train", namespace="team-b", owner=FTJ), False),  # right uid, other namespace
        (obj("Job", "demo-train"), False),  # labels only
        (obj("Job", "demo-train", owner=ref("FineTuneJob", "demo", UID, controller=False)), False),
        (obj("Job", "demo-train", owner=ref("FineTuneJob", "other", "uid-other")), False),
    ],
)
def test_a_child_counts_only_in_the_namespace_with_the_controller_reference(
    child: dict[str, Any], counts: bool
) -> None:
    assert is_controlled_by(child, NS, UID) is counts


def test_controller_of_ignores_plain_owner_references() -> None:
    child = obj("Pod", "p", owner=ref("Job", "a", "uid-a", controller=False))
    child["metadata"]["ownerReferences"].append(ref("Job", "b", "uid-b"))
    assert (controller_of(child) or {}).get("uid") == "uid-b"
    assert controller_of(obj("Pod", "q")) is None


def test_a_pod_counts_only_through_a_controller_that_counts() -> None:
    job = obj("Job", "demo-train", owner=FTJ)
    deployment = obj("Deployment", "demo-serve", owner=FTJ)
    jobs, deployments = [job], [deployment]
    assert pod_is_owned(
        obj("Pod", "t", owner=ref("Job", "demo-train", "uid-demo-train")), NS, jobs, deployments
    )
    assert pod_is_owned(
        obj("Pod", "s", owner=ref("Deployment", "demo-serve", "uid-demo-serve")), NS, jobs, deployments
    )
    replica = obj("Pod", "r", owner=ref("ReplicaSet", "demo-serve-5d9c7", "uid-rs"))
    replica["metadata"]["labels"]["pod-template-hash"] = "5d9c7"
    assert pod_is_owned(replica, NS, jobs, deployments)
    # A Job of the same name elsewhere, a foreign Job, a pod in another namespace, no controller at all.
    assert not pod_is_owned(
        obj("Pod", "x", owner=ref("Job", "demo-train", "uid-evil")), NS, jobs, deployments
    )
    assert not pod_is_owned(
        obj("Pod", "y", namespace="team-b", owner=ref("Job", "demo-train", "uid-demo-train")),
        NS,
        jobs,
        deployments,
    )
    assert not pod_is_owned(obj("Pod", "z"), NS, jobs, deployments)
    wrong_hash = obj("Pod", "w", owner=ref("ReplicaSet", "demo-serve-5d9c7", "uid-rs"))
    wrong_hash["metadata"]["labels"]["pod-template-hash"] = "other"
    assert not pod_is_owned(wrong_hash, NS, jobs, deployments)


def test_owned_children_splits_kept_and_ignored() -> None:
    mine = obj("Job", "demo-train", owner=FTJ)
    foreign = obj("Job", "demo-train", namespace="team-b", owner=FTJ)
    found = Children(
        jobs=[mine, foreign],
        services=[obj("Service", "demo-serve")],
        pods=[
            labelled(obj("Pod", "ok", owner=ref("Job", "demo-train", "uid-demo-train"))),
            labelled(obj("Pod", "evil", "team-b", owner=ref("Job", "demo-train", "uid-demo-train"))),
        ],
    )
    kept, ignored = owned_children(found, NS, UID)
    assert (
        kept.jobs == [mine] and kept.services == [] and [p["metadata"]["name"] for p in kept.pods] == ["ok"]
    )
    assert sorted((o["kind"], o["metadata"]["namespace"]) for o in ignored) == [
        ("Job", "team-b"),
        ("Pod", "team-b"),
        ("Service", NS),
    ]


def test_only_pods_with_the_operators_labels_are_read() -> None:
    """Issue 20, defect 4: anyone may create a pod whose controller is the genuine stage Job; the chart's
    pod admission policy refuses such pods only when they carry our labels, so a pod without them (or with
    another job's uid) is never read, whatever its ownerReference and termination message say."""
    job = obj("Job", "demo-evaluate", owner=FTJ)
    under_job = ref("Job", "demo-evaluate", "uid-demo-evaluate")
    genuine = labelled(obj("Pod", "genuine", owner=under_job))
    no_labels = obj("Pod", "no-labels", owner=under_job)
    not_managed = labelled(obj("Pod", "not-managed", owner=under_job))
    not_managed["metadata"]["labels"][LABEL_MANAGED_BY] = "someone-else"
    other_uid = labelled(obj("Pod", "other-uid", owner=under_job), uid="uid-of-another-job")
    found = Children(jobs=[job], pods=[genuine, no_labels, not_managed, other_uid])
    kept, ignored = owned_children(found, NS, UID, {"Job/demo-evaluate": {"uid": "uid-demo-evaluate"}})
    assert [p["metadata"]["name"] for p in kept.pods] == ["genuine"]
    assert sorted(o["metadata"]["name"] for o in ignored) == ["no-labels", "not-managed", "other-uid"]


def _finished_job(name: str, namespace: str, labels: dict[str, str], owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "labels": dict(labels),
            "ownerReferences": [owner],
        },
        "status": {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1},
    }


def _pod_with_summary(job: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    meta = job["metadata"]
    return {
        "kind": "Pod",
        "metadata": {
            "name": f"{meta['name']}-xyz12",
            "namespace": meta["namespace"],
            "uid": f"pod-{meta['uid']}",
            "labels": dict(meta["labels"]),
        }
        | controlled_by(job),
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {
                            "exitCode": 0,
                            "message": json.dumps({"exitCode": 0, "summary": summary}),
                        }
                    },
                }
            ],
        },
    }


async def test_spoofed_children_in_another_namespace_do_not_move_the_victim(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The probe of issue 9: a Job in namespace team-b with the victim's labels (and even an ownerReference
    with its uid) whose pod writes a crafted termination message must not advance the victim or set its
    adapter; a labelled Job in the victim's own namespace without the controller reference neither."""
    job = new_job()
    ctx, api = setup(job)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    assert job["status"]["phase"] == "Validating"
    genuine = api.objects[("Job", NS, "demo-validate")]
    labels = genuine["metadata"]["labels"]
    owner = genuine["metadata"]["ownerReferences"][0]
    summaries = {
        "validate": {"train": 10, "test": 2, "trainTokens": 100},
        "train": {"adapter": "s3://attacker-bucket/evil-adapter", "step": 1, "totalSteps": 1},
    }
    for namespace, stage_owner in (("team-b", owner), (NS, ref("FineTuneJob", "x", "uid-x"))):
        for stage, summary in summaries.items():
            spoof = _finished_job(
                f"evil-{stage}", namespace, {**labels, "app.kubernetes.io/component": stage}, stage_owner
            )
            api.objects[("Job", namespace, spoof["metadata"]["name"])] = spoof
            pod = _pod_with_summary(spoof, summary)
            api.objects[("Pod", namespace, pod["metadata"]["name"])] = pod
    with caplog.at_level(logging.WARNING, logger="finetune_operator.finetunejob.controller"):
        for _ in range(3):
            await reconcile(ctx, copy.deepcopy(job), trigger="resync")
    status = job["status"]
    assert status["phase"] == "Validating", status
    assert "adapter" not in (status.get("artifacts") or {})
    assert not [w for w in api.writes if w[1] == "Job" and w[2] == "demo-train"]
    ignoring = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(ignoring) == 8, ignoring  # 4 Jobs and 4 pods, each logged once over three passes
    assert any("Job team-b/evil-train" in line for line in ignoring)


async def test_an_eviction_event_for_a_foreign_pod_is_not_a_retry() -> None:
    job = new_job()
    ctx, api = setup(job, cache=False)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    evicted = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "demo-validate-abcde",
            "namespace": "team-b",
            "uid": "pod-evil",
            "labels": {LABEL_JOB_UID: UID},
            "ownerReferences": [ref("Job", "demo-validate", "uid-demo-validate")],
        },
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
        },
    }
    await lifecycle.on_child_event({"ctx": ctx}, evicted, "DELETED")
    assert not ctx.records[UID].disrupted
    assert api.job["status"].get("retries") is None


# --- issue 20, defect 4: only children the operator created count (status.children) ---------------------


def _nonced(child: dict[str, Any], nonce: str) -> dict[str, Any]:
    child["metadata"]["annotations"] = {ANNOTATION_CHILD_NONCE: nonce}
    return child


@pytest.mark.parametrize(
    ("records", "counts"),
    [
        ({}, False),  # our ownerReference, but nothing recorded: someone else created it
        ({"Job/demo-evaluate": {"uid": "uid-demo-evaluate"}}, True),
        ({"Job/demo-evaluate": {"uid": "uid-an-earlier-one"}}, False),  # deleted and re-created by someone
        ({"Job/demo-evaluate": {"nonceHashes": [nonce_hash("n-1")]}}, True),  # created, killed before the uid
        ({"Job/demo-evaluate": {"nonceHashes": [nonce_hash("n-2")]}}, False),  # a nonce we never issued
        ({"Job/demo-train": {"uid": "uid-demo-evaluate"}}, False),  # the record of another child
        (None, True),  # a job from before status.children: the ownerReference rule until recorded
    ],
)
def test_a_child_counts_only_when_the_status_records_it(records: dict[str, Any] | None, counts: bool) -> None:
    child = _nonced(obj("Job", "demo-evaluate", owner=FTJ), "n-1")
    kept, ignored = owned_children(Children(jobs=[child]), NS, UID, records)
    assert (kept.jobs == [child]) is counts
    assert (ignored == []) is counts


def test_pods_of_an_unrecorded_job_do_not_count() -> None:
    forged = obj("Job", "demo-evaluate", owner=FTJ)
    pod = obj("Pod", "demo-evaluate-x", owner=ref("Job", "demo-evaluate", "uid-demo-evaluate"))
    kept, _ = owned_children(Children(jobs=[forged], pods=[pod]), NS, UID, {})
    assert kept.jobs == [] and kept.pods == []


def test_a_pending_create_is_confirmed_by_uid_and_intents_keep_earlier_nonces() -> None:
    entry = intent(None, "n-1")
    entry = intent(entry, "n-2")  # the create is repeated (a restart with a stale cache)
    assert entry["nonceHashes"] == [nonce_hash("n-1"), nonce_hash("n-2")]
    child = _nonced(obj("Job", "demo-train", owner=FTJ), "n-1")
    records = {"Job/demo-train": entry}
    kept, _ = owned_children(Children(jobs=[child]), NS, UID, records)
    assert confirmations(kept, records) == {"Job/demo-train": {"uid": "uid-demo-train", "nonceHashes": None}}
    assert confirmations(kept, {"Job/demo-train": {"uid": "uid-demo-train"}}) == {}
    for nonce in range(20):  # bounded: a record never outgrows its CRD schema
        entry = intent(entry, f"x-{nonce}")
    assert len(entry["nonceHashes"]) == 8


def _forge_finished(api: Any, job: dict[str, Any], stage: str, summary: dict[str, Any]) -> None:
    """What a namespace editor can create: a finished Job named like the stage's child, with the operator's
    labels and the controller ownerReference to the FineTuneJob's uid, and a pod with a crafted message."""
    name = f"demo-{stage}"
    labels = {LABEL_JOB_UID: UID, "app.kubernetes.io/component": stage}
    owner = ref("FineTuneJob", "demo", job["metadata"]["uid"])
    forged = _finished_job(name, NS, labels, owner)
    api.objects[("Job", NS, name)] = forged
    pod = _pod_with_summary(forged, summary)
    api.objects[("Pod", NS, pod["metadata"]["name"])] = pod


async def test_a_forged_child_with_our_owner_reference_is_a_conflict_not_adopted() -> None:
    """The probe of issue 20: a pre-created `demo-validate` with the job's controller ownerReference, its
    labels and a crafted termination message is not adopted; the job waits naming the object."""
    job = new_job()
    ctx, api = setup(job)
    _forge_finished(api, job, "validate", {"train": 10, "test": 2, "trainTokens": 100})
    for _ in range(2):
        await reconcile(ctx, copy.deepcopy(job), trigger="resync")
    status = job["status"]
    assert status["phase"] == "Pending", status
    assert "dataset" not in status
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ChildConflict"
    assert "Job team-a/demo-validate exists and was not created by the operator" in status["message"]
    assert "kubectl delete job -n team-a demo-validate" in status["message"]
    assert not [w for w in api.writes if w[1] == "Job" and w[2] == "demo-train"]
    assert len(status["children"]["Job/demo-validate"]["nonceHashes"]) == 1  # retries reuse the intent
    del api.objects[("Job", NS, "demo-validate")]  # the user deletes it: the job carries on
    await reconcile(ctx, copy.deepcopy(job), trigger="resync")
    assert job["status"]["phase"] == "Validating"
    created = api.objects[("Job", NS, "demo-validate")]
    assert job["status"]["children"]["Job/demo-validate"] == {"uid": created["metadata"]["uid"]}


async def test_a_forged_copy_of_a_recorded_child_does_not_count() -> None:
    """Deleting the operator's child and re-creating it under the same name (nonce annotation copied) with
    a crafted outcome: the recorded uid is not the copy's, so the job does not advance."""
    job = new_job()
    ctx, api = setup(job)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    genuine = api.objects.pop(("Job", NS, "demo-validate"))
    _forge_finished(api, job, "validate", {"train": 10, "test": 2, "trainTokens": 100})
    copied = genuine["metadata"].get("annotations", {})  # the nonce annotation, read off the genuine one
    api.objects[("Job", NS, "demo-validate")]["metadata"]["annotations"] = copied
    for _ in range(2):
        await reconcile(ctx, copy.deepcopy(job), trigger="resync")
    assert job["status"]["phase"] == "Pending"
    assert "dataset" not in job["status"]


@pytest.mark.parametrize("cache", [True, False])
async def test_a_child_created_just_before_a_crash_is_adopted_after_restart(cache: bool) -> None:
    """Killed between creating the child and recording its uid: the restarted operator finds it (in its
    watch cache, or by its own create meeting AlreadyExists) carrying a nonce of the recorded intent."""
    job = new_job()
    ctx, api = setup(job)
    patch_status = api.patch_status

    async def dies(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if set(args[2]) == {"children"}:
            return await patch_status(*args, **kwargs)
        raise TimeoutError("the operator was killed here")

    api.patch_status = dies  # type: ignore[method-assign]
    assert await reconcile(ctx, copy.deepcopy(job), trigger="test") is False
    api.patch_status = patch_status  # type: ignore[method-assign]
    assert "uid" not in job["status"]["children"]["Job/demo-validate"]
    stale: Any = lambda _uid: Children()  # noqa: E731 - a watch cache that has not listed the child yet
    restarted = Context(config=CONFIG, api=api, children_of=api.children if cache else stale)
    assert await reconcile(restarted, copy.deepcopy(job), trigger="resume") is True
    status = job["status"]
    assert status["phase"] == "Validating", status
    created = api.objects[("Job", NS, "demo-validate")]
    assert status["children"]["Job/demo-validate"] == {"uid": created["metadata"]["uid"]}
    creates = [w for w in api.writes if w[1] == "Job"]
    assert creates == [("create", "Job", "demo-validate")] * (1 if cache else 2)


def test_a_created_modelserver_is_not_taken_for_a_child_in_the_watch_cache() -> None:
    """Issue 21: the job's own ModelServer is created like a child (and remembered as created), but it is
    read from the pools' cache: listing the job's children must neither fail on it nor return it."""
    ctx = Context(config=CONFIG, children_of=lambda uid: Children())
    record = ctx.remember(new_job() | {"metadata": {"name": "demo", "namespace": "team-a", "uid": UID}})
    server = {"kind": "ModelServer", "metadata": {"name": "demo-serve", "namespace": "team-a"}}
    record.created["demo-serve/ModelServer"] = server
    found = ctx.children(UID, "team-a")
    assert found.jobs == found.deployments == found.services == []
