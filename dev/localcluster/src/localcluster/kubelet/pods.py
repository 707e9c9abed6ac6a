"""One pod on the local kubelet: volumes, init containers in order, containers as process groups, probes,
restarts, termination, and the pod status a real kubelet would report."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from ..apiserver.kubeconfig import write_kubeconfig
from ..controllers.events import now_iso
from ..kubeclient import CONFIGMAPS, PODS, SECRETS
from ..runtime import ImageNotPresent, Launch, PathRewriter, StartError, expand, resolve_launch
from . import volumes as vol
from .logs import LogFile, tail_text
from .probes import run_probe
from .quantity import parse_quantity

if TYPE_CHECKING:
    from .kubelet import Kubelet

log = logging.getLogger(__name__)

TERMINAL = ("Succeeded", "Failed")
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_MESSAGE = 4096
BACKOFF_START = 10.0
BACKOFF_MAX = 300.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def thread_env(threads: int | None) -> dict[str, str]:
    """The thread caps a container process starts with (its own env entries still win)."""
    if threads is None:
        return {}
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def _container_id() -> str:
    return "containerd://" + secrets.token_hex(32)


async def _main_process_exit(proc: asyncio.subprocess.Process) -> None:
    """Return once a container's main process has exited, whether or not its pipes are still open."""
    while proc.returncode is None:
        try:
            if psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        await asyncio.sleep(0.5)


@dataclass
class ContainerState:
    spec: dict[str, Any]
    init: bool = False
    state: str = "waiting"  # waiting | running | terminated
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    message: str | None = None
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    container_id: str = ""
    last_terminated: dict[str, Any] | None = None
    process: asyncio.subprocess.Process | None = None
    oom: bool = False
    kill_reason: str | None = None  # why the kubelet killed it (liveness, startup, deletion)
    log_path: Path | None = None
    log_paths: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def sidecar(self) -> bool:
        return self.init and self.spec.get("restartPolicy") == "Always"

    def status(self) -> dict[str, Any]:
        image = self.spec.get("image", "")
        out: dict[str, Any] = {
            "name": self.name,
            "image": image,
            "imageID": f"localcluster://{image}",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.started if (not self.init or self.sidecar) else self.state == "running",
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.container_id:
            out["containerID"] = self.container_id
        if self.state == "running":
            out["state"] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            out["state"] = {"terminated": self.terminated()}
        else:
            waiting: dict[str, Any] = {"reason": self.waiting_reason}
            if self.waiting_message:
                waiting["message"] = self.waiting_message
            out["state"] = {"waiting": waiting}
        return out

    def terminated(self) -> dict[str, Any]:
        term: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }
        if self.message:
            term["message"] = self.message
        if self.signal:
            term["signal"] = self.signal
        if self.container_id:
            term["containerID"] = self.container_id
        return term


