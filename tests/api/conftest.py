"""API tier: the OpenAI-compatible service (operator/finetune_api) run in-process against the embedded
cluster's API server and S3, driven with the official `openai` client.

The service authenticates as a ServiceAccount bound to exactly the rules the chart gives it (tokenreviews and
subjectaccessreviews create; `get` of its one models ConfigMap), so a call it makes with its own identity
beyond that fails here as it would in a cluster. Callers are ServiceAccounts of a fresh namespace with tokens
from the TokenRequest API, exactly what `kubectl create token` hands out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from finetune_api.app import create_app
from finetune_api.config import ApiConfig
from finetune_api.kube import load
from localcluster.pytest_plugin import (
    lc_api,
    lc_namespace,
    local_cluster,
    pytest_collection_modifyitems,
)

__all__ = ["lc_api", "lc_namespace", "local_cluster", "pytest_collection_modifyitems"]

GROUP, VERSION = "finetune.dev", "v1alpha1"
BUCKET = "finetune-api-test"
MODELS_CM = "finetune-api-models-test"  # not the demo's ConfigMap name: this tier owns its mapping
SERVICE_ACCOUNT = "finetune-api-test"
# What a user of the API needs in a namespace (the aggregated edit role covers the same).
USER_RULES = [
    {
        "apiGroups": [GROUP],
        "resources": ["finetunejobs"],
        "verbs": ["create", "get", "list", "watch", "patch"],
    },
    {"apiGroups": [GROUP], "resources": ["modelservers"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["events", "pods", "services"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]
STORAGE = "storage: {output: s3://runs/api, credentialsSecret: s3}\n"
MAPPING = {
    "tiny": "baseModel: {uri: s3://models/tiny-base}\n" + STORAGE,
    "denied": "baseModel: {uri: s3://unapproved/base}\n" + STORAGE,
}


class Admin:
    """Plain HTTP to the embedded API server without credentials (the emulator's cluster admin)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = urllib3.PoolManager()

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        response = self.http.request(
            method, self.url + path, body=data, headers={"Content-Type": content_type}, retries=False
        )
        try:
            return response.status, json.loads(response.data) if response.data else None
        except ValueError:
            return response.status, response.data.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, answer = self.request(method, path, body, **kw)
        assert status < 300, f"{method} {path} → {status}: {answer}"
        return answer

    def create(self, path: str, body: dict[str, Any]) -> None:
        status, answer = self.request("POST", path, body)
        assert status < 300 or status == 409, f"POST {path} → {status}: {answer}"

    def token(self, namespace: str, account: str) -> str:
        """A ServiceAccount token from the TokenRequest API (what `kubectl create token` prints)."""
        self.create(f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": account}})
        answer = self.ok(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
        )
        return str(answer["status"]["token"])

    def jobs(self, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.ok(
            "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/finetunejobs"
        )["items"]
        return items


class DnsFile(AbstractResolver):
    """The proxy's resolver in tests: cluster Service names from the embedded cluster's dns.json (what pods
    resolve through the podshim), anything else as usual."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fallback: AbstractResolver | None = None  # made on the service's loop

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        try:
            table = json.loads(self.path.read_text())
        except (OSError, ValueError):
            table = {}
        name = host.rstrip(".").lower()
        for candidate in (name, f"{name}.cluster.local"):
            if table.get(candidate):
                return [
                    ResolveResult(
                        hostname=host,
                        host=ip,
                        port=port,
                        family=socket.AF_INET,
                        proto=0,
                        flags=socket.AI_NUMERICHOST,
                    )
                    for ip in table[candidate]
                ]
        self.fallback = self.fallback or DefaultResolver()
        return await self.fallback.resolve(host, port, family)

    async def close(self) -> None:
        if self.fallback is not None:
            await self.fallback.close()


class ServiceThread:
    """One instance of the service on 127.0.0.1, in a thread with its own event loop."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, access_log=None)
        self.thread = threading.Thread(target=self.loop.run_forever, name="finetune-api", daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def cluster(local_cluster: Any) -> Any:
    if getattr(local_cluster, "external", False):
        pytest.skip("the API tier runs the service against the embedded cluster's API server and S3")
    return local_cluster


@pytest.fixture(scope="session")
def admin(cluster: Any) -> Admin:
    return Admin(cluster.api_url)


@pytest.fixture(scope="session")
def service_kubeconfig(cluster: Any, admin: Admin) -> Path:
    """The service's own identity: a ServiceAccount with exactly the chart's rules for it."""
    ns, name = "default", SERVICE_ACCOUNT
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    admin.create(
        f"{rbac}/clusterroles",
        {
            "metadata": {"name": name},
            "rules": [
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {
                    "apiGroups": ["authorization.k8s.io"],
                    "resources": ["subjectaccessreviews"],
                    "verbs": ["create"],
                },
            ],
        },
    )
    admin.create(
        f"{rbac}/clusterrolebindings",
        {
            "metadata": {"name": name},
            "subjects": subject,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        },
    )
    admin.create(
        f"{rbac}/namespaces/{ns}/roles",
        {
            "metadata": {"name": name},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "verbs": ["get"],
                    "resourceNames": [MODELS_CM],
                }
            ],
        },
    )
    admin.create(
        f"{rbac}/namespaces/{ns}/rolebindings",
        {
            "metadata": {"name": name},
            "subjects": subject,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        },
    )
    path: Path = cluster.call(cluster.service_account_kubeconfig(ns, name))
    return path


@pytest.fixture(scope="session")
def models_configmap(admin: Admin) -> dict[str, str]:
    body = {"metadata": {"name": MODELS_CM}, "data": MAPPING}
    status, _ = admin.request("POST", "/api/v1/namespaces/default/configmaps", body)
    if status == 409:
        admin.ok("PUT", f"/api/v1/namespaces/default/configmaps/{MODELS_CM}", body)
    return MAPPING


@pytest.fixture(scope="session")
def s3(cluster: Any) -> Any:
    client = cluster.s3_client()
    with contextlib.suppress(
        client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
    ):
        client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="session")
def start_service(
    cluster: Any, service_kubeconfig: Path, models_configmap: dict[str, str], s3: Any
) -> Iterator[Callable[..., str]]:
    """Start an instance of the service (overrides of ApiConfig as keywords); returns its base URL."""
    started: list[ServiceThread] = []

    def start(**overrides: Any) -> str:
        settings: dict[str, Any] = {
            "files_uri": f"s3://{BUCKET}/files",
            "max_file_bytes": 256 * 1024,
            "max_body_bytes": 64 * 1024,
            "models_configmap": MODELS_CM,
            "models_namespace": "default",
            "kubeconfig": str(service_kubeconfig),
            **overrides,
        }
        config = ApiConfig(**settings)
        resolver = DnsFile(Path(cluster.workdir) / "dns.json")
        app = create_app(config, kube=load(config.kubeconfig), s3_client=s3, resolver=resolver)
        service = ServiceThread(app)
        started.append(service)
        return service.url

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def api_url(start_service: Callable[..., str]) -> str:
    return start_service()


@dataclass
class Tenant:
    namespace: str
    token: str
    url: str

    def client(self, token: str | None = None, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=token or self.token, max_retries=0, **kw)


@pytest.fixture
def tenant(lc_namespace: str, admin: Admin, api_url: str) -> Tenant:
    """A namespace with a user (ServiceAccount `app-dev`) allowed what the API needs, and its token."""
    ns = lc_namespace
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
    admin.create(f"{rbac}/roles", {"metadata": {"name": "api-user"}, "rules": USER_RULES})
    admin.create(
        f"{rbac}/rolebindings",
        {
            "metadata": {"name": "api-user"},
            "subjects": [{"kind": "ServiceAccount", "name": "app-dev", "namespace": ns}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "api-user"},
        },
    )
    return Tenant(ns, admin.token(ns, "app-dev"), api_url)


def good_lines(n: int = 3) -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(n)
    ]
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"
