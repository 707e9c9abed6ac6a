"""The reconcile: observe one FineTuneJob and its children, plan, act. The same code runs on create, on
operator start (resume), on any change of the job or a child, and from the periodic resync.

Children come from watch caches (Kopf indexes), so a reconcile reads nothing from the API except, while
training, the tail of the trainer's log. Writes happen only when the plan differs from what is there:
an unchanged world costs no API call at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf

from . import builders, events, kube, ownership, state
from .builders import LABEL_JOB_UID, JobRef
from .config import OperatorConfig
from .metrics import Metrics
from .models import Phase, SpecError, parse_spec, spec_to_dict
from .naming import Stage

log = logging.getLogger(__name__)

COMPONENT_LABEL = "app.kubernetes.io/component"
RETRY_DELAY = 10.0
STAGE_CONDITIONS = (
    (Stage.VALIDATE, "Validated"),
    (Stage.TRAIN, "Trained"),
    (Stage.EVALUATE, "Evaluated"),
    (Stage.SERVE, "Deployed"),
)


@dataclass
class Children:
    """Snapshots of one job's children, as the watch caches have them."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)

    def by_stage(
        self,
    ) -> tuple[dict[Stage, dict[str, Any]], dict[Stage, list[dict[str, Any]]], dict[str, Any] | None]:
        children: dict[Stage, dict[str, Any]] = {}
        for obj in self.jobs + self.deployments:
            stage = _stage_of(obj)
            if stage is not None:
                children[stage] = obj
        pods: dict[Stage, list[dict[str, Any]]] = {}
        for pod in self.pods:
            stage = _stage_of(pod)
            if stage is not None:
                pods.setdefault(stage, []).append(pod)
        service = self.services[0] if self.services else None
        return children, pods, service


ChildSource = Callable[[str], Children]


def _stage_of(obj: Mapping[str, Any]) -> Stage | None:
    value = ((obj.get("metadata") or {}).get("labels") or {}).get(COMPONENT_LABEL)
    try:
        return Stage(str(value))
    except ValueError:
        return None


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a child the state machine reads; keeps the watch caches small."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            key: meta[key]
            for key in (
                "name",
                "namespace",
                "uid",
                "labels",
                "annotations",
                "ownerReferences",
                "generation",
                "resourceVersion",
                "creationTimestamp",
            )
            if key in meta
        },
        "status": dict(body.get("status") or {}),
    }
    if body.get("kind") == "Job":
        out["spec"] = {"suspend": bool((body.get("spec") or {}).get("suspend"))}
    return out


def owner_uid(body: Mapping[str, Any]) -> str | None:
    labels = (body.get("metadata") or {}).get("labels") or {}
    value = labels.get(LABEL_JOB_UID)
    return str(value) if value else None


def newest_progress(log_text: str) -> dict[str, Any] | None:
    """The newest `{"event": "progress", …}` line of the trainer's stdout (CONTRACT.md)."""
    for line in reversed(log_text.splitlines()):
        line = line.strip()
        if not line.startswith("{") or '"progress"' not in line:
            continue
        try:
            document = json.loads(line)
        except ValueError:
            continue
        if isinstance(document, dict) and document.get("event") == "progress":
            return document
    return None


def _resource_version(body: Mapping[str, Any]) -> int:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


