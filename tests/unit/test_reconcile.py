"""The reconcile against a fake API layer (the real one needs an API server; the embedded cluster's
end-to-end tests cover it): write counts, idempotence, restart safety, adoption, errors, progress."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import pytest
from finetune_operator.config import load_config
from finetune_operator.context import Children, Context, snapshot
from finetune_operator.finetunejob.controller import newest_progress, reconcile
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import ownership
from finetune_vocabulary.labels import LABEL_JOB_UID

from .ftj_factory import UID, spec

CONFIG = load_config(env={})


class FakeApi:
    """An in-memory API: objects by (kind, namespace, name), every write recorded."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.events: list[tuple[str, str, str]] = []
        self.logs: dict[str, str] = {}
        self.fail_next: kube.ApiError | None = None
        self.event_failures: list[Exception] = []  # raised by the next Event posts, in order
        self.event_names: set[str] = set()
        self.reject_pod_replacement_policy = False

    def _check(self) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    async def create_or_adopt(
        self, manifest: Mapping[str, Any], owner_uid: str, records: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        self._check()
        meta = manifest["metadata"]
        key = (str(manifest["kind"]), str(meta["namespace"]), str(meta["name"]))
        self.writes.append(("create", key[0], key[2]))
        if self.reject_pod_replacement_policy and "podReplacementPolicy" in manifest.get("spec", {}):
            raise kube.ApiError(422, {"message": "spec.podReplacementPolicy: Forbidden"}, "POST", "/jobs")
        if key in self.objects:
            owners = self.objects[key]["metadata"].get("ownerReferences") or []
            controlled = any(o["uid"] == owner_uid and o.get("controller") for o in owners)
            recorded = records is None or ownership.is_recorded(self.objects[key], key[0], records)
            if not (controlled and recorded):
                message = ownership.conflict_message(key[0], self.objects[key], owner_uid)
                raise kube.NotOwnedError(message, kind=key[0], name=key[2])
            return self.objects[key]
        obj = copy.deepcopy(dict(manifest))
        obj["metadata"]["uid"] = f"uid-{key[2]}"
        obj["status"] = {}
        self.objects[key] = obj
        return obj

    async def patch(
        self, kind: str, namespace: str, name: str, patch: Any, patch_type: str = "merge"
    ) -> None:
        self._check()
        self.writes.append(("patch", kind, name))

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        self.writes.append(("delete", kind, name))
        self.objects.pop((kind, namespace, name), None)

    async def patch_status(
        self, namespace: str, name: str, patch: Mapping[str, Any], uid: str | None = None
    ) -> dict[str, Any]:
        self._check()
        if uid is not None and uid != self.job["metadata"]["uid"]:
            raise kube.ApiError(
                422, {"reason": "Invalid", "message": "metadata.uid: field is immutable"}, "PATCH", name
            )
        self.writes.append(("patch", "FineTuneJob/status", name))
        merge_patch(self.job.setdefault("status", {}), patch)
        meta = self.job["metadata"]
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
        return copy.deepcopy(self.job)

    async def post_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str, name: str | None = None
    ) -> None:
        self.writes.append(("create", "Event", reason))
        if self.event_failures:
            raise self.event_failures.pop(0)
        if name is not None and name in self.event_names:
            raise kube.ApiError(409, {"reason": "AlreadyExists"}, "POST", "/events")
        self.event_names.add(name or f"random-{len(self.events)}")
        self.events.append((type_, reason, message))

    async def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str:
        return "\n".join(self.logs.get(pod, "").splitlines()[-lines:])

    def children(self, uid: str) -> Children:
        """What a watch cache would show: every stored object labelled with the job's uid."""
        found = Children()
        for (kind, _, _), obj in self.objects.items():
            if obj["metadata"]["labels"].get("finetune.dev/job-uid") != uid:
                continue
            target = {
                "Job": found.jobs,
                "Deployment": found.deployments,
                "Service": found.services,
                "Pod": found.pods,
            }[kind]
            target.append(snapshot(obj))
        return found


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """RFC 7386, as the API server applies a merge patch: objects merge, None deletes."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def controlled_by(owner: Mapping[str, Any]) -> dict[str, Any]:
    """The ownerReferences a controller (here the Job controller) puts on what it creates."""
    meta = owner["metadata"]
    ref = {"kind": owner["kind"], "name": meta["name"], "uid": meta["uid"], "controller": True}
    return {"ownerReferences": [ref]}


def new_job(**overrides: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "demo",
            "namespace": "team-a",
            "uid": UID,
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": spec(**overrides),
    }


def setup(job: dict[str, Any], *, cache: bool = True) -> tuple[Context, FakeApi]:
    api = FakeApi(job)
    ctx = Context(config=CONFIG, api=api)
    if cache:
        ctx.children_of = api.children
    return ctx, api


async def test_new_job_costs_four_writes_then_nothing() -> None:
    job = new_job()
    ctx, api = setup(job)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    assert api.writes == [
        ("patch", "FineTuneJob/status", "demo"),  # the record of the child about to be created
        ("create", "Job", "demo-validate"),
        ("create", "Event", "Validating"),  # before the status patch: see events.py
        ("patch", "FineTuneJob/status", "demo"),
    ]
    assert job["status"]["phase"] == "Validating"
    await reconcile(ctx, copy.deepcopy(job), trigger="test")  # e.g. the watch event of our own patch
    assert len(api.writes) == 4
    assert ctx.metrics.phases[UID] == "Validating"


async def test_stale_watch_cache_does_not_duplicate_children() -> None:
    job = new_job()
    ctx, api = setup(job, cache=False)  # the cache never shows the child
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    assert [w for w in api.writes if w[0] == "create" and w[1] == "Job"] == [
        ("create", "Job", "demo-validate")
    ]


async def test_an_older_watch_event_does_not_undo_our_status() -> None:
    job = new_job()
    ctx, api = setup(job)
    stale = copy.deepcopy(job)  # resourceVersion 1, no status
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    await reconcile(ctx, stale, trigger="child-event")
    assert len(api.writes) == 4  # no second status patch, no second Event


async def test_restarted_operator_adopts_and_writes_nothing() -> None:
    job = new_job()
    _, api = setup(job)
    first = Context(config=CONFIG, api=api, children_of=api.children)
    await reconcile(first, copy.deepcopy(job), trigger="test")
    writes = len(api.writes)
    restarted = Context(config=CONFIG, api=api, children_of=api.children)
    await reconcile(restarted, copy.deepcopy(job), trigger="resume")
    assert len(api.writes) == writes


async def test_a_child_name_owned_by_someone_else_is_named_in_the_status_until_freed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 9, item 5: an orphaned leftover (no controller) holds the child's name. The job waits in
    Pending with a condition naming the object and what to do, and carries on once it is deleted."""
    caplog.set_level(logging.WARNING, logger="finetune_operator")  # whatever the root level is
    job = new_job()
    ctx, api = setup(job, cache=False)
    api.objects[("Job", "team-a", "demo-validate")] = {
        "kind": "Job",
        "metadata": {"name": "demo-validate", "namespace": "team-a", "labels": {}, "ownerReferences": []},
    }
    for _ in range(3):  # the resync retries; the status and the log say it once
        await reconcile(ctx, copy.deepcopy(job), trigger="resync")
        assert ctx.records[UID].dirty
    status = job["status"]
    assert status["phase"] == "Pending"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ChildConflict"
    assert "Job team-a/demo-validate exists and is not controlled by this FineTuneJob" in ready["message"]
    assert "kubectl delete job -n team-a demo-validate" in status["message"]
    assert [e[:2] for e in api.events] == [("Warning", "ChildConflict")]
    assert len([r for r in caplog.records if "waits" in r.getMessage()]) == 1
    assert ("patch", "FineTuneJob/status", "demo") in api.writes
    del api.objects[("Job", "team-a", "demo-validate")]  # the user deletes the leftover
    await reconcile(ctx, copy.deepcopy(job), trigger="resync")
    assert job["status"]["phase"] == "Validating"
    assert not ctx.records[UID].dirty
    assert api.objects[("Job", "team-a", "demo-validate")]["metadata"]["ownerReferences"][0]["uid"] == UID


