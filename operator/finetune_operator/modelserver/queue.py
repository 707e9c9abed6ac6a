"""The ModelServer queue (controller.py says how pools are queued): kicked pools, the ModelServers seen, and
the background tasks of pool passes. Held by the Context; the Kopf handlers only kick."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_vocabulary.labels import LABEL_MODELSERVER_UID


@dataclass
class PoolController:
    """Kicked pools and the ModelServers seen, shared by the handlers (lives in the Context)."""

    servers: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (ns, name) → body
    by_uid: dict[str, tuple[str, str]] = field(default_factory=dict)
    kicked: set[tuple[str, str]] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    running: set[asyncio.Task[Any]] = field(default_factory=set)
    timers: dict[tuple[str, str], asyncio.TimerHandle] = field(default_factory=dict)  # kick_later's
    # Reconciles a FineTuneJob that reads a pool's status (set by the wiring: the kinds import neither).
    tell_job: Callable[[Mapping[str, Any]], Coroutine[Any, Any, Any]] | None = None

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    def kick(self, namespace: str, name: str) -> None:
        self.kicked.add((namespace, name))
        self.wake.set()

    def kick_later(self, namespace: str, name: str, delay: float) -> None:
        """Kick the pool after `delay` seconds (a rollout step falls due), replacing an earlier timer."""
        key = (namespace, name)
        old = self.timers.pop(key, None)
        if old is not None:
            old.cancel()
        self.timers[key] = asyncio.get_running_loop().call_later(max(0.0, delay), self.kick, *key)

    def seen(self, body: Mapping[str, Any], deleted: bool) -> None:
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        if deleted:
            self.servers.pop(key, None)
            self.by_uid.pop(str(meta.get("uid")), None)
        else:
            self.servers[key] = {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec", "status")}
            self.by_uid[str(meta.get("uid"))] = key
        self.kick(*key)

    def told(self, job: Mapping[str, Any]) -> None:
        """Reconcile the job now (its own queue retries a failure)."""
        if self.tell_job is not None:
            self.spawn(self.tell_job(job))

    def kick_pod(self, pod: Mapping[str, Any]) -> None:
        uid = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_MODELSERVER_UID)
        key = self.by_uid.get(str(uid))
        if key is not None:
            self.kick(*key)

    def kick_job(self, job: Mapping[str, Any]) -> None:
        """The pool a job names, or the job's own ModelServer (the one it controls)."""
        namespace, uid = str(job["metadata"]["namespace"]), job["metadata"].get("uid")
        server = ((job.get("spec") or {}).get("deployment") or {}).get("server")
        if server:
            self.kick(namespace, str(server))
        for key, body in list(self.servers.items()):
            owners = (body.get("metadata") or {}).get("ownerReferences") or []
            if key[0] == namespace and any(o.get("controller") and o.get("uid") == uid for o in owners):
                self.kick(*key)
