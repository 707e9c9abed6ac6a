"""Event recorder: core/v1 Events aggregated like client-go's (same reason + message → count++)."""

from __future__ import annotations

import logging
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from ..kubeclient import EVENTS, ApiError, KubeClient

log = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventRecorder:
    def __init__(self, client: KubeClient, component: str, host: str | None = None):
        self.client = client
        self.component = component
        self.host = host
        self._seen: dict[tuple[str, str, str, str], tuple[str, int, float]] = {}

    async def emit(self, obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        key = (meta.get("uid", ""), reason, message, event_type)
        stamp = now_iso()
        seen = self._seen.get(key)
        try:
            if seen is not None and time.monotonic() - seen[2] < 600:
                name, count, _ = seen
                count += 1
                try:
                    await self.client.patch(
                        EVENTS.path(namespace, name), {"count": count, "lastTimestamp": stamp}
                    )
                    self._seen[key] = (name, count, time.monotonic())
                    return
                except ApiError as err:
                    if not err.not_found:
                        raise
                    # The event was deleted (namespace cleanup, TTL): record a fresh one.
            name = f"{meta.get('name')}.{secrets.token_hex(8)}"
            source = {"component": self.component}
            if self.host:
                source["host"] = self.host
            body = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name, "namespace": namespace},
                "involvedObject": {
                    "apiVersion": obj.get("apiVersion"),
                    "kind": obj.get("kind"),
                    "name": meta.get("name"),
                    "namespace": meta.get("namespace"),
                    "uid": meta.get("uid"),
                    "resourceVersion": meta.get("resourceVersion"),
                },
                "reason": reason,
                "message": message,
                "type": event_type,
                "source": source,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
                "reportingComponent": self.component,
                "reportingInstance": self.host or self.component,
            }
            await self.client.create(EVENTS.path(namespace), body)
            self._seen[key] = (name, 1, time.monotonic())
            if len(self._seen) > 5000:
                self._seen.clear()
        except (ApiError, OSError) as err:
            log.debug("event %s/%s not recorded: %s", reason, meta.get("name"), err)
        except Exception as err:  # an event must never break a controller
            log.debug("event %s/%s not recorded: %r", reason, meta.get("name"), err)
