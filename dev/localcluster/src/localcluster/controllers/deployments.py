"""apps/v1 Deployment controller.

Pods are owned by the Deployment directly (no ReplicaSet objects) but carry `pod-template-hash` and are
named `<deployment>-<hash>-<random>` as usual; the status (replicas, updated/ready/available,
observedGeneration) and the Available/Progressing conditions follow kube-controller-manager, including
RollingUpdate's maxSurge and
maxUnavailable, Recreate, and progressDeadlineSeconds.
"""

from __future__ import annotations

import copy
import json
import math
import time
from typing import Any

from ..kubeclient import DEPLOYMENTS, PODS, ApiError, Informer, KubeClient, object_key
from .events import EventRecorder, now_iso
from .jobs import _parse_time, random_suffix
from .workqueue import WorkQueueController

_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"


def template_hash(template: dict[str, Any], collision_count: int = 0) -> str:
    """fnv-1a 32 over the template, encoded like apimachinery's SafeEncodeString."""
    data = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    if collision_count:
        data += str(collision_count).encode()
    h = 0x811C9DC5
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return "".join(_ALPHANUMS[b % len(_ALPHANUMS)] for b in str(h).encode())


def _int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if value is None:
        value = "25%"
    if isinstance(value, str) and value.endswith("%"):
        raw = int(value[:-1]) * total / 100
        return math.ceil(raw) if round_up else math.floor(raw)
    return int(value)


def _ready_since(pod: dict[str, Any]) -> float | None:
    if pod["metadata"].get("deletionTimestamp"):
        return None
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            return _parse_time(cond.get("lastTransitionTime")) or 0.0
    return None


