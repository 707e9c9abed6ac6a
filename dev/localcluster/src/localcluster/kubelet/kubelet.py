"""The local kubelet: watches pods bound to its nodes and runs each through a PodWorker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from ..controllers.events import EventRecorder
from ..kubeclient import PODS, ApiError, Informer, KubeClient
from . import volumes as vol
from .addresses import AddressBlock
from .logs import read_log
from .nodes import NodeConfig
from .pods import TERMINAL, PodWorker

log = logging.getLogger(__name__)


class LogError(Exception):
    """pods/log cannot be served; `status` and `message` are what kube-apiserver answers."""

    def __init__(self, status: int, message: str, reason: str = "BadRequest"):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class Kubelet:
    def __init__(
        self,
        client: KubeClient,
        pods: Informer,
        nodes: list[NodeConfig],
        *,
        workdir: Path,
        kubeconfig: Path | None,
        project_root: Path,
        shim_dir: Path,
        dns_file: Path,
        service_env: Callable[[str], dict[str, str]] = lambda _ns: {},
        backoff_scale: float = 1.0,
        addresses: AddressBlock | None = None,
        pod_threads: int | None = None,
    ):
        self.client = client
        self.pods = pods
        self.nodes = {n.name: n for n in nodes}
        self.workdir = workdir
        self.pods_dir = workdir / "pods"
        self.kubeconfig = kubeconfig
        self.project_root = project_root
        self.shim_dir = shim_dir
        self.dns_file = dns_file
        self.service_env = service_env
        self.backoff_scale = backoff_scale
        # OpenMP/MKL threads per container process unless its spec says otherwise (None: the libraries' own
        # default, one per host core). Test runs set 1: several torch processes on a small shared host, each
        # spinning one OpenMP thread per core, slow each other down several times over.
        self.pod_threads = pod_threads
        # image repository → virtualenv, overriding the project root's (runtime.RUNTIMES); read at each start
        self.runtimes: dict[str, Path] = {}
        self.recorder = EventRecorder(client, "kubelet")
        self.workers: dict[str, PodWorker] = {}
        self.addresses = addresses or AddressBlock(1)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        pods.add_handler(self._on_pod)

    def http_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        return self._session

    def allocate_ip(self) -> str:
        return self.addresses.pod_ip()

    async def remove_pod(self, namespace: str, name: str, uid: str) -> None:
        """Delete with grace period 0 (the kubelet's last word on a pod), retried through API errors."""
        for attempt in range(8):
            try:
                await self.client.delete(PODS.path(namespace, name), grace_period=0, uid=uid)
                return
            except (ApiError, OSError, aiohttp.ClientError) as err:
                log.debug("removing pod %s/%s: %s", namespace, name, err)
                await asyncio.sleep(min(0.2 * 2**attempt, 5))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- pod events -----------------------------------------------------------------------------------------
    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        uid = meta.get("uid")
        node = spec.get("nodeName")
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                self._spawn(self._forget(worker, abort=True))
            return
        if not node:
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                # Never scheduled: nothing to stop, so it goes at once (kube-apiserver does the same).
                self._spawn(self.remove_pod(meta["namespace"], meta["name"], uid))
            return
        if node not in self.nodes:
            return
        if worker is None:
            if meta.get("deletionTimestamp"):
                self._spawn(self.remove_pod(meta["namespace"], meta["name"], uid))
                return
            if pod.get("status", {}).get("phase") in TERMINAL:
                return
            cfg = self.nodes[node]
            worker = PodWorker(self, pod, self.allocate_ip(), cfg.ip)
            self.workers[uid] = worker
            worker.start()
            return
        worker.pod = pod
        if meta.get("deletionTimestamp"):
            if worker.done.is_set():
                if not worker.removal_requested:
                    worker.removal_requested = True
                    self._spawn(self.remove_pod(meta["namespace"], meta["name"], uid))
            elif not worker.killed_by_deletion:
                grace = meta.get("deletionGracePeriodSeconds")
                worker.request_stop(float(grace) if grace is not None else None)

    async def _forget(self, worker: PodWorker, abort: bool) -> None:
        if abort:
            await worker.abort()
        self.workers.pop(worker.uid, None)
        vol.cleanup(worker.dir, worker.uid)

    async def stop(self) -> None:
        workers = list(self.workers.values())
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()

    # -- pods/log -------------------------------------------------------------------------------------------
    def _find(self, namespace: str, name: str) -> PodWorker | None:
        for worker in self.workers.values():
            if worker.namespace == namespace and worker.name == name:
                return worker
        return None

    def open_logs(
        self,
        namespace: str,
        pod: str,
        container: str | None = None,
        *,
        tail: int | None = None,
        since: Any = None,
        follow: bool = False,
        timestamps: bool = False,
        previous: bool = False,
        limit_bytes: int | None = None,
    ) -> AsyncIterator[bytes]:
        """Serve pods/log like the kubelet: the chosen container's current (or previous) run.

        Errors are raised here, before any byte is streamed. `since` may be seconds (sinceSeconds), a
        datetime or an RFC 3339 string (sinceTime)."""
        worker = self._find(namespace, pod)
        if worker is None:
            obj = self.pods.get(namespace, pod)
            if obj is None:
                raise LogError(404, f'pods "{pod}" not found', "NotFound")
            spec = obj.get("spec", {})
            names = [c["name"] for c in spec.get("containers") or []]
            name = container or (names[0] if len(names) == 1 else None)
            if name is None:
                raise LogError(
                    400,
                    f"a container name must be specified for pod {pod}, choose one of: [{' '.join(names)}]",
                )
            raise LogError(400, f'container "{name}" in pod "{pod}" is waiting to start: ContainerCreating')
        names = [s.name for s in worker.states]
        if container is None:
            if len(names) != 1:
                init = (
                    " or one of the init containers: [" + " ".join(s.name for s in worker.init_states) + "]"
                    if worker.init_states
                    else ""
                )
                raise LogError(
                    400,
                    f"a container name must be specified for pod {pod}, choose one of: "
                    f"[{' '.join(names)}]{init}",
                )
            container = names[0]
        state = worker.container_state(container)
        if state is None:
            raise LogError(400, f"container {container} is not valid for pod {pod}")
        paths = list(state.log_paths)
        if previous:
            if len(paths) < 2 and not (state.state == "waiting" and paths):
                raise LogError(400, f'previous terminated container "{container}" in pod "{pod}" not found')
            path = paths[-1] if state.state == "waiting" else paths[-2]
            follow = False
        else:
            if not paths:
                reason = state.waiting_reason or "ContainerCreating"
                raise LogError(400, f'container "{container}" in pod "{pod}" is waiting to start: {reason}')
            path = paths[-1]
        since_dt = _since(since)

        def running() -> bool:
            return state.state == "running" and bool(state.log_paths) and state.log_paths[-1] == path

        return read_log(
            path,
            tail=tail,
            since=since_dt,
            timestamps=timestamps,
            limit_bytes=limit_bytes,
            follow=follow,
            still_running=running,
        )


def _since(since: Any) -> datetime | None:
    if since is None or since == "":
        return None
    if isinstance(since, datetime):
        return since if since.tzinfo else since.replace(tzinfo=UTC)
    if isinstance(since, int | float) or (isinstance(since, str) and since.isdigit()):
        return datetime.now(UTC) - timedelta(seconds=float(since))
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(str(since).replace("Z", "+00:00"))
    return None
