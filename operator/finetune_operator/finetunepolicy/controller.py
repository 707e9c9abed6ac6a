"""The FineTunePolicy controller: each policy's status (selector, use per namespace, GPU-hour ledger) kept
current on its own trigger, not on the FineTuneJob resync loop.

How it is triggered (the one place that says it): a policy or namespace watch event wakes `run` at once (a new
policy gets its status without waiting for anything), and `run` syncs every `period` seconds (the wiring
passes the FineTuneJob loop's cadence, so the hours recorded follow training progress as before). Kopf timers
or daemons on the policy kind would put a finalizer on every FineTunePolicy (Kopf requires one for them): the
operator writes none (lifecycle.configure), so this is an asyncio task like the ModelServer queue.

A sync records the GPU hours spent in each policy's ledger (ledger.py), writes the status when it changed,
with the resourceVersion the ledger was read at (a stale write is refused: read-modify-write), and returns
the budget gauges. A failure is logged and retried on the next sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_operator.api.finetunepolicy import FineTunePolicy, parse_policy
from finetune_operator.api.schema import SpecError
from finetune_operator.finetunepolicy import enforcement, ledger
from finetune_operator.k8s import client as kube

log = logging.getLogger(__name__)

# What a failed sync may raise: retried on the next one.
RETRIED_ERRORS = kube.TRANSIENT_ERRORS

Budgets = dict[tuple[str, str], tuple[float, float | None]]  # (policy, namespace) → (used, budget)


@dataclass
class PolicyCaches:
    """The policies and namespace labels as the watches have them, and what the sync keeps between passes:
    each policy's last status written by this process and its ledger with the resourceVersion it was read or
    written at. The wiring owns the dicts (the Context) and hands them over."""

    policies: dict[str, FineTunePolicy]
    namespace_labels: dict[str, dict[str, str]]
    written: dict[str, dict[str, Any]]
    ledgers: dict[str, tuple[int, list[dict[str, Any]]]]


@dataclass
class PolicyQueue:
    """The sync task and what wakes it (lives in the Context)."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def _resource_version(body: Mapping[str, Any]) -> int:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _without_nulls(value: Any) -> Any:
    """A status as the API stores it: a merge patch's nulls remove keys."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def seen(caches: PolicyCaches, body: Mapping[str, Any], deleted: bool) -> None:
    """A policy's watch event: keep it (parsed), and its ledger as stored unless this process holds a newer
    one; a status someone else changed (or a re-created policy) is written again."""
    name = str(body["metadata"]["name"])
    caches.policies.pop(name, None)
    if _without_nulls(body.get("status") or None) != _without_nulls(caches.written.get(name)):
        caches.written.pop(name, None)
    if deleted:
        caches.ledgers.pop(name, None)
        return
    version, held = _resource_version(body), caches.ledgers.get(name)
    if held is None or version >= held[0]:
        caches.ledgers[name] = (version, list((body.get("status") or {}).get("ledger") or []))
    try:
        caches.policies[name] = parse_policy(dict(body))
    except SpecError as error:  # the CRD's schema admits nothing else; an older or hand-made CRD might
        log.warning("ignoring FineTunePolicy %s: %s", name, error)


async def _gone(api: kube.Api, held: list[dict[str, Any]], known: Sequence[str], now: datetime) -> set[str]:
    """Uids a ledger holds that the API confirms deleted (a job not listed yet after a restart is kept)."""
    gone: set[str] = set()
    for namespace, uids in ledger.unconfirmed(held, known, now).items():
        try:
            listed = await api.list("FineTuneJob", namespace)
        except RETRIED_ERRORS as error:
            log.warning("could not list the FineTuneJobs of %s: %s", namespace, error)
            continue
        gone |= uids - {str(j["metadata"].get("uid")) for j in listed}
    return gone


async def sync_status(
    api: kube.Api, caches: PolicyCaches, jobs: Sequence[Mapping[str, Any]], now: datetime
) -> Budgets:
    """Record, write what changed, and return the budget gauges of every policy."""
    known = [str(j["metadata"].get("uid")) for j in jobs]
    budgets: Budgets = {}
    for name, found in sorted(caches.policies.items()):
        labels = caches.namespace_labels
        selected = [n for n, ls in labels.items() if found.spec.namespace_selector.matches(ls)]
        version, before = caches.ledgers.get(name, (0, []))
        recorded = ledger.record(before, selected, jobs, now, await _gone(api, before, known, now))
        status = enforcement.policy_status(found, labels, jobs, now, recorded)
        used = {u["namespace"]: u["gpuHours"] for u in status["used"]}
        for namespace in selected:
            budgets[(name, namespace)] = (used.get(namespace, 0.0), found.spec.gpu_hours_per_month)
        if caches.written.get(name) == status:
            continue
        try:
            written = await api.patch_policy_status(name, status, str(version) if version else None)
        except RETRIED_ERRORS as error:
            log.warning("could not write the status of FineTunePolicy %s: %s", name, error)
            continue
        caches.written[name] = status
        caches.ledgers[name] = (_resource_version(written or {}) or version, recorded)
    return budgets


async def run(sync: Callable[[], Awaitable[None]], queue: PolicyQueue, period: float) -> None:
    """Sync when woken (a policy or namespace changed) and every `period` seconds."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.wake.wait(), period)
        queue.wake.clear()
        try:
            await sync()
        except Exception:  # a bug in one sync must not stop the next
            log.exception("FineTunePolicy status sync failed")
