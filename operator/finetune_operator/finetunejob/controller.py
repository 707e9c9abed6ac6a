"""The reconcile: observe one FineTuneJob and its children, plan, act.

How work is queued and retried (the one place that says it):

- Kopf delivers watch events to `on.event` handlers (handlers.py). Kopf does not retry those: an exception
  raised there is logged and dropped, and `kopf.TemporaryError`/`PermanentError` mean nothing. So the
  reconcile raises neither; it never raises for an API or network failure at all.
- The project runs its own queue instead: a per-job record (records.JobRecord) and the resync loop
  (lifecycle.resync_loop). A reconcile that fails marks its job's record dirty and returns; every
  `resync_seconds` (and every `progress_seconds` while training) the loop re-runs dirty jobs, stale jobs
  (not reconciled for `resync_seconds` and not idle) and training jobs (to read progress). There are no
  Kopf timers or change handlers, hence no finalizers and no Kopf annotations on user objects.
- Reconciles of one job are serialised by its record's lock; different jobs run concurrently.

The same code runs on create, on operator start (resume, from the initial listing), on any change of the job
or a child, and from the resync loop. Children come from watch caches (Kopf indexes), so a reconcile reads
nothing from the API except, while training, the tail of the trainer's log. Writes happen only when the plan
differs from what is there: an unchanged world costs no API call at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

from finetune_operator.api.finetunejob_status import Phase, Stage
from finetune_operator.containers.trainer import TRAINER_CONTAINER
from finetune_operator.finetunejob import distributed, ownedserver
from finetune_operator.finetunejob.plan import Observed, Plan
from finetune_operator.finetunejob.planner import plan
from finetune_operator.finetunejob.records import ControllerContext, JobRecord, by_stage, stage_of
from finetune_operator.finetunejob.ref import JobRef, ObjectRef, dataset_sources
from finetune_operator.finetunejob.stages import STAGES
from finetune_operator.finetunepolicy import enforcement as policy
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import events, ownership
from finetune_operator.k8s.actions import Event
from finetune_operator.k8s.observe import disrupted_pods, parse_time
from finetune_operator.k8s.watchcache import resource_version, snapshot

log = logging.getLogger(__name__)

# What a failed reconcile may raise: retried by the resync loop; anything else is a bug and propagates.
RETRIED_ERRORS = (*kube.TRANSIENT_ERRORS, kube.NotOwnedError)


class NotConnected(Exception):
    """The API client is not ready yet (before Kopf's login)."""


def newest_progress(log_text: str) -> dict[str, Any] | None:
    """The newest `{"event": "progress", …}` line of the trainer's stdout (CONTRACT.md)."""
    for line in reversed(log_text.splitlines()):
        line = line.strip()
        if not line.startswith("{") or '"progress"' not in line:
            continue
        try:
            document = json.loads(line)
        except (ValueError, RecursionError):  # a log line is not trusted to be shallow
            continue
        if isinstance(document, dict) and document.get("event") == "progress":
            return document
    return None


def _is_echo(record: JobRecord | None, body: Mapping[str, Any]) -> bool:
    """A watch event that only echoes a version this process already reconciled (e.g. its status patch)."""
    version = resource_version(body)
    return (
        record is not None
        and not record.dirty
        and record.last_run is not None
        and 0 < version <= resource_version(record.body)
    )


async def reconcile(
    ctx: ControllerContext,
    body: Mapping[str, Any],
    *,
    trigger: str,
    read_progress: bool = False,
    skip_echo: bool = False,
) -> bool:
    """Observe → plan → act for one FineTuneJob; False when it failed and the resync loop will retry it.

    With `skip_echo`, a watch event that only echoes a version this process already reconciled is dropped.
    """
    record = ctx.records.get(str(body["metadata"]["uid"])) or ctx.remember(body)
    async with record.lock:
        if skip_echo and _is_echo(record, body):
            return True
        record = ctx.remember(body)
        ctx.metrics.reconciles.labels(trigger).inc()
        record.dirty = False
        try:
            await _reconcile(ctx, record, read_progress=read_progress)
            return True
        except (*RETRIED_ERRORS, NotConnected) as error:
            record.dirty = True
            ctx.metrics.reconcile_errors.labels(type(error).__name__).inc()
            meta = record.body["metadata"]
            log.warning("reconcile of %s/%s failed, will retry: %s", meta["namespace"], meta["name"], error)
            return False
        finally:
            record.last_run = time.monotonic()


async def _reconcile(ctx: ControllerContext, record: JobRecord, *, read_progress: bool) -> None:
    job = record.body
    meta = job["metadata"]
    if meta.get("deletionTimestamp"):
        return  # being deleted: nothing to create, and its name may soon belong to a re-created job
    uid, namespace, name = str(meta["uid"]), str(meta["namespace"]), str(meta["name"])
    parsed = record.spec()
    spec, view = parsed.spec, None
    if spec is not None:
        view = ctx.policy_view(spec, namespace, uid)
        spec = policy.with_defaults(spec, view.filled) if view else spec
    sources = dataset_sources(meta)
    ref = ObjectRef(namespace, name, uid) if spec is None else JobRef(namespace, name, uid, spec, sources)
    children, pods, service = by_stage(ctx.children(uid, namespace))
    status = job.get("status") or {}
    progress = None
    if read_progress and ctx.api is not None and status.get("phase") == Phase.TRAINING.value:
        progress = await _read_progress(
            ctx.api, namespace, pods.get(Stage.TRAIN, []), ctx.config.defaults.progress_tail_lines
        )
    for stage_pods in pods.values():
        record.disrupted |= disrupted_pods(stage_pods)
    observed = Observed(
        job=ref,
        generation=parsed.generation,
        status=status,
        children=children,
        service=service,
        pods=pods,
        progress=progress,
        spec_error=parsed.error,
        disrupted=frozenset(record.disrupted),
        built=record.built,
        policy=view,
        server=_server(ctx, ref if isinstance(ref, JobRef) else None),
        own_server=_own_server(ctx, ref if isinstance(ref, JobRef) else None),
    )
    planned = plan(observed, ctx.config)
    if view is not None and any(stage_of(m) is Stage.TRAIN for m in planned.create):
        ctx.starting.add(uid)  # counted as active from now on, before its status says Training
    conflicts = await execute(ctx, record, planned)
    if (record.body.get("status") or {}).get("phase") != Phase.VALIDATING.value:
        ctx.starting.discard(uid)
    if conflicts:
        await _wait_for_conflicts(ctx, record, observed, conflicts)
    if parsed.error is not None:
        log.info("%s/%s has an invalid spec: %s", namespace, name, parsed.error)


def _server(ctx: ControllerContext, job: JobRef | None) -> Mapping[str, Any] | None:
    """The ModelServer a job names in spec.deployment.server (issue 11), else its own (ownedserver.py: the
    planner checks it is the job's), as last seen."""
    if job is None:
        return None
    name = job.spec.deployment.server or ownedserver.server_name(job)
    return ctx.model_server(job.namespace, name)


def _own_server(ctx: ControllerContext, job: JobRef | None) -> Mapping[str, Any] | None:
    """The job's own ModelServer while spec.deployment.server names another one (to retire it)."""
    if job is None or not job.spec.deployment.server:
        return None
    return ctx.model_server(job.namespace, ownedserver.server_name(job))


async def _wait_for_conflicts(
    ctx: ControllerContext, record: JobRecord, observed: Observed, conflicts: dict[tuple[str, str], str]
) -> None:
    """A child's name is taken by an object this job does not control (an orphaned leftover, another
    owner's object): plan again knowing it, so the status says which object and what to do, and retry
    from the resync loop until the name is free. Logged once per object, not on every retry."""
    meta = record.body["metadata"]
    for (kind, name), message in conflicts.items():
        if f"conflict:{kind}/{name}" not in record.ignored:
            record.ignored.add(f"conflict:{kind}/{name}")
            log.warning("%s/%s waits: %s", meta["namespace"], meta["name"], message)
    again = await execute(ctx, record, plan(dataclasses.replace(observed, conflicts=conflicts), ctx.config))
    if again:
        raise kube.NotOwnedError("; ".join(again.values()))
    record.dirty = True


async def _read_progress(
    api: kube.Api, namespace: str, pods: Iterable[Mapping[str, Any]], lines: int
) -> dict[str, Any] | None:
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if not running:
        return None
    # progress comes from global rank 0: index 0 of a multi-node Job (other ranks print no progress)
    rank_zero = [p for p in running if distributed.completion_index(p) in (None, 0)] or running
    newest = max(rank_zero, key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""))
    text = await api.pod_log_tail(namespace, str(newest["metadata"]["name"]), TRAINER_CONTAINER, lines)
    return newest_progress(text)


