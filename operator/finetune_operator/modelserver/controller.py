"""The ModelServer controller: observe one pool, plan (planner.py), act, and tell its jobs.

How pools are queued (the one place that says it): pools are few, so unlike FineTuneJobs
(finetunejob/controller.py) a pool pass reads what it needs from the API (the ModelServer, its Deployment,
Service, ConfigMap and NetworkPolicy, its pods, the namespace's FineTuneJobs) and asks each running pod's
adapter router for its state (admin port).
Kopf `on.event` handlers (ModelServers, pool pods, FineTuneJobs that name a pool) only `kick` a pool; one
asyncio task (`run`) runs kicked pools at once and every pool every `POOL_RESYNC_SECONDS`. A failed pass is
logged and retried by the next kick or resync; passes of one pool never overlap.

A pass writes the version registry to the status before any replica loads anything, so a version number is
never reused for other weights even if the operator stops in between.

Events are posted exactly once as FineTuneJob Events are (k8s/events.py): under deterministic names, before
the status write that records their transition, and those the API refuses for now are kept in
`status.pendingEvents` and posted by a later pass. A `Loaded` Event reports a load this pass measured: a
crash between the load and its Event loses that one report (never duplicates it).

The controller knows nothing of the FineTuneJob controller (.importlinter): the wiring hands it a
`PoolWiring` (lifecycle.pool_wiring).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from finetune_vocabulary.labels import LABEL_MODELSERVER_UID

from finetune_operator.api.finetunejob import KIND as JOB_KIND
from finetune_operator.api.modelserver import KIND, parse_modelserver_spec
from finetune_operator.api.schema import SpecError
from finetune_operator.config import OperatorConfig
from finetune_operator.finetunepolicy.enforcement import PolicyView
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import events
from finetune_operator.metrics import Metrics
from finetune_operator.modelserver import builders as modelserver
from finetune_operator.modelserver.builders import PoolRef
from finetune_operator.modelserver.planner import (
    PoolEvent,
    PoolObserved,
    PoolPlan,
    plan_pool,
    pod_reachable,
)
from finetune_operator.modelserver.queue import PoolController
from finetune_operator.modelserver.status import as_fields, invalid_status, merge_patch
from finetune_operator.serving_contract import jobs_served_by

log = logging.getLogger(__name__)

POOL_RESYNC_SECONDS = 5.0
REQUEUE_SLACK_SECONDS = 0.2  # after a rollout step is due: the pass then sees it due
STATE_TIMEOUT = aiohttp.ClientTimeout(total=5)
PUSH_TIMEOUT = aiohttp.ClientTimeout(total=900)  # downloading and loading adapters


async def router_state(session: aiohttp.ClientSession, ip: str) -> dict[str, Any] | None:
    try:
        async with session.get(f"http://{ip}:{modelserver.ADMIN_PORT}/state", timeout=STATE_TIMEOUT) as r:
            if r.status != 200:
                return None
            found: dict[str, Any] = await r.json()
            return found
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def push_state(
    session: aiohttp.ClientSession, ip: str, state: Mapping[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.put(
        f"http://{ip}:{modelserver.ADMIN_PORT}/state", json=dict(state), timeout=PUSH_TIMEOUT
    ) as response:
        try:
            body: dict[str, Any] = await response.json()
        except (aiohttp.ContentTypeError, ValueError):
            body = {"error": (await response.text())[:300]}
        return response.status, body


async def observe(
    api: kube.KubeApi, session: aiohttp.ClientSession, body: Mapping[str, Any], pool: PoolRef
) -> PoolObserved:
    name, namespace = modelserver.pool_name(pool.name), pool.namespace
    deployment, service, configmap, policy, pods, jobs = await asyncio.gather(
        api.get("Deployment", namespace, name),
        api.get("Service", namespace, name),
        api.get("ConfigMap", namespace, name),
        api.get("NetworkPolicy", namespace, name),
        api.list("Pod", namespace, f"{LABEL_MODELSERVER_UID}={pool.uid}"),
        api.list("FineTuneJob", namespace),
    )
    children = (deployment, service, configmap, policy)
    owned = [obj if _controlled_by(obj, pool.uid) else None for obj in children]
    reachable = [p for p in pods if pod_reachable(p)]
    states = await asyncio.gather(*(router_state(session, p["status"]["podIP"]) for p in reachable))
    return PoolObserved(
        pool=pool,
        status=body.get("status") or {},
        deployment=owned[0],
        service=owned[1],
        configmap=owned[2],
        network_policy=owned[3],
        pods=pods,
        replicas={p["metadata"]["name"]: s for p, s in zip(reachable, states, strict=True)},
        jobs=jobs,
        generation=_generation(body),
    )


def _generation(body: Mapping[str, Any]) -> int:
    return int(body["metadata"].get("generation") or 0)


def _controlled_by(obj: Mapping[str, Any] | None, uid: str) -> bool:
    owners = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(o.get("uid") == uid and o.get("controller") for o in owners)


@dataclass(frozen=True)
class PoolWiring:
    """What the wiring (lifecycle.pool_wiring) hands the ModelServer controller. The two kinds are
    independent (.importlinter): of FineTuneJobs it gets a read-only view and a way to wake one, no more."""

    config: OperatorConfig
    metrics: Metrics
    queue: PoolController
    api: Callable[[], kube.KubeApi | None]  # the client of the current login; None before it
    # (namespace, pool uid) → the FineTunePolicies selecting the namespace and the GPUs its other servers hold
    policy_view: Callable[[str, str], PolicyView | None]
    known_jobs: Callable[[str], list[Mapping[str, Any]]]  # the FineTuneJobs of a namespace the operator holds
    wake_job: Callable[[str], None]  # by uid: reconcile that FineTuneJob now (it reads the pool's status)


def pending(
    body: Mapping[str, Any], planned: Sequence[PoolEvent], skip: Sequence[PoolEvent] = ()
) -> list[dict[str, Any]]:
    """The plan's Events as named records (status.pendingEvents items), and on its job too
    Named from the resourceVersion they were planned from and their content (events.keyed_name): a pass
    repeated after a crash or a failed status write plans them again under the same names."""
    meta = body["metadata"]
    name, uid, version = str(meta["name"]), str(meta["uid"]), str(meta.get("resourceVersion") or "")
    records: list[dict[str, Any]] = []
    for event in planned:
        if event in skip:
            continue
        key = (version, event.reason, event.message)
        base = {"type": event.type, "reason": event.reason, "message": event.message[:1024]}
        records.append({"name": events.keyed_name(name, uid, *key), **base})
        if event.job:
            records.append({"name": events.keyed_name(event.job, uid, *key, "job"), **base, "job": event.job})
    return records


def loaded_events(loads: Mapping[str, Mapping[str, float]]) -> list[PoolEvent]:
    """One `Loaded` Event per version a pass loaded: into which pods, how long each took."""
    return [
        PoolEvent(
            "Normal",
            "Loaded",
            f"{version} loaded into "
            + ", ".join(f"{pod} {seconds:.1f} s" for pod, seconds in sorted(pods.items())),
        )
        for version, pods in sorted(loads.items())
    ]


class PoolReconciler:
    """One pass over one pool."""

    def __init__(self, wiring: PoolWiring, api: kube.KubeApi, session: aiohttp.ClientSession) -> None:
        self.w, self.api, self.session = wiring, api, session
        self.loads: dict[str, dict[str, float]] = {}  # version → pod → seconds, this pass

    async def reconcile(self, namespace: str, name: str) -> None:
        """Children, then Events, then the status (the registry first when it changed), as the FineTuneJob
        controller does: a crash in between re-plans the same Events under the same names."""
        found = await self.api.get("ModelServer", namespace, name)
        if found is None or found["metadata"].get("deletionTimestamp"):
            gone = {"name": name, "namespace": namespace}  # they wait for a server again
            self.tell_jobs(jobs_served_by(self.w.known_jobs(namespace), gone))
            return
        body: Mapping[str, Any] = found
        meta = body["metadata"]
        try:
            spec = parse_modelserver_spec(dict(body.get("spec") or {}))
        except SpecError as error:
            invalid = invalid_status(
                body.get("status") or {}, str(error), datetime.now(UTC), _generation(body)
            )
            await self.write_status(body, as_fields(invalid))
            return
        pool = PoolRef(namespace, name, str(meta["uid"]), spec, meta)
        observed = await self.observe(body, pool)
        plan = plan_pool(observed, self.w.config)
        await self.apply_children(pool, plan)
        owed = await self.post_events(body, [*self.owed(body), *pending(body, plan.events)])
        if plan.registry_changed:  # with the Events still owed: a transition and its Events in one write
            body = await self.write_status(
                body, {"models": plan.status["models"], "pendingEvents": owed or None}
            )
        if await self.push(pool, plan):  # report what the replicas hold now
            first = plan
            observed = await self.observe(body, pool)
            plan = plan_pool(observed, self.w.config)
            again = pending(body, [*plan.events, *loaded_events(self.loads)], skip=first.events)
            owed = await self.post_events(body, [*owed, *again])
        await self.write_status(body, {**plan.status, "pendingEvents": owed or None})
        self.record_metrics(pool, observed, plan)
        if plan.requeue_after is not None:  # a rollout step is due before the next resync may come
            self.w.queue.kick_later(namespace, name, plan.requeue_after + REQUEUE_SLACK_SECONDS)
        self.tell_jobs(jobs_served_by(observed.jobs, pool.identity()))

    async def observe(self, body: Mapping[str, Any], pool: PoolRef) -> PoolObserved:
        observed = await observe(self.api, self.session, body, pool)
        return dataclasses.replace(observed, policy=self.w.policy_view(pool.namespace, pool.uid))

    def owed(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        found = (body.get("status") or {}).get("pendingEvents") or []
        return [{k: v for k, v in dict(e).items() if v is not None} for e in found]

    async def post_events(
        self, body: Mapping[str, Any], records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Post in order under their names (events.post_all); returns those still owed (status.pendingEvents),
        which every later pass (every POOL_RESYNC_SECONDS) posts again."""
        namespace = body["metadata"]["namespace"]

        async def post(record: Mapping[str, Any]) -> None:
            job = record.get("job")
            involved = {"metadata": {"namespace": namespace, "name": job}} if job else body
            kind = JOB_KIND if job else KIND
            await self.api.post_event(
                involved, record["type"], record["reason"], record["message"], name=record["name"], kind=kind
            )
            self.w.metrics.api_writes.labels("create", "Event").inc()

        return await events.post_all(post, records)

    async def apply_children(self, pool: PoolRef, plan: PoolPlan) -> None:
        for manifest in plan.create:
            await self.api.create_or_adopt(manifest, pool.uid)
            self.w.metrics.api_writes.labels("create", manifest["kind"]).inc()
        for patch in plan.patch:
            await self.api.patch(patch.kind, pool.namespace, patch.name, patch.patch, patch.patch_type)
            self.w.metrics.api_writes.labels("patch", patch.kind).inc()

    async def push(self, pool: PoolRef, plan: PoolPlan) -> bool:
        """Send the desired state to every ready pod that differs, at once; True when any answered."""
        if not plan.push:
            return False

        async def one(pod: str, ip: str) -> bool:
            began = time.monotonic()
            try:
                status, answer = await push_state(self.session, ip, plan.state)
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning(
                    "%s/%s: pushing adapters to pod %s failed: %s", pool.namespace, pool.name, pod, error
                )
                return False
            if status != 200:
                log.warning(
                    "%s/%s: pod %s refused the adapters: %s %s",
                    pool.namespace,
                    pool.name,
                    pod,
                    status,
                    answer,
                )
                return False
            for version, seconds in (answer.get("loadSeconds") or {}).items():
                self.w.metrics.adapter_load_seconds.observe(float(seconds))
                self.loads.setdefault(str(version), {})[pod] = float(seconds)
                log.info("%s/%s: pod %s loaded %s in %.2fs", pool.namespace, pool.name, pod, version, seconds)
            log.debug("push to %s took %.2fs", pod, time.monotonic() - began)
            return True

        results = await asyncio.gather(*(one(pod, ip) for pod, ip in plan.push.items()))
        return any(results)

    async def write_status(self, body: Mapping[str, Any], fields: Mapping[str, Any]) -> Mapping[str, Any]:
        """Merge-patch what differs of `fields` (None: remove), with the uid as precondition."""
        meta = body["metadata"]
        patch = merge_patch(body.get("status") or {}, fields)
        if not patch:
            return body
        updated = await self.api.patch_object_status(
            "ModelServer", meta["namespace"], meta["name"], patch, str(meta["uid"])
        )
        self.w.metrics.api_writes.labels("patch", "ModelServer/status").inc()
        self.w.queue.seen(updated, deleted=False)
        return updated

    def record_metrics(self, pool: PoolRef, observed: PoolObserved, plan: PoolPlan) -> None:
        versions = self.w.metrics.versions
        for old in [k for k in versions if k[:2] == (pool.namespace, pool.name)]:
            del versions[old]
        for (model, version), figures in plan.versions.items():
            versions[(pool.namespace, pool.name, model, version)] = figures
        gauge = self.w.metrics.loaded_adapters
        for pod, state in observed.replicas.items():
            count = len((state or {}).get("loaded") or {})
            gauge[(pool.namespace, pool.name, pod)] = count
        for key in [
            k for k in gauge if k[:2] == (pool.namespace, pool.name) and k[2] not in observed.replicas
        ]:
            del gauge[key]

    def tell_jobs(self, jobs: Sequence[Mapping[str, Any]]) -> None:
        """The attached jobs read the pool's status: reconcile them now (their own queue retries)."""
        for job in jobs:
            self.w.wake_job(str(job["metadata"]["uid"]))


