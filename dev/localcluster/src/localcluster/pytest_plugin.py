"""pytest fixtures for the embedded cluster, imported by the conftest of each test tier that uses a cluster
(tests/conformance, tests/e2e, tests/chart) so that unit and trainer tests never load it.

- `local_cluster` (session): the embedded LocalCluster, started once; or, when `KUBECONFIG` is set in the
  environment, an `ExternalCluster` for that cluster, and every test marked `local_kubelet` is skipped.
  `LOCALCLUSTER_EMBEDDED=1` forces the embedded cluster even with KUBECONFIG set.
- `lc_kubectl`: a `Kubectl` runner, parametrized over the kubectl binaries present (/usr/bin/kubectl 1.32 and
  .tools/bin/kubectl-1.35); `lc_kubectl_one`: a single runner (1.35 when present) for tests needing only one.
- `lc_namespace`: a fresh namespace per test, deleted afterwards.
- `lc_api`: a `kubernetes.client.ApiClient` for the cluster (the official Python client).
(The `lc_` prefix keeps these clear of directory conftests that define their own `kubectl`/`namespace`.)

Helpers: `wait_for`, `pod`, `pod_phase`, `job`, `job_pods`, `condition`, `events` (objects as plain dicts).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .cluster import LocalCluster
from .runtime import project_root

KUBECTL_BINARIES = {
    "kubectl-1.32": Path("/usr/bin/kubectl"),
    "kubectl-1.35": project_root() / ".tools" / "bin" / "kubectl-1.35",
}


def external_kubeconfig() -> str | None:
    if os.environ.get("LOCALCLUSTER_EMBEDDED") == "1":
        return None
    return os.environ.get("KUBECONFIG") or None


@dataclass
class ExternalCluster:
    """A cluster given by KUBECONFIG: same surface as LocalCluster where it makes sense."""

    kubeconfig: Path
    apiserver: None = None
    kubelet: None = None
    s3_endpoint: str | None = None
    external: bool = True

    @property
    def api_url(self) -> str:
        import yaml

        config = yaml.safe_load(self.kubeconfig.read_text())
        current = config.get("current-context")
        context = next(c["context"] for c in config["contexts"] if c["name"] == current)
        return next(c["cluster"]["server"] for c in config["clusters"] if c["name"] == context["cluster"])

    @property
    def s3_env(self) -> dict[str, str]:
        return {}

    def services(self) -> dict[str, Any]:
        return {}

    def service_url(self, namespace: str, name: str, port: int | str | None = None) -> str | None:
        return None


class Kubectl:
    """One kubectl binary against the cluster: `kubectl("get", "pods")`, `kubectl.json("get", "pod", "x")`."""

    def __init__(self, binary: Path, kubeconfig: Path, version: str):
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.version = version

    def __call__(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.binary), *(["-n", namespace] if namespace else []), *args]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def json(self, *args: str, namespace: str | None = None, **kw: Any) -> Any:
        return json.loads(self(*args, "-o", "json", namespace=namespace, **kw).stdout)

    def apply(self, manifest: dict[str, Any] | str, namespace: str | None = None) -> str:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self("apply", "-f", "-", input=text, namespace=namespace).stdout

    def __repr__(self) -> str:
        return f"Kubectl({self.version})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if external_kubeconfig() is None:
        return
    skip = pytest.mark.skip(reason="needs the embedded cluster's local kubelet (KUBECONFIG points elsewhere)")
    for item in items:
        if "local_kubelet" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def local_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster | ExternalCluster]:
    kubeconfig = external_kubeconfig()
    if kubeconfig:
        yield ExternalCluster(Path(kubeconfig))
        return
    yield _session_cluster(request.config, tmp_path_factory)


_CLUSTER_KEY = pytest.StashKey[LocalCluster]()


def _session_cluster(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
    """One embedded cluster per test session, however many conftests import the `local_cluster` fixture."""
    cluster = config.stash.get(_CLUSTER_KEY, None)
    if cluster is None:
        workdir = tmp_path_factory.mktemp("localcluster")
        backoff_scale = float(os.environ.get("LOCALCLUSTER_BACKOFF_SCALE", "0.1"))
        # One OpenMP thread per pod process: tests run several torch processes (pods of two xdist workers'
        # clusters) on a 2-core host, where per-core OpenMP pools spin against each other (0: the default).
        threads = int(os.environ.get("LOCALCLUSTER_POD_THREADS", "1"))
        cluster = LocalCluster(workdir, backoff_scale=backoff_scale, pod_threads=threads or None)
        cluster.start_background()
        config.stash[_CLUSTER_KEY] = cluster
        config.add_cleanup(cluster.stop_background)
    return cluster


def _available_kubectls() -> list[str]:
    return [name for name, path in KUBECTL_BINARIES.items() if path.exists() or shutil.which(str(path))]


@pytest.fixture(params=list(KUBECTL_BINARIES), ids=list(KUBECTL_BINARIES))
def lc_kubectl(request: pytest.FixtureRequest, local_cluster: LocalCluster | ExternalCluster) -> Kubectl:
    path = KUBECTL_BINARIES[request.param]
    if not path.exists():
        pytest.skip(f"{path} is not installed (make tools)")
    return Kubectl(path, Path(local_cluster.kubeconfig), request.param)


@pytest.fixture
def lc_kubectl_one(local_cluster: LocalCluster | ExternalCluster) -> Kubectl:
    for name in reversed(list(KUBECTL_BINARIES)):
        if KUBECTL_BINARIES[name].exists():
            return Kubectl(KUBECTL_BINARIES[name], Path(local_cluster.kubeconfig), name)
    pytest.skip("no kubectl binary found")
    raise AssertionError  # unreachable


@pytest.fixture(scope="session")
def lc_api(local_cluster: LocalCluster | ExternalCluster) -> Iterator[Any]:
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(local_cluster.kubeconfig))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def lc_namespace(lc_api: Any) -> Iterator[str]:
    from kubernetes import client

    name = f"t-{secrets.token_hex(4)}"
    core = client.CoreV1Api(lc_api)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):  # best-effort cleanup
            core.delete_namespace(name, propagation_policy="Background", grace_period_seconds=0)


# -- helpers for tests (polling and reading objects through the official client) -----------------------------
T = TypeVar("T")


def _k8s() -> Any:
    from kubernetes import client

    return client


def wait_for(
    check: Callable[[], T | None], timeout: float = 30, interval: float = 0.2, what: str = "condition"
) -> T:
    """Poll `check` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}")