class PodWorker:
    def __init__(self, kubelet: Kubelet, pod: dict[str, Any], pod_ip: str, host_ip: str):
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.pod_ip = pod_ip
        self.host_ip = host_ip
        self.dir = kubelet.pods_dir / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy") or "Always"
        self.init_states = [
            ContainerState(c, init=True, waiting_reason="PodInitializing")
            for c in spec.get("initContainers") or []
        ]
        self.states = [
            ContainerState(c, waiting_reason="PodInitializing" if self.init_states else "ContainerCreating")
            for c in spec.get("containers") or []
        ]
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.start_time: str | None = None
        self.sandbox_ready = False
        self.initialized = not self.init_states
        self.mounts: dict[str, Path] = {}
        self.stopping = asyncio.Event()
        self.grace: float = float(spec.get("terminationGracePeriodSeconds", 30) or 0)
        self.killed_by_deletion = False
        self.removal_requested = False  # the kubelet asked the API to remove the (finished) pod
        self.deleted = False
        self.done = asyncio.Event()
        self._dirty = asyncio.Event()
        self._transitions: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._container_tasks: list[asyncio.Task[None]] = []
        self._sidecar_tasks: list[asyncio.Task[None]] = []
        self._kills: dict[int, asyncio.Future[None]] = {}

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._status_task = asyncio.create_task(self._status_writer(), name=f"status-{self.name}")
        self._task = asyncio.create_task(self._run(), name=f"pod-{self.name}")

    def request_stop(self, grace: float | None) -> None:
        if grace is not None:
            self.grace = min(self.grace, grace) if self.stopping.is_set() else grace
        self.killed_by_deletion = True
        self.stopping.set()

    async def abort(self) -> None:
        """The pod object is gone (force delete): kill at once, write nothing more."""
        self.deleted = True
        self.grace = 0
        self.stopping.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 10)
        await self._stop_status_writer()

    async def shutdown(self) -> None:
        """The cluster is stopping: kill processes (short grace) without touching the API."""
        self.deleted = True
        self.grace = min(self.grace, 2)
        self.stopping.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 10)
        await self._stop_status_writer()

    async def _stop_status_writer(self) -> None:
        if self._status_task:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._status_task

    def mark_dirty(self) -> None:
        self._dirty.set()

    async def _run(self) -> None:
        try:
            await self._run_pod()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.exception("pod %s/%s worker crashed", self.namespace, self.name)
            self.phase, self.reason, self.message = "Failed", "LocalKubeletError", str(err)
        finally:
            self.stopping.set()  # nothing restarts from here on (sidecars included)
            await self._kill_all(self.grace)
            self.mark_dirty()
            if not self.deleted:
                await self._flush_status()
                if self.killed_by_deletion or self.pod["metadata"].get("deletionTimestamp"):
                    self.killed_by_deletion = True
                    await self.kubelet.remove_pod(self.namespace, self.name, self.uid)
            self.done.set()

    async def _run_pod(self) -> None:
        self.start_time = now_iso()
        self.mark_dirty()
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline:
            asyncio.get_running_loop().call_later(float(deadline), self._deadline_exceeded)
        # Sandbox: volumes (retried while a Secret/ConfigMap is missing, like MountVolume.SetUp).
        while not self.stopping.is_set():
            try:
                self.mounts = await vol.materialise(
                    self.kubelet.client, self.pod, self.dir, self.kubelet.workdir
                )
                break
            except vol.VolumeError as err:
                await self.kubelet.recorder.emit(
                    self.pod, "Warning", "FailedMount", f"MountVolume.SetUp failed for volume: {err}"
                )
                await self._sleep_or_stop(2)
        if self.stopping.is_set():
            return
        self.sandbox_ready = True
        self.mark_dirty()
        for state in self.init_states:
            if state.sidecar:
                # A native sidecar (restartPolicy Always): keeps running beside the main containers; the next
                # init container starts once it has started.
                self._sidecar_tasks.append(asyncio.create_task(self._supervise(state, always=True)))
                while not self.stopping.is_set() and not (state.state == "running" and state.started):
                    await asyncio.sleep(0.05)
                continue
            while True:
                await self._run_container(state)
                if self.stopping.is_set():
                    return
                if state.exit_code == 0:
                    break
                if self.restart_policy == "Never":
                    for main in self.states:
                        main.waiting_reason = "PodInitializing"
                    self.phase = "Failed"
                    self.mark_dirty()
                    return
                if not await self._backoff(state):
                    return
        self.initialized = True
        for state in self.states:
            state.waiting_reason = "ContainerCreating"
        self.mark_dirty()
        self._container_tasks = [
            asyncio.create_task(self._supervise(s), name=f"ctr-{self.name}-{s.name}") for s in self.states
        ]
        await asyncio.gather(*self._container_tasks, return_exceptions=True)

    def _deadline_exceeded(self) -> None:
        if self.done.is_set() or self.phase in TERMINAL:
            return
        self.reason = "DeadlineExceeded"
        self.message = "Pod was active on the node longer than the specified deadline"
        self.phase = "Failed"
        self.grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30) or 0)
        self.stopping.set()

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _backoff(self, state: ContainerState) -> bool:
        delay = min(
            BACKOFF_START * self.kubelet.backoff_scale * 2 ** max(0, state.restart_count),
            BACKOFF_MAX * self.kubelet.backoff_scale,
        )
        state.last_terminated = state.terminated()
        state.state = "waiting"
        state.waiting_reason = "CrashLoopBackOff"
        state.waiting_message = (
            f"back-off {int(delay)}s restarting failed container={state.name} "
            f"pod={self.name}_{self.namespace}({self.uid})"
        )
        state.ready = False
        state.started = False
        self.mark_dirty()
        await self.kubelet.recorder.emit(
            self.pod,
            "Warning",
            "BackOff",
            "Back-off restarting failed container "
            f"{state.name} in pod {self.name}_{self.namespace}({self.uid})",
        )
        await self._sleep_or_stop(delay)
        if self.stopping.is_set():
            return False
        state.restart_count += 1
        return True

    async def _supervise(self, state: ContainerState, always: bool = False) -> None:
        while not self.stopping.is_set():
            await self._run_container(state)
            if self.stopping.is_set():
                return
            restart = (
                always
                or self.restart_policy == "Always"
                or (self.restart_policy == "OnFailure" and state.exit_code != 0)
            )
            if not restart:
                self._update_phase()
                return
            if not await self._backoff(state):
                return

    def _update_phase(self) -> None:
        if any(s.state != "terminated" for s in self.states):
            return
        if all(s.exit_code == 0 for s in self.states):
            self.phase = "Succeeded"
        else:
            self.phase = "Failed"
        self.mark_dirty()

    # -- one container run ----------------------------------------------------------------------------------
    async def _container_env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = dict(
            self.kubelet.service_env(self.namespace)
            if self.pod["spec"].get("enableServiceLinks", True)
            else {}
        )
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                ref = source["secretRef"]
                obj = await self.kubelet.client.get_or_none(SECRETS.path(self.namespace, ref["name"]))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise StartError(f'secret "{ref["name"]}" not found')
                for k, v in (obj.get("data") or {}).items():
                    env[prefix + k] = base64.b64decode(v).decode("utf-8", "replace")
            elif "configMapRef" in source:
                ref = source["configMapRef"]
                obj = await self.kubelet.client.get_or_none(CONFIGMAPS.path(self.namespace, ref["name"]))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise StartError(f'configmap "{ref["name"]}" not found')
                for k, v in (obj.get("data") or {}).items():
                    env[prefix + k] = str(v)
        pod_view = {**self.pod, "status": {"podIP": self.pod_ip, "hostIP": self.host_ip}}
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item or "valueFrom" not in item:
                env[name] = expand(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            if "secretKeyRef" in source or "configMapKeyRef" in source:
                is_secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
                path = (SECRETS if is_secret else CONFIGMAPS).path(self.namespace, ref["name"])
                obj = await self.kubelet.client.get_or_none(path)
                kind = "secret" if is_secret else "configmap"
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise StartError(f'{kind} "{ref["name"]}" not found')
                data = obj.get("data") or {}
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise StartError(
                        f"couldn't find key {ref['key']} in {'Secret' if is_secret else 'ConfigMap'} "
                        f"{self.namespace}/{ref['name']}"
                    )
                value = data[ref["key"]]
                env[name] = base64.b64decode(value).decode("utf-8", "replace") if is_secret else str(value)
            elif "fieldRef" in source:
                env[name] = vol.field_value(pod_view, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[name] = vol.resource_value(self.pod, source["resourceFieldRef"], container["name"])
        return env

    def _service_account_kubeconfig(self, container: str, token_dir: str | None) -> Path | None:
        """The container's kubeconfig: the API server with the ServiceAccount token the pod mounts (where a
        real pod's in-cluster config reads it); None without a mounted token (no credentials)."""
        if token_dir is None:
            return None
        token_file = Path(token_dir) / "token"
        if not token_file.is_file():
            return None
        target = self.dir / "kubeconfigs" / container
        target.parent.mkdir(parents=True, exist_ok=True)
        write_kubeconfig(
            target,
            self.kubelet.client.base_url,
            token=token_file.read_text().strip(),
            namespace=self.namespace,
        )
        return target

    async def _prepare(self, state: ContainerState) -> tuple[Launch, str, Path, dict[str, str]]:
        container = state.spec
        term_file = self.dir / "termination" / state.name
        term_file.parent.mkdir(parents=True, exist_ok=True)
        term_file.write_bytes(b"")
        mapping: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            local = self.mounts.get(mount["name"])
            if local is None:
                raise StartError(f'volume "{mount["name"]}" not found in the pod spec')
            if mount.get("subPath"):
                local = local / mount["subPath"]
                if not local.exists():  # a subPath naming a projected file (a ConfigMap key) stays a file
                    local.mkdir(parents=True, exist_ok=True)
            mapping[mount["mountPath"]] = str(local)
        mapping[container.get("terminationMessagePath") or "/dev/termination-log"] = str(term_file)
        rewrite = PathRewriter(mapping)
        kubeconfig = self._service_account_kubeconfig(state.name, mapping.get(SERVICE_ACCOUNT_MOUNT))
        env = await self._container_env(container)
        command = [expand(c, env) for c in container.get("command") or []]
        args = [expand(a, env) for a in container.get("args") or []]
        # The command names a program on the host; args and env carry in-container paths (rewritten).
        launch = resolve_launch(
            container.get("image", ""),
            command,
            [rewrite(a) for a in args],
            pod_ip=self.pod_ip,
            kubeconfig=kubeconfig,
            root=self.kubelet.project_root,
            venvs=self.kubelet.runtimes,
        )
        process_env = {
            "HOSTNAME": self.name,
            "HOME": str(self.dir / "home"),
            "LANG": "C.UTF-8",
            "CUDA_VISIBLE_DEVICES": "",
            **thread_env(self.kubelet.pod_threads),
            **launch.env,
        }
        for key, value in env.items():
            process_env[key] = rewrite(value)
        shim = str(self.kubelet.shim_dir)
        existing = process_env.get("PYTHONPATH")
        process_env["PYTHONPATH"] = f"{shim}:{existing}" if existing else shim
        if "/tmp" in mapping and "TMPDIR" not in env:
            process_env["TMPDIR"] = mapping["/tmp"]  # a volume on /tmp is the container's tempdir
        if kubeconfig is not None and "KUBECONFIG" not in env:
            process_env["KUBECONFIG"] = str(kubeconfig)  # in-cluster clients: the pod's own account
        process_env["LOCALCLUSTER_POD_IP"] = self.pod_ip
        process_env["LOCALCLUSTER_POD_NAMESPACE"] = self.namespace
        # The pod's loopback: its containers reach each other's declared ports on 127.0.0.1 (podshim).
        process_env["LOCALCLUSTER_POD_PORTS"] = ",".join(
            str(port["containerPort"])
            for c in self.pod["spec"].get("containers", [])
            for port in c.get("ports") or []
            if port.get("containerPort")
        )
        process_env["LOCALCLUSTER_DNS_FILE"] = str(self.kubelet.dns_file)
        (self.dir / "home").mkdir(parents=True, exist_ok=True)
        working_dir = container.get("workingDir")
        if working_dir:
            cwd = rewrite(working_dir)
            if cwd == working_dir and not Path(cwd).is_dir():
                cwd = str(self.dir / "rootfs" / working_dir.lstrip("/"))
        else:
            cwd = str(self.dir / "rootfs" / state.name)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        return launch, cwd, term_file, process_env

    async def _image_pull_failed(self, state: ContainerState, error: str, failures: int) -> None:
        """As kubelet: ErrImagePull with the error, then ImagePullBackOff until the next try (10 s doubling
        to 300 s); the back-off message keeps the error (kubelet >= 1.31), so the cause stays visible."""
        image = str(state.spec.get("image", ""))
        state.state = "waiting"
        state.container_id = ""  # nothing was created
        state.waiting_reason, state.waiting_message = "ErrImagePull", error
        self.mark_dirty()
        await self.kubelet.recorder.emit(
            self.pod, "Warning", "Failed", f'Failed to pull image "{image}": {error}'
        )
        await self.kubelet.recorder.emit(self.pod, "Warning", "Failed", "Error: ErrImagePull")
        scale = self.kubelet.backoff_scale
        await self._sleep_or_stop(scale)  # the pod's next sync finds the image in back-off
        if self.stopping.is_set():
            return
        state.waiting_reason = "ImagePullBackOff"
        state.waiting_message = f'Back-off pulling image "{image}": ErrImagePull: {error}'
        self.mark_dirty()
        await self.kubelet.recorder.emit(self.pod, "Normal", "BackOff", f'Back-off pulling image "{image}"')
        await self.kubelet.recorder.emit(self.pod, "Warning", "Failed", "Error: ImagePullBackOff")
        await self._sleep_or_stop(min(BACKOFF_START * 2**failures, BACKOFF_MAX) * scale)

    async def _create(self, state: ContainerState) -> tuple[Launch, str, Path, dict[str, str]] | None:
        """Pull and create the container, retrying what kubelet retries; None when it cannot start."""
        pulls_failed = 0
        while True:
            try:
                return await self._prepare(state)
            except ImageNotPresent as err:
                await self._image_pull_failed(state, str(err), pulls_failed)
                pulls_failed += 1
                if self.stopping.is_set():
                    return None
            except StartError as err:
                text = str(err)
                if not (text.startswith(("secret ", "configmap ", "couldn't find key"))):
                    self._terminate_state(state, 128, "StartError", text)
                    await self.kubelet.recorder.emit(self.pod, "Warning", "Failed", f"Error: {text}")
                    return None
                # A missing Secret/ConfigMap keeps the container waiting, as CreateContainerConfigError.
                state.state = "waiting"
                state.waiting_reason = "CreateContainerConfigError"
                state.waiting_message = text
                self.mark_dirty()
                await self.kubelet.recorder.emit(self.pod, "Warning", "Failed", f"Error: {text}")
                await self._sleep_or_stop(2)
                if self.stopping.is_set():
                    return None
            except (vol.VolumeError, OSError) as err:
                self._terminate_state(state, 128, "StartError", str(err))
                await self.kubelet.recorder.emit(self.pod, "Warning", "Failed", f"Error: {err}")
                return None

    async def _run_container(self, state: ContainerState) -> None:
        container = state.spec
        state.container_id = _container_id()
        state.exit_code = state.signal = None
        state.message = state.reason = None
        state.oom = False
        state.kill_reason = None
        prepared = await self._create(state)
        if prepared is None or self.stopping.is_set():
            return
        launch, cwd, term_file, process_env = prepared
        state.container_id = state.container_id or _container_id()
        await self.kubelet.recorder.emit(
            self.pod,
            "Normal",
            "Pulled",
            f'Container image "{container.get("image")}" already present on machine',
        )
        log_path = self.dir / "logs" / state.name / f"{state.restart_count}.log"
        logfile = LogFile(log_path)
        state.log_path = log_path
        state.log_paths.append(log_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                cwd=cwd,
                env=process_env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as err:
            logfile.close()
            self._terminate_state(state, 128, "StartError", f"failed to create containerd task: {err}")
            await self.kubelet.recorder.emit(self.pod, "Warning", "Failed", f"Error: {err}")
            return
        state.process = proc
        state.state = "running"
        state.started_at = now_iso()
        state.finished_at = None
        state.waiting_message = ""
        probed = not state.init or state.sidecar
        has_startup = bool(container.get("startupProbe")) and probed
        state.started = not has_startup
        has_readiness = bool(container.get("readinessProbe")) and probed
        state.ready = state.started and not has_readiness and probed
        self.mark_dirty()
        await self.kubelet.recorder.emit(self.pod, "Normal", "Created", f"Created container: {state.name}")
        await self.kubelet.recorder.emit(self.pod, "Normal", "Started", f"Started container {state.name}")
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.create_task(logfile.pump(proc.stdout, "stdout")),
            asyncio.create_task(logfile.pump(proc.stderr, "stderr")),
        ]
        helpers = []
        if not state.init or state.sidecar:
            helpers.append(asyncio.create_task(self._probe_loop(state, process_env, cwd)))
        limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        if limit:
            helpers.append(asyncio.create_task(self._memory_watch(state, int(parse_quantity(limit)))))
        stopper = asyncio.create_task(self.stopping.wait())
        waiter = asyncio.create_task(proc.wait())
        leader = asyncio.create_task(_main_process_exit(proc))
        await asyncio.wait([waiter, stopper, leader], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done() and not leader.done():
            await self._kill(state, self.grace)
        # A container ends with its main process: what it left running in its process group dies with it (in
        # Kubernetes the container's PID namespace goes away), so no server outlives its pod. asyncio's wait()
        # also waits for the pipes, which such a leftover would hold open.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await waiter
        leader.cancel()
        stopper.cancel()
        for task in helpers:
            task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pumps, return_exceptions=True), 5)
        for task in pumps:
            task.cancel()
        logfile.close()
        code = proc.returncode if proc.returncode is not None else -9
        sig = -code if code < 0 else None
        exit_code = 128 + sig if sig else code
        if state.oom:
            reason = "OOMKilled"
        elif exit_code == 0:
            reason = "Completed"
        else:
            reason = "Error"
        message = self._termination_message(state, term_file, exit_code, log_path)
        self._terminate_state(state, exit_code, reason, message)
        state.process = None

    def _termination_message(
        self, state: ContainerState, term_file: Path, exit_code: int, log_path: Path
    ) -> str | None:
        data = term_file.read_bytes()[:MAX_MESSAGE] if term_file.exists() else b""
        text = data.decode("utf-8", "replace")
        if (
            not text
            and exit_code != 0
            and state.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            text = tail_text(log_path)
        return text or None

    def _terminate_state(
        self, state: ContainerState, exit_code: int, reason: str, message: str | None
    ) -> None:
        state.state = "terminated"
        state.exit_code = exit_code
        state.reason = reason
        state.message = message
        state.started_at = state.started_at or now_iso()
        state.finished_at = now_iso()
        state.ready = False
        state.started = False
        self.mark_dirty()

    async def _kill(self, state: ContainerState, grace: float) -> None:
        """Stop a container once: concurrent callers share one SIGTERM → grace → SIGKILL sequence."""
        proc = state.process
        if proc is None or proc.returncode is not None:
            return
        kill = self._kills.get(proc.pid)
        if kill is None or kill.done():
            kill = asyncio.ensure_future(self._terminate(state, proc, grace))
            self._kills[proc.pid] = kill
        await asyncio.shield(kill)
        self._kills.pop(proc.pid, None)

    async def _terminate(self, state: ContainerState, proc: asyncio.subprocess.Process, grace: float) -> None:
        if not self.deleted:
            message = {
                "liveness": f"Container {state.name} failed liveness probe, will be restarted",
                "startup": f"Container {state.name} failed startup probe, will be restarted",
            }.get(state.kill_reason or "", f"Stopping container {state.name}")
            await self.kubelet.recorder.emit(self.pod, "Normal", "Killing", message)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), max(grace, 0.01))
        # SIGKILL the whole group: children a container left behind die with it, as in a real container.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)

    async def _kill_all(self, grace: float) -> None:
        running = [s for s in self.init_states + self.states if s.process and s.process.returncode is None]
        if running:
            await asyncio.gather(*(self._kill(s, grace) for s in running), return_exceptions=True)
        for task in self._container_tasks + self._sidecar_tasks:
            if not task.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), 10)
        if self.killed_by_deletion or self.reason == "DeadlineExceeded":
            # Terminal phase before the pod object goes away, as kubelets since 1.27 do.
            for state in self.states:
                if state.state == "waiting":
                    state.exit_code, state.reason = 137, "ContainerStatusUnknown"
                    state.message = "The container could not be located when the pod was terminated"
                    state.state = "terminated"
                    state.finished_at = now_iso()
            if self.phase not in TERMINAL:
                ok = all(s.exit_code == 0 for s in self.states)
                self.phase = "Succeeded" if ok and self.reason != "DeadlineExceeded" else "Failed"

    # -- probes and memory ----------------------------------------------------------------------------------
    async def _probe_loop(self, state: ContainerState, env: dict[str, str], cwd: str) -> None:
        container = state.spec
        startup, liveness, readiness = (
            container.get(k) for k in ("startupProbe", "livenessProbe", "readinessProbe")
        )
        session = self.kubelet.http_session()
        counters: dict[str, tuple[int, int]] = {}
        next_run: dict[str, float] = {}
        begin = time.monotonic()
        for kind, probe in (("startup", startup), ("liveness", liveness), ("readiness", readiness)):
            if probe:
                next_run[kind] = begin + float(probe.get("initialDelaySeconds") or 0)
        while next_run:
            now = time.monotonic()
            due = [k for k, t in next_run.items() if t <= now and (k == "startup" or state.started)]
            if not due:
                await asyncio.sleep(
                    max(0.05, min(t for t in next_run.values()) - now)
                    if any(k == "startup" or state.started for k in next_run)
                    else 0.2
                )
                continue
            for kind in due:
                probe = {"startup": startup, "liveness": liveness, "readiness": readiness}[kind]
                assert probe is not None
                next_run[kind] = time.monotonic() + float(probe.get("periodSeconds") or 10)
                ok, message = await run_probe(
                    probe, pod_ip=self.pod_ip, container=container, env=env, cwd=cwd, session=session
                )
                successes, failures = counters.get(kind, (0, 0))
                successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
                counters[kind] = (successes, failures)
                if not ok:
                    await self.kubelet.recorder.emit(
                        self.pod, "Warning", "Unhealthy", f"{kind.capitalize()} probe failed: {message}"
                    )
                threshold_ok = int(probe.get("successThreshold") or 1)
                threshold_fail = int(probe.get("failureThreshold") or 3)
                if kind == "startup":
                    if ok:
                        state.started = True
                        next_run.pop("startup", None)
                        if not readiness:
                            state.ready = True
                        self.mark_dirty()
                    elif failures >= threshold_fail:
                        state.kill_reason = "startup"
                        await self._kill(
                            state, float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
                        )
                        return
                elif kind == "liveness":
                    if failures >= threshold_fail:
                        state.kill_reason = "liveness"
                        await self._kill(
                            state, float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
                        )
                        return
                else:
                    ready = state.ready
                    if ok and successes >= threshold_ok:
                        ready = True
                    elif not ok and failures >= threshold_fail:
                        ready = False
                    if ready != state.ready:
                        state.ready = ready
                        self.mark_dirty()

    async def _memory_watch(self, state: ContainerState, limit: int) -> None:
        proc = state.process
        assert proc is not None
        while proc.returncode is None:
            await asyncio.sleep(0.5)
            try:
                root = psutil.Process(proc.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                continue
            if rss > limit:
                state.oom = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return

    # -- status ---------------------------------------------------------------------------------------------
    def _condition(
        self, kind: str, status: bool, reason: str | None = None, message: str | None = None
    ) -> dict[str, Any]:
        value = "True" if status else "False"
        key = f"{kind}={value}"
        if self._transitions.get(kind, "").split("|")[0] != key:
            self._transitions[kind] = f"{key}|{now_iso()}"
        cond: dict[str, Any] = {
            "type": kind,
            "status": value,
            "lastProbeTime": None,
            "lastTransitionTime": self._transitions[kind].split("|")[1],
        }
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        return cond

    def build_status(self) -> dict[str, Any]:
        terminal = self.phase in TERMINAL
        if terminal:
            pass
        elif self.initialized and any(s.state != "waiting" or s.restart_count for s in self.states):
            self.phase = "Running"
        unready = [s.name for s in self.states + [c for c in self.init_states if c.sidecar] if not s.ready]
        conditions = [
            self._condition(
                "PodReadyToStartContainers", self.sandbox_ready and not (terminal and self.deleted)
            )
        ]
        incomplete = [
            s.name
            for s in self.init_states
            if not (s.state == "terminated" and s.exit_code == 0) and not (s.sidecar and s.state == "running")
        ]
        if self.phase == "Succeeded":
            conditions.append(self._condition("Initialized", True, "PodCompleted"))
            conditions.append(self._condition("Ready", False, "PodCompleted"))
            conditions.append(self._condition("ContainersReady", False, "PodCompleted"))
        else:
            if incomplete and not self.initialized:
                conditions.append(
                    self._condition(
                        "Initialized",
                        False,
                        "ContainersNotInitialized",
                        f"containers with incomplete status: [{' '.join(incomplete)}]",
                    )
                )
            else:
                conditions.append(self._condition("Initialized", True))
            all_ready = not unready and not terminal
            msg = f"containers with unready status: [{' '.join(unready)}]"
            conditions.append(
                self._condition(
                    "Ready",
                    all_ready,
                    None if all_ready else "ContainersNotReady",
                    None if all_ready else msg,
                )
            )
            conditions.append(
                self._condition(
                    "ContainersReady",
                    all_ready,
                    None if all_ready else "ContainersNotReady",
                    None if all_ready else msg,
                )
            )
        status: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "containerStatuses": [s.status() for s in self.states],
        }
        if self.init_states:
            status["initContainerStatuses"] = [s.status() for s in self.init_states]
        if self.reason:
            status["reason"] = self.reason
        if self.message:
            status["message"] = self.message
        return status

    async def _status_writer(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(0.05)
            self._dirty.clear()
            try:
                await self.write_status()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.debug("status of %s/%s: %r", self.namespace, self.name, err)
                self._dirty.set()
                await asyncio.sleep(0.5)

    async def _flush_status(self) -> None:
        for _ in range(5):
            self._dirty.clear()
            try:
                await self.write_status()
                break
            except Exception as err:
                log.debug("final status of %s/%s: %r", self.namespace, self.name, err)
                await asyncio.sleep(0.3)
        await self._stop_status_writer()

    async def write_status(self) -> None:
        desired = self.build_status()
        owned = {"PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady"}

        def mutate(obj: dict[str, Any]) -> dict[str, Any] | None:
            if obj["metadata"].get("uid") != self.uid:
                return None
            current = obj.get("status") or {}
            if current.get("phase") in TERMINAL and desired["phase"] not in TERMINAL:
                return None  # a kubelet never moves a pod out of a terminal phase
            foreign = [c for c in current.get("conditions") or [] if c.get("type") not in owned]
            if not any(c.get("type") == "PodScheduled" for c in foreign):
                foreign.insert(
                    0,
                    {
                        "type": "PodScheduled",
                        "status": "True",
                        "lastProbeTime": None,
                        "lastTransitionTime": self.start_time,
                    },
                )
            new_status = {**current, **desired, "conditions": foreign + desired["conditions"]}
            if new_status == current:
                return None
            obj["status"] = new_status
            return obj

        result = await self.kubelet.client.update_with_retry(
            PODS.path(self.namespace, self.name, "status"), mutate
        )
        if result is not None:
            self.pod = {**self.pod, "metadata": result["metadata"]}

    # -- for pods/log ---------------------------------------------------------------------------------------
    def container_state(self, name: str) -> ContainerState | None:
        return next((s for s in self.states + self.init_states if s.name == name), None)