async def execute(ctx: ControllerContext, record: JobRecord, plan: Plan) -> dict[tuple[str, str], str]:
    """Children first, then Events, then the status: a crash in between is repaired by the next pass, which
    re-posts the same Event names (events.py: exactly one Event per transition).

    Returns {(kind, name): message} without writing anything else when a child's name is taken by an
    object the job does not control (kube.NotOwnedError); the caller plans again knowing that.
    """
    if ctx.api is None:
        raise NotConnected("the API client is not ready yet")
    api, job = ctx.api, record.body
    meta = job["metadata"]
    uid, namespace = str(meta["uid"]), str(meta["namespace"])
    records, creates = await _record_intents(ctx, api, record, plan.create)
    for manifest in creates:
        try:
            created = await _create(api, manifest, uid, records)
        except kube.NotOwnedError as error:
            return {(str(manifest["kind"]), str(manifest["metadata"]["name"])): str(error)}
        ctx.metrics.api_writes.labels("create", manifest["kind"]).inc()
        record.created[f"{manifest['metadata']['name']}/{manifest['kind']}"] = snapshot(created)
    for patch in plan.patch:
        await api.patch(patch.kind, namespace, patch.name, patch.patch, patch.patch_type)
        ctx.metrics.api_writes.labels("patch", patch.kind).inc()
    for delete in plan.delete:
        await api.delete(delete.kind, namespace, delete.name)
        ctx.metrics.api_writes.labels("delete", delete.kind).inc()
    status_patch = {**plan.status, **await _post_events(ctx, api, record, plan.events)}
    confirmed = ownership.confirmations(ctx.children(uid, namespace), records)
    if confirmed:  # the uids of the children just created (or created before a crash, by their nonce)
        status_patch["children"] = {**(status_patch.get("children") or {}), **confirmed}
    if status_patch:
        await _write_status(ctx, api, record, plan, status_patch)
    phase = (record.body.get("status") or {}).get("phase")
    if phase:
        ctx.metrics.phases[uid] = str(phase)
    return {}


