"""A small asyncio Kubernetes API client (aiohttp) used by the local kubelet and controllers.

The controllers are ordinary API clients: they list, watch, create and patch over HTTP and honour
resourceVersion conflicts, exactly as kube-controller-manager and the kubelet do against a real API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSONPATCH = "application/json-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the API server, carrying the Kubernetes `Status` body."""

    def __init__(self, status: int, body: Any, method: str = "", path: str = ""):
        self.status = status
        self.body = body if isinstance(body, dict) else {"message": str(body)}
        self.reason = self.body.get("reason", "")
        self.method = method
        self.path = path
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.body.get('message', '')}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


@dataclass(frozen=True)
class Resource:
    """Where a kind lives: `/api/v1` or `/apis/<group>/<version>`, its plural and whether it is namespaced."""

    api: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        parts = [self.api]
        if self.namespaced and namespace:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        if name:
            parts.append(name)
        if sub:
            parts.append(sub)
        return "/".join(parts)


PODS = Resource("/api/v1", "pods")
NODES = Resource("/api/v1", "nodes", namespaced=False)
SERVICES = Resource("/api/v1", "services")
SECRETS = Resource("/api/v1", "secrets")
CONFIGMAPS = Resource("/api/v1", "configmaps")
EVENTS = Resource("/api/v1", "events")
NAMESPACES = Resource("/api/v1", "namespaces", namespaced=False)
JOBS = Resource("/apis/batch/v1", "jobs")
DEPLOYMENTS = Resource("/apis/apps/v1", "deployments")
LEASES = Resource("/apis/coordination.k8s.io/v1", "leases")
CRDS = Resource("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", namespaced=False)


class KubeClient:
    """Thin JSON client: one aiohttp session, Kubernetes error bodies turned into `ApiError`."""

    def __init__(self, base_url: str, token: str | None = None, user_agent: str = "localcluster"):
        self.base_url = base_url.rstrip("/")
        self._headers = {"User-Agent": user_agent, "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                connector=aiohttp.TCPConnector(limit=64, force_close=False),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (params or {}).items()}
        async with self.session.request(
            method,
            self.base_url + path,
            data=data,
            params=query,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            raw = await resp.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = {"message": raw.decode("utf-8", "replace")}
            if resp.status >= 400:
                raise ApiError(resp.status, payload, method, path)
            return payload

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params=params)

    async def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.get(path)
        except ApiError as err:
            if err.not_found:
                return None
            raise

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, body=body)

    async def patch(self, path: str, body: Any, content_type: str = MERGE) -> dict[str, Any]:
        return await self.request("PATCH", path, body=body, content_type=content_type)

    async def delete(
        self,
        path: str,
        *,
        grace_period: int | None = None,
        uid: str | None = None,
        propagation: str | None = None,
        missing_ok: bool = True,
    ) -> Any:
        opts: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace_period is not None:
            opts["gracePeriodSeconds"] = grace_period
        if uid:
            opts["preconditions"] = {"uid": uid}
        if propagation:
            opts["propagationPolicy"] = propagation
        try:
            return await self.request("DELETE", path, body=opts)
        except ApiError as err:
            if missing_ok and (err.not_found or (uid and err.conflict)):
                return None
            raise

    async def update_with_retry(
        self,
        path: str,
        mutate: Callable[[dict[str, Any]], dict[str, Any] | None],
        *,
        current: dict[str, Any] | None = None,
        attempts: int = 8,
    ) -> dict[str, Any] | None:
        """GET (or use `current`), let `mutate` edit a copy, PUT it; on 409 Conflict read again and retry.

        `mutate` returns the object to write or None when nothing needs to change. The write is a PUT
        carrying the resourceVersion that was read, so a concurrent writer's change is never lost.
        """
        obj = current
        for _ in range(attempts):
            if obj is None:
                obj = await self.get_or_none(_object_path(path))
                if obj is None:
                    return None
            desired = mutate(json.loads(json.dumps(obj)))
            if desired is None:
                return obj
            try:
                return await self.replace(path, desired)
            except ApiError as err:
                if err.conflict:
                    obj = None
                    continue
                if err.not_found:
                    return None
                raise
        raise ApiError(
            409, {"reason": "Conflict", "message": f"gave up after {attempts} conflicts"}, "PUT", path
        )

    async def watch(
        self, path: str, resource_version: str, *, timeout_seconds: int = 300, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream watch events; returns when the server closes the stream. ERROR events are yielded."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
            **{k: str(v) for k, v in params.items()},
        }
        async with self.session.get(
            self.base_url + path,
            params=query,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30),
        ) as resp:
            if resp.status >= 400:
                raw = await resp.read()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = {"message": raw.decode("utf-8", "replace")}
                raise ApiError(resp.status, payload, "WATCH", path)
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buffer.strip():
                yield json.loads(buffer)