def pod(api: Any, namespace: str, name: str) -> dict[str, Any]:
    return _k8s().CoreV1Api(api).read_namespaced_pod(name, namespace, _preload_content=False).json()


def pod_phase(
    api: Any, namespace: str, name: str, phases: tuple[str, ...] = ("Succeeded", "Failed")
) -> dict[str, Any] | None:
    obj = pod(api, namespace, name)
    return obj if obj.get("status", {}).get("phase") in phases else None


def job(api: Any, namespace: str, name: str) -> dict[str, Any]:
    return _k8s().BatchV1Api(api).read_namespaced_job(name, namespace, _preload_content=False).json()


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c.get("type") == kind), None)


def job_pods(api: Any, namespace: str, job_name: str) -> list[dict[str, Any]]:
    listing = (
        _k8s()
        .CoreV1Api(api)
        .list_namespaced_pod(
            namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}", _preload_content=False
        )
        .json()
    )
    return listing["items"]


def events(api: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = _k8s().CoreV1Api(api).list_namespaced_event(namespace, _preload_content=False).json()
    return [e for e in listing["items"] if e["involvedObject"].get("name") == name]


def restricted(container: dict[str, Any]) -> dict[str, Any]:
    """The restricted securityContext every pod of ours carries (ignored by the local kubelet)."""
    container["securityContext"] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return container