async def _post_events(
    ctx: ControllerContext, api: kube.Api, record: JobRecord, planned: list[Event]
) -> dict[str, Any]:
    """Post the Events still owed (status.pendingEvents) and the plan's new ones, before the status patch,
    under deterministic names (events.py); returns the status patch for what remains owed."""
    job = record.body
    meta = job["metadata"]
    uid, name = str(meta["uid"]), str(meta["name"])
    owed_before = list((job.get("status") or {}).get("pendingEvents") or [])
    records = owed_before + events.pending(name, uid, events.planned_from(job), planned)
    if not records:
        return {}

    async def post(event: Mapping[str, Any]) -> None:
        await api.post_event(job, event["type"], event["reason"], event["message"], name=event["name"])
        ctx.metrics.api_writes.labels("create", "Event").inc()

    owed = await events.post_all(post, records)
    if owed:
        record.dirty = True  # the resync loop posts them again
    return {"pendingEvents": owed or None} if owed != owed_before else {}


async def _write_status(
    ctx: ControllerContext, api: kube.Api, record: JobRecord, plan: Plan, patch: dict[str, Any]
) -> None:
    job = record.body
    meta = job["metadata"]
    old_status = dict(job.get("status") or {})
    # The uid is a precondition: kube-apiserver refuses to patch a re-created namesake (uid is immutable).
    updated = await api.patch_status(str(meta["namespace"]), str(meta["name"]), patch, uid=str(meta["uid"]))
    ctx.metrics.api_writes.labels("patch", "FineTuneJob/status").inc()
    if updated.get("metadata"):
        ctx.remember(updated)
        if (updated["metadata"].get("generation") or 1) != (meta.get("generation") or 1):
            record.dirty = True  # the spec changed while we planned: the resync loop re-runs it soon
    else:
        job["status"] = {**job.get("status", {}), **patch}
    _observe(ctx, record, old_status, plan)