async def run(wiring: PoolWiring) -> None:
    """The pool queue: kicked pools at once, every known pool every POOL_RESYNC_SECONDS."""
    pools = wiring.queue
    session = aiohttp.ClientSession()
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pools.wake.wait(), POOL_RESYNC_SECONDS)
            pools.wake.clear()
            due = pools.kicked | set(pools.servers)
            pools.kicked = set()
            api = wiring.api()
            if api is None:
                continue
            for key in sorted(due):  # a reconciler per pass: it collects that pass's loads
                pools.spawn(_one(pools, PoolReconciler(wiring, api, session), key))
    finally:
        for task in list(pools.running):
            task.cancel()
        await asyncio.gather(*pools.running, return_exceptions=True)
        await session.close()


async def _one(pools: PoolController, reconciler: PoolReconciler, key: tuple[str, str]) -> None:
    lock = pools.locks.setdefault(key, asyncio.Lock())
    if lock.locked():
        pools.kicked.add(key)  # running: once more afterwards
        return
    async with lock:
        try:
            await reconciler.reconcile(*key)
        except (kube.ApiError, aiohttp.ClientError, TimeoutError, OSError, kube.NotOwnedError) as error:
            reconciler.w.metrics.reconcile_errors.labels(type(error).__name__).inc()
            log.warning("ModelServer %s/%s: pass failed, will retry: %s", *key, error)
        except Exception:
            reconciler.w.metrics.reconcile_errors.labels("unexpected").inc()
            log.exception("ModelServer %s/%s: pass failed", *key)