class DeploymentController(WorkQueueController):
    name = "deployment-controller"

    def __init__(self, client: KubeClient, deployments: Informer, pods: Informer):
        super().__init__(deployments, pods)
        self.client = client
        self.deployments = deployments
        self.pods = pods
        self.recorder = EventRecorder(client, "deployment-controller")
        self.expected: dict[str, dict[str, float]] = {}
        deployments.add_handler(self._on_deployment)
        pods.add_handler(self._on_pod)

    def _on_deployment(self, kind: str, dep: dict[str, Any]) -> None:
        if kind == "DELETED":
            self.expected.pop(dep["metadata"]["uid"], None)
            return
        self.enqueue(object_key(dep))

    @staticmethod
    def _owner(pod: dict[str, Any]) -> dict[str, Any] | None:
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "Deployment" and ref.get("controller"):
                return ref
        return None

    def _on_pod(self, _kind: str, pod: dict[str, Any]) -> None:
        ref = self._owner(pod)
        if ref is not None:
            self.enqueue(f"{pod['metadata']['namespace']}/{ref['name']}")

    async def reconcile(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        dep = self.deployments.get(namespace, name)
        if dep is None or dep["metadata"].get("deletionTimestamp"):
            return
        uid = dep["metadata"]["uid"]
        spec = dep.get("spec", {})
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        phash = template_hash(template)
        rs_name = f"{name}-{phash}"
        min_ready = float(spec.get("minReadySeconds") or 0)
        now = time.time()
        owned = [
            p
            for p in self.pods.values()
            if p["metadata"].get("namespace") == namespace and (self._owner(p) or {}).get("uid") == uid
        ]
        expected = self.expected.setdefault(uid, {})
        for pod_name, when in list(expected.items()):
            if now - when > 30 or self.pods.get(namespace, pod_name) is not None:
                expected.pop(pod_name)
        dead = [
            p
            for p in owned
            if p.get("status", {}).get("phase") in ("Failed", "Succeeded")
            and not p["metadata"].get("deletionTimestamp")
        ]
        live = [p for p in owned if p not in dead and not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in owned if p["metadata"].get("deletionTimestamp")]
        new = [p for p in live if (p["metadata"].get("labels") or {}).get("pod-template-hash") == phash]
        old = [p for p in live if p not in new]

        def available(pod: dict[str, Any]) -> bool:
            since = _ready_since(pod)
            return since is not None and since + min_ready <= now

        strategy = spec.get("strategy") or {}
        rolling = strategy.get("type", "RollingUpdate") == "RollingUpdate"
        ru = strategy.get("rollingUpdate") or {}
        max_surge = _int_or_percent(ru.get("maxSurge"), replicas, True) if rolling else 0
        max_unavailable = _int_or_percent(ru.get("maxUnavailable"), replicas, False) if rolling else replicas
        if rolling and max_surge == 0 and max_unavailable == 0:
            max_unavailable = 1
        created = 0
        if not spec.get("paused"):
            await self._delete(dep, dead, "dead")
            pending_new = len(new) + len(expected)
            if rolling:
                total = len(live) + len(expected)
                room = min(replicas - pending_new, replicas + max_surge - total)
                for _ in range(max(0, room)):
                    if await self._create(dep, template, phash, expected):
                        created += 1
                min_available = replicas - max_unavailable
                available_count = sum(1 for p in live if available(p))
                unhealthy_old = [p for p in old if not available(p)]
                await self._delete(dep, unhealthy_old, "old")
                healthy_old = [p for p in old if available(p)]
                budget = available_count - min_available
                if budget > 0 and healthy_old:
                    await self._delete(dep, healthy_old[:budget], "old")
            else:  # Recreate: every old pod gone before any new one
                if old or any(p not in new for p in terminating):
                    await self._delete(dep, old, "old")
                else:
                    for _ in range(max(0, replicas - pending_new)):
                        if await self._create(dep, template, phash, expected):
                            created += 1
            if len(new) > replicas:
                ranked = sorted(new, key=lambda p: (available(p), p["metadata"].get("creationTimestamp", "")))
                await self._delete(dep, ranked[: len(new) - replicas], "extra")
            if created:
                await self.recorder.emit(
                    dep,
                    "Normal",
                    "ScalingReplicaSet",
                    f"Scaled up replica set {rs_name} from {len(new)} to {len(new) + created}",
                )
        # Pods become "available" minReadySeconds after turning Ready: look again then.
        waits = [
            s + min_ready - now for p in live if (s := _ready_since(p)) is not None and s + min_ready > now
        ]
        if waits:
            self.enqueue_after(key, min(waits) + 0.05)
        await self._write_status(dep, rs_name, live, new, expected, available, replicas, max_unavailable)

    async def _create(
        self, dep: dict[str, Any], template: dict[str, Any], phash: str, expected: dict[str, float]
    ) -> bool:
        meta = dep["metadata"]
        tmpl = copy.deepcopy(template)
        pod_meta = tmpl.get("metadata") or {}
        labels = {**(pod_meta.get("labels") or {}), "pod-template-hash": phash}
        for _ in range(5):
            name = f"{meta['name']}-{phash}-{random_suffix()}"
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "generateName": f"{meta['name']}-{phash}-",
                    "namespace": meta["namespace"],
                    "labels": labels,
                    "annotations": dict(pod_meta.get("annotations") or {}),
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "Deployment",
                            "name": meta["name"],
                            "uid": meta["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": tmpl.get("spec") or {},
            }
            try:
                await self.client.create(PODS.path(meta["namespace"]), body)
            except ApiError as err:
                if err.conflict:
                    continue
                await self.recorder.emit(
                    dep, "Warning", "FailedCreate", f"Error creating: {err.body.get('message')}"
                )
                raise
            if self.pods.get(meta["namespace"], name) is None:
                expected[name] = time.time()
            return True
        return False

    async def _delete(self, dep: dict[str, Any], pods: list[dict[str, Any]], _why: str) -> None:
        for pod in pods:
            meta = pod["metadata"]
            await self.client.delete(PODS.path(meta["namespace"], meta["name"]), uid=meta["uid"])

    async def _write_status(
        self,
        dep: dict[str, Any],
        rs_name: str,
        live: list[dict[str, Any]],
        new: list[dict[str, Any]],
        expected: dict[str, float],
        available: Any,
        replicas: int,
        max_unavailable: int,
    ) -> None:
        spec = dep.get("spec", {})
        current = dep.get("status") or {}
        total = len(live) + len(expected)
        available_count = sum(1 for p in live if available(p))
        ready_count = sum(1 for p in live if _ready_since(p) is not None)
        updated = len(new) + len(expected)
        status: dict[str, Any] = {
            "observedGeneration": dep["metadata"].get("generation", 1),
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": ready_count,
            "availableReplicas": available_count,
            "unavailableReplicas": max(0, max(total, replicas) - available_count),
        }
        for field in (
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
            "updatedReplicas",
            "replicas",
        ):
            if not status[field]:
                status.pop(field)
        conditions = {c["type"]: dict(c) for c in current.get("conditions") or []}
        stamp = now_iso()

        def put(kind: str, value: str, reason: str, message: str) -> None:
            cond = conditions.get(kind)
            if (
                cond
                and cond.get("status") == value
                and cond.get("reason") == reason
                and cond.get("message") == message
            ):
                return
            transition = (
                stamp if not cond or cond.get("status") != value else cond.get("lastTransitionTime", stamp)
            )
            conditions[kind] = {
                "type": kind,
                "status": value,
                "lastUpdateTime": stamp,
                "lastTransitionTime": transition,
                "reason": reason,
                "message": message,
            }

        if available_count >= replicas - max_unavailable:
            put("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
        else:
            put(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        complete = updated == replicas and available_count >= replicas and total == replicas
        progressing = conditions.get("Progressing")
        if spec.get("paused"):
            put("Progressing", "Unknown", "DeploymentPaused", "Deployment is paused")
        elif complete:
            put(
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{rs_name}" has successfully progressed.',
            )
        elif progressing is None or progressing.get("reason") in (
            "NewReplicaSetAvailable",
            "DeploymentPaused",
        ):
            reason = "NewReplicaSetCreated" if progressing is None else "ReplicaSetUpdated"
            message = (
                f'Created new replica set "{rs_name}"'
                if progressing is None
                else f'ReplicaSet "{rs_name}" is progressing.'
            )
            put("Progressing", "True", reason, message)
        elif (
            status != {k: current.get(k) for k in status}
            and progressing.get("reason") != "ProgressDeadlineExceeded"
        ):
            put("Progressing", "True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.')
        else:
            deadline = float(spec.get("progressDeadlineSeconds") or 600)
            last = _parse_time(progressing.get("lastUpdateTime")) or time.time()
            if time.time() - last > deadline:
                put(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    f'ReplicaSet "{rs_name}" has timed out progressing.',
                )
            else:
                self.enqueue_after(object_key(dep), last + deadline - time.time() + 0.1)
        order = ["Available", "Progressing"]
        status["conditions"] = [conditions[k] for k in order if k in conditions] + [
            c for k, c in conditions.items() if k not in order
        ]
        if status == current:
            return
        meta = dep["metadata"]

        def mutate(obj: dict[str, Any]) -> dict[str, Any] | None:
            if obj["metadata"].get("uid") != meta["uid"]:
                return None
            if (obj.get("status") or {}) == status:
                return None
            obj["status"] = status
            return obj

        await self.client.update_with_retry(
            DEPLOYMENTS.path(meta["namespace"], meta["name"], "status"), mutate, current=dep
        )