async def _record_intents(
    ctx: ControllerContext, api: kube.Api, record: JobRecord, manifests: list[dict[str, Any]]
) -> tuple[Mapping[str, Any] | None, list[dict[str, Any]]]:
    """Before creating children, record in the status a hash of a random nonce for each, and annotate each
    with its nonce: a child counts only when the status records it (ownership.py), and nobody can forge a
    nonce they have not seen. Returns the job's records as they are now and the annotated manifests."""
    records = ownership.records_of(record.body.get("status") or {})
    if not manifests or records is None:  # None: a job from before status.children keeps the old rule
        return records, manifests
    intents, annotated = {}, []
    for manifest in manifests:
        key = ownership.child_key(str(manifest["kind"]), str(manifest["metadata"]["name"]))
        nonce = record.nonces.get(key)
        hashes = (records.get(key) or {}).get("nonceHashes") or []
        if nonce is None or ownership.nonce_hash(nonce) not in hashes:
            # a fresh one, unless this process's last try is still unconfirmed (a conflict, a stale cache)
            nonce = record.nonces[key] = secrets.token_urlsafe(24)
            intents[key] = ownership.intent(records.get(key), nonce)
        annotations = {
            **(manifest["metadata"].get("annotations") or {}),
            ownership.ANNOTATION_CHILD_NONCE: nonce,
        }
        annotated.append({**manifest, "metadata": {**manifest["metadata"], "annotations": annotations}})
    if not intents:
        return records, annotated
    meta = record.body["metadata"]
    updated = await api.patch_status(
        str(meta["namespace"]), str(meta["name"]), {"children": intents}, uid=str(meta["uid"])
    )
    ctx.metrics.api_writes.labels("patch", "FineTuneJob/status").inc()
    if updated.get("metadata"):
        ctx.remember(updated)
    return {**records, **intents}, annotated


async def _create(
    api: kube.Api, manifest: dict[str, Any], uid: str, records: Mapping[str, Any] | None
) -> dict[str, Any]:
    try:
        return await api.create_or_adopt(manifest, uid, records)
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
            return await api.create_or_adopt({**manifest, "spec": spec}, uid, records)
        raise


def _observe(ctx: ControllerContext, record: JobRecord, old_status: Mapping[str, Any], plan: Plan) -> None:
    """Stage durations when a stage condition turns True; GPU-hours for the gauge."""
    meta = record.body["metadata"]
    uid = str(meta["uid"])
    hours = plan.status.get("gpuHours")
    if isinstance(hours, int | float):
        ctx.metrics.record_gpu_hours(str(meta["namespace"]), uid, float(hours))
    old = {c.get("type"): c.get("status") for c in old_status.get("conditions") or []}
    new = {c["type"]: c.get("status") for c in plan.status.get("conditions") or []}
    # The last row reporting a condition is the one that turns it True (serve, not export, for Deployed).
    stage_of_condition = {row.condition.value: row.stage for row in STAGES}
    finished = [
        s for kind, s in stage_of_condition.items() if new.get(kind) == "True" and old.get(kind) != "True"
    ]
    if not finished:
        return
    children, _, _ = by_stage(ctx.children(uid, str(meta["namespace"])))
    for stage in finished:
        child_status = (children.get(stage) or {}).get("status") or {}
        start = parse_time(child_status.get("startTime"))
        end = parse_time(child_status.get("completionTime"))
        if start and end:
            ctx.metrics.stage_seconds.labels(stage.value).observe((end - start).total_seconds())
