"""The ModelServer controller: observe one pool, plan (modelserver_plan.py), act, and tell its jobs.

How pools are queued (the one place that says it): pools are few, so unlike FineTuneJobs (reconcile.py) a
pool pass reads what it needs from the API (the ModelServer, its Deployment, Service, ConfigMap and
NetworkPolicy, its pods, the namespace's FineTuneJobs) and asks each running pod's adapter router for its
state (admin port).
Kopf `on.event` handlers (ModelServers, pool pods, FineTuneJobs that name a pool) only `kick` a pool; one
asyncio task (`run`) runs kicked pools at once and every pool every `POOL_RESYNC_SECONDS`. A failed pass is
logged and retried by the next kick or resync; passes of one pool never overlap.

A pass writes the version registry to the status before any replica loads anything, so a version number is
never reused for other weights even if the operator stops in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from finetune_vocabulary.labels import LABEL_MODELSERVER_UID

from finetune_operator.api.modelserver import KIND, parse_modelserver_spec
from finetune_operator.api.schema import SpecError
from finetune_operator.finetunepolicy import enforcement as policy
from finetune_operator.k8s import client as kube
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
from finetune_operator.serving_contract import jobs_served_by

log = logging.getLogger(__name__)

POOL_RESYNC_SECONDS = 5.0
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
        generation=int(body["metadata"].get("generation") or 0),
    )


def _controlled_by(obj: Mapping[str, Any] | None, uid: str) -> bool:
    owners = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(o.get("uid") == uid and o.get("controller") for o in owners)


class PoolReconciler:
    """One pass over one pool."""

    def __init__(self, ctx: Any, api: kube.KubeApi, session: aiohttp.ClientSession) -> None:
        self.ctx, self.api, self.session = ctx, api, session
        self.loads: dict[str, dict[str, float]] = {}  # version → pod → seconds, this pass

    async def reconcile(self, namespace: str, name: str) -> None:
        found = await self.api.get("ModelServer", namespace, name)
        if found is None or found["metadata"].get("deletionTimestamp"):
            self.tell_jobs_of(namespace, name)  # they wait for a server again
            return
        body: Mapping[str, Any] = found
        meta = body["metadata"]
        try:
            spec = parse_modelserver_spec(dict(body.get("spec") or {}))
        except SpecError as error:
            await self.write_status(body, {"message": f"invalid spec: {error}"[:4096]})
            return
        pool = PoolRef(namespace, name, str(meta["uid"]), spec, meta)
        observed = self.with_policy(await observe(self.api, self.session, body, pool))
        plan = plan_pool(observed, self.ctx.config)
        await self.apply_children(pool, plan)
        if plan.registry_changed:
            body = await self.write_status(body, {"models": plan.status["models"]})
        events = list(plan.events)
        loaded_any = await self.push(pool, plan)
        if loaded_any:  # report what the replicas hold now
            observed = self.with_policy(await observe(self.api, self.session, body, pool))
            plan = plan_pool(observed, self.ctx.config)
            events += [e for e in plan.events if e not in events]
        await self.post_events(body, events)
        await self.post_loaded(body, self.loads)
        await self.write_status(body, plan.status)
        self.record_metrics(pool, observed)
        self.tell_jobs(observed)

    def with_policy(self, observed: PoolObserved) -> PoolObserved:
        """The FineTunePolicies selecting the pool's namespace and the GPUs its other servers hold."""
        pool = observed.pool
        selected = policy.applicable(
            self.ctx.policies.values(), self.ctx.namespace_labels.get(pool.namespace, {})
        )
        if not selected:
            return observed
        view = policy.PolicyView(selected, serving_gpus=self.ctx.serving_gpus(pool.namespace, pool.uid))
        return dataclasses.replace(observed, policy=view)

    async def apply_children(self, pool: PoolRef, plan: PoolPlan) -> None:
        for manifest in plan.create:
            await self.api.create_or_adopt(manifest, pool.uid)
            self.ctx.metrics.api_writes.labels("create", manifest["kind"]).inc()
        for patch in plan.patch:
            await self.api.patch(patch.kind, pool.namespace, patch.name, patch.patch, patch.patch_type)
            self.ctx.metrics.api_writes.labels("patch", patch.kind).inc()

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
                self.ctx.metrics.adapter_load_seconds.observe(float(seconds))
                self.loads.setdefault(str(version), {})[pod] = float(seconds)
                log.info("%s/%s: pod %s loaded %s in %.2fs", pool.namespace, pool.name, pod, version, seconds)
            log.debug("push to %s took %.2fs", pod, time.monotonic() - began)
            return True

        results = await asyncio.gather(*(one(pod, ip) for pod, ip in plan.push.items()))
        return any(results)

    async def post_loaded(self, body: Mapping[str, Any], loads: Mapping[str, Mapping[str, float]]) -> None:
        """One `Loaded` Event per version a pass loaded: into which pods, how long each took."""
        for version, pods in sorted(loads.items()):
            timings = ", ".join(f"{pod} {seconds:.1f} s" for pod, seconds in sorted(pods.items()))
            with contextlib.suppress(kube.ApiError):
                await self.api.post_event(
                    body, "Normal", "Loaded", f"{version} loaded into {timings}", kind=KIND
                )

    async def post_events(self, body: Mapping[str, Any], events: list[PoolEvent]) -> None:
        for event in events:
            with contextlib.suppress(kube.ApiError):
                await self.api.post_event(body, event.type, event.reason, event.message, kind=KIND)
            if event.job:
                job = {"metadata": {"namespace": body["metadata"]["namespace"], "name": event.job}}
                with contextlib.suppress(kube.ApiError):
                    await self.api.post_event(job, event.type, event.reason, event.message)

    async def write_status(self, body: Mapping[str, Any], status: Mapping[str, Any]) -> Mapping[str, Any]:
        meta = body["metadata"]
        old = body.get("status") or {}
        patch = {k: v for k, v in status.items() if old.get(k) != v}
        if not patch:
            return body
        updated = await self.api.patch_object_status(
            "ModelServer", meta["namespace"], meta["name"], patch, str(meta["uid"])
        )
        self.ctx.metrics.api_writes.labels("patch", "ModelServer/status").inc()
        self.ctx.pools.seen(updated, deleted=False)
        return updated

    def record_metrics(self, pool: PoolRef, observed: PoolObserved) -> None:
        gauge = self.ctx.metrics.loaded_adapters
        for pod, state in observed.replicas.items():
            count = len((state or {}).get("loaded") or {})
            gauge[(pool.namespace, pool.name, pod)] = count
        for key in [
            k for k in gauge if k[:2] == (pool.namespace, pool.name) and k[2] not in observed.replicas
        ]:
            del gauge[key]

    def tell_jobs_of(self, namespace: str, name: str) -> None:
        for record in list(self.ctx.records.values()):
            meta, spec = record.body["metadata"], record.body.get("spec") or {}
            if meta.get("namespace") == namespace and (spec.get("deployment") or {}).get("server") == name:
                self.ctx.pools.told(record.body)

    def tell_jobs(self, observed: PoolObserved) -> None:
        """The attached jobs read the pool's status: reconcile them now (their own queue retries)."""
        for job in jobs_served_by(observed.jobs, observed.pool.identity()):
            record = self.ctx.records.get(str(job["metadata"]["uid"]))
            if record is not None:
                self.ctx.pools.told(record.body)


async def run(ctx: Any) -> None:
    """The pool queue: kicked pools at once, every known pool every POOL_RESYNC_SECONDS."""
    pools: PoolController = ctx.pools
    session = aiohttp.ClientSession()
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pools.wake.wait(), POOL_RESYNC_SECONDS)
            pools.wake.clear()
            due = pools.kicked | set(pools.servers)
            pools.kicked = set()
            if not isinstance(ctx.api, kube.KubeApi):
                continue
            for key in sorted(due):  # a reconciler per pass: it collects that pass's loads
                pools.spawn(_one(pools, PoolReconciler(ctx, ctx.api, session), key))
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
            reconciler.ctx.metrics.reconcile_errors.labels(type(error).__name__).inc()
            log.warning("ModelServer %s/%s: pass failed, will retry: %s", *key, error)
        except Exception:
            reconciler.ctx.metrics.reconcile_errors.labels("unexpected").inc()
            log.exception("ModelServer %s/%s: pass failed", *key)