async def test_api_errors_become_temporary_and_mark_the_job_for_retry() -> None:
    job = new_job()
    ctx, api = setup(job)
    api.fail_next = kube.ApiError(503, {"message": "etcd is sad"}, "POST", "/jobs")
    assert await reconcile(ctx, copy.deepcopy(job), trigger="test") is False
    assert ctx.records[UID].dirty
    assert await reconcile(ctx, copy.deepcopy(job), trigger="resync") is True
    assert not ctx.records[UID].dirty
    assert job["status"]["phase"] == "Validating"
    assert ctx.metrics.reconcile_errors.labels("ApiError")._value.get() == 1


async def test_clusters_without_pod_replacement_policy_get_a_job_without_it() -> None:
    job = new_job()
    ctx, api = setup(job)
    api.reject_pod_replacement_policy = True
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    created = api.objects[("Job", "team-a", "demo-validate")]
    assert "podReplacementPolicy" not in created["spec"]


async def test_invalid_spec_fails_permanently_with_the_field_named() -> None:
    job = new_job()
    job["spec"]["resources"]["gpus"] = 99
    ctx, api = setup(job)
    # Nothing to retry: the job is Failed with the field named, and the reconcile did its work.
    assert await reconcile(ctx, copy.deepcopy(job), trigger="test") is True
    assert not ctx.records[UID].dirty
    assert job["status"]["phase"] == "Failed"
    assert "spec.resources.gpus" in job["status"]["message"]
    assert not [w for w in api.writes if w[1] == "Job"]


