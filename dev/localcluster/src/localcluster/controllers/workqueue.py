"""A de-duplicating work queue with delayed re-queues: the loop each controller here runs (as client-go)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..kubeclient import ApiError, Informer


class WorkQueueController:
    """Reconciles `namespace/name` keys one at a time once its informers have synced.

    Subclasses implement `reconcile(key)`; API errors re-queue after 0.5 s, other errors after 1 s.
    """

    name = "controller"

    def __init__(self, *informers: Informer) -> None:
        self._informers = informers
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._task: asyncio.Task[None] | None = None
        self._log = logging.getLogger(f"localcluster.{self.name}")

    def enqueue(self, key: str) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def enqueue_after(self, key: str, delay: float) -> None:
        old = self._timers.pop(key, None)
        if old:
            old.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(max(delay, 0.01), self.enqueue, key)

    async def reconcile(self, key: str) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        for informer in self._informers:
            await informer.synced.wait()
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            try:
                await self.reconcile(key)
            except asyncio.CancelledError:
                raise
            except ApiError as err:
                self._log.debug("%s: %s", key, err)
                self.enqueue_after(key, 0.5)
            except Exception:
                self._log.exception("%s: reconcile failed", key)
                self.enqueue_after(key, 1)
