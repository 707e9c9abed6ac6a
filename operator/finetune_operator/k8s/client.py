"""The one module that talks to the Kubernetes API (aiohttp, async).

It creates or adopts children (after checking ownership), patches them and the FineTuneJob status, posts
Events and tails pod logs for training progress. It never reads or writes Secrets: credentials reach pods by
reference only. `rbac.RULES` lists exactly the verbs used here.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import tempfile
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from finetune_vocabulary.labels import API_GROUP, MANAGER

from finetune_operator.api.finetunejob import API_VERSION, KIND
from finetune_operator.api.finetunepolicy import PLURAL as POLICY_PLURAL
from finetune_operator.k8s import ownership

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"

# kind → (API prefix, plural); the only kinds the operator touches.
KINDS: dict[str, tuple[str, str]] = {
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    KIND: (f"/apis/{API_VERSION}", "finetunejobs"),
    "ModelServer": (f"/apis/{API_VERSION}", "modelservers"),
    "FineTuneSchedule": (f"/apis/{API_VERSION}", "finetuneschedules"),
}


class ApiError(Exception):
    def __init__(
        self, status: int, body: Any, method: str, path: str, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.retry_after = retry_after  # seconds, from a 429's Retry-After header
        self.body = body if isinstance(body, dict) else {"message": str(body)}
        self.reason = str(self.body.get("reason", ""))
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.body.get('message', '')}")


# What a pass may meet that a later pass can get past: an API error, a timeout, a dropped connection.
TRANSIENT_ERRORS = (TimeoutError, ApiError, aiohttp.ClientError, OSError)


class NotOwnedError(Exception):
    """A child's name is taken by an object another owner controls (e.g. a deleted job's leftovers)."""

    def __init__(self, message: str, kind: str = "", name: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name


class Api(Protocol):
    """What the reconcile needs from the API; `KubeApi` is the real one, tests use a fake."""

    async def create_or_adopt(
        self, manifest: Mapping[str, Any], owner_uid: str, records: Mapping[str, Any] | None = None
    ) -> dict[str, Any]: ...

    async def patch(
        self, kind: str, namespace: str, name: str, patch: Any, patch_type: str = "merge"
    ) -> None: ...

    async def delete(self, kind: str, namespace: str, name: str) -> None: ...

    async def patch_status(
        self, namespace: str, name: str, patch: Mapping[str, Any], uid: str | None = None
    ) -> dict[str, Any]: ...

    async def post_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str, name: str | None = None
    ) -> None: ...

    async def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str: ...

    async def patch_policy_status(
        self, name: str, patch: Mapping[str, Any], resource_version: str | None = None
    ) -> Mapping[str, Any] | None: ...

    async def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]: ...


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def path_of(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural = KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def _write_temp(data: str | bytes, suffix: str) -> str:
    raw = data if isinstance(data, bytes) else data.encode()
    handle = tempfile.NamedTemporaryFile(delete=False, suffix=suffix)  # noqa: SIM115 - kept for ssl
    with handle:
        handle.write(raw)
    return handle.name


def _maybe_b64(data: str | bytes) -> bytes:
    """Kopf's ConnectionInfo may carry PEM text or base64 of it (as in kubeconfig *-data fields)."""
    raw = data if isinstance(data, bytes) else data.encode()
    if b"-----BEGIN" in raw:
        return raw
    return base64.b64decode(raw)


def ssl_context(info: Any) -> ssl.SSLContext | bool:
    """An SSL context from a kopf.ConnectionInfo (CA, client certificate, insecure flag)."""
    if not str(info.server).startswith("https"):
        return False
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=str(info.ca_path) if info.ca_path else None,
        cadata=_maybe_b64(info.ca_data).decode() if info.ca_data else None,
    )
    cert = info.certificate_path or (
        info.certificate_data and _write_temp(_maybe_b64(info.certificate_data), ".crt")
    )
    key = info.private_key_path or (
        info.private_key_data and _write_temp(_maybe_b64(info.private_key_data), ".key")
    )
    if cert:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key) if key else None)
    return context


