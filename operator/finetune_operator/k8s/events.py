"""Exactly one Event per transition, even when the Events API fails or the operator restarts.

A transition is two writes: the Event and the status patch. They are made idempotent and eventually
complete this way:

- Every Event gets a deterministic name, from the job's uid, the status the transition was planned from
  (`planned_from`: its generation and status, less the child intents and owed Events written before a
  transition completes) and its place in the plan. A repeated pass (after a failed status patch, or after a
  restart before it, even one whose new watch cache has not listed the child yet and records a fresh
  intent) plans the same transition from the same status and re-posts the same name: the API answers 409
  AlreadyExists, which counts as posted. So Events are posted *before* the status patch.
- An Event the API refuses for now (429, 5xx, timeouts) is retried a few times with backoff (honouring
  Retry-After), then written into the same status patch as `status.pendingEvents`: the transition and the
  Events it still owes are recorded in one write. Every later pass (the resync loop revisits the job) posts
  them again under their names and drops them from the status once posted: so a restart loses nothing.
- An Event the API refuses for good (403, 422, ...) is logged and dropped: retrying cannot help.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp

from finetune_operator.k8s import client as kube

log = logging.getLogger(__name__)

MAX_PENDING = 32  # status.pendingEvents' schema limit; the oldest are dropped beyond it (logged)
RETRY_DELAYS = (0.5, 1.0, 2.0)  # in-pass backoff; after that the resync loop retries
MAX_RETRY_AFTER = 5.0  # seconds waited at most for one Retry-After inside a pass

Post = Callable[[Mapping[str, Any]], Awaitable[None]]
# Written before a transition's status patch (ownership.py intents, events owed): not part of its key.
TRANSIENT_STATUS = frozenset({"children", "pendingEvents", "kopf"})


def event_name(job_name: str, uid: str, planned_from: str, index: int, reason: str) -> str:
    """`<job>.<16 hex>`: the same transition planned from the same version always gets the same name."""
    return keyed_name(job_name, uid, planned_from, index, reason)


def planned_from(body: Mapping[str, Any]) -> str:
    """The key of what a pass plans from: the generation and the status, less what is written before a
    transition completes (status.children intents, owed Events), so a repeated pass finds the same key."""
    status = {k: v for k, v in (body.get("status") or {}).items() if k not in TRANSIENT_STATUS}
    digest = hashlib.sha256(json.dumps(status, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{(body.get('metadata') or {}).get('generation')}:{digest}"


def keyed_name(object_name: str, uid: str, *key: object) -> str:
    """`<object>.<16 hex>` of the object's uid and a key naming the transition (a ModelServer keys it by the
    resourceVersion it planned from and the Event's reason and message, which no pass reorders)."""
    digest = hashlib.sha256("/".join((uid, *map(str, key))).encode()).hexdigest()[:16]
    return f"{object_name[:200].rstrip('.-')}.{digest}"


def pending(job_name: str, uid: str, planned_from: str, planned: Sequence[Any]) -> list[dict[str, str]]:
    """The plan's Events (state.Event) as named records, the shape of `status.pendingEvents` items."""
    return [
        {
            "name": event_name(job_name, uid, planned_from, index, event.reason),
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
        }
        for index, event in enumerate(planned)
    ]


def is_transient(error: BaseException) -> bool:
    """Worth retrying: throttling, server errors, timeouts, connection problems."""
    if isinstance(error, kube.ApiError):
        return error.status in (409, 429) or error.status >= 500  # 409 here: Conflict, not AlreadyExists
    return isinstance(error, TimeoutError | aiohttp.ClientError | OSError)


def _retry_after(error: BaseException, default: float) -> float:
    if isinstance(error, kube.ApiError) and error.retry_after is not None:
        return min(max(error.retry_after, default), MAX_RETRY_AFTER)
    return default


async def post_once(post: Post, record: Mapping[str, Any]) -> bool:
    """Post one Event, retrying transient errors with backoff; True when it is in the API (or never will
    be: a permanent refusal is logged and dropped), False when it is still owed."""
    for attempt, delay in enumerate((*RETRY_DELAYS, None)):
        try:
            await post(record)
            return True
        except kube.ApiError as error:
            if error.status == 409 and error.reason == "AlreadyExists":
                return True  # posted by an earlier pass or process under this name
            if not is_transient(error):
                log.warning("dropping Event %s (%s): %s", record["name"], record["reason"], error)
                return True
            failure: BaseException = error
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            failure = error
        if delay is None:
            log.info("Event %s still owed after %d attempts: %s", record["name"], attempt + 1, failure)
            return False
        await asyncio.sleep(_retry_after(failure, delay))
    return False  # unreachable


async def post_all(post: Post, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Post in order; returns the records still owed (kept for `status.pendingEvents`). After the first
    one still owed the rest are not tried this pass (the API is refusing; the order is kept)."""
    owed: list[dict[str, Any]] = []
    for record in records:
        if owed or not await post_once(post, record):
            owed.append(dict(record))
    if len(owed) > MAX_PENDING:
        for record in owed[:-MAX_PENDING]:
            log.warning("dropping owed Event %s (%s): too many pending", record["name"], record["reason"])
        owed = owed[-MAX_PENDING:]
    return owed
