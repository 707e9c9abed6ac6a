"""A scheduler with kube-scheduler's filters and messages: resources, nodeSelector/affinity, taints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from fractions import Fraction
from typing import Any

from ..kubeclient import PODS, ApiError, Informer, KubeClient, object_key
from ..kubelet.quantity import parse_quantity, pod_requests
from .events import EventRecorder, now_iso

log = logging.getLogger(__name__)

TERMINAL = ("Succeeded", "Failed")
_UNRESOLVABLE = "Preemption is not helpful for scheduling"
_NO_VICTIMS = "No preemption victims found for incoming pod"


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    for tol in tolerations or []:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        operator = tol.get("operator") or "Equal"
        key = tol.get("key") or ""
        if operator == "Exists":
            if not key or key == taint.get("key"):
                return True
        elif key == taint.get("key") and (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _match_expression(expr: dict[str, Any], value: str | None) -> bool:
    op, values = expr.get("operator"), expr.get("values") or []
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and values:
        try:
            lhs, rhs = int(value), int(values[0])
        except ValueError:
            return False
        return lhs > rhs if op == "Gt" else lhs < rhs
    return False


def matches_node_affinity(spec: dict[str, Any], node: dict[str, Any]) -> bool:
    labels = node.get("metadata", {}).get("labels") or {}
    for key, value in (spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms")
    if not terms:
        return True
    fields = {"metadata.name": node["metadata"]["name"]}
    for term in terms:
        exprs = term.get("matchExpressions") or []
        field_exprs = term.get("matchFields") or []
        if not exprs and not field_exprs:
            continue
        if all(_match_expression(e, labels.get(e.get("key"))) for e in exprs) and all(
            _match_expression(e, fields.get(e.get("key"))) for e in field_exprs
        ):
            return True
    return False


def filter_node(
    pod: dict[str, Any], node: dict[str, Any], used: dict[str, Fraction], pod_count: int
) -> list[str]:
    """Reasons this node cannot take the pod, in kube-scheduler's plugin order (first failing plugin)."""
    spec = pod.get("spec", {})
    if node.get("spec", {}).get("unschedulable") and not tolerates(
        spec.get("tolerations"), {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    ):
        return ["node(s) were unschedulable"]
    for taint in node.get("spec", {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(
            spec.get("tolerations"), taint
        ):
            return [f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value') or ''}}}"]
    if not matches_node_affinity(spec, node):
        return ["node(s) didn't match Pod's node affinity/selector"]
    allocatable = node.get("status", {}).get("allocatable") or {}
    reasons = []
    if pod_count + 1 > int(parse_quantity(allocatable.get("pods", "110"))):
        reasons.append("Too many pods")
    for resource, amount in sorted(pod_requests(spec).items()):
        if amount <= 0:
            continue
        have = parse_quantity(allocatable.get(resource, 0))
        if used.get(resource, Fraction(0)) + amount > have:
            reasons.append(f"Insufficient {resource}")
    return reasons


def _histogram(reasons: dict[str, int]) -> str:
    return ", ".join(sorted(f"{count} {reason}" for reason, count in reasons.items()))


def unschedulable_message(per_node: dict[str, list[str]]) -> str:
    total = len(per_node)
    reasons: dict[str, int] = {}
    preemption: dict[str, int] = {}
    for node_reasons in per_node.values():
        for reason in node_reasons:
            reasons[reason] = reasons.get(reason, 0) + 1
        resolvable = all(r.startswith("Insufficient ") or r == "Too many pods" for r in node_reasons)
        key = _NO_VICTIMS if resolvable else _UNRESOLVABLE
        preemption[key] = preemption.get(key, 0) + 1
    if total == 0:
        return "no nodes available to schedule pods"
    return (
        f"0/{total} nodes are available: {_histogram(reasons)}. "
        f"preemption: 0/{total} nodes are available: {_histogram(preemption)}."
    )


class Scheduler:
    def __init__(self, client: KubeClient, pods: Informer, nodes: Informer):
        self.client = client
        self.pods = pods
        self.nodes = nodes
        self.recorder = EventRecorder(client, "default-scheduler")
        self._kick = asyncio.Event()
        self._assumed: dict[str, tuple[str, float]] = {}  # pod uid → (node, when), until the watch shows it
        self._task: asyncio.Task[None] | None = None
        pods.add_handler(lambda _kind, _obj: self._kick.set())
        nodes.add_handler(lambda _kind, _obj: self._kick.set())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        await self.pods.synced.wait()
        await self.nodes.synced.wait()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=5)
            self._kick.clear()
            try:
                await self.schedule_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduling pass failed")
                await asyncio.sleep(0.5)

    def _usage(self) -> tuple[dict[str, dict[str, Fraction]], dict[str, int]]:
        used: dict[str, dict[str, Fraction]] = {}
        counts: dict[str, int] = {}
        now = time.monotonic()
        for pod in self.pods.values():
            uid = pod["metadata"].get("uid")
            node = pod.get("spec", {}).get("nodeName")
            if not node and uid in self._assumed:
                node = self._assumed[uid][0]
            if not node or pod.get("status", {}).get("phase") in TERMINAL:
                continue
            counts[node] = counts.get(node, 0) + 1
            bucket = used.setdefault(node, {})
            for resource, amount in pod_requests(pod.get("spec", {})).items():
                bucket[resource] = bucket.get(resource, Fraction(0)) + amount
        if self._assumed:
            present = {p["metadata"].get("uid") for p in self.pods.values()}
            for uid, (_, when) in list(self._assumed.items()):
                if now - when > 30 or uid not in present:
                    self._assumed.pop(uid, None)
        return used, counts

    async def schedule_pending(self) -> None:
        pending = [
            p
            for p in self.pods.values()
            if not p.get("spec", {}).get("nodeName")
            and p["metadata"].get("uid") not in self._assumed
            and not p["metadata"].get("deletionTimestamp")
            and p.get("status", {}).get("phase") not in TERMINAL
            and (p.get("spec", {}).get("schedulerName") or "default-scheduler") == "default-scheduler"
        ]
        pending.sort(
            key=lambda p: (-(p["spec"].get("priority") or 0), p["metadata"].get("creationTimestamp", ""))
        )
        for pod in pending:
            used, counts = self._usage()
            nodes = sorted(self.nodes.values(), key=lambda n: n["metadata"]["name"])
            per_node: dict[str, list[str]] = {}
            feasible = []
            for node in nodes:
                name = node["metadata"]["name"]
                reasons = filter_node(pod, node, used.get(name, {}), counts.get(name, 0))
                if reasons:
                    per_node[name] = reasons
                else:
                    feasible.append(node)
            if feasible:
                best = max(feasible, key=lambda n: self._score(pod, n, used.get(n["metadata"]["name"], {})))
                await self._bind(pod, best["metadata"]["name"])
            else:
                await self._mark_unschedulable(pod, unschedulable_message(per_node))

    @staticmethod
    def _score(pod: dict[str, Any], node: dict[str, Any], used: dict[str, Fraction]) -> tuple[int, Fraction]:
        allocatable = node.get("status", {}).get("allocatable") or {}
        wants_gpu = any(k.startswith("nvidia.com/") for k in pod_requests(pod.get("spec", {})))
        has_gpu = "nvidia.com/gpu" in allocatable
        # Keep CPU-only pods off GPU nodes when they may go elsewhere; then least allocated wins.
        affinity = 1 if wants_gpu == has_gpu else 0
        free = Fraction(0)
        for resource in ("cpu", "memory"):
            have = parse_quantity(allocatable.get(resource, 0))
            if have:
                free += (have - used.get(resource, Fraction(0))) / have
        return affinity, free

    async def _bind(self, pod: dict[str, Any], node: str) -> None:
        meta = pod["metadata"]
        self._assumed[meta["uid"]] = (node, time.monotonic())
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        try:
            try:
                await self.client.create(PODS.path(meta["namespace"], meta["name"], "binding"), binding)
            except ApiError as err:
                if err.status not in (404, 405):
                    raise
                # No pods/binding on this server: fall back to setting spec.nodeName (404 here = pod gone).
                await self.client.patch(
                    PODS.path(meta["namespace"], meta["name"]), {"spec": {"nodeName": node}}
                )
        except ApiError as err:
            self._assumed.pop(meta["uid"], None)
            log.debug("binding %s to %s failed: %s", object_key(pod), node, err)
            return
        await self.recorder.emit(
            pod, "Normal", "Scheduled", f"Successfully assigned {meta['namespace']}/{meta['name']} to {node}"
        )

    async def _mark_unschedulable(self, pod: dict[str, Any], message: str) -> None:
        current = next(
            (c for c in pod.get("status", {}).get("conditions") or [] if c.get("type") == "PodScheduled"),
            None,
        )
        if current and current.get("status") == "False" and current.get("message") == message:
            return
        meta = pod["metadata"]

        def mutate(obj: dict[str, Any]) -> dict[str, Any] | None:
            if obj.get("spec", {}).get("nodeName"):
                return None
            status = obj.setdefault("status", {})
            status.setdefault("phase", "Pending")
            conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
            conditions.append(
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                    "lastProbeTime": None,
                    "lastTransitionTime": now_iso(),
                }
            )
            status["conditions"] = conditions
            return obj

        try:
            await self.client.update_with_retry(
                PODS.path(meta["namespace"], meta["name"], "status"), mutate, current=pod
            )
        except ApiError as err:
            log.debug("marking %s unschedulable: %s", object_key(pod), err)
            return
        await self.recorder.emit(pod, "Warning", "FailedScheduling", message)