async def test_training_progress_is_read_from_the_log_tail() -> None:
    job = new_job()
    ctx, api = setup(job)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    validate = api.objects[("Job", "team-a", "demo-validate")]
    validate["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    summary = {"train": 10, "test": 2, "trainTokens": 1000}
    api.objects[("Pod", "team-a", "v-1")] = {
        "kind": "Pod",
        "metadata": {"name": "v-1", "namespace": "team-a", "labels": validate["metadata"]["labels"]}
        | controlled_by(validate),
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
    await reconcile(ctx, copy.deepcopy(job), trigger="child-event")
    assert job["status"]["phase"] == "Training"
    train = api.objects[("Job", "team-a", "demo-train")]
    api.objects[("Pod", "team-a", "t-1")] = {
        "kind": "Pod",
        "metadata": {"name": "t-1", "namespace": "team-a", "labels": train["metadata"]["labels"]}
        | controlled_by(train),
        "status": {"phase": "Running"},
    }
    api.logs["t-1"] = "\n".join(
        [
            "loading model",
            json.dumps({"event": "progress", "step": 5, "totalSteps": 50, "loss": 2.5}),
            json.dumps({"event": "progress", "step": 10, "totalSteps": 50, "loss": 2.1, "etaSeconds": 30}),
            "{not json",
        ]
    )
    await reconcile(ctx, copy.deepcopy(job), trigger="resync", read_progress=True)
    newest = {"step": 10, "totalSteps": 50, "etaSeconds": 30, "loss": 2.1, "display": "10/50"}
    assert job["status"]["progress"].items() >= newest.items()  # a merge patch keeps the batching


@pytest.mark.parametrize(
    ("text", "step"),
    [
        ("", None),
        ("plain text\n", None),
        ('{"event": "progress", "step": 3}\n{"event": "log"}', 3),
        ('{"event": "progress", "step": 3}\n{"event": "progress", "step": 4}', 4),
        ('{"event": "progress"', None),
        (
            '{"event": "progress", "step": 5}\n{"event": "progress", "x": '
            + "[" * 100_000
            + "]" * 100_000
            + "}",
            5,
        ),
    ],
)
def test_newest_progress(text: str, step: int | None) -> None:
    found = newest_progress(text)
    assert (found or {}).get("step") == step


def test_kopf_index_ids_are_the_ones_the_reconcile_reads() -> None:
    from finetune_operator import handlers, lifecycle

    registry = handlers.register(kopf.OperatorRegistry())
    assert {h.id for h in registry._indexing.get_all_handlers()} == set(lifecycle.CHILD_INDEXES)


async def test_metrics_show_jobs_by_phase_writes_and_gpu_hours() -> None:
    from prometheus_client import generate_latest

    job = new_job()
    ctx, _ = setup(job)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    text = generate_latest(ctx.metrics.registry).decode()
    assert 'finetune_jobs{phase="Validating"} 1.0' in text
    assert 'finetune_api_writes_total{kind="Job",verb="create"} 1.0' in text
    assert 'finetune_reconciles_total{trigger="test"} 1.0' in text
    ctx.forget(UID)
    assert 'finetune_jobs{phase="Validating"}' not in generate_latest(ctx.metrics.registry).decode()


@pytest.mark.parametrize(
    ("argv", "namespaces", "all_namespaces"),
    [([], [], False), (["--all-namespaces"], [], True), (["--namespace", "a", "-n", "b"], ["a", "b"], False)],
)
def test_command_line(argv: list[str], namespaces: list[str], all_namespaces: bool) -> None:
    from finetune_operator.__main__ import parse_args

    args = parse_args([*argv, "--metrics-port", "9100"])
    assert args.namespace == namespaces and args.all_namespaces is all_namespaces
    assert args.metrics_port == 9100 and args.liveness_port == 8080


def test_bad_config_file_exits_with_the_field_named(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from finetune_operator.__main__ import main

    path = tmp_path / "config.yaml"
    path.write_text("images: {pullPolicy: Sometimes}")
    assert main(["--config", str(path)]) == 2
    assert "images.pullPolicy" in capsys.readouterr().err


async def test_child_events_that_only_echo_our_own_create_are_dropped() -> None:
    from finetune_operator import lifecycle

    job = new_job()
    ctx, api = setup(job, cache=False)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    created = api.objects[("Job", "team-a", "demo-validate")]
    runs = ctx.metrics.reconciles.labels("child-event")
    await lifecycle.on_child_event({"ctx": ctx}, copy.deepcopy(created), "ADDED")
    assert runs._value.get() == 0  # nothing new: the operator wrote this itself
    changed = copy.deepcopy(created)
    changed["status"] = {"active": 1, "startTime": "2026-01-01T00:00:00Z"}
    await lifecycle.on_child_event({"ctx": ctx}, changed, "MODIFIED")
    assert runs._value.get() == 1


async def test_an_eviction_seen_only_in_the_pod_delete_event_still_counts_as_a_retry() -> None:
    from finetune_operator import lifecycle

    job = new_job()
    ctx, _api = setup(job, cache=False)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    evicted = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "demo-train-abcde",
            "namespace": "team-a",
            "uid": "pod-1",
            "labels": {LABEL_JOB_UID: UID},
            "ownerReferences": [
                {"kind": "Job", "name": "demo-validate", "uid": "uid-demo-validate", "controller": True}
            ],
        },
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
        },
    }
    # The pod is already gone from the index when its reconcile runs: only the event carries it.
    await lifecycle.on_child_event({"ctx": ctx}, evicted, "DELETED")
    assert ctx.records[UID].disrupted == {"pod-1"}


