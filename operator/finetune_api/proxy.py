"""`/v1/models` and `/v1/chat/completions`: the models served in the caller's namespace (FineTuneJobs'
`status.endpoint {url, model}`, ModelServers' `status.endpoint` + `status.models`), listed with the caller's
token, and the chat request passed to the one serving `model`, streamed back as it comes (SSE included).

Only cluster-internal Service URLs of the caller's own namespace are called (`http://<svc>.<ns>.svc[...]`), so
a status field cannot point the service anywhere else; the caller's token is never forwarded to a model
server."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from finetune_operator.api.finetunejob import API_VERSION
from finetune_operator.api.finetunejob import PLURAL as JOBS_PLURAL
from finetune_operator.api.modelserver import PLURAL as SERVERS_PLURAL

from .auth import Caller
from .errors import ApiError
from .jobs import epoch
from .kube import Kube

SERVICE_HOST = re.compile(
    r"^(?P<svc>[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)\.(?P<ns>[a-z0-9-]{1,63})\.svc(\.cluster\.local)?$"
)
PASSED_HEADERS = ("Content-Type", "Cache-Control")
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)


@dataclass(frozen=True)
class Served:
    model: str
    url: str  # the OpenAI-compatible base URL (…/v1)
    created: int
    owner: str  # "FineTuneJob/<name>" or "ModelServer/<name>"


def service_url(url: Any, namespace: str) -> str | None:
    """`url` when it is a Service of `namespace` over http(s), else None."""
    if not isinstance(url, str):
        return None
    parts = urlsplit(url)
    match = SERVICE_HOST.match(parts.hostname or "")
    if parts.scheme not in ("http", "https") or match is None or match.group("ns") != namespace:
        return None
    if parts.username or parts.password or parts.query or parts.fragment:
        return None
    return url.rstrip("/")


def _created(obj: Mapping[str, Any]) -> int:
    return epoch((obj.get("metadata") or {}).get("creationTimestamp")) or 0


def served_models(
    namespace: str, jobs: list[dict[str, Any]], servers: list[dict[str, Any]]
) -> dict[str, Served]:
    """model name → where it is served; a job's own server wins over a pool's name on a clash."""
    found: dict[str, Served] = {}
    for server in servers:
        status = server.get("status") or {}
        url = service_url(status.get("endpoint"), namespace)
        if url is None:
            continue
        for model in status.get("models") or {}:
            found[str(model)] = Served(
                str(model), url, _created(server), f"ModelServer/{server['metadata']['name']}"
            )
    for job in jobs:
        endpoint = (job.get("status") or {}).get("endpoint") or {}
        url = service_url(endpoint.get("url"), namespace)
        if url is not None and endpoint.get("model"):
            model = str(endpoint["model"])
            found[model] = Served(model, url, _created(job), f"FineTuneJob/{job['metadata']['name']}")
    return found


def _model_object(served: Served, caller: Caller) -> dict[str, Any]:
    return {"id": served.model, "object": "model", "created": served.created, "owned_by": caller.namespace}


def _not_served(model: str, caller: Caller, param: str | None) -> ApiError:
    return ApiError(
        404,
        f'The model "{model[:256]}" is not served in namespace "{caller.namespace}"',
        code="model_not_found",
        param=param,
    )


class Proxy:
    def __init__(self, kube: Kube, resolver: aiohttp.abc.AbstractResolver | None = None) -> None:
        self.kube = kube
        self.resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = (
                aiohttp.TCPConnector(resolver=self.resolver) if self.resolver else aiohttp.TCPConnector()
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def served(self, caller: Caller) -> dict[str, Served]:
        base = f"/apis/{API_VERSION}/namespaces/{caller.namespace}"
        jobs = await self.kube.request("GET", f"{base}/{JOBS_PLURAL}", token=caller.token)
        try:
            servers = await self.kube.request("GET", f"{base}/{SERVERS_PLURAL}", token=caller.token)
        except ApiError as err:
            if err.status not in (403, 404):  # may see jobs but not pools: list what it may see
                raise
            servers = {}
        return served_models(caller.namespace, jobs.get("items") or [], servers.get("items") or [])

    async def models(self, caller: Caller) -> dict[str, Any]:
        data = [
            _model_object(s, caller)
            for s in sorted((await self.served(caller)).values(), key=lambda s: s.model)
        ]
        return {"object": "list", "data": data}

    async def model(self, caller: Caller, model: str) -> dict[str, Any]:
        """One served model (`client.models.retrieve`); 404 model_not_found as chat answers for it."""
        served = (await self.served(caller)).get(model)
        if served is None:
            raise _not_served(model, caller, param=None)
        return _model_object(served, caller)

    async def chat(self, request: web.Request, caller: Caller, body: Mapping[str, Any]) -> web.StreamResponse:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required", param="model")
        served = (await self.served(caller)).get(model)
        if served is None:
            raise _not_served(model, caller, param="model")
        try:
            async with self.session.post(
                served.url + "/chat/completions",
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as upstream:
                return await self._relay(request, upstream)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise ApiError(
                502, f"the model server of {model} is unreachable: {type(err).__name__}", code="server_error"
            ) from None

    @staticmethod
    async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        headers = {k: upstream.headers[k] for k in PASSED_HEADERS if k in upstream.headers}
        if "Content-Encoding" in upstream.headers:
            headers["Content-Encoding"] = upstream.headers["Content-Encoding"]
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
