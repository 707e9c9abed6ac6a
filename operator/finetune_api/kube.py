"""The one module of the service that talks to the Kubernetes API.

Two identities: the service's own (kubeconfig, or the in-cluster ServiceAccount whose token file is re-read so
rotation works) only for TokenReview, SubjectAccessReview and `get` of the model mapping ConfigMap; the
caller's bearer token for everything else (FineTuneJobs, Events, pods/log, ModelServers), so RBAC, admission
policies and budgets apply to the caller exactly as with kubectl. No impersonation. Kubernetes answers map to
OpenAI errors (`api_error`)."""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .errors import ApiError

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_S = 30.0  # kubelet rotates projected tokens well before expiry; re-reading this often is plenty
TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)
POLICY_MARKERS = ("ValidatingAdmissionPolicy", "denied by FineTunePolicy")
INVALID_KEY = "invalid or expired API key: use a Kubernetes token (kubectl create token ...)"


@dataclass(frozen=True)
class Endpoint:
    """Where the API server is and how the service authenticates to it."""

    server: str
    ssl_context: ssl.SSLContext | None
    token: str | None = None
    token_file: str | None = None


def _data_file(data: str) -> str:
    with tempfile.NamedTemporaryFile("wb", delete=False, prefix="finetune-api-", suffix=".pem") as handle:
        handle.write(base64.b64decode(data))
    return handle.name


def _tls(cluster: Mapping[str, Any], user: Mapping[str, Any]) -> ssl.SSLContext | None:
    if not str(cluster["server"]).startswith("https://"):
        return None
    context = ssl.create_default_context()
    if cluster.get("insecure-skip-tls-verify"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif cluster.get("certificate-authority-data"):
        context.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    elif cluster.get("certificate-authority"):
        context.load_verify_locations(cafile=cluster["certificate-authority"])
    cert = user.get("client-certificate") or (
        _data_file(user["client-certificate-data"]) if user.get("client-certificate-data") else None
    )
    key = user.get("client-key") or (
        _data_file(user["client-key-data"]) if user.get("client-key-data") else None
    )
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


def from_kubeconfig(path: str) -> Endpoint:
    """The current context of a kubeconfig: server, CA, token / tokenFile / client certificate."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    context_name = config.get("current-context")
    context = next(c["context"] for c in config.get("contexts") or [] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config.get("clusters") or [] if c["name"] == context["cluster"])
    user = next(
        (u.get("user") or {} for u in config.get("users") or [] if u["name"] == context.get("user")), {}
    )
    return Endpoint(
        str(cluster["server"]).rstrip("/"), _tls(cluster, user), user.get("token"), user.get("tokenFile")
    )


def in_cluster() -> Endpoint:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    context = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
    host = f"[{host}]" if ":" in host else host
    return Endpoint(f"https://{host}:{port}", context, None, str(SA_DIR / "token"))


def api_error(status: int, body: Any, *, not_found: str = "not_found") -> ApiError:
    """A Kubernetes API answer → the OpenAI-shaped error the client sees."""
    message = body.get("message") if isinstance(body, dict) else None
    message = str(
        message or (body if isinstance(body, str) and body else f"Kubernetes API answered {status}")
    )
    if status == 401:
        return ApiError(401, INVALID_KEY, code="invalid_api_key")
    if status == 403:
        if any(marker in message for marker in POLICY_MARKERS):
            return ApiError(403, message, code="policy_violation")
        return ApiError(403, message, code="permission_denied")
    if status == 404:
        return ApiError(404, message, code=not_found)
    if status == 409:
        return ApiError(409, message, code="conflict")
    if status in (400, 422):
        return ApiError(400, message, code="invalid_request")
    if status == 429:
        return ApiError(429, message, code="rate_limit_exceeded", headers={"Retry-After": "1"})
    return ApiError(502, f"the Kubernetes API failed: {message}", code="server_error")


class Kube:
    """Calls to the API server over one aiohttp session (close with `close()`)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._session: aiohttp.ClientSession | None = None
        self._own_token: tuple[float, str | None] = (0.0, endpoint.token)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.endpoint.ssl_context or False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=TIMEOUT)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def own_token(self) -> str | None:
        """The service's token; a token file is re-read now and then (projected tokens rotate)."""
        read_at, token = self._own_token
        if self.endpoint.token_file and time.monotonic() - read_at > TOKEN_REREAD_S:
            token = Path(self.endpoint.token_file).read_text().strip()
            self._own_token = (time.monotonic(), token)
        return token

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        not_found: str = "not_found",
        text: bool = False,
        own: bool = False,
    ) -> Any:
        """One API call with `token` (the caller's, or the service's own when `own`); a non-2xx answer raises
        the mapped ApiError. The service's own identity being refused is the platform's problem, not the
        caller's: 502."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body)
        try:
            async with self.session.request(
                method, self.endpoint.server + path, data=data, params=params, headers=headers
            ) as response:
                raw = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as err:
            raise ApiError(
                502, f"the Kubernetes API is unreachable: {type(err).__name__}", code="server_error"
            ) from None
        if text and status < 300:
            return raw
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        if own and status in (401, 403):
            raise ApiError(
                502, f"the API service's own identity may not {method} {path}", code="server_error"
            )
        if status >= 300:
            raise api_error(status, parsed, not_found=not_found)
        return parsed

    # -- the service's own identity: exactly these three calls ------------------------------------------
    async def token_review(self, token: str) -> dict[str, Any] | None:
        """The user a bearer token authenticates as (username, uid, groups, extra), or None."""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        answer = await self.request(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            token=self.own_token(),
            body=review,
            own=True,
        )
        status = (answer or {}).get("status") or {}
        if not status.get("authenticated"):
            return None
        user: dict[str, Any] = status.get("user") or {}
        return user

    async def access_review(self, user: Mapping[str, Any], attributes: Mapping[str, str]) -> bool:
        """SubjectAccessReview: may `user` (a TokenReview's user) do `attributes` (verb, group, resource,
        namespace)?"""
        spec: dict[str, Any] = {
            "user": user.get("username", ""),
            "groups": list(user.get("groups") or []),
            "resourceAttributes": dict(attributes),
        }
        if user.get("uid"):
            spec["uid"] = user["uid"]
        if user.get("extra"):
            spec["extra"] = user["extra"]
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        answer = await self.request(
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            token=self.own_token(),
            body=review,
            own=True,
        )
        return bool(((answer or {}).get("status") or {}).get("allowed"))

    async def config_map(self, namespace: str, name: str) -> dict[str, str]:
        """The data of a ConfigMap (the model mapping), read with the service's own identity."""
        answer = await self.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/configmaps/{name}",
            token=self.own_token(),
            not_found="model_mapping_missing",
            own=True,
        )
        return {str(k): str(v) for k, v in ((answer or {}).get("data") or {}).items()}


def load(kubeconfig: str | None) -> Kube:
    return Kube(from_kubeconfig(kubeconfig) if kubeconfig else in_cluster())