async def test_a_job_being_deleted_gets_no_children_and_no_status() -> None:
    """Its name may soon belong to a re-created job (kubectl delete --cascade=orphan, then apply again)."""
    job = new_job()
    job["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ctx, api = setup(job)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    assert api.writes == []


async def test_a_stale_pass_for_a_deleted_uid_cannot_write_a_namesakes_status() -> None:
    job = new_job()
    ctx, _api = setup(job)
    stale = copy.deepcopy(job)
    stale["metadata"]["uid"] = "the-deleted-job"
    # The API refuses (uid is immutable): the pass fails and is left to the resync loop, nothing written.
    assert await reconcile(ctx, stale, trigger="resync") is False
    assert ctx.records["the-deleted-job"].dirty
    assert "status" not in job


async def test_a_scheduled_runs_dataset_sources_reach_its_status_and_ftj_config() -> None:
    """Issue 24: a FineTuneSchedule's run carries its assembly's counts in the dataset-sources annotation;
    the job copies the integers into status.dataset.sources and FTJ_CONFIG dataset.sources (MLflow)."""
    job = new_job()
    job["metadata"]["annotations"] = {
        "finetune.dev/dataset-sources": json.dumps(
            {"base": 100, "captured": 7, "total": 107, "bad": "x", "f": 1.5}
        )
    }
    ctx, api = setup(job)
    await reconcile(ctx, copy.deepcopy(job), trigger="test")
    validate = api.objects[("Job", "team-a", "demo-validate")]
    env = validate["spec"]["template"]["spec"]["containers"][0]["env"]
    document = json.loads(next(e["value"] for e in env if e["name"] == "FTJ_CONFIG"))
    assert document["dataset"] == {"sources": {"base": 100, "captured": 7, "total": 107}}
    validate["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    summary = {"train": 10, "test": 2, "trainTokens": 1000}
    api.objects[("Pod", "team-a", "v-1")] = {
        "kind": "Pod",
        "metadata": {"name": "v-1", "namespace": "team-a", "labels": validate["metadata"]["labels"]}
        | controlled_by(validate),
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
    await reconcile(ctx, copy.deepcopy(job), trigger="child-event")
    assert job["status"]["dataset"]["sources"] == {"base": 100, "captured": 7, "total": 107}
    assert job["status"]["dataset"]["train"] == 10
    # a job without the annotation: neither
    plain = new_job()
    ctx, api = setup(plain)
    await reconcile(ctx, copy.deepcopy(plain), trigger="test")
    env = api.objects[("Job", "team-a", "demo-validate")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "dataset" not in json.loads(next(e["value"] for e in env if e["name"] == "FTJ_CONFIG"))
