"""LocalCluster: the API emulator, S3, nodes, scheduler, controllers, local kubelet and (optionally) the
operator, composed into one cluster on loopback.

    async with LocalCluster(Path(".local")) as cluster:      # or cluster.start_background() from sync code
        print(cluster.kubeconfig, cluster.api_url, cluster.s3_endpoint)

Files under `workdir`: `kubeconfig` (written atomically once the cluster is ready), `s3.env`, `services.json`
(each Service's local URL), `dns.json` (the pods' DNS map), `pods/` (volumes, logs), `pvcs/`, `operator.log`,
`s3.log`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import yaml

from .apiserver import ApiServer
from .apiserver.kubeconfig import write_kubeconfig
from .controllers.deployments import DeploymentController
from .controllers.jobs import JobController
from .controllers.scheduler import Scheduler
from .controllers.services import ServiceController
from .kubeclient import (
    CRDS,
    DEPLOYMENTS,
    JOBS,
    NODES,
    PODS,
    SECRETS,
    SERVICES,
    ApiError,
    Informer,
    KubeClient,
)
from .kubelet.addresses import AddressBlock
from .kubelet.kubelet import Kubelet
from .kubelet.nodes import NodeConfig, NodeRegistrar, default_nodes
from .kubelet.pods import _die_with_parent
from .runtime import project_root
from .s3 import S3Server

log = logging.getLogger("localcluster")

S3_SECRET = "s3-credentials"


def _operator_default() -> bool:
    return os.environ.get("LOCAL_OPERATOR", "1") != "0"


def _operator_rbac_default() -> bool:
    return os.environ.get("LOCAL_OPERATOR_RBAC", "1") != "0"


OPERATOR_ACCOUNT = ("default", "finetune-operator")  # the host-run operator's ServiceAccount


class LocalCluster:
    def __init__(
        self,
        workdir: Path = Path(".local"),
        *,
        kubelet: bool = True,
        s3: bool = True,
        operator: bool | None = None,
        nodes: list[NodeConfig] | None = None,
        api_port: int = 0,
        install_crds: bool | None = None,
        backoff_scale: float = 1.0,
        root: Path | None = None,
        operator_restart_backoff: tuple[float, float] = (1.0, 30.0),
        operator_rbac: bool | None = None,
        mlflow: bool = False,
        pod_threads: int | None = None,
        finetune_api: bool = False,
    ):
        self.workdir = Path(workdir).absolute()
        self.kubelet_enabled = kubelet
        self.s3_enabled = s3
        self.operator_enabled = _operator_default() if operator is None else operator
        # The host-run operator authenticates as its own ServiceAccount with exactly the chart's rules
        # (finetune_operator.k8s.rbac), so a verb missing there fails here too; LOCAL_OPERATOR_RBAC=0: admin.
        self.operator_rbac = _operator_rbac_default() if operator_rbac is None else operator_rbac
        self.install_crds = self.operator_enabled if install_crds is None else install_crds
        # The MLflow server (mlflow.py) starts with the cluster only when asked; start_mlflow() later.
        self.mlflow_enabled = mlflow
        self.mlflow_started = False
        self.mlflow_ready: asyncio.Task[str] | None = None  # its host URL, when started with the cluster
        # The OpenAI-compatible API (finetuneapi.py): with the cluster when asked; start_finetune_api() later.
        self.finetune_api_enabled = finetune_api
        self.finetune_api_started = False
        self.finetune_api_ready: asyncio.Task[str] | None = None  # its host URL, as mlflow_ready
        self.nodes = nodes if nodes is not None else default_nodes()
        self.api_port = api_port
        self.backoff_scale = backoff_scale
        self.pod_threads = pod_threads  # OpenMP threads per pod process (kubelet.Kubelet.pod_threads)
        self.root = root or project_root()
        self.kubeconfig = self.workdir / "kubeconfig"
        self.s3_env_file = self.workdir / "s3.env"
        self.services_file = self.workdir / "services.json"
        self.apiserver: ApiServer | None = None
        self.s3: S3Server | None = None
        self.client: KubeClient | None = None
        self._controller_clients: list[KubeClient] = []  # one per controller identity
        self.kubelet: Kubelet | None = None
        self.operator_process: asyncio.subprocess.Process | None = None
        # The operator runs supervised, like a Deployment's pod: restarted when it exits, with back-off.
        self.operator_restart_backoff = operator_restart_backoff
        self.operator_restarts = 0
        self._operator_supervisor: asyncio.Task[None] | None = None
        self._informers: list[Informer] = []
        self._components: list[Any] = []
        self._registrar: NodeRegistrar | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.started_in: float | None = None
        self.addresses: AddressBlock | None = None

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        assert self.apiserver is not None, "cluster not started"
        return self.apiserver.url

    @property
    def operator_ip(self) -> str:
        """Where the host-run operator's ports (metrics, health) listen."""
        assert self.addresses is not None, "cluster not started"
        return self.addresses.operator_ip

    @property
    def s3_endpoint(self) -> str | None:
        return self.s3.endpoint if self.s3 else None

    @property
    def s3_env(self) -> dict[str, str]:
        return dict(self.s3.env) if self.s3 else {}

    def s3_client(self) -> Any:
        """A boto3 S3 client for the cluster's S3, with the same credentials pods get."""
        import boto3

        env = self.s3_env
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        )

    def services(self) -> dict[str, Any]:
        """The content of services.json: `"<namespace>/<name>"` → clusterIP, ports[{name, port, url}], url."""
        import json

        try:
            return json.loads(self.services_file.read_text())
        except (OSError, ValueError):
            return {}

    def service_url(self, namespace: str, name: str, port: int | str | None = None) -> str | None:
        entry = self.services().get(f"{namespace}/{name}")
        if not entry:
            return None
        if port is None:
            return entry.get("url")
        for item in entry.get("ports") or []:
            if port in (item.get("port"), item.get("name")):
                return item.get("url")
        return None

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.kubeconfig.unlink()  # a stale one must not be mistaken for "ready"
        for stale in ("pods", "pvcs"):  # the API state is in memory: so is what pods left behind
            shutil.rmtree(self.workdir / stale, ignore_errors=True)
        self.addresses = AddressBlock.claim()
        for index, node in enumerate(self.nodes):
            node.ip = self.addresses.node_ip(index)
        self.apiserver = ApiServer("127.0.0.1", self.api_port)
        await self.apiserver.start()
        s3_start = None
        if self.s3_enabled:
            self.s3 = S3Server(log_file=self.workdir / "s3.log")
            s3_start = asyncio.create_task(self.s3.start())
        self.client = KubeClient(self.apiserver.url, user_agent="localcluster-controllers")
        try:
            if self.kubelet_enabled:
                await self._start_kubelet()
            if s3_start is not None:
                await s3_start
                await self._publish_s3()
            if self.install_crds:
                await self._install_crds()
        except BaseException:
            if s3_start is not None and not s3_start.done():
                s3_start.cancel()
            await self.stop()
            raise
        write_kubeconfig(self.kubeconfig, self.apiserver.url)
        self.started_in = time.monotonic() - began
        log.info("local cluster ready in %.1fs: %s", self.started_in, self.apiserver.url)
        if self.mlflow_enabled:  # in the background: the cluster is usable while MLflow starts (~20-30 s)
            self.mlflow_ready = asyncio.create_task(self.start_mlflow())
        if self.finetune_api_enabled:  # in the background too: the cluster is usable while it starts
            self.finetune_api_ready = asyncio.create_task(self.start_finetune_api())
        if self.operator_enabled:
            await self._start_operator()

    async def start_mlflow(self, timeout: float = 180) -> str:
        """Run the MLflow tracking server (Deployment + Service default/mlflow) and wait until it answers;
        returns its host URL (services.json key `mlflow`). Pods use mlflow.IN_CLUSTER_URL."""
        from . import mlflow

        assert self.client is not None and self.s3 is not None, "MLflow needs the kubelet and S3"
        if not self.mlflow_started:
            with contextlib.suppress(Exception):  # already there after a restart of this call
                await asyncio.to_thread(self.s3_client().create_bucket, Bucket=mlflow.BUCKET)
            data_dir = self.workdir / "mlflow"
            data_dir.mkdir(parents=True, exist_ok=True)
            deployment, service = mlflow.manifests(S3_SECRET, self.s3.endpoint, str(data_dir))
            for resource, body in ((DEPLOYMENTS, deployment), (SERVICES, service)):
                try:
                    await self.client.create(resource.path(mlflow.NAMESPACE), body)
                except ApiError as err:
                    if not err.conflict:
                        raise
            self.mlflow_started = True
        return await self.wait_mlflow(timeout)

    async def start_finetune_api(self, timeout: float = 120) -> str:
        """Run the OpenAI-compatible API from the chart's own api objects (finetuneapi.py) in `default`, its
        files in bucket `finetune-api`, and wait until /healthz answers; returns its host URL (services.json
        key `finetune-api`). Idempotent. Pods use finetuneapi.IN_CLUSTER_URL."""
        from . import finetuneapi

        assert self.client is not None and self.s3 is not None, "the finetune API needs the kubelet and S3"
        if not self.finetune_api_started:
            with contextlib.suppress(Exception):  # already there after a restart of this call
                await asyncio.to_thread(self.s3_client().create_bucket, Bucket=finetuneapi.BUCKET)
            for body in await asyncio.to_thread(finetuneapi.manifests, self.root, S3_SECRET):
                try:
                    await self.client.create(finetuneapi.collection_path(body), body)
                except ApiError as err:
                    if not err.conflict:
                        raise
            self.finetune_api_started = True
        return await self.wait_service(finetuneapi.SERVICES_KEY, "/healthz", timeout)

    async def wait_service(self, key: str, path: str, timeout: float) -> str:
        """The host URL of the Service whose services.json alias is `key`, once `path` answers 200."""
        import aiohttp

        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                entry = self.services().get(key) or {}
                url = entry.get("url")
                if url and any(p.get("endpoints") for p in entry.get("ports") or []):
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with session.get(f"{url}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r:
                            if r.status == 200:
                                return str(url)
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{key} did not answer {path} within {timeout:.0f}s (pod log under pods/)"
                    )
                await asyncio.sleep(0.5)

    def _mlflow_processes(self) -> list[Any]:
        """The MLflow pod's process tree (psutil), so stop() can make sure none of it outlives the cluster."""
        import psutil

        from . import mlflow

        found: list[Any] = []
        if self.kubelet is None or not self.mlflow_started:
            return found
        for worker in self.kubelet.workers.values():
            if worker.namespace != mlflow.NAMESPACE or not worker.name.startswith(f"{mlflow.NAME}-"):
                continue
            for state in worker.states:
                if state.process is not None and state.process.returncode is None:
                    with contextlib.suppress(psutil.Error):
                        root = psutil.Process(state.process.pid)
                        found += [root, *root.children(recursive=True)]
        return found

    async def wait_mlflow(self, timeout: float = 180) -> str:
        """The MLflow server's host URL once /health answers (after a start or a scale back to 1)."""
        from . import mlflow

        return await self.wait_service(mlflow.SERVICES_KEY, "/health", timeout)

    async def _start_kubelet(self) -> None:
        assert self.client is not None and self.apiserver is not None
        client = self.client
        for node in self.nodes:
            self.apiserver.register_kubelet(node.name)
        self._registrar = NodeRegistrar(client, self.nodes)
        await self._registrar.register()
        pods = Informer(client, PODS)
        nodes = Informer(client, NODES)
        jobs = Informer(client, JOBS)
        deployments = Informer(client, DEPLOYMENTS)
        services = Informer(client, SERVICES)
        self._informers = [pods, nodes, jobs, deployments, services]
        service_ctrl = ServiceController(services, pods, self.workdir, self.addresses)
        self.kubelet = Kubelet(
            client,
            pods,
            self.nodes,
            workdir=self.workdir,
            kubeconfig=self.kubeconfig,
            project_root=self.root,
            shim_dir=Path(__file__).parent / "podshim",
            dns_file=service_ctrl.dns_file,
            service_env=service_ctrl.service_env,
            backoff_scale=self.backoff_scale,
            addresses=self.addresses,
            pod_threads=self.pod_threads,
        )
        self._components = [
            Scheduler(client, pods, nodes),
            JobController(self._controller_client("job-controller"), jobs, pods),
            # On a real cluster the ReplicaSet controller creates a Deployment's pods; here the Deployment
            # controller does (no ReplicaSet objects), under that controller's name.
            DeploymentController(self._controller_client("replicaset-controller"), deployments, pods),
            service_ctrl,
        ]
        for informer in self._informers:
            informer.start()
        await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in self._informers)), 10)
        for component in self._components:
            component.start()
        self.apiserver.log_provider = self.kubelet.open_logs  # errors carry status/reason/message

    def _controller_client(self, account: str) -> KubeClient:
        """A client authenticated as kube-controller-manager's `account` controller
        (system:serviceaccount:kube-system:<account>, as with --use-service-account-credentials), so an
        admission policy that lets only the Job or ReplicaSet controller create pods (the chart's
        pod-admission.yaml) sees the same requester here as on a real cluster. There are no bootstrap
        controller roles here, so the account is also in system:masters."""
        assert self.apiserver is not None
        token = secrets.token_urlsafe(32)
        self.apiserver.add_user(token, f"system:serviceaccount:kube-system:{account}", ["system:masters"])
        client = KubeClient(self.apiserver.url, token=token, user_agent=f"localcluster-{account}")
        self._controller_clients.append(client)
        return client

    async def _publish_s3(self) -> None:
        assert self.s3 is not None and self.client is not None
        env = self.s3.env
        tmp = self.s3_env_file.with_name(".s3.env.tmp")
        tmp.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.s3_env_file)
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": S3_SECRET,
                "namespace": "default",
                "labels": {"app.kubernetes.io/managed-by": "localcluster"},
            },
            "stringData": env,
        }
        try:
            await self.client.create(SECRETS.path("default"), body)
        except ApiError as err:
            if not err.conflict:
                raise
            current = await self.client.get(SECRETS.path("default", S3_SECRET))
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await self.client.replace(SECRETS.path("default", S3_SECRET), body)

    async def _install_crds(self) -> None:
        assert self.client is not None
        directory = self.root / "crds"
        for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                try:
                    await self.client.create(CRDS.path(), doc)
                except ApiError as err:
                    if not err.conflict:
                        raise

    async def service_account_kubeconfig(
        self,
        namespace: str,
        name: str,
        path: Path | None = None,
        expiration_seconds: int = 86400,
    ) -> Path:
        """Write a kubeconfig that authenticates as ServiceAccount `namespace/name` (created if missing)
        with a token from the TokenRequest API; returns its path (default
        `<workdir>/sa-<namespace>-<name>.kubeconfig`). From another thread:
        `cluster.call(cluster.service_account_kubeconfig(...))`. Python clients and Kopf send the token over
        the cluster's plain http; kubectl sends tokens only over https, so with kubectl use
        `--as=system:serviceaccount:<namespace>:<name>` and the admin kubeconfig."""
        assert self.client is not None and self.apiserver is not None, "cluster not started"
        accounts = f"/api/v1/namespaces/{namespace}/serviceaccounts"
        try:
            await self.client.create(accounts, {"metadata": {"name": name}})
        except ApiError as err:
            if not err.conflict:
                raise
        answer = await self.client.create(
            f"{accounts}/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        target = path or self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        write_kubeconfig(target, self.apiserver.url, token=answer["status"]["token"], namespace=namespace)
        return Path(target)

    async def _operator_kubeconfig(self) -> Path:
        """The admin kubeconfig, or one for the operator's ServiceAccount bound to its own rules."""
        if not self.operator_rbac:
            return self.kubeconfig
        try:
            from finetune_operator.k8s.rbac import cluster_role
        except ImportError as err:
            log.warning("operator runs as cluster admin: its RBAC rules are not importable (%s)", err)
            return self.kubeconfig
        assert self.client is not None
        namespace, name = OPERATOR_ACCOUNT
        role = cluster_role(f"localcluster-{name}")
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role["metadata"]["name"]},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role["metadata"]["name"],
            },
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        }
        rbac = "/apis/rbac.authorization.k8s.io/v1"
        for path, body in ((f"{rbac}/clusterroles", role), (f"{rbac}/clusterrolebindings", binding)):
            try:
                await self.client.create(path, body)
            except ApiError as err:
                if not err.conflict:
                    raise
                current = await self.client.get(f"{path}/{body['metadata']['name']}")
                body = {
                    **body,
                    "metadata": {
                        **body["metadata"],
                        "resourceVersion": current["metadata"]["resourceVersion"],
                    },
                }
                await self.client.replace(f"{path}/{body['metadata']['name']}", body)
        return await self.service_account_kubeconfig(
            namespace, name, self.workdir / "operator.kubeconfig", expiration_seconds=365 * 86400
        )

    async def _start_operator(self) -> None:
        """Start the operator under supervision: when it exits for any reason other than stop(), it is
        restarted after a back-off (first delay doubling up to the cap, reset after a minute of running),
        as the kubelet restarts a Deployment's container. `make local-cluster` and `make demo` run it so."""
        if (
            importlib.util.find_spec("finetune_operator") is None
            or importlib.util.find_spec("finetune_operator.__main__") is None
        ):
            log.warning(
                "operator not started: the finetune_operator package is not installed in this environment "
                "(`make venv` installs it); set LOCAL_OPERATOR=0 to run the cluster without it"
            )
            return
        if self._operator_supervisor is not None and not self._operator_supervisor.done():
            return
        await self._spawn_operator()
        supervisor = self._supervise_operator()
        self._operator_supervisor = asyncio.create_task(supervisor, name="operator-supervisor")

    async def _supervise_operator(self) -> None:
        first, cap = self.operator_restart_backoff
        delay = first
        while True:
            proc = self.operator_process
            assert proc is not None
            started = time.monotonic()
            code = await proc.wait()
            if time.monotonic() - started >= 60:
                delay = first  # it ran cleanly for a while: back to the short delay
            log.warning(
                "operator (pid %s) exited with %s; restarting in %.1fs (restart %d)",
                proc.pid,
                code,
                delay,
                self.operator_restarts + 1,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)
            try:
                await self._spawn_operator()
            except OSError as err:
                log.error("operator restart failed: %s", err)
                continue
            self.operator_restarts += 1

    async def _spawn_operator(self) -> None:
        python = self.root / ".venv" / "bin" / "python"
        kubeconfig = await self._operator_kubeconfig()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
        if self.kubelet_enabled:
            # Like a pod: cluster DNS for `<svc>.<ns>.svc` and its own loopback IP for the ports it opens
            # (metrics, health), so an operator pod installed by helm can use the same ports.
            shim = str(Path(__file__).parent / "podshim")
            env["PYTHONPATH"] = f"{shim}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else shim
            env["LOCALCLUSTER_DNS_FILE"] = str(self.workdir / "dns.json")
            env["LOCALCLUSTER_POD_IP"] = self.operator_ip
            env["LOCALCLUSTER_POD_NAMESPACE"] = "default"
        for key in self.s3_env:
            env.pop(key, None)  # the operator never holds storage credentials
        # Everything here is on loopback over plain http (reference endpoints in tests and demos included):
        # the one place that allowance is made. A real install allows no plain-http host by default.
        env.setdefault("FTO_REFERENCE_PLAIN_HTTP_HOSTS", "127.0.0.0/8,localhost,::1")
        # Chaos testing (issue 24): the pools' routers accept PUT /faults here; the chart keeps it off.
        env.setdefault("FTO_ROUTER_FAULT_INJECTION", "true")
        if self.mlflow_enabled:
            from .mlflow import IN_CLUSTER_URL

            env.setdefault("FTO_MLFLOW_TRACKING_URI", IN_CLUSTER_URL)  # the chart value's local equivalent
        out = open(self.workdir / "operator.log", "ab")  # noqa: SIM115
        try:
            self.operator_process = await asyncio.create_subprocess_exec(
                str(python if python.exists() else sys.executable),
                "-m",
                "finetune_operator",
                "--all-namespaces",
                "--metrics-port",
                "0",
                "--liveness-port",
                "0",  # concurrent clusters must not share ports
                cwd=str(self.root),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        log.info(
            "operator started (pid %s, ports on %s, as %s), log: %s",
            self.operator_process.pid,
            self.operator_ip,
            "system:serviceaccount:{}:{}".format(*OPERATOR_ACCOUNT)
            if kubeconfig != self.kubeconfig
            else "admin",
            self.workdir / "operator.log",
        )

    async def _stop_operator(self) -> None:
        """Stop the operator for good (no restart) until _start_operator()."""
        supervisor, self._operator_supervisor = self._operator_supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        proc = self.operator_process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()

    async def stop(self) -> None:
        for ready in (self.mlflow_ready, self.finetune_api_ready):
            if ready is not None and not ready.done():
                ready.cancel()
        await self._stop_operator()
        leftovers = self._mlflow_processes()
        if self.kubelet is not None:
            await self.kubelet.stop()
        for process in leftovers:  # `mlflow server` runs uvicorn as a child; never leave it behind
            with contextlib.suppress(Exception):
                process.kill()
        for component in self._components:
            with contextlib.suppress(Exception):
                await component.stop()
        if self._registrar is not None:
            await self._registrar.stop()
        for informer in self._informers:
            await informer.stop()
        for client in self._controller_clients:
            await client.close()
        self._controller_clients = []
        if self.client is not None:
            await self.client.close()
        if self.s3 is not None:
            await self.s3.stop()
        if self.apiserver is not None:
            with contextlib.suppress(Exception):
                await self.apiserver.stop()
        with contextlib.suppress(FileNotFoundError):
            self.kubeconfig.unlink()
        if self.addresses is not None:
            self.addresses.release()

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- thread-backed sync wrapper (pytest, scripts) --------------------------------------------------------
    def start_background(self, timeout: float = 60) -> LocalCluster:
        """Run the cluster's event loop in a daemon thread; returns once the cluster is ready."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as err:
                failure.append(err)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="localcluster", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"local cluster not ready within {timeout:g}s")
        if failure:
            raise failure[0]
        return self

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 60) -> Any:
        """Run a coroutine on the cluster's loop from another thread (e.g. ApiServer fault injection)."""
        assert self._loop is not None, "start_background() first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Start a coroutine on the cluster's loop without waiting (e.g. start_mlflow() during the demo)."""
        assert self._loop is not None, "start_background() first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop_background(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> LocalCluster:
        return self.start_background()

    def __exit__(self, *exc: object) -> None:
        self.stop_background()