def _object_path(path: str) -> str:
    """The object path for a subresource path (…/pods/x/status → …/pods/x)."""
    for sub in ("/status", "/scale"):
        if path.endswith(sub):
            return path[: -len(sub)]
    return path


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


Handler = Callable[[str, dict[str, Any]], None]


class Informer:
    """List + watch one resource into a cache and call handlers for every event, in order.

    Like client-go's reflector: relists on `410 Gone` or a broken stream, resumes from the last
    resourceVersion seen (bookmarks included), and reports synthetic DELETED events for objects that vanished
    between a watch break and the relist.
    """

    def __init__(self, client: KubeClient, resource: Resource, *, label_selector: str | None = None):
        self.client = client
        self.resource = resource
        self.label_selector = label_selector
        self.cache: dict[str, dict[str, Any]] = {}
        self.handlers: list[Handler] = []
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add_handler(self, handler: Handler) -> None:
        self.handlers.append(handler)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer-{self.resource.plural}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def values(self) -> Iterable[dict[str, Any]]:
        return list(self.cache.values())

    def get(self, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.cache.get(f"{namespace}/{name}" if namespace else name)

    def _dispatch(self, kind: str, obj: dict[str, Any]) -> None:
        for handler in self.handlers:
            try:
                handler(kind, obj)
            except Exception:
                log.exception("handler for %s %s failed", self.resource.plural, object_key(obj))

    async def _list(self) -> str:
        params: dict[str, Any] = {}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        listing = await self.client.get(self.resource.path(), **params)
        fresh = {object_key(o): o for o in listing.get("items", [])}
        for key, old in list(self.cache.items()):
            if key not in fresh:
                del self.cache[key]
                self._dispatch("DELETED", old)
        for key, obj in fresh.items():
            old = self.cache.get(key)
            self.cache[key] = obj
            if old is None:
                self._dispatch("ADDED", obj)
            elif old.get("metadata", {}).get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._dispatch("MODIFIED", obj)
        return str(listing.get("metadata", {}).get("resourceVersion", "0"))

    async def _run(self) -> None:
        rv: str | None = None
        backoff = 0.2
        while True:
            try:
                if rv is None:
                    rv = await self._list()
                    self.synced.set()
                params = {"labelSelector": self.label_selector} if self.label_selector else {}
                began = asyncio.get_running_loop().time()
                async for event in self.client.watch(self.resource.path(), rv, **params):
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            rv = None
                        break
                    new_rv = obj.get("metadata", {}).get("resourceVersion")
                    if new_rv:
                        rv = new_rv
                    if kind == "BOOKMARK":
                        continue
                    key = object_key(obj)
                    if kind == "DELETED":
                        self.cache.pop(key, None)
                    else:
                        self.cache[key] = obj
                    self._dispatch(kind, obj)
                if asyncio.get_running_loop().time() - began < 1:
                    # A stream that ends at once (errors, a server closing watches): back off, never spin.
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5)
                else:
                    backoff = 0.2
            except asyncio.CancelledError:
                raise
            except ApiError as err:
                if err.status == 410:
                    rv = None
                    continue
                log.debug("watch %s: %s", self.resource.plural, err)
                rv = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5)
            except (TimeoutError, aiohttp.ClientError, ValueError, OSError) as err:
                log.debug("watch %s broke: %r", self.resource.plural, err)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5)
