"""Operator-wide plumbing behind the Kopf handlers: login, Kopf settings, watch-cache wiring, the
resync loop (the FineTuneJob retry queue, see finetunejob/controller.py) and routing child events to
their parents."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from finetune_vocabulary.labels import LABEL_MODELSERVER_UID

from finetune_operator.api.conditions import IDLE_PHASES
from finetune_operator.context import Children, Context, owner_uid, snapshot
from finetune_operator.finetunejob import controller as reconcile
from finetune_operator.finetunepolicy import controller as policy_controller
from finetune_operator.finetunepolicy import enforcement as policy
from finetune_operator.finetuneschedule import controller as schedule
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import ownership
from finetune_operator.k8s.observe import disrupted_pods
from finetune_operator.modelserver import controller as pool

log = logging.getLogger(__name__)

# Kopf index ids (the handler names in handlers.py) → Children fields.
CHILD_INDEXES = {
    "child_jobs": "jobs",
    "child_deployments": "deployments",
    "child_services": "services",
    "child_pods": "pods",
}


def context(memo: Any) -> Context:
    """The shared Context: Kopf shallow-copies the memo per object, so it lives under one key."""
    ctx = memo["ctx"]
    assert isinstance(ctx, Context)
    return ctx


async def login(memo: Any, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, else $KUBECONFIG / ~/.kube/config (as kubectl)."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        ctx = context(memo)
        ctx.connection = info
        if isinstance(ctx.api, kube.KubeApi):
            await ctx.api.close()  # re-login after a 401: drop the old credentials' session
        ctx.api = kube.KubeApi(info)
    return info


class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """No change detection: there are no on.create/update handlers, so Kopf's per-event deep copy of every
    body into an "essence" is wasted work (a third of the operator's CPU at a thousand jobs)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None  # nothing stored (Kopf writes no annotations), so skip looking for it on every event


class _NoCopyProgress(kopf.SmartProgressStorage):
    """Same reason: the essence is empty, nothing to copy or clean."""

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return essence


def configure(settings: kopf.OperatorSettings) -> kopf.OperatorSettings:
    """Kopf writes nothing of its own: no finalizers, no progress or diff-base annotations (only
    on.event handlers and indexes are used), no Kopf Events, no peering objects."""
    settings.posting.enabled = False
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.persistence.progress_storage = _NoCopyProgress()
    return settings


def bind_indexes(ctx: Context, kwargs: Mapping[str, Any]) -> None:
    """Let the reconcile read children from Kopf's watch-backed indexes."""
    indexes = {field: kwargs[index] for index, field in CHILD_INDEXES.items() if index in kwargs}
    if len(indexes) != len(CHILD_INDEXES):
        return

    def children_of(uid: str) -> Children:
        found = Children()
        for field, index in indexes.items():
            getattr(found, field).extend(index.get(uid, ()))
        return found

    ctx.children_of = children_of


def index_child(body: Mapping[str, Any]) -> dict[str, Any] | None:
    uid = owner_uid(body)
    return {uid: snapshot(body)} if uid else None


def index_deployment(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """A job's Deployment by its uid, a ModelServer's by the pool's: FineTunePolicy's maxServingGpus sums
    what both hold (Context.serving_gpus)."""
    labels = (body.get("metadata") or {}).get("labels") or {}
    uid = owner_uid(body) or labels.get(LABEL_MODELSERVER_UID)
    return {str(uid): snapshot(body)} if uid else None


async def on_job_event(memo: Any, body: Mapping[str, Any], event_type: str | None) -> None:
    ctx = context(memo)
    ctx.pools.kick_job(body)  # a job on a ModelServer: its pool registers, loads or unloads it
    ctx.schedules.kick_child(body)  # a run of a FineTuneSchedule: its status lists the run's phase
    if event_type == "DELETED":
        ctx.forget(str(body["metadata"]["uid"]))
        return
    await reconcile.reconcile(ctx, body, trigger="job-event", skip_echo=True)


async def on_child_event(memo: Any, body: Mapping[str, Any], event_type: str | None) -> None:
    ctx = context(memo)
    uid = owner_uid(body)
    record = ctx.records.get(uid) if uid else None
    if uid is None or record is None:
        return  # the parent's own event (or the resync) reconciles it
    if _counts_for(ctx, record.body, body):
        # Remember evictions from the event itself: the pod may be gone from the index before the
        # reconcile it triggers runs, and the Job's `failed` counter ignores disruptions.
        record.disrupted |= disrupted_pods([body])
    if event_type == "DELETED":
        record.created.pop(f"{body['metadata']['name']}/{body.get('kind')}", None)
    elif ctx.is_echo_of_created(uid, body):
        return
    await reconcile.reconcile(ctx, record.body, trigger="child-event")


async def on_policy_event(memo: Any, body: Mapping[str, Any], event_type: str | None) -> None:
    """Keep the FineTunePolicies and sync their status at once; jobs that have not finished are planned again
    with the change."""
    ctx = context(memo)
    policy_controller.seen(policy_caches(ctx), body, deleted=event_type == "DELETED")
    ctx.policy_queue.wake.set()
    for record in ctx.records.values():
        if (record.body.get("status") or {}).get("phase") not in IDLE_PHASES:
            record.dirty = True


async def on_namespace_event(memo: Any, body: Mapping[str, Any], event_type: str | None) -> None:
    """Keep namespace labels for the policies' namespaceSelectors."""
    ctx = context(memo)
    meta = body["metadata"]
    if event_type == "DELETED":
        ctx.namespace_labels.pop(str(meta["name"]), None)
    else:
        ctx.namespace_labels[str(meta["name"])] = dict(meta.get("labels") or {})
    ctx.policy_queue.wake.set()  # the namespaces a policy selects may have changed


def policy_caches(ctx: Context) -> policy_controller.PolicyCaches:
    """The Context's policy dicts, for the FineTunePolicy controller (shared, not copied)."""
    return policy_controller.PolicyCaches(ctx.policies, ctx.namespace_labels, ctx.policy_status, ctx.ledgers)


async def sync_policy_status(ctx: Context) -> None:
    """One FineTunePolicy status sync (finetunepolicy/controller.py) and the budget gauges it yields."""
    if ctx.api is None:
        return
    jobs = [record.body for record in ctx.records.values()]
    caches = policy_caches(ctx)
    ctx.metrics.budgets = await policy_controller.sync_status(ctx.api, caches, jobs, datetime.now(UTC))


def _counts_for(ctx: Context, parent: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """Whether a child event's object is the parent's child by ownership (labels alone can be copied)."""
    meta = parent["metadata"]
    namespace, uid = str(meta["namespace"]), str(meta["uid"])
    if ownership.is_controlled_by(body, namespace, uid):
        return True
    owned = ctx.children(uid, namespace)  # a pod: its controller must be one of the parent's children
    return ownership.pod_is_owned(body, namespace, owned.jobs, owned.deployments)


def _due(ctx: Context, now: float) -> list[tuple[dict[str, Any], bool]]:
    """(job, read progress) for every job the loop must reconcile now: dirty, stale or training."""
    defaults = ctx.config.defaults
    due = []
    for record in list(ctx.records.values()):
        phase = (record.body.get("status") or {}).get("phase")
        training = phase == "Training"
        last = record.last_run if record.last_run is not None else 0.0
        stale = phase not in IDLE_PHASES and now - last >= defaults.resync_seconds
        if training or stale or record.dirty or policy.waiting_on_policy(record.body):
            due.append((record.body, training))
    return due


async def resync_loop(ctx: Context) -> None:
    """The FineTuneJob queue: re-run failed and stale reconciles, poll training progress (controller.py).

    Kopf timers would put a finalizer on every job; this loop needs none and writes nothing by itself.
    """
    defaults = ctx.config.defaults
    while True:
        await asyncio.sleep(min(defaults.progress_seconds, defaults.resync_seconds))
        for job, training in _due(ctx, time.monotonic()):
            try:
                await reconcile.reconcile(ctx, job, trigger="resync", read_progress=training)
            except Exception:  # one job's bug must not stop the loop for all others
                ctx.metrics.reconcile_errors.labels("unexpected").inc()
                log.exception("resync of %s failed", job["metadata"].get("uid"))


def pool_wiring(ctx: Context) -> pool.PoolWiring:
    """What the ModelServer controller may use of the operator: it never calls the FineTuneJob reconcile
    itself, it asks to wake a job."""

    def current_api() -> kube.KubeApi | None:
        return ctx.api if isinstance(ctx.api, kube.KubeApi) else None

    def policy_view(namespace: str, uid: str) -> policy.PolicyView | None:
        selected = policy.applicable(ctx.policies.values(), ctx.namespace_labels.get(namespace, {}))
        if not selected:
            return None
        return policy.PolicyView(selected, serving_gpus=ctx.serving_gpus(namespace, uid))

    def known_jobs(namespace: str) -> list[Mapping[str, Any]]:
        return [r.body for r in ctx.records.values() if r.body["metadata"].get("namespace") == namespace]

    def wake_job(uid: str) -> None:
        record = ctx.records.get(uid)
        if record is not None:
            ctx.pools.spawn(reconcile.reconcile(ctx, record.body, trigger="pool"))

    return pool.PoolWiring(ctx.config, ctx.metrics, ctx.pools, current_api, policy_view, known_jobs, wake_job)


async def startup(memo: Any, kwargs: Mapping[str, Any]) -> None:
    """Wire the watch caches into the reconcile and start the resync loop (its task lives in the Context)."""
    ctx = context(memo)
    bind_indexes(ctx, kwargs)
    ctx.resync = asyncio.get_running_loop().create_task(resync_loop(ctx), name="finetune-resync")
    ctx.pools.task = asyncio.get_running_loop().create_task(pool.run(pool_wiring(ctx)), name="finetune-pools")
    wiring = schedule.ScheduleWiring(
        ctx.config, ctx.schedules, lambda: ctx.api if isinstance(ctx.api, kube.KubeApi) else None
    )
    ctx.schedules.task = asyncio.get_running_loop().create_task(
        schedule.run(wiring), name="finetune-schedules"
    )
    period = min(ctx.config.defaults.progress_seconds, ctx.config.defaults.resync_seconds)
    ctx.policy_queue.task = asyncio.get_running_loop().create_task(
        policy_controller.run(lambda: sync_policy_status(ctx), ctx.policy_queue, period),
        name="finetune-policies",
    )


async def cleanup(memo: Any) -> None:
    """Stop the resync loop and close the API session."""
    ctx = context(memo)
    if ctx.resync is not None:
        ctx.resync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ctx.resync
        ctx.resync = None
    for holder in (ctx.pools, ctx.policy_queue, ctx.schedules):
        if holder.task is not None:
            holder.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder.task
            holder.task = None
    if isinstance(ctx.api, kube.KubeApi):
        await ctx.api.close()
