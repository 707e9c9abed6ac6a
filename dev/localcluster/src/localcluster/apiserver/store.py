"""In-memory object storage: one global resourceVersion, an event history for watch resumption, and
watchers fed as writes commit."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

StorageKey = tuple[str, str]  # (group, plural)
ObjectKey = tuple[str, str]  # (namespace, name)


@dataclass
class Event:
    rv: int
    storage: StorageKey
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None
    encoded: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (type, groupVersion) -> watch line


@dataclass(eq=False)
class Watcher:
    storage: StorageKey
    namespace: str | None
    matches: Callable[[dict[str, Any]], bool]
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


class Store:
    def __init__(self, history_size: int = 10_000) -> None:
        self.rv = 1
        self.objects: dict[StorageKey, dict[ObjectKey, dict[str, Any]]] = collections.defaultdict(dict)
        self.by_uid: dict[str, tuple[StorageKey, ObjectKey]] = {}
        self.history: collections.deque[Event] = collections.deque()
        self.history_size = history_size
        self.compacted_rv = 1  # events up to and including this version are no longer retained
        self.watchers: dict[StorageKey, set[Watcher]] = collections.defaultdict(set)

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def get(self, storage: StorageKey, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects[storage].get((namespace, name))

    def select(self, storage: StorageKey, namespace: str | None = None) -> list[dict[str, Any]]:
        items = self.objects[storage]
        if namespace is None:
            return [items[k] for k in sorted(items)]
        return [items[k] for k in sorted(items) if k[0] == namespace]

    def by_owner_uid(self, uid: str) -> dict[str, Any] | None:
        where = self.by_uid.get(uid)
        if where is None:
            return None
        return self.objects[where[0]].get(where[1])

    def commit(
        self, storage: StorageKey, event_type: str, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> None:
        """Record a write whose object already carries its new resourceVersion, and notify watchers."""
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if event_type == "DELETED":
            self.objects[storage].pop(key, None)
            self.by_uid.pop(meta.get("uid", ""), None)
        else:
            self.objects[storage][key] = obj
            self.by_uid[meta["uid"]] = (storage, key)
        event = Event(int(meta["resourceVersion"]), storage, event_type, obj, old)
        if len(self.history) >= self.history_size:
            self.compacted_rv = self.history.popleft().rv
        self.history.append(event)
        for watcher in list(self.watchers.get(storage, ())):
            if watcher.namespace is None or watcher.namespace == key[0]:
                watcher.queue.put_nowait(event)

    def events_since(self, storage: StorageKey, rv: int) -> list[Event] | None:
        """Events after rv for one resource, or None when rv is older than the retained window."""
        if rv < self.compacted_rv:
            return None
        return [e for e in self.history if e.rv > rv and e.storage == storage]

    def add_watcher(self, watcher: Watcher) -> None:
        self.watchers[watcher.storage].add(watcher)

    def remove_watcher(self, watcher: Watcher) -> None:
        self.watchers[watcher.storage].discard(watcher)

    def all_watchers(self) -> list[Watcher]:
        return [w for ws in self.watchers.values() for w in ws]
