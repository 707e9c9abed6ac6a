"""Conformance fixtures: one cluster per session, reached through real kubectl binaries and the
`kubernetes` Python client.

By default the embedded API emulator is started in a background thread. With `KUBECONFIG` set the same
tests run against that cluster instead; tests marked `emulator` (fault injection, in-process hooks) are
skipped there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from localcluster.pytest_plugin import (
    lc_api,
    lc_kubectl,
    lc_kubectl_one,
    lc_namespace,
    local_cluster,
    pytest_collection_modifyitems,
)

REPO = Path(__file__).resolve().parents[2]
KUBECTLS = {"1.32": "/usr/bin/kubectl", "1.35": str(REPO / ".tools/bin/kubectl-1.35")}

# A small CRD of our own exercising what FineTuneJob relies on: structural schema, defaults, enum, minimum,
# CEL (with a transition rule), status and scale subresources, printer columns.
WIDGET_CRD: dict[str, Any] = yaml.safe_load("""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.conformance.example.com
spec:
  group: conformance.example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            x-kubernetes-validations:
            - rule: "self.size <= 10 || self.mode == 'big'"
              message: size above 10 needs mode big
            - rule: "!has(oldSelf.mode) || self.mode == oldSelf.mode || oldSelf.mode == 'small'"
              message: mode cannot go back from big
            properties:
              size: {type: integer, minimum: 1}
              mode: {type: string, enum: [small, big], default: small}
              replicas: {type: integer, default: 1}
          status:
            type: object
            properties:
              phase: {type: string}
              replicas: {type: integer}
              conditions:
                type: array
                items:
                  type: object
                  properties:
                    type: {type: string}
                    status: {type: string}
                    reason: {type: string}
                    message: {type: string}
""")
WIDGET_GROUP, WIDGET_VERSION, WIDGET_PLURAL = "conformance.example.com", "v1", "widgets"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "emulator: needs the in-process API emulator (skipped against a real cluster)"
    )


@dataclass
class Cluster:
    kubeconfig: str
    api_url: str
    apiserver: Any  # the ApiServer when the emulator runs in-process, else None
    run_on_loop: Callable[[Any], Any] | None = (
        None  # runs a coroutine on the emulator's loop, returns its result
    )

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the emulator's event loop thread (the ApiServer is not thread-safe)."""
        assert self.run_on_loop is not None

        async def run() -> Any:
            return fn()

        return self.run_on_loop(run())


@pytest.fixture(scope="session")
def cluster(local_cluster: Any) -> Cluster:
    """The shared embedded cluster (tests/conftest.py), or the one KUBECONFIG names."""
    if local_cluster.apiserver is None:
        return Cluster(str(local_cluster.kubeconfig), local_cluster.api_url, None)
    return Cluster(
        str(local_cluster.kubeconfig), local_cluster.api_url, local_cluster.apiserver, local_cluster.call
    )


@pytest.fixture
def emulator(cluster: Cluster) -> Any:
    """The in-process ApiServer; tests using it are skipped against a real cluster."""
    if cluster.apiserver is None:
        pytest.skip("needs the in-process API emulator")
    return cluster.apiserver


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> Any:
    from kubernetes import config as kconfig

    return kconfig.new_client_from_config(config_file=cluster.kubeconfig)


class Raw:
    """Plain HTTP against the cluster with the kubeconfig's credentials: status codes and bodies as sent."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.cfg = api.configuration

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float = 15,
        preload: bool = True,
        headers: dict[str, Any] | None = None,
    ) -> tuple[int, Any, Any]:
        """`headers` adds to (or, for Authorization, replaces) the kubeconfig's credentials."""
        sent: dict[str, Any] = {"Content-Type": content_type, "Accept": accept}
        for auth in self.cfg.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                sent[auth["key"]] = auth["value"]
        sent.update(headers or {})
        headers = sent
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        response = self.api.rest_client.pool_manager.request(
            method,
            self.cfg.host + path,
            body=data,
            headers=headers,
            timeout=timeout,
            preload_content=preload,
            retries=False,
        )
        if not preload:
            return response.status, None, response
        try:
            parsed = json.loads(response.data) if response.data else None
        except ValueError:
            parsed = response.data.decode(errors="replace")
        return response.status, parsed, response.headers


@pytest.fixture(scope="session")
def raw(api: Any) -> Raw:
    return Raw(api)


@pytest.fixture(scope="session")
def widget_crd(raw: Raw) -> dict[str, Any]:
    """The test CRD, registered once per session."""
    name = WIDGET_CRD["metadata"]["name"]
    status, body, _ = raw.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    if status == 404:
        status, body, _ = raw.request(
            "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGET_CRD
        )
        assert status == 201, body
    wait_for(lambda: raw.request("GET", f"/apis/{WIDGET_GROUP}/{WIDGET_VERSION}")[0] == 200, "CRD served")
    return body


@pytest.fixture
def namespace(raw: Raw) -> Iterator[str]:
    name = f"conf-{uuid.uuid4().hex[:8]}"
    status, body, _ = raw.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert status == 201, body
    yield name
    raw.request("DELETE", f"/api/v1/namespaces/{name}")


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 15.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Kubectl:
    def __init__(self, binary: str, version: str, kubeconfig: str, cache_dir: Path) -> None:
        self.binary = binary
        self.version = version
        self.kubeconfig = kubeconfig
        self.cache_dir = cache_dir

    def argv(self, *args: str) -> list[str]:
        return [self.binary, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}", *args]

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*args), input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session", params=sorted(KUBECTLS))
def kubectl(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Kubectl:
    binary = KUBECTLS[request.param]
    if not (os.path.exists(binary) or shutil.which(binary)):
        pytest.skip(f"kubectl {request.param} is not installed ({binary})")
    return Kubectl(
        binary, request.param, cluster.kubeconfig, tmp_path_factory.mktemp(f"kubectl-{request.param}")
    )