class KubeApi:
    """Talks JSON to the API server with the credentials Kopf logged in with."""

    def __init__(self, info: Any, *, concurrency: int = 64) -> None:
        self.server = str(info.server).rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": f"{MANAGER}/0.1"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            basic = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        self._headers = headers
        self._ssl = ssl_context(info)
        self._session: aiohttp.ClientSession | None = None
        self._concurrency = concurrency
        self.instance = os.environ.get("HOSTNAME", "local")

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._concurrency, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                headers=self._headers, connector=connector, timeout=aiohttp.ClientTimeout(total=60)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        text: bool = False,
    ) -> Any:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(
            method, self.server + path, data=data, headers=headers, params=params
        ) as response:
            payload = await response.text()
            if response.status >= 400:
                try:
                    parsed = json.loads(payload)
                except ValueError:
                    parsed = payload
                raise ApiError(
                    response.status,
                    parsed,
                    method,
                    path,
                    retry_after=_seconds(response.headers.get("Retry-After")),
                )
            if text:
                return payload
            return json.loads(payload) if payload else {}

    # children
    async def create_or_adopt(
        self, manifest: Mapping[str, Any], owner_uid: str, records: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Create; "already exists" is success when the existing object is controlled by the same owner and,
        given the owner's `records` (a FineTuneJob's status.children), recorded there (ownership.py)."""
        meta = manifest["metadata"]
        kind, namespace, name = str(manifest["kind"]), str(meta["namespace"]), str(meta["name"])
        try:
            created: dict[str, Any] = await self.request("POST", path_of(kind, namespace), body=manifest)
            return created
        except ApiError as error:
            if error.status != 409:
                raise
        existing: dict[str, Any] = await self.request("GET", path_of(kind, namespace, name))
        owners = (existing.get("metadata") or {}).get("ownerReferences") or []
        controlled = any(o.get("uid") == owner_uid and o.get("controller") for o in owners)
        if controlled and (records is None or ownership.is_recorded(existing, kind, records)):
            log.info("adopted existing %s %s/%s", kind, namespace, name)
            return existing
        message = ownership.conflict_message(kind, existing, owner_uid)
        raise NotOwnedError(message, kind=kind, name=name)

    async def patch(
        self, kind: str, namespace: str, name: str, patch: Any, patch_type: str = "merge"
    ) -> None:
        content_type = JSON_PATCH if patch_type == "json" else MERGE_PATCH
        await self.request("PATCH", path_of(kind, namespace, name), body=patch, content_type=content_type)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self.request(
                "DELETE", path_of(kind, namespace, name), body={"propagationPolicy": "Background"}
            )
        except ApiError as error:
            if error.status != 404:
                raise

    async def patch_status(
        self, namespace: str, name: str, patch: Mapping[str, Any], uid: str | None = None
    ) -> dict[str, Any]:
        """Merge-patch the status. With `uid` in the patch kube-apiserver refuses to patch a re-created
        namesake (metadata.uid is immutable: 422); the embedded cluster does not check it."""
        body: dict[str, Any] = {"status": patch}
        if uid:
            body["metadata"] = {"uid": uid}
        result: dict[str, Any] = await self.request(
            "PATCH",
            path_of(KIND, namespace, name, "status"),
            body=body,
            content_type=MERGE_PATCH,
        )
        return result

    async def patch_policy_status(
        self, name: str, patch: Mapping[str, Any], resource_version: str | None = None
    ) -> Mapping[str, Any] | None:
        """Merge-patch a (cluster-scoped) FineTunePolicy's status: its namespaces' use and GPU-hour ledger.
        With `resource_version` it is refused (409) when the policy changed since (read-modify-write)."""
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        result: Mapping[str, Any] = await self.request(
            "PATCH",
            f"/apis/{API_VERSION}/{POLICY_PLURAL}/{name}/status",
            body=body,
            content_type=MERGE_PATCH,
        )
        return result

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        try:
            found: dict[str, Any] = await self.request("GET", path_of(kind, namespace, name))
            return found
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": selector} if selector else None
        found = await self.request("GET", path_of(kind, namespace), params=params)
        items: list[dict[str, Any]] = found.get("items") or []
        return items

    async def patch_object_status(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], uid: str
    ) -> dict[str, Any]:
        """Merge-patch another kind's status (ModelServer), with the uid as precondition."""
        result: dict[str, Any] = await self.request(
            "PATCH",
            path_of(kind, namespace, name, "status"),
            body={"metadata": {"uid": uid}, "status": patch},
            content_type=MERGE_PATCH,
        )
        return result

    async def post_event(
        self,
        involved: Mapping[str, Any],
        type_: str,
        reason: str,
        message: str,
        name: str | None = None,
        kind: str = KIND,
    ) -> None:
        """Create an Event; with `name` (events.event_name) a second post of it answers 409 AlreadyExists."""
        meta = involved.get("metadata") or {}
        namespace = str(meta.get("namespace"))
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": name or f"{str(meta.get('name'))[:200].rstrip('.-')}.{uuid.uuid4().hex[:16]}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": kind,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": MANAGER},
            "reportingComponent": f"{API_GROUP}/{MANAGER}",
            "reportingInstance": self.instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("POST", path_of("Event", namespace), body=event, text=True)  # nothing to parse

    async def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str:
        try:
            text: str = await self.request(
                "GET",
                path_of("Pod", namespace, pod, "log"),
                params={"container": container, "tailLines": str(lines)},
                text=True,
            )
            return text
        except (TimeoutError, ApiError, aiohttp.ClientError) as error:
            log.debug("no log for %s/%s: %s", namespace, pod, error)
            return ""