@dataclass
class Context:
    """Operator-wide state shared by handlers (Kopf's memo)."""

    config: OperatorConfig
    metrics: Metrics = field(default_factory=Metrics)
    api: kube.Api | None = None
    children_of: ChildSource = field(default=lambda uid: Children())
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid → newest FineTuneJob body seen
    dirty: set[str] = field(default_factory=set)  # uids whose last reconcile failed
    last_run: dict[str, float] = field(default_factory=dict)
    created: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # uid → name → object
    disrupted: dict[str, set[str]] = field(default_factory=dict)  # uid → evicted pods seen failing
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # uid → (generation, spec as parsed and defaulted, its error): the spec changes only with the generation.
    specs: dict[str, tuple[int, dict[str, Any], str | None]] = field(default_factory=dict)
    # uid → objects carrying the job's labels that are not its children, already logged (once each).
    ignored: dict[str, set[str]] = field(default_factory=dict)
    connection: Any = None

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())

    def remember(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Keep the newest version of a job: a watch event can be older than our own status patch."""
        uid = str(body["metadata"]["uid"])
        known = self.jobs.get(uid)
        if (
            known is None
            or _resource_version(body) >= _resource_version(known)
            or not _resource_version(body)
        ):
            self.jobs[uid] = {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "metadata": dict(body["metadata"]),
                "spec": body.get("spec") or {},
                "status": dict(body.get("status") or {}),
            }
        return self.jobs[uid]

    def forget(self, uid: str) -> None:
        for table in (
            self.jobs,
            self.last_run,
            self.created,
            self.locks,
            self.disrupted,
            self.specs,
            self.ignored,
        ):
            table.pop(uid, None)
        self.dirty.discard(uid)
        self.metrics.forget(uid)

    def is_echo_of_created(self, uid: str, body: Mapping[str, Any]) -> bool:
        """A watch event for a child this process just created, showing nothing it does not know."""
        created = self.created.get(uid, {}).get(f"{body['metadata']['name']}/{body.get('kind')}")
        return created is not None and snapshot(body)["status"] == created["status"]

    def children(self, uid: str, namespace: str) -> Children:
        """The job's children: watch-cache objects with its label that its controller ownerReference
        confirms (ownership.py), plus the ones this process created that the cache has not shown yet."""
        found, ignored = ownership.owned_children(self._labelled(uid), namespace, uid)
        self._log_ignored(uid, ignored)
        return found

    def _log_ignored(self, uid: str, ignored: Iterable[Mapping[str, Any]]) -> None:
        seen = self.ignored.setdefault(uid, set())
        for obj in ignored:
            key = str((obj.get("metadata") or {}).get("uid") or ownership.describe(obj))
            if key not in seen:
                seen.add(key)
                log.warning(
                    "ignoring %s: it carries the labels of FineTuneJob uid %s but is not controlled by it "
                    "in its namespace",
                    ownership.describe(obj),
                    uid,
                )

    def _labelled(self, uid: str) -> Children:
        found = self.children_of(uid)
        recent = self.created.get(uid)
        if recent:
            lists = {"Job": found.jobs, "Deployment": found.deployments, "Service": found.services}
            for key, obj in list(recent.items()):
                listed = lists[obj["kind"]]
                # Watch events may omit `kind`; the list a snapshot sits in says what it is.
                if any(c["metadata"]["name"] == obj["metadata"]["name"] for c in listed):
                    del recent[key]
                else:
                    listed.append(obj)
        return found


async def reconcile(
    ctx: Context,
    body: Mapping[str, Any],
    *,
    trigger: str,
    read_progress: bool = False,
    skip_echo: bool = False,
) -> None:
    """Observe → plan → act for one FineTuneJob; raises kopf.TemporaryError/PermanentError on failure.

    With `skip_echo`, a watch event that only echoes a version this process already reconciled (typically
    its own status patch) is dropped: nothing can have changed.
    """
    uid = str(body["metadata"]["uid"])
    async with ctx.lock(uid):
        known = ctx.jobs.get(uid)
        version = _resource_version(body)
        if (
            skip_echo
            and known is not None
            and uid not in ctx.dirty
            and uid in ctx.last_run
            and (0 < version <= _resource_version(known))
        ):
            return
        ctx.metrics.reconciles.labels(trigger).inc()
        job = ctx.remember(body)
        ctx.dirty.discard(uid)
        try:
            await _reconcile(ctx, job, read_progress=read_progress)
        except kopf.PermanentError:
            ctx.metrics.reconcile_errors.labels("permanent").inc()
            raise
        except (TimeoutError, kube.ApiError, kube.NotOwnedError, aiohttp.ClientError, OSError) as error:
            ctx.dirty.add(uid)
            ctx.metrics.reconcile_errors.labels(type(error).__name__).inc()
            raise kopf.TemporaryError(f"reconcile failed, will retry: {error}", delay=RETRY_DELAY) from error
        finally:
            ctx.last_run[uid] = time.monotonic()


async def _reconcile(ctx: Context, job: dict[str, Any], *, read_progress: bool) -> None:
    meta = job["metadata"]
    if meta.get("deletionTimestamp"):
        return  # being deleted: nothing to create, and its name may soon belong to a re-created job
    uid, namespace, name = str(meta["uid"]), str(meta["namespace"]), str(meta["name"])
    spec, spec_error = _parsed_spec(ctx, uid, int(meta.get("generation") or 1), job.get("spec") or {})
    ref = JobRef(namespace=namespace, name=name, uid=uid, spec=spec)
    children, pods, service = ctx.children(uid, namespace).by_stage()
    status = job.get("status") or {}
    progress = None
    if read_progress and ctx.api is not None and status.get("phase") == Phase.TRAINING.value:
        progress = await _read_progress(
            ctx.api, namespace, pods.get(Stage.TRAIN, []), ctx.config.defaults.progress_tail_lines
        )
    seen = ctx.disrupted.setdefault(uid, set())
    for stage_pods in pods.values():
        seen |= state.disrupted_pods(stage_pods)
    observed = state.Observed(
        disrupted=frozenset(seen),
        job=ref,
        generation=int(meta.get("generation") or 1),
        status=status,
        children=children,
        service=service,
        pods=pods,
        progress=progress,
        spec_error=spec_error,
    )
    plan = state.plan(observed, ctx.config)
    conflicts = await execute(ctx, job, plan)
    if conflicts:
        await _wait_for_conflicts(ctx, job, observed, conflicts)
    if spec_error is not None:
        raise kopf.PermanentError(f"{namespace}/{name}: {spec_error}")


async def _wait_for_conflicts(
    ctx: Context, job: dict[str, Any], observed: state.Observed, conflicts: dict[tuple[str, str], str]
) -> None:
    """A child's name is taken by an object this job does not control (an orphaned leftover, another
    owner's object): plan again knowing it, so the status says which object and what to do, and retry
    from the resync loop until the name is free. Logged once per object, not on every retry."""
    uid = str(job["metadata"]["uid"])
    seen = ctx.ignored.setdefault(uid, set())
    for (kind, name), message in conflicts.items():
        if f"conflict:{kind}/{name}" not in seen:
            seen.add(f"conflict:{kind}/{name}")
            log.warning("%s/%s waits: %s", job["metadata"]["namespace"], job["metadata"]["name"], message)
    plan = state.plan(dataclasses.replace(observed, conflicts=conflicts), ctx.config)
    again = await execute(ctx, job, plan)
    if again:
        raise kube.NotOwnedError("; ".join(again.values()))
    ctx.dirty.add(uid)


def _parsed_spec(
    ctx: Context, uid: str, generation: int, raw: Mapping[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """The operator's validation of the spec, run once per generation (pydantic is most of a pass's cost)."""
    cached = ctx.specs.get(uid)
    if cached is not None and cached[0] == generation:
        return cached[1], cached[2]
    try:
        spec, error = spec_to_dict(parse_spec(dict(raw))), None
    except SpecError as exc:
        spec, error = dict(raw), str(exc)
    ctx.specs[uid] = (generation, spec, error)
    return spec, error


async def _read_progress(
    api: kube.Api, namespace: str, pods: Iterable[Mapping[str, Any]], lines: int
) -> dict[str, Any] | None:
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if not running:
        return None
    newest = max(running, key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""))
    text = await api.pod_log_tail(
        namespace, str(newest["metadata"]["name"]), builders.TRAINER_CONTAINER, lines
    )
    return newest_progress(text)


async def execute(ctx: Context, job: dict[str, Any], plan: state.Plan) -> dict[tuple[str, str], str]:
    """Children first, then Events, then the status: a crash in between is repaired by the next pass, which
    re-posts the same Event names (events.py: exactly one Event per transition).

    Returns {(kind, name): message} without writing anything else when a child's name is taken by an
    object the job does not control (kube.NotOwnedError); the caller plans again knowing that.
    """
    if ctx.api is None:
        raise kopf.TemporaryError("the API client is not ready yet", delay=1)
    api = ctx.api
    meta = job["metadata"]
    uid, namespace, name = str(meta["uid"]), str(meta["namespace"]), str(meta["name"])
    for manifest in plan.create:
        try:
            created = await _create(ctx, api, manifest, uid)
        except kube.NotOwnedError as error:
            return {(str(manifest["kind"]), str(manifest["metadata"]["name"])): str(error)}
        ctx.metrics.api_writes.labels("create", manifest["kind"]).inc()
        ctx.created.setdefault(uid, {})[f"{manifest['metadata']['name']}/{manifest['kind']}"] = snapshot(
            created
        )
    for patch in plan.patch:
        await api.patch(patch.kind, namespace, patch.name, patch.patch, patch.patch_type)
        ctx.metrics.api_writes.labels("patch", patch.kind).inc()
    for delete in plan.delete:
        await api.delete(delete.kind, namespace, delete.name)
        ctx.metrics.api_writes.labels("delete", delete.kind).inc()
    status_patch = {**plan.status, **await _post_events(ctx, api, job, plan.events)}
    if status_patch:
        old_status = dict(job.get("status") or {})
        updated = await api.patch_status(namespace, name, status_patch, uid=uid)
        ctx.metrics.api_writes.labels("patch", "FineTuneJob/status").inc()
        if updated.get("metadata"):
            ctx.remember(updated)
            if (updated["metadata"].get("generation") or 1) != (meta.get("generation") or 1):
                ctx.dirty.add(uid)  # the spec changed while we planned: the resync loop re-runs it soon
        else:
            job["status"] = {**job.get("status", {}), **status_patch}
        _observe(ctx, job, old_status, plan)
    phase = (ctx.jobs.get(uid, job).get("status") or {}).get("phase")
    if phase:
        ctx.metrics.phases[uid] = str(phase)
    return {}


async def _post_events(
    ctx: Context, api: kube.Api, job: Mapping[str, Any], planned: list[state.Event]
) -> dict[str, Any]:
    """Post the Events still owed (status.pendingEvents) and the plan's new ones, before the status patch,
    under deterministic names (events.py); returns the status patch for what remains owed."""
    meta = job["metadata"]
    uid, name = str(meta["uid"]), str(meta["name"])
    owed_before = list((job.get("status") or {}).get("pendingEvents") or [])
    records = owed_before + events.pending(name, uid, str(meta.get("resourceVersion") or ""), planned)
    if not records:
        return {}

    async def post(record: Mapping[str, Any]) -> None:
        await api.post_event(job, record["type"], record["reason"], record["message"], name=record["name"])
        ctx.metrics.api_writes.labels("create", "Event").inc()

    owed = await events.post_all(post, records)
    if owed:
        ctx.dirty.add(uid)  # the resync loop posts them again
    return {"pendingEvents": owed or None} if owed != owed_before else {}


async def _create(ctx: Context, api: kube.Api, manifest: dict[str, Any], uid: str) -> dict[str, Any]:
    try:
        return await api.create_or_adopt(manifest, uid)
    except kube.ApiError as error:
        # Clusters before 1.29 reject podReplacementPolicy: retry once without it.
        if (
            error.status == 422
            and "podReplacementPolicy" in str(error)
            and "podReplacementPolicy" in manifest.get("spec", {})
        ):
            log.warning(
                "the cluster rejects podReplacementPolicy; creating %s without it",
                manifest["metadata"]["name"],
            )
            spec = {k: v for k, v in manifest["spec"].items() if k != "podReplacementPolicy"}
            return await api.create_or_adopt({**manifest, "spec": spec}, uid)
        raise


def _observe(ctx: Context, job: Mapping[str, Any], old_status: Mapping[str, Any], plan: state.Plan) -> None:
    """Stage durations when a stage condition turns True; GPU-hours for the gauge."""
    meta = job["metadata"]
    uid = str(meta["uid"])
    hours = plan.status.get("gpuHours")
    if isinstance(hours, int | float):
        ctx.metrics.gpu_hours[(str(meta["namespace"]), uid)] = float(hours)
    old = {c.get("type"): c.get("status") for c in old_status.get("conditions") or []}
    new = {c["type"]: c.get("status") for c in plan.status.get("conditions") or []}
    finished = [s for s, kind in STAGE_CONDITIONS if new.get(kind) == "True" and old.get(kind) != "True"]
    if not finished:
        return
    children, _, _ = ctx.children(uid, str(meta["namespace"])).by_stage()
    for stage in finished:
        child_status = (children.get(stage) or {}).get("status") or {}
        start = state.parse_time(child_status.get("startTime"))
        end = state.parse_time(child_status.get("completionTime"))
        if start and end:
            ctx.metrics.stage_seconds.labels(stage.value).observe((end - start).total_seconds())
