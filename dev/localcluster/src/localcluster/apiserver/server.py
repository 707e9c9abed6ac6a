"""The API server emulator: aiohttp on loopback, kube-apiserver semantics on an in-memory store."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import copy
import datetime as dt
import inspect
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web

from . import builtin_schema, defaults, errors, openapi, protobuf
from .auth import ADMIN, TokenAuthenticator, UserInfo, parse_service_account, user_with_defaults
from .errors import ApiError
from .faults import Fault, FaultInjector, Latency, RequestCounters
from .patch import json_patch, merge_patch, strategic_merge_patch
from .policy import REASON_CODES, PolicyEvaluator, compile_problems
from .policy import Request as AdmissionRequest
from .rbac import RBAC_GROUP, Attributes, Authorizer, forbidden_message
from .resources import ResourceType, builtin_types, event_from_v1, event_to_v1
from .selectors import jsonpath, label_selector_matches, parse_field_selector, parse_label_selector
from .store import Event, Store, Watcher
from .tables import to_table
from .validation import immutable_field_problems, validate_metadata

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 3 * 1024 * 1024
# Warnings for the current request (`Warning: 299 - "..."` response headers, as kubectl prints them).
_warnings: contextvars.ContextVar[list[str]] = contextvars.ContextVar("warnings")
# Keys repeated within one JSON object of the current request's body, in the order they were closed.
_duplicates: contextvars.ContextVar[list[str]] = contextvars.ContextVar("duplicates")
# Who the current HTTP request runs as; unset for the emulator's own in-process writes (bootstrap, GC), which
# bypass admission as they bypass the HTTP handlers.
_user: contextvars.ContextVar[UserInfo | None] = contextvars.ContextVar("user", default=None)
_SA_TOKEN_SECONDS = 3607  # what the kubelet asks for (an hour and a bit), as on a real node
_SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# Kinds whose pod template Pod Security admission checks (warnings only, as kube-apiserver).
_WORKLOADS = frozenset(
    {
        ("apps", "deployments"),
        ("apps", "replicasets"),
        ("apps", "statefulsets"),
        ("apps", "daemonsets"),
        ("batch", "jobs"),
        ("batch", "cronjobs"),
    }
)
_GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_TABLE_MARK = "as=Table"

# The kubelet serves pods/log: `log_provider(namespace, pod, container, *, tail, since, follow, timestamps,
# previous, limit_bytes)` (since: seconds as float for sinceSeconds, an aware datetime for sinceTime) returns
# str, bytes or an async iterator of bytes, directly or from a coroutine. Errors: raise ApiError, or any
# exception with integer `status`, `message` and optional `reason` attributes; the client gets that Status.
LogProvider = Callable[..., Any]


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: refused with the Go decoder's words, as kube-apiserver does."""
    where = "in numeric literal" if name.startswith("-") else "looking for beginning of value"
    raise ValueError(f"invalid character {name.lstrip('-')[0]!r} {where}")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"json: cannot unmarshal number {text} into Go value of type float64")
    return value


def _object_noting_duplicates(pairs: list[tuple[str, Any]], duplicates: list[str]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            duplicates.append(key)
        obj[key] = value
    return obj


def now_iso(offset: float = 0.0) -> str:
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class RequestInfo:
    verb: str
    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None
    watch: bool = False

    @property
    def resource(self) -> str:
        return self.rtype.plural + (f"/{self.subresource}" if self.subresource else "")


class ApiServer:
    """A Kubernetes API server emulator.

    `await start()` binds the port; `url` is then the base URL for kubeconfigs. Tests drive failures with
    `add_fault`, `set_latency`, `drop_watches`, `pause`/`resume`, and read `counters`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        tls: bool = False,
        history_size: int = 10_000,
        bookmark_interval: float = 10.0,
        git_version: str = "v1.34.0",
        anonymous_admin: bool | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.tls = tls
        self.ca_pem: bytes | None = None  # the self-signed certificate clients must trust when tls=True
        self.bookmark_interval = bookmark_interval
        self.git_version = git_version
        self.store = Store(history_size)
        self.counters = RequestCounters()
        self.faults = FaultInjector()
        self.log_provider: LogProvider | None = None
        self.kubelet_nodes: set[str] = set()
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for rtype in builtin_types():
            self.types[(rtype.group, rtype.version, rtype.plural)] = rtype
        self._crd_types: dict[str, list[ResourceType]] = {}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._gc_wakeup: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._openapi_cache: dict[str, tuple[str, dict[str, Any]]] = {}
        # Server-side apply: the last configuration each field manager applied, by object uid.
        self._apply_configs: dict[str, dict[str, dict[str, Any]]] = {}
        # Requests without credentials run as the admin unless a token is required (see auth.py).
        self.anonymous_admin = token is None if anonymous_admin is None else anonymous_admin
        self.authenticator = TokenAuthenticator()
        if token is not None:
            self.authenticator.add_static(token, ADMIN)
        self.authorizer = Authorizer(lambda plural, ns: self.store.select((RBAC_GROUP, plural), ns))
        self.policies = PolicyEvaluator(
            lambda plural: self.store.select(("admissionregistration.k8s.io", plural)),
            self._find_params,
            self._param_namespaced,
        )
        self._bootstrap()

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES * 4)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        ssl_context = None
        if self.tls:
            from .tls import self_signed

            ssl_context, self.ca_pem = self_signed(self.host)
        self._site = web.TCPSite(
            self._runner, self.host, self.port, reuse_address=True, ssl_context=ssl_context
        )
        await self._site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        self._gc_wakeup = asyncio.Event()
        self._spawn(self._gc_loop())
        # Load the CEL machinery now rather than inside the first custom-resource request.
        with contextlib.suppress(ImportError):
            import localcluster.crdvalidation  # noqa: F401
        minor = int(self.git_version.lstrip("v").split(".")[1])
        builtin_schema.unknown_fields({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}, minor)

    async def stop(self) -> None:
        self.resume()
        for watcher in self.store.all_watchers():
            watcher.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def write_kubeconfig(self, path: str, namespace: str = "default") -> str:
        from .kubeconfig import write_kubeconfig

        return write_kubeconfig(path, self.url, token=self.token, namespace=namespace, ca_pem=self.ca_pem)

    # ------------------------------------------------------------------ fault injection
    def add_fault(
        self,
        verb: str,
        resource: str,
        status: int,
        rate: float = 1.0,
        count: int | None = None,
        retry_after: int = 1,
        namespace: str | None = None,
        agent: str | tuple[str, ...] | None = None,
    ) -> Fault:
        """Fail matching requests with 409, 429 (with Retry-After) or 500; `count` limits how many; `agent`
        limits them to one client (its User-Agent product, e.g. "kopf")."""
        if status not in (409, 429, 500, 503):
            raise ValueError("status must be one of 409, 429, 500, 503")
        fault = Fault(verb, resource, status, rate, count, retry_after, namespace, agent)
        self.faults.faults.append(fault)
        return fault

    def remove_fault(self, fault: Fault) -> None:
        with contextlib.suppress(ValueError):
            self.faults.faults.remove(fault)

    def clear_faults(self) -> None:
        self.faults.faults.clear()
        self.faults.latencies.clear()

    def set_latency(
        self,
        seconds: float,
        verb: str = "*",
        resource: str = "*",
        rate: float = 1.0,
        agent: str | tuple[str, ...] | None = None,
    ) -> Latency:
        """Delay matching requests (a fraction `rate` of them; only `agent`'s when given) by `seconds`."""
        latency = Latency(seconds, verb, resource, rate, agent)
        self.faults.latencies.append(latency)
        return latency

    def remove_latency(self, latency: Latency) -> None:
        with contextlib.suppress(ValueError):
            self.faults.latencies.remove(latency)

    def drop_watches(self, resource: str = "*") -> int:
        """Close open watch streams (clients see the connection end and must re-watch)."""
        dropped = 0
        for watcher in self.store.all_watchers():
            if resource in (
                "*",
                watcher.storage[1],
                ".".join(filter(None, (watcher.storage[1], watcher.storage[0]))),
            ):
                watcher.close()
                dropped += 1
        return dropped

    def pause(self) -> None:
        """Hold every request (and watch delivery) until `resume()`."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    # ------------------------------------------------------------------ kubelet hooks
    def register_kubelet(self, node_name: str) -> None:
        """A kubelet for this node finishes graceful pod deletions itself."""
        self.kubelet_nodes.add(node_name)

    def unregister_kubelet(self, node_name: str) -> None:
        self.kubelet_nodes.discard(node_name)

    def get_object(self, group: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of a stored object (in-process read for tests and the local cluster)."""
        obj = self.store.get((group, plural), namespace or "", name)
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, group: str, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return copy.deepcopy(self.store.select((group, plural), namespace))

    # ------------------------------------------------------------------ bootstrap
    def _bootstrap(self) -> None:
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self._internal_create(self.types[("", "v1", "namespaces")], None, {"metadata": {"name": ns}})
        self._internal_create(
            self.types[("", "v1", "services")],
            "default",
            {
                "metadata": {
                    "name": "kubernetes",
                    "labels": {"component": "apiserver", "provider": "kubernetes"},
                },
                "spec": {
                    "clusterIP": "10.96.0.1",
                    "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
                },
            },
        )
        from .rbac import default_cluster_role_bindings, default_cluster_roles

        for role in default_cluster_roles():
            self._internal_create(self.types[(RBAC_GROUP, "v1", "clusterroles")], None, role)
        for binding in default_cluster_role_bindings():
            self._internal_create(self.types[(RBAC_GROUP, "v1", "clusterrolebindings")], None, binding)
        # Like a real cluster whose etcd compacted long ago: bootstrap history cannot be watched from.
        self.store.history.clear()
        self.store.compacted_rv = self.store.rv

    def _internal_create(
        self, rtype: ResourceType, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        body = {"apiVersion": rtype.group_version, "kind": rtype.kind, **body}
        return self._create(rtype, namespace, body, {})

    # ------------------------------------------------------------------ authentication
    def add_user(self, token: str, name: str, groups: list[str] | None = None) -> UserInfo:
        """A static token for a user (like kube-apiserver's --token-auth-file); returns the user."""
        user = user_with_defaults(name, groups or [])
        self.authenticator.add_static(token, user)
        return user

    def _alive(self, kind: str, namespace: str, name: str, uid: str) -> bool:
        plural = {"ServiceAccount": "serviceaccounts", "Pod": "pods", "Secret": "secrets"}.get(kind)
        obj = self.store.get(("", plural), namespace, name) if plural else None
        return (
            obj is not None
            and obj["metadata"].get("uid") == uid
            and (kind != "Pod" or not obj["metadata"].get("deletionTimestamp"))
        )

    def _authenticate(self, request: web.Request) -> UserInfo:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            record = (
                self.authenticator.lookup(token.strip(), self._alive) if scheme.lower() == "bearer" else None
            )
            if record is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            user = record.user
        elif self.anonymous_admin:
            user = ADMIN
        else:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return self._impersonate(request, user)

    def _impersonate(self, request: web.Request, user: UserInfo) -> UserInfo:
        """Impersonate-User/-Group/-Uid/-Extra-*: each needs the `impersonate` verb, as in kube-apiserver."""
        headers = request.headers
        name = headers.get("Impersonate-User")
        groups = headers.getall("Impersonate-Group", [])
        uid = headers.get("Impersonate-Uid", "")
        extra = {
            key[len("Impersonate-Extra-") :].lower(): headers.getall(key)
            for key in set(headers)
            if key.lower().startswith("impersonate-extra-")
        }
        if name is None:
            if groups or uid or extra:
                raise ApiError(
                    500,
                    "InternalError",
                    "Internal error occurred: requested [...] without impersonating a user",
                )
            return user
        checks: list[tuple[str, str, str, str]] = []  # resource, name, namespace, api group
        sa = parse_service_account(name)
        if sa is not None:
            checks.append(("serviceaccounts", sa[1], sa[0], ""))
        else:
            checks.append(("users", name, "", ""))
        checks += [("groups", g, "", "") for g in groups]
        if uid:
            checks.append(("uids", uid, "", "authentication.k8s.io"))
        for key, values in extra.items():
            checks += [(f"userextras/{key}", v, "", "authentication.k8s.io") for v in values]
        for resource, target, namespace, group in checks:
            resource, _, sub = resource.partition("/")
            attrs = Attributes(user, "impersonate", namespace, group, resource, sub, target)
            if not self.authorizer.allowed(attrs):
                raise errors.forbidden(group, resource, target, forbidden_message(attrs))
        return user_with_defaults(name, groups, uid, tuple((k, tuple(v)) for k, v in sorted(extra.items())))

    def _authorize(self, user: UserInfo, request: web.Request, info: RequestInfo | None) -> None:
        if user.is_admin:
            return
        if info is None:  # non-resource request: the verb is the lower-cased HTTP method
            attrs = Attributes(user, request.method.lower(), path=request.path, resource_request=False)
            if not self.authorizer.allowed(attrs):
                raise errors.forbidden("", "", "", forbidden_message(attrs))
            return
        verb = "watch" if info.watch else info.verb
        attrs = Attributes(
            user,
            verb,
            info.namespace or "",
            info.rtype.group,
            info.rtype.plural,
            info.subresource or "",
            info.name or "",
        )
        if not self.authorizer.allowed(attrs):
            self.counters.forbidden[(user.name, verb, info.resource)] += 1
            raise errors.forbidden(
                info.rtype.group, info.rtype.plural, info.name or "", forbidden_message(attrs)
            )

    # ------------------------------------------------------------------ HTTP entry
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            if not self._resumed.is_set():
                await self._resumed.wait()
            user = self._authenticate(request)
            _user.set(user)
            self.counters.by_user[user.name] += 1
            path = request.path
            if not (path.startswith("/api/") or path.startswith("/apis/")) or path in ("/api/", "/apis/"):
                self._authorize(user, request, None)
                return await self._non_resource(request)
            info = self._request_info(request)
            if info is None:
                self._authorize(user, request, None)
                return await self._discovery(request)
            self._authorize(user, request, info)
            agent = request.headers.get("User-Agent", "").split("/", 1)[0].split(" ", 1)[0]
            self.counters.record(info.verb, info.resource, agent)
            delay = self.faults.delay(info.verb, info.resource, agent)
            if delay:
                await asyncio.sleep(delay)
            self.faults.check(
                info.verb, info.resource, info.rtype.group, info.namespace, info.name or "", agent
            )
            warnings: list[str] = []
            _warnings.set(warnings)
            _duplicates.set([])
            response = await self._serve(request, info)
            if warnings and not response.prepared:
                for text in warnings:
                    response.headers.add("Warning", "299 - " + json.dumps(text))
            return response
        except ApiError as exc:
            self.counters.errors[exc.code] += 1
            return web.Response(
                status=exc.code,
                body=_dumps(exc.status()),
                content_type="application/json",
                headers=exc.headers,
            )
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("emulator error serving %s %s", request.method, request.path_qs)
            err = errors.internal(f"{type(exc).__name__}: {exc}")
            self.counters.errors[500] += 1
            return web.Response(status=500, body=_dumps(err.status()), content_type="application/json")

    def _request_info(self, request: web.Request) -> RequestInfo | None:
        parts = [p for p in request.path.split("/") if p]
        if parts[0] == "api":
            if len(parts) < 3:
                return None
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) < 4:
                return None
            group, version, rest = parts[1], parts[2], parts[3:]
        watch = False
        if rest and rest[0] == "watch":
            watch, rest = True, rest[1:]
        namespace = None
        if (
            len(rest) >= 3
            and rest[0] == "namespaces"
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rtype = self.types.get((group, version, rest[0]))
        if rtype is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if rtype.namespaced and namespace is None and name is not None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub is not None and not self._has_subresource(rtype, sub):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        method = request.method
        query_watch = request.query.get("watch", "").lower() in ("true", "1")
        if method == "GET":
            verb = "get" if name else ("watch" if watch or query_watch else "list")
        elif method == "POST":
            verb = "create"
        elif method == "PUT":
            verb = "update"
        elif method == "PATCH":
            verb = "patch"
        elif method == "DELETE":
            verb = "delete" if name else "deletecollection"
        else:
            raise errors.method_not_allowed()
        return RequestInfo(verb, rtype, namespace, name, sub, watch or query_watch)

    @staticmethod
    def _has_subresource(rtype: ResourceType, sub: str) -> bool:
        if sub == "status":
            return rtype.status_subresource
        if sub == "scale":
            return rtype.scale is not None
        if sub == "finalize":
            return rtype.plural == "namespaces"
        return sub in rtype.subresources

    async def _serve(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        rtype, ns, name, sub = info.rtype, info.namespace, info.name, info.subresource
        query = request.query
        if info.verb == "watch":
            return await self._watch(request, rtype, ns)
        if info.watch and info.verb == "get" and name is not None and sub is None:
            return await self._watch(request, rtype, ns, only_name=name)  # legacy /watch/.../<name>
        if info.verb == "list":
            return self._respond(request, rtype, self._list(request, rtype, ns), is_list=True)
        if name is None and info.verb not in ("create", "deletecollection"):
            raise errors.method_not_allowed()
        if sub == "log":
            return await self._pod_log(request, ns or "", name or "")
        if sub == "scale":
            return await self._scale(request, info)
        if info.verb == "get":
            obj = self._get(rtype, ns, name or "")
            return self._respond(request, rtype, obj)
        if info.verb == "create" and rtype.verbs == ("create",):
            body = await self._read_object(request)
            self._check_kind(rtype, body)
            return self._json(self._review(rtype, ns, body), 201)
        if info.verb == "create":
            body = await self._read_object(request)
            self._check_duplicate_fields(rtype, query)
            if sub == "token":
                return self._json(self._token_request(ns or "", name or "", body), 201)
            if sub == "eviction":
                return self._json(self._evict(rtype, ns or "", name or "", body), 201)
            if sub == "binding":
                return self._json(self._bind(rtype, ns or "", name or "", body), 201)
            if name is not None:
                raise errors.method_not_allowed()
            if rtype.namespaced and ns is None:
                ns = (body.get("metadata") or {}).get("namespace")
                if not ns:
                    raise errors.bad_request("the namespace of the object must be set")
            obj = self._create(rtype, ns, self._to_storage(rtype, body), query, check_kind=True)
            return self._respond(request, rtype, obj, status=201)
        if info.verb == "update":
            body = await self._read_object(request)
            self._check_duplicate_fields(rtype, query)
            obj = self._update(rtype, ns, name or "", self._to_storage(rtype, body), query, sub)
            return self._respond(request, rtype, obj)
        if info.verb == "patch":
            raw = await self._read_body(request)
            obj, created = self._patch(request, rtype, ns, name or "", raw, sub)
            return self._respond(request, rtype, obj, status=201 if created else 200)
        if info.verb == "delete":
            options = await self._delete_options(request)
            obj, done = self._delete(rtype, ns, name or "", options, dry_run=self._dry_run(query))
            return self._respond(request, rtype, obj, status=200 if done else 202)
        if info.verb == "deletecollection":
            options = await self._delete_options(request)
            items = self._filter(rtype, self.store.select(rtype.storage_key, ns), query)
            for item in items:
                meta = item["metadata"]
                self._delete(
                    rtype, meta.get("namespace"), meta["name"], options, dry_run=self._dry_run(query)
                )
            return self._json(self._list_body(rtype, items, {}))
        raise errors.method_not_allowed()

    # ------------------------------------------------------------------ bodies and responses
    async def _read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise errors.too_large()
        data = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise errors.too_large()
        return bytes(data)

    @staticmethod
    def _decode(raw: bytes, content_type: str) -> Any:
        if not raw.strip():
            raise errors.bad_request("the body of the request is empty; an object was expected")
        duplicates: list[str] = []
        _duplicates.set(duplicates)
        try:
            return json.loads(
                raw,
                parse_constant=_refuse_constant,
                parse_float=_finite_float,
                object_pairs_hook=lambda pairs: _object_noting_duplicates(pairs, duplicates),
            )
        except RecursionError as exc:
            raise errors.bad_request("the request body is nested too deeply") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            if "yaml" not in content_type:
                raise errors.bad_request(f"couldn't get version/kind; json parse error: {exc}") from exc
        try:
            return yaml.safe_load(raw)
        except RecursionError as exc:
            raise errors.bad_request("the request body is nested too deeply") from exc
        except yaml.YAMLError as exc:
            raise errors.bad_request(f"error converting YAML to JSON: {exc}") from exc

    async def _read_object(self, request: web.Request) -> dict[str, Any]:
        raw = await self._read_body(request)
        if request.content_type == protobuf.CONTENT_TYPE:
            return protobuf.decode_object(raw)
        body = self._decode(raw, request.content_type)
        if not isinstance(body, dict):
            raise errors.bad_request(
                "couldn't get version/kind; json parse error: the body must be a JSON object"
            )
        return body

    async def _delete_options(self, request: web.Request) -> dict[str, Any]:
        options: dict[str, Any] = {}
        raw = await self._read_body(request)
        if raw.strip():
            if request.content_type == protobuf.CONTENT_TYPE:
                body = protobuf.decode_object(raw)
            else:
                body = self._decode(raw, request.content_type)
            if isinstance(body, dict):
                options.update(body)
        query = request.query
        if "propagationPolicy" in query:
            options["propagationPolicy"] = query["propagationPolicy"]
        if "gracePeriodSeconds" in query:
            try:
                options["gracePeriodSeconds"] = int(query["gracePeriodSeconds"])
            except ValueError as exc:
                raise errors.bad_request("gracePeriodSeconds must be an integer") from exc
        if "orphanDependents" in query:
            options["orphanDependents"] = query["orphanDependents"] == "true"
        if options.get("dryRun") and "dryRun" not in query:
            options["_dry"] = True
        return options

    @staticmethod
    def _dry_run(query: Any) -> bool:
        return bool(query.get("dryRun"))

    @staticmethod
    def _json(body: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=_dumps(body), content_type="application/json")

    def _respond(
        self,
        request: web.Request,
        rtype: ResourceType,
        body: dict[str, Any],
        status: int = 200,
        is_list: bool = False,
    ) -> web.Response:
        if _TABLE_MARK in request.headers.get("Accept", ""):
            include = request.query.get("includeObject", "PartialObjectMetadata")
            if is_list:
                meta = {k: v for k, v in body["metadata"].items() if k in ("continue", "remainingItemCount")}
                table = to_table(rtype, body["items"], body["metadata"]["resourceVersion"], include, meta)
            else:
                table = to_table(rtype, [body], body["metadata"].get("resourceVersion", ""), include)
            return self._json(table, status)
        return self._json(body, status)

    def _present(self, rtype: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """The stored object as this group/version serves it."""
        if rtype.storage_group is not None and rtype.group == "events.k8s.io":
            return event_to_v1(obj)
        if obj.get("apiVersion") != rtype.group_version:
            obj = dict(obj)
            obj["apiVersion"] = rtype.group_version
        return obj

    def _to_storage(self, rtype: ResourceType, body: dict[str, Any]) -> dict[str, Any]:
        if rtype.group == "events.k8s.io":
            self._check_kind(rtype, body)
            return event_from_v1(body)
        return body

    def _check_kind(self, rtype: ResourceType, body: dict[str, Any]) -> None:
        kind, api_version = body.get("kind"), body.get("apiVersion")
        if kind is not None and kind != rtype.kind:
            raise errors.bad_request(
                f"the kind in the request body ({kind}) does not match the resource kind "
                f"({rtype.kind}) of the URL"
            )
        if api_version is not None and api_version != rtype.group_version:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API version "
                f"({rtype.group_version})"
            )

    # ------------------------------------------------------------------ reads
    def _get(self, rtype: ResourceType, ns: str | None, name: str) -> dict[str, Any]:
        obj = self.store.get(rtype.storage_key, ns or "", name)
        if obj is None:
            raise errors.not_found(rtype.group, rtype.plural, name)
        return self._present(rtype, obj)

    def _filter(self, rtype: ResourceType, items: list[dict[str, Any]], query: Any) -> list[dict[str, Any]]:
        label_pred = parse_label_selector(query.get("labelSelector"))
        field_pred = parse_field_selector(query.get("fieldSelector"), rtype.supports_field)
        if rtype.group == "events.k8s.io":
            items = [event_to_v1(i) for i in items]
        if label_pred:
            items = [i for i in items if label_pred(i)]
        if field_pred:
            items = [i for i in items if field_pred(i)]
        return items

    def _list(self, request: web.Request, rtype: ResourceType, ns: str | None) -> dict[str, Any]:
        query = request.query
        items = self._filter(rtype, self.store.select(rtype.storage_key, ns), query)
        list_meta: dict[str, Any] = {}
        token = query.get("continue")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode()))
                start = tuple(state["start"])
                token_rv = int(state["rv"])
            except (ValueError, KeyError, TypeError) as exc:
                raise errors.bad_request(f"continue key is not valid: {exc}") from exc
            if token_rv < self.store.compacted_rv:
                raise errors.gone(
                    "The provided continue parameter is too old to display a consistent list result. You can "
                    "start a new list without the continue parameter."
                )
            items = [i for i in items if self._key(i) > start]
        limit = int(query.get("limit", "0") or 0)
        if limit > 0 and len(items) > limit:
            remaining = len(items) - limit
            items = items[:limit]
            next_token = {"rv": self.store.rv, "start": list(self._key(items[-1]))}
            list_meta["continue"] = base64.urlsafe_b64encode(_dumps(next_token)).decode()
            list_meta["remainingItemCount"] = remaining
        return self._list_body(rtype, [self._present(rtype, i) for i in items], list_meta)

    def _list_body(
        self, rtype: ResourceType, items: list[dict[str, Any]], meta: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.group_version,
            "metadata": {"resourceVersion": str(self.store.rv), **meta},
            "items": items,
        }

    @staticmethod
    def _key(obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj["metadata"]
        return (meta.get("namespace", ""), meta["name"])

    # ------------------------------------------------------------------ create
    def _generate_name(self, rtype: ResourceType, ns: str | None, prefix: str) -> str:
        for _ in range(100):
            name = prefix + "".join(random.choice(_GENERATE_CHARS) for _ in range(5))
            if self.store.get(rtype.storage_key, ns or "", name) is None:
                return name
        raise errors.ApiError(500, "AlreadyExists", "could not generate a unique name")

    def _create(
        self,
        rtype: ResourceType,
        ns: str | None,
        body: dict[str, Any],
        query: Any,
        check_kind: bool = False,
    ) -> dict[str, Any]:
        if check_kind and rtype.group != "events.k8s.io":
            self._check_kind(rtype, body)
        obj = body  # callers hand over a fresh object (parsed from the request or built for this call)
        obj.setdefault("apiVersion", "v1" if rtype.storage_group == "" else rtype.group_version)
        obj.setdefault("kind", rtype.kind)
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        if meta.get("resourceVersion"):
            raise errors.internal("resourceVersion should not be set on objects to be created")
        if rtype.namespaced:
            if meta.get("namespace") and meta["namespace"] != ns:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = self._generate_name(rtype, ns, str(meta["generateName"]))
        name = str(meta.get("name") or "")
        problems = validate_metadata(rtype.plural, obj, rtype.namespaced)
        if problems:
            raise errors.invalid(rtype.kind, rtype.group, name, problems)
        if rtype.namespaced:
            namespace = self.store.get(("", "namespaces"), "", ns or "")
            if namespace is None:
                raise errors.not_found("", "namespaces", ns or "")
            if namespace["metadata"].get("deletionTimestamp"):
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{rtype.qualified} "{name}" is forbidden: '
                    f"unable to create new content in namespace {ns} because it is being terminated",
                    {
                        "name": name,
                        "group": rtype.group,
                        "kind": rtype.plural,
                        "causes": [
                            {
                                "reason": "NamespaceTerminating",
                                "message": f"namespace {ns} is being terminated",
                                "field": "metadata.namespace",
                            }
                        ],
                    },
                )
        if self.store.get(rtype.storage_key, ns or "", name) is not None:
            raise errors.already_exists(rtype.group, rtype.plural, name)
        _clean_metadata(meta)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_iso()
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"):
            meta.pop(key, None)
        if rtype.generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if rtype.crd is None:
            self._check_builtin_fields(rtype, obj, query)
            defaults.prepare_create(rtype.group, rtype.plural, obj)
            if rtype.plural == "pods" and rtype.group == "" and _user.get() is not None:
                self._mount_service_account_token(obj)
        elif rtype.status_subresource:
            obj.pop("status", None)
        defaults.normalize(rtype.group, rtype.plural, obj)
        if rtype.crd is not None:
            obj = self._admit_custom(rtype, obj, None, query)
        if rtype.plural == "customresourcedefinitions":
            self._prepare_crd(obj, None)
        if rtype.plural == "validatingadmissionpolicies":
            self._check_policy(obj)
        self._admit(rtype, "CREATE", obj, None, None, query)
        if self._dry_run(query):
            meta["resourceVersion"] = str(self.store.rv)
            return self._present(rtype, obj)
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.store.next_rv())
        self.store.commit(rtype.storage_key, "ADDED", obj, None)
        self._after_write(rtype, "ADDED", obj)
        return self._present(rtype, obj)

    # ------------------------------------------------------------------ update
    def _update(
        self,
        rtype: ResourceType,
        ns: str | None,
        name: str,
        body: dict[str, Any],
        query: Any,
        subresource: str | None,
        old: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if rtype.group != "events.k8s.io":
            self._check_kind(rtype, body)
        if old is None:
            old = self.store.get(rtype.storage_key, ns or "", name)
        if old is None:
            raise errors.not_found(rtype.group, rtype.plural, name)
        meta = body.get("metadata")
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata is required")
        if meta.get("name") and meta["name"] != name:
            raise errors.bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
            )
        if rtype.namespaced and meta.get("namespace") and meta["namespace"] != ns:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv:
            if str(wanted_rv) != old["metadata"]["resourceVersion"]:
                raise errors.stale_conflict(rtype.group, rtype.plural, name)
        elif rtype.crd is not None or rtype.plural == "customresourcedefinitions":
            raise errors.invalid(
                rtype.kind,
                rtype.group,
                name,
                [
                    errors.cause(
                        "metadata.resourceVersion",
                        "FieldValueInvalid",
                        "Invalid value: 0x0: must be specified for an update",
                    )
                ],
            )
        new = self._prepare_update(rtype, old, body, subresource, query)
        return self._commit_update(rtype, old, new, query)

    def _prepare_update(
        self,
        rtype: ResourceType,
        old: dict[str, Any],
        body: dict[str, Any],
        subresource: str | None,
        query: Any,
    ) -> dict[str, Any]:
        if subresource == "finalize":  # namespaces/finalize changes spec.finalizers only
            new = copy.deepcopy(old)
            new.setdefault("spec", {})["finalizers"] = list((body.get("spec") or {}).get("finalizers") or [])
        elif subresource == "status":
            new = copy.deepcopy(old)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(body)
            new.setdefault("apiVersion", old.get("apiVersion"))
            new.setdefault("kind", old.get("kind"))
            if rtype.status_subresource:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            meta = new["metadata"] = dict(new.get("metadata") or {})
            old_meta = old["metadata"]
            for key in (
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
                "name",
            ):
                if key in old_meta:
                    meta[key] = old_meta[key]
                else:
                    meta.pop(key, None)
            meta.pop("managedFields", None)
            _clean_metadata(meta)
            if old_meta.get("deletionTimestamp"):
                # Finalizers may only be removed from an object that is being deleted.
                meta["finalizers"] = [
                    f for f in meta.get("finalizers") or [] if f in (old_meta.get("finalizers") or [])
                ]
                if not meta["finalizers"]:
                    meta.pop("finalizers")
            problems = validate_metadata(rtype.plural, new, rtype.namespaced)
            if problems:
                raise errors.invalid(rtype.kind, rtype.group, meta.get("name", ""), problems)
            if rtype.crd is None:
                self._check_builtin_fields(rtype, new, query)
                defaults.prepare_update(rtype.group, rtype.plural, new, old)
                problems = immutable_field_problems(rtype.group, rtype.plural, old, new)
                if problems:
                    raise errors.invalid(rtype.kind, rtype.group, meta.get("name", ""), problems)
            defaults.normalize(rtype.group, rtype.plural, new)
            if rtype.plural == "namespaces":
                new["status"] = copy.deepcopy(old.get("status", {}))
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if rtype.crd is not None:
            new = self._admit_custom(rtype, new, old, query)
        if rtype.plural == "customresourcedefinitions" and subresource != "status":
            self._prepare_crd(new, old)
        if rtype.plural == "validatingadmissionpolicies" and subresource != "status":
            self._check_policy(new)
        self._admit(rtype, "UPDATE", new, old, subresource, query)
        if rtype.generation and self._spec_changed(rtype, old, new):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        return new

    @staticmethod
    def _spec_changed(rtype: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> bool:
        skip = {"metadata", "status"} if rtype.status_subresource else {"metadata"}
        keys = (set(old) | set(new)) - skip
        return any(old.get(k) != new.get(k) for k in keys if k not in ("apiVersion", "kind"))

    def _commit_update(
        self, rtype: ResourceType, old: dict[str, Any], new: dict[str, Any], query: Any
    ) -> dict[str, Any]:
        dry = self._dry_run(query)
        meta = new["metadata"]
        if (
            meta.get("deletionTimestamp")
            and not meta.get("finalizers")
            and not meta.get("deletionGracePeriodSeconds")
            and not (rtype.plural == "namespaces" and (new.get("spec") or {}).get("finalizers"))
        ):
            if not dry:
                meta["resourceVersion"] = str(self.store.next_rv())
                self.store.commit(rtype.storage_key, "DELETED", new, old)
                self._after_write(rtype, "DELETED", new)
            return self._present(rtype, new)
        if new == old:
            return self._present(rtype, old)
        if dry:
            return self._present(rtype, new)
        meta["resourceVersion"] = str(self.store.next_rv())
        self.store.commit(rtype.storage_key, "MODIFIED", new, old)
        self._after_write(rtype, "MODIFIED", new)
        return self._present(rtype, new)

    # ------------------------------------------------------------------ patch
    def _patch(
        self,
        request: web.Request,
        rtype: ResourceType,
        ns: str | None,
        name: str,
        raw: bytes,
        subresource: str | None,
    ) -> tuple[dict[str, Any], bool]:
        content_type = request.content_type
        query = request.query
        old = self.store.get(rtype.storage_key, ns or "", name)
        if content_type == "application/apply-patch+yaml":
            return self._apply(rtype, ns, name, raw, query, subresource, old)
        if old is None:
            raise errors.not_found(rtype.group, rtype.plural, name)
        patch = self._decode(raw, "json")
        current = self._present(rtype, old)
        if content_type == "application/json-patch+json":
            new = json_patch(copy.deepcopy(current), patch)
        elif content_type == "application/merge-patch+json":
            if not isinstance(patch, dict):
                raise errors.bad_request("merge patch must be a JSON object")
            new = merge_patch(current, patch)
        elif content_type == "application/strategic-merge-patch+json":
            if not rtype.strategic:
                raise errors.unsupported_media(content_type)
            new = strategic_merge_patch(current, patch, rtype.kind, self._patch_meta(rtype))
        else:
            raise errors.unsupported_media(content_type)
        if not isinstance(new, dict):
            raise errors.bad_request("the patch did not produce an object")
        new = self._to_storage(rtype, new) if rtype.group == "events.k8s.io" else new
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv and str(wanted_rv) != old["metadata"]["resourceVersion"]:
            raise errors.stale_conflict(rtype.group, rtype.plural, name)
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if meta.get("name") != name:
            raise errors.bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        new = self._prepare_update(rtype, old, new, subresource, query)
        return self._commit_update(rtype, old, new, query), False

    def _apply(
        self,
        rtype: ResourceType,
        ns: str | None,
        name: str,
        raw: bytes,
        query: Any,
        subresource: str | None,
        old: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], bool]:
        """Server-side apply, simplified: create, or merge the applied config and drop the fields this field
        manager applied last time but no longer does (no managedFields, no conflicts between managers)."""
        manager = query.get("fieldManager")
        if not manager:
            raise errors.bad_request("PATCH, fieldManager must be set for apply")
        config = self._decode(raw, "yaml")
        if not isinstance(config, dict):
            raise errors.bad_request("apply patch must be an object")
        self._check_kind(rtype, config)
        meta = config.get("metadata") or {}
        if meta.get("name") not in (None, name):
            raise errors.bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        if old is None:
            if subresource:
                raise errors.not_found(rtype.group, rtype.plural, name)
            body = copy.deepcopy(config)
            body.setdefault("metadata", {})["name"] = name
            created = self._create(rtype, ns, self._to_storage(rtype, body), query)
            if not self._dry_run(query):
                self._apply_configs.setdefault(created["metadata"]["uid"], {})[manager] = config
            return created, True
        previous = self._apply_configs.get(old["metadata"]["uid"], {}).get(manager, {})
        removals = _removed_fields(previous, config)
        current = self._present(rtype, old)
        if rtype.strategic:
            new = strategic_merge_patch(
                merge_patch(current, removals), config, rtype.kind, self._patch_meta(rtype)
            )
        else:
            new = merge_patch(merge_patch(current, removals), config)
        wanted_rv = (new.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and str(wanted_rv) != old["metadata"]["resourceVersion"]:
            raise errors.stale_conflict(rtype.group, rtype.plural, name)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        new = self._prepare_update(rtype, old, self._to_storage(rtype, new), subresource, query)
        result = self._commit_update(rtype, old, new, query)
        if not self._dry_run(query):
            self._apply_configs.setdefault(old["metadata"]["uid"], {})[manager] = config
        return result, False

    # ------------------------------------------------------------------ delete and garbage collection
    def _delete(
        self,
        rtype: ResourceType,
        ns: str | None,
        name: str,
        options: dict[str, Any],
        dry_run: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Returns (object, deleted now)."""
        dry_run = dry_run or bool(options.get("_dry"))
        obj = self.store.get(rtype.storage_key, ns or "", name)
        if obj is None:
            raise errors.not_found(rtype.group, rtype.plural, name)
        meta = obj["metadata"]
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise errors.conflict(
                rtype.group,
                rtype.plural,
                name,
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta['uid']}",
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise errors.conflict(
                rtype.group,
                rtype.plural,
                name,
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {meta['resourceVersion']}",
            )
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        if policy is None:
            policy = "Orphan" if (rtype.group, rtype.plural) == ("batch", "jobs") else "Background"
        if policy not in ("Orphan", "Foreground", "Background"):
            raise errors.invalid(
                "DeleteOptions",
                "meta.k8s.io",
                "",
                [
                    errors.cause(
                        "propagationPolicy",
                        "FieldValueNotSupported",
                        f'Unsupported value: "{policy}": '
                        'supported values: "Foreground", "Background", "Orphan"',
                    )
                ],
            )
        grace = 0
        if (rtype.group, rtype.plural) == ("", "pods"):
            requested = options.get("gracePeriodSeconds")
            grace = int(
                requested
                if requested is not None
                else (obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            )
            phase = (obj.get("status") or {}).get("phase")
            if not (obj.get("spec") or {}).get("nodeName") or phase in ("Succeeded", "Failed"):
                grace = 0
        new = copy.deepcopy(obj)
        new_meta = new["metadata"]
        finalizers = list(new_meta.get("finalizers") or [])
        if policy == "Orphan" and "orphan" not in finalizers:
            finalizers.append("orphan")
        if (
            policy == "Foreground"
            and "foregroundDeletion" not in finalizers
            and self._dependents(meta["uid"])
        ):
            finalizers.append("foregroundDeletion")
        pending_ns = rtype.plural == "namespaces" and bool((obj.get("spec") or {}).get("finalizers"))
        if (
            rtype.plural == "customresourcedefinitions"
            and not meta.get("deletionTimestamp")
            and self.store.select((obj["spec"]["group"], obj["spec"]["names"]["plural"]))
        ):
            finalizers.append("customresourcecleanup.apiextensions.k8s.io")
        if meta.get("deletionTimestamp"):
            # Already being deleted: a shorter grace period may speed it up; otherwise nothing changes.
            current_grace = int(meta.get("deletionGracePeriodSeconds") or 0)
            if grace < current_grace or (grace == 0 and current_grace):
                new_meta["deletionGracePeriodSeconds"] = grace
                new_meta["deletionTimestamp"] = now_iso(grace)
            new_meta["finalizers"] = finalizers
            if not finalizers:
                new_meta.pop("finalizers")
            if new == obj:
                return self._present(rtype, obj), False
            if dry_run:
                return self._present(rtype, new), False
            result = self._commit_update(rtype, obj, new, {})
            return result, self.store.get(rtype.storage_key, ns or "", name) is None
        if finalizers or grace > 0 or pending_ns:
            if dry_run:
                return self._present(rtype, obj), False
            new_meta["finalizers"] = finalizers
            if not finalizers:
                new_meta.pop("finalizers")
            new_meta["deletionTimestamp"] = now_iso(grace)
            new_meta["deletionGracePeriodSeconds"] = grace
            if rtype.plural == "namespaces":
                new.setdefault("status", {})["phase"] = "Terminating"
            new_meta["resourceVersion"] = str(self.store.next_rv())
            self.store.commit(rtype.storage_key, "MODIFIED", new, obj)
            self._after_write(rtype, "MODIFIED", new)
            if grace > 0 and (new.get("spec") or {}).get("nodeName") not in self.kubelet_nodes:
                self._spawn(self._finish_graceful_delete(rtype, ns or "", name, meta["uid"], grace))
            return self._present(rtype, new), False
        if dry_run:
            return self._present(rtype, obj), True
        new_meta["resourceVersion"] = str(self.store.next_rv())
        self.store.commit(rtype.storage_key, "DELETED", new, obj)
        self._after_write(rtype, "DELETED", new)
        return self._present(rtype, new), True

    async def _finish_graceful_delete(
        self, rtype: ResourceType, ns: str, name: str, uid: str, grace: int
    ) -> None:
        """No kubelet owns this pod's node: finish its deletion once the grace period is over."""
        await asyncio.sleep(grace)
        obj = self.store.get(rtype.storage_key, ns, name)
        if obj is not None and obj["metadata"]["uid"] == uid and obj["metadata"].get("deletionTimestamp"):
            with contextlib.suppress(ApiError):
                self._delete(rtype, ns, name, {"gracePeriodSeconds": 0})

    def _dependents(self, owner_uid: str) -> list[tuple[ResourceType, dict[str, Any]]]:
        found = []
        for storage, objects in self.store.objects.items():
            rtype = self._type_for_storage(storage)
            if rtype is None:
                continue
            for obj in objects.values():
                for ref in obj["metadata"].get("ownerReferences") or ():
                    if ref.get("uid") == owner_uid:
                        found.append((rtype, obj))
                        break
        return found

    def _type_for_storage(self, storage: tuple[str, str]) -> ResourceType | None:
        for rtype in self.types.values():
            if rtype.storage_key == storage and rtype.storage_group is None:
                return rtype
        return None

    def _after_write(self, rtype: ResourceType, event_type: str, obj: dict[str, Any]) -> None:
        if event_type == "DELETED":
            self._apply_configs.pop(obj["metadata"].get("uid", ""), None)
        if rtype.group == RBAC_GROUP:
            self.authorizer.invalidate()
            if rtype.plural == "clusterroles":
                self._aggregate_cluster_roles()
        if rtype.plural == "namespaces" and rtype.group == "" and event_type == "ADDED":
            name = obj["metadata"]["name"]
            if self.store.get(("", "serviceaccounts"), name, "default") is None:
                # kube-controller-manager's serviceaccounts controller: every namespace gets "default".
                self._internal_create(
                    self.types[("", "v1", "serviceaccounts")], name, {"metadata": {"name": "default"}}
                )
        if rtype.plural == "customresourcedefinitions" and rtype.group == "apiextensions.k8s.io":
            if event_type == "DELETED":
                self._unregister_crd(obj["metadata"]["name"])
            else:
                self._register_crd(obj)
        meta = obj["metadata"]
        if self._gc_wakeup is not None and (
            event_type == "DELETED"
            or meta.get("deletionTimestamp")
            or any(not self._owner_alive(ref) for ref in meta.get("ownerReferences") or ())
        ):
            self._gc_wakeup.set()

    async def _gc_loop(self) -> None:
        assert self._gc_wakeup is not None
        while True:
            await self._gc_wakeup.wait()
            self._gc_wakeup.clear()
            await asyncio.sleep(0.01)  # let a burst of writes land before one sweep
            for _ in range(50):
                try:
                    if not self._gc_pass():
                        break
                except Exception:
                    log.exception("garbage collector pass failed")
                    break
                await asyncio.sleep(0)

    def _gc_pass(self) -> bool:
        """One sweep of the garbage collector, namespace controller and CRD finalizer. True if it changed
        anything."""
        changed = False
        for storage in list(self.store.objects):
            rtype = self._type_for_storage(storage)
            if rtype is None:
                continue
            for obj in list(self.store.objects[storage].values()):
                meta = obj["metadata"]
                if meta.get("deletionTimestamp"):
                    changed |= self._finalize(rtype, obj)
                refs = meta.get("ownerReferences")
                if refs and self.store.get(storage, meta.get("namespace", ""), meta["name"]) is obj:
                    changed |= self._collect_orphan(rtype, obj, refs)
        return changed

    def _owner_alive(self, ref: dict[str, Any]) -> bool:
        owner = self.store.by_owner_uid(str(ref.get("uid", "")))
        return owner is not None

    def _collect_orphan(self, rtype: ResourceType, obj: dict[str, Any], refs: list[dict[str, Any]]) -> bool:
        alive = [r for r in refs if self._owner_alive(r)]
        meta = obj["metadata"]
        if alive:
            if len(alive) == len(refs):
                return False
            new = copy.deepcopy(obj)
            new["metadata"]["ownerReferences"] = alive
            self._commit_update(rtype, obj, new, {})
            return True
        if meta.get("deletionTimestamp"):
            return False
        # Dependents of an owner deleted in the foreground are deleted in the foreground too.
        with contextlib.suppress(ApiError):
            self._delete(rtype, meta.get("namespace"), meta["name"], {"propagationPolicy": "Background"})
        return True

    def _remove_finalizer(self, rtype: ResourceType, obj: dict[str, Any], finalizer: str) -> None:
        new = copy.deepcopy(obj)
        new["metadata"]["finalizers"] = [f for f in obj["metadata"].get("finalizers") or [] if f != finalizer]
        if not new["metadata"]["finalizers"]:
            new["metadata"].pop("finalizers")
        self._commit_update(rtype, obj, new, {})

    def _finalize(self, rtype: ResourceType, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        finalizers = meta.get("finalizers") or []
        uid = meta["uid"]
        if "orphan" in finalizers:
            for dep_type, dep in self._dependents(uid):
                new = copy.deepcopy(dep)
                new["metadata"]["ownerReferences"] = [
                    r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != uid
                ]
                if not new["metadata"]["ownerReferences"]:
                    new["metadata"].pop("ownerReferences")
                self._commit_update(dep_type, dep, new, {})
            self._remove_finalizer(rtype, obj, "orphan")
            return True
        if "foregroundDeletion" in finalizers:
            blocking = False
            progressed = False
            for dep_type, dep in self._dependents(uid):
                dep_meta = dep["metadata"]
                ref = next(r for r in dep_meta["ownerReferences"] if r.get("uid") == uid)
                if ref.get("blockOwnerDeletion"):
                    blocking = True
                if not dep_meta.get("deletionTimestamp"):
                    with contextlib.suppress(ApiError):
                        self._delete(
                            dep_type,
                            dep_meta.get("namespace"),
                            dep_meta["name"],
                            {"propagationPolicy": "Foreground"},
                        )
                        progressed = True
            if not blocking:
                self._remove_finalizer(rtype, obj, "foregroundDeletion")
                return True
            return progressed
        if rtype.plural == "namespaces" and rtype.group == "":
            return self._finalize_namespace(rtype, obj)
        if (
            rtype.plural == "customresourcedefinitions"
            and "customresourcecleanup.apiextensions.k8s.io" in finalizers
        ):
            storage = (obj["spec"]["group"], obj["spec"]["names"]["plural"])
            remaining = self.store.select(storage)
            cr_type = self._type_for_storage(storage)
            progressed = False
            for item in remaining:
                if cr_type is not None and not item["metadata"].get("deletionTimestamp"):
                    with contextlib.suppress(ApiError):
                        self._delete(cr_type, item["metadata"].get("namespace"), item["metadata"]["name"], {})
                        progressed = True
            if not self.store.select(storage):
                self._remove_finalizer(rtype, obj, "customresourcecleanup.apiextensions.k8s.io")
                return True
            return progressed
        return False

    def _finalize_namespace(self, rtype: ResourceType, ns_obj: dict[str, Any]) -> bool:
        name = ns_obj["metadata"]["name"]
        spec_finalizers = (ns_obj.get("spec") or {}).get("finalizers") or []
        if "kubernetes" not in spec_finalizers:
            return False
        remaining = 0
        progressed = False
        for storage in list(self.store.objects):
            item_type = self._type_for_storage(storage)
            if item_type is None or not item_type.namespaced:
                continue
            for item in list(self.store.objects[storage].values()):
                if item["metadata"].get("namespace") != name:
                    continue
                remaining += 1
                if not item["metadata"].get("deletionTimestamp"):
                    with contextlib.suppress(ApiError):
                        self._delete(
                            item_type, name, item["metadata"]["name"], {"propagationPolicy": "Background"}
                        )
                        progressed = True
        if remaining:
            return progressed
        new = copy.deepcopy(ns_obj)
        new["spec"]["finalizers"] = [f for f in spec_finalizers if f != "kubernetes"]
        self._commit_update(rtype, ns_obj, new, {})
        return True

    # ------------------------------------------------------------------ subresources
    def _evict(self, rtype: ResourceType, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("kind") not in (None, "Eviction"):
            raise errors.bad_request(f"the kind in the request body ({body.get('kind')}) must be Eviction")
        pod = self.store.get(rtype.storage_key, ns, name)
        if pod is None:
            raise errors.not_found("", "pods", name)
        options = dict(body.get("deleteOptions") or {})
        if not pod["metadata"].get("deletionTimestamp"):
            self._check_disruption_budget(pod)
            new = copy.deepcopy(pod)
            conditions = [
                c
                for c in (new.setdefault("status", {}).get("conditions") or [])
                if c.get("type") != "DisruptionTarget"
            ]
            conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "EvictionByEvictionAPI",
                    "message": "Eviction API: evicting",
                    "lastTransitionTime": now_iso(),
                }
            )
            new["status"]["conditions"] = conditions
            self._commit_update(rtype, pod, new, {})
        self._delete(rtype, ns, name, options)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def _check_disruption_budget(self, pod: dict[str, Any]) -> None:
        """Refuse an eviction that would take the pods of a PodDisruptionBudget below what it asks for
        (computed from the pods' Ready conditions at the time of the request)."""
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or not _pod_ready(pod):
            return  # terminal or unhealthy pods may always be evicted
        ns = pod["metadata"]["namespace"]
        labels = pod["metadata"].get("labels") or {}
        budgets = [
            pdb
            for pdb in self.store.select(("policy", "poddisruptionbudgets"), ns)
            if (pdb.get("spec") or {}).get("selector") is not None
            and label_selector_matches(pdb["spec"]["selector"], labels)
        ]
        if not budgets:
            return
        if len(budgets) > 1:
            raise errors.internal(
                "This pod has more than one PodDisruptionBudget, "
                "which the eviction subresource does not support."
            )
        pdb = budgets[0]
        covered = [
            p
            for p in self.store.select(("", "pods"), ns)
            if not p["metadata"].get("deletionTimestamp")
            and label_selector_matches(pdb["spec"]["selector"], p["metadata"].get("labels") or {})
        ]
        healthy = sum(1 for p in covered if _pod_ready(p))
        spec = pdb["spec"]
        if spec.get("maxUnavailable") is not None:
            desired = len(covered) - _scaled(spec["maxUnavailable"], len(covered))
        else:
            desired = _scaled(spec.get("minAvailable", 1), len(covered))
        if healthy - desired <= 0:
            raise ApiError(
                429,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.",
                {
                    "causes": [
                        {
                            "reason": "DisruptionBudget",
                            "message": f"The disruption budget {pdb['metadata']['name']} needs {desired} "
                            f"healthy pods and has {healthy} currently",
                        }
                    ]
                },
            )

    def _bind(self, rtype: ResourceType, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        pod = self.store.get(rtype.storage_key, ns, name)
        if pod is None:
            raise errors.not_found("", "pods", name)
        node = (body.get("target") or {}).get("name")
        if not node:
            raise errors.invalid(
                "Binding", "", name, [errors.cause("target.name", "FieldValueRequired", "Required value")]
            )
        if (pod.get("spec") or {}).get("nodeName"):
            raise errors.conflict(
                "", "pods", name, f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"'
            )
        new = copy.deepcopy(pod)
        new["spec"]["nodeName"] = node
        conditions = [
            c
            for c in (new.setdefault("status", {}).get("conditions") or [])
            if c.get("type") != "PodScheduled"
        ]
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()})
        new["status"]["conditions"] = conditions
        self._commit_update(rtype, pod, new, {})
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    async def _pod_log(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        pod = self.store.get(("", "pods"), ns, name)
        if pod is None:
            raise errors.not_found("", "pods", name)
        query = request.query
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        init_containers = [c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []]
        container = query.get("container")
        if not container:
            if len(containers) != 1:
                raise errors.bad_request(
                    f"a container name must be specified for pod {name}, "
                    f"choose one of: [{' '.join(containers)}]"
                )
            container = containers[0]
        if container not in containers and container not in init_containers:
            raise errors.bad_request(f"container {container} is not valid for pod {name}")
        try:
            tail = int(query["tailLines"]) if query.get("tailLines") else None
            limit_bytes = int(query["limitBytes"]) if query.get("limitBytes") else None
            since: float | dt.datetime | None = None
            if query.get("sinceSeconds"):
                since = float(query["sinceSeconds"])
        except ValueError as exc:
            raise errors.bad_request(f"invalid log options: {exc}") from exc
        if since is None and query.get("sinceTime"):
            from .tables import parse_time

            since = parse_time(query["sinceTime"])
        flag = {k: query.get(k, "").lower() in ("true", "1") for k in ("follow", "timestamps", "previous")}
        if self.log_provider is None:
            raise errors.bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating'
            )
        try:
            result = self.log_provider(
                ns,
                name,
                container,
                tail=tail,
                since=since,
                follow=flag["follow"],
                timestamps=flag["timestamps"],
                previous=flag["previous"],
                limit_bytes=limit_bytes,
            )
            if inspect.isawaitable(result):
                result = await result
        except ApiError:
            raise
        except Exception as exc:
            status = getattr(exc, "status", None)
            if isinstance(status, int):
                raise ApiError(
                    status, str(getattr(exc, "reason", "BadRequest")), str(getattr(exc, "message", exc))
                ) from exc
            raise
        if isinstance(result, str):
            result = result.encode()
        if isinstance(result, bytes):
            return web.Response(body=result, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        async for chunk in result:
            await response.write(chunk.encode() if isinstance(chunk, str) else chunk)
        await response.write_eof()
        return response

    async def _scale(self, request: web.Request, info: RequestInfo) -> web.Response:
        rtype, ns, name = info.rtype, info.namespace, info.name or ""
        assert rtype.scale is not None
        old = self.store.get(rtype.storage_key, ns or "", name)
        if old is None:
            raise errors.not_found(rtype.group, rtype.plural, name)
        scale = self._scale_of(rtype, old)
        if info.verb == "get":
            return self._json(scale)
        if info.verb == "update":
            body = await self._read_object(request)
        elif info.verb == "patch":
            raw = await self._read_body(request)
            patch = self._decode(raw, "json")
            if request.content_type == "application/json-patch+json":
                body = json_patch(copy.deepcopy(scale), patch)
            else:
                body = merge_patch(scale, patch)
        else:
            raise errors.method_not_allowed()
        wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and str(wanted_rv) != old["metadata"]["resourceVersion"]:
            raise errors.stale_conflict(rtype.group, rtype.plural, name)
        replicas = (body.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise errors.invalid(
                "Scale",
                "autoscaling",
                name,
                [
                    errors.cause(
                        "spec.replicas",
                        "FieldValueInvalid",
                        f"Invalid value: {replicas}: must be greater than or equal to 0",
                    )
                ],
            )
        new = copy.deepcopy(old)
        _set_path(new, rtype.scale["specReplicasPath"], replicas)
        new = self._prepare_update(rtype, old, new, None, request.query) if rtype.crd is not None else new
        if rtype.generation and self._spec_changed(rtype, old, new):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        stored = self._commit_update(rtype, old, new, request.query)
        return self._json(self._scale_of(rtype, stored))

    def _scale_of(self, rtype: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        assert rtype.scale is not None
        meta = obj["metadata"]
        spec_replicas = jsonpath(obj, rtype.scale["specReplicasPath"])
        status_replicas = jsonpath(obj, rtype.scale.get("statusReplicasPath", ".status.replicas"))
        selector_path = rtype.scale.get("labelSelectorPath")
        selector = jsonpath(obj, selector_path) if selector_path else []
        selector_text = selector[0] if selector and isinstance(selector[0], str) else ""
        if not selector_text and rtype.crd is None:
            labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            selector_text = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        status: dict[str, Any] = {"replicas": status_replicas[0] if status_replicas else 0}
        if selector_text:
            status["selector"] = selector_text
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": spec_replicas[0] if spec_replicas else 0},
            "status": status,
        }

    # ------------------------------------------------------------------ watch
    async def _watch(
        self, request: web.Request, rtype: ResourceType, ns: str | None, only_name: str | None = None
    ) -> web.StreamResponse:
        query = request.query
        label_pred = parse_label_selector(query.get("labelSelector"))
        field_pred = parse_field_selector(query.get("fieldSelector"), rtype.supports_field)

        def matches(obj: dict[str, Any]) -> bool:
            if only_name is not None and obj["metadata"].get("name") != only_name:
                return False
            return (label_pred is None or label_pred(obj)) and (field_pred is None or field_pred(obj))

        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        send_initial = query.get("sendInitialEvents", "").lower() in ("true", "1")
        rv_text = query.get("resourceVersion", "")
        table = _TABLE_MARK in request.headers.get("Accept", "")
        include = query.get("includeObject", "PartialObjectMetadata")

        watcher = Watcher(rtype.storage_key, ns, matches)
        self.store.add_watcher(watcher)
        initial: list[tuple[str, dict[str, Any]]] = []
        too_old = False
        if send_initial or rv_text in ("", "0"):
            initial = [("ADDED", self._present(rtype, o)) for o in self.store.select(rtype.storage_key, ns)]
            initial = [(t, o) for t, o in initial if matches(o)]
        else:
            try:
                since = int(rv_text)
            except ValueError as exc:
                self.store.remove_watcher(watcher)
                raise errors.bad_request(f"invalid resource version: {rv_text}") from exc
            events = self.store.events_since(rtype.storage_key, since)
            if events is None:
                too_old = True
            else:
                for event in events:
                    if ns is None or event.obj["metadata"].get("namespace", "") == ns:
                        shaped = self._shape_event(rtype, event, matches)
                        if shaped:
                            initial.append(shaped)
        start_rv = self.store.rv

        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        await response.prepare(request)
        headers_sent = False

        async def send(event_type: str, obj: dict[str, Any]) -> None:
            nonlocal headers_sent
            if table and event_type not in ("BOOKMARK", "ERROR"):
                obj = to_table(
                    rtype,
                    [obj],
                    obj["metadata"].get("resourceVersion", ""),
                    include,
                    with_headers=not headers_sent,
                )
                headers_sent = True
            await response.write(_dumps({"type": event_type, "object": obj}) + b"\n")

        try:
            if too_old:
                status = errors.gone(
                    f"too old resource version: {rv_text} ({self.store.compacted_rv + 1})"
                ).status()
                await send("ERROR", status)
                return response
            for event_type, obj in initial:
                await send(event_type, obj)
            if send_initial and bookmarks:
                await send("BOOKMARK", self._bookmark(rtype, start_rv, initial_end=True))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            next_bookmark = loop.time() + self.bookmark_interval
            while True:
                now = loop.time()
                if now >= deadline:
                    break
                wait = min(deadline, next_bookmark) - now
                try:
                    # Queued events go out at once: a wait_for per event costs a loop cycle each, which
                    # under load lets a watch fall seconds behind the writes it reports.
                    if not watcher.queue.empty():
                        event = watcher.queue.get_nowait()
                    else:
                        event = await asyncio.wait_for(watcher.queue.get(), timeout=max(wait, 0.001))
                except TimeoutError:
                    if bookmarks and loop.time() >= next_bookmark:
                        await send("BOOKMARK", self._bookmark(rtype, self.store.rv))
                        next_bookmark = loop.time() + self.bookmark_interval
                    continue
                if event is None:
                    break
                if not self._resumed.is_set():
                    await self._resumed.wait()
                shaped = self._shape_event(rtype, event, matches)
                if shaped and not table:
                    key = (shaped[0], rtype.group_version)
                    line = event.encoded.get(key)
                    if line is None:
                        line = event.encoded[key] = _dumps({"type": shaped[0], "object": shaped[1]}) + b"\n"
                    await response.write(line)
                elif shaped:
                    await send(*shaped)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.remove_watcher(watcher)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await response.write_eof()
        return response

    def _bookmark(self, rtype: ResourceType, rv: int, initial_end: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"kind": rtype.kind, "apiVersion": rtype.group_version, "metadata": meta}

    def _shape_event(
        self, rtype: ResourceType, event: Event, matches: Callable[[dict[str, Any]], bool]
    ) -> tuple[str, dict[str, Any]] | None:
        obj = self._present(rtype, event.obj)
        now_match = matches(obj)
        if event.type == "MODIFIED" and event.old is not None:
            was_match = matches(self._present(rtype, event.old))
            if now_match and not was_match:
                return ("ADDED", obj)
            if was_match and not now_match:
                return ("DELETED", obj)
        return (event.type, obj) if now_match else None

    # ------------------------------------------------------------------ custom resources
    def _validator(self, rtype: ResourceType) -> Any:
        if rtype.validator is None:
            try:
                from localcluster.crdvalidation import CRDValidator
            except ImportError:
                log.warning("localcluster.crdvalidation is missing: custom resources are stored unvalidated")
                rtype.validator = False
            else:
                assert rtype.crd is not None
                rtype.validator = CRDValidator(rtype.crd, rtype.version)
        return rtype.validator or None

    def _admit_custom(
        self, rtype: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None, query: Any
    ) -> dict[str, Any]:
        validator = self._validator(rtype)
        if validator is None:
            return obj
        try:
            from localcluster.crdvalidation import InvalidError
        except ImportError:  # pragma: no cover - validator exists implies this exists
            return obj
        metadata = obj.get("metadata")
        mode = query.get("fieldValidation", "") if query else ""
        if mode in ("Strict", "Warn"):
            self._report_unknown(rtype, mode, _dropped_paths(obj, validator.normalize(obj)))
        try:
            admitted = validator.admit(obj, old)  # admit works on copies
        except InvalidError as exc:
            causes = [{"reason": c.type, "message": c.message, "field": c.field} for c in exc.causes]
            raise ApiError(
                422,
                "Invalid",
                exc.message(),
                {
                    "name": (metadata or {}).get("name", ""),
                    "group": rtype.group,
                    "kind": rtype.kind,
                    "causes": causes,
                },
            ) from exc
        admitted["metadata"] = metadata
        return admitted

    def _patch_meta(self, rtype: ResourceType) -> Any:
        minor = int(self.git_version.lstrip("v").split(".")[1])
        api_version = "v1" if rtype.storage_group == "" else rtype.group_version
        return builtin_schema.patch_meta(rtype.kind, api_version, minor)

    def _check_builtin_fields(self, rtype: ResourceType, obj: dict[str, Any], query: Any) -> None:
        """Unknown fields of a built-in kind: 400 (Strict), warnings (Warn), and dropped in every case."""
        mode = query.get("fieldValidation", "") if query else ""
        minor = int(self.git_version.lstrip("v").split(".")[1])
        typed = {**obj, "apiVersion": obj.get("apiVersion") or rtype.group_version, "kind": rtype.kind}
        if mode == "Strict":
            self._report_unknown(rtype, mode, builtin_schema.unknown_fields(typed, minor) or [])
        unknown = builtin_schema.unknown_fields(typed, minor, prune=True)
        for key in list(obj):
            if key not in typed:
                del obj[key]
        if unknown and mode == "Warn":
            self._report_unknown(rtype, mode, unknown)

    @staticmethod
    def _check_duplicate_fields(rtype: ResourceType, query: Any) -> None:
        """Keys given twice in one object: 400 under Strict, a warning under Warn (the default), as
        kube-apiserver's strict JSON decoder reports them."""
        duplicates = _duplicates.get([])
        mode = (query.get("fieldValidation", "") if query else "") or "Warn"
        if not duplicates or mode == "Ignore":
            return
        found = [f'duplicate field "{key}"' for key in duplicates]
        if mode == "Warn":
            with contextlib.suppress(LookupError):
                _warnings.get().extend(found)
            return
        raise errors.bad_request(
            f'{rtype.kind} in version "{rtype.version}" cannot be handled as a {rtype.kind}: '
            f"strict decoding error: {', '.join(found)}"
        )

    @staticmethod
    def _report_unknown(rtype: ResourceType, mode: str, unknown: list[str]) -> None:
        if not unknown:
            return
        if mode == "Warn":
            with contextlib.suppress(LookupError):
                _warnings.get().extend(f'unknown field "{path}"' for path in unknown)
            return
        fields = ", ".join(f'unknown field "{path}"' for path in unknown)
        raise errors.bad_request(
            f'{rtype.kind} in version "{rtype.version}" cannot be handled as a {rtype.kind}: '
            f"strict decoding error: {fields}"
        )

    def _prepare_crd(self, crd: dict[str, Any], old: dict[str, Any] | None) -> None:
        spec = crd.get("spec") or {}
        name = crd["metadata"].get("name", "")
        problems = []
        group = spec.get("group", "")
        names = spec.get("names") or {}
        plural = names.get("plural", "")
        if not group:
            problems.append(errors.cause("spec.group", "FieldValueRequired", "Required value"))
        if not plural:
            problems.append(errors.cause("spec.names.plural", "FieldValueRequired", "Required value"))
        if not names.get("kind"):
            problems.append(errors.cause("spec.names.kind", "FieldValueRequired", "Required value"))
        if group and plural and name != f"{plural}.{group}":
            problems.append(
                errors.cause(
                    "metadata.name",
                    "FieldValueInvalid",
                    f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group',
                )
            )
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            problems.append(
                errors.cause(
                    "spec.scope",
                    "FieldValueNotSupported",
                    f'Unsupported value: "{spec.get("scope")}": supported values: "Cluster", "Namespaced"',
                )
            )
        versions = spec.get("versions") or []
        if not versions:
            problems.append(
                errors.cause(
                    "spec.versions", "FieldValueInvalid", "Invalid value: must have at least one version"
                )
            )
        elif sum(1 for v in versions if v.get("storage")) != 1:
            problems.append(
                errors.cause(
                    "spec.versions",
                    "FieldValueInvalid",
                    "Invalid value: must have exactly one version marked as storage version",
                )
            )
        if old is not None and old.get("spec", {}).get("group") != group:
            problems.append(
                errors.cause("spec.group", "FieldValueInvalid", "Invalid value: field is immutable")
            )
        if not problems:
            problems = self._check_crd_schemas(crd)
        if problems:
            raise errors.invalid("CustomResourceDefinition", "apiextensions.k8s.io", name, problems)
        accepted = {
            "plural": plural,
            "singular": names.get("singular") or names["kind"].lower(),
            "kind": names["kind"],
            "listKind": names.get("listKind") or names["kind"] + "List",
        }
        for key in ("shortNames", "categories"):
            if names.get(key):
                accepted[key] = names[key]
        names.setdefault("singular", accepted["singular"])
        names.setdefault("listKind", accepted["listKind"])
        storage_version = next(v["name"] for v in versions if v.get("storage"))
        stored = list(((old or {}).get("status") or {}).get("storedVersions") or [])
        if storage_version not in stored:
            stored.append(storage_version)
        now = now_iso()
        previous = {c.get("type"): c for c in ((old or {}).get("status") or {}).get("conditions") or []}

        def condition(kind: str, reason: str, message: str) -> dict[str, Any]:
            if kind in previous and previous[kind].get("status") == "True":
                return previous[kind]
            return {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
            }

        crd["status"] = {
            "conditions": [
                condition("NamesAccepted", "NoConflicts", "no conflicts found"),
                condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            ],
            "acceptedNames": accepted,
            "storedVersions": stored,
        }
        spec.setdefault("conversion", {"strategy": "None"})

    def _check_crd_schemas(self, crd: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            from localcluster.crdvalidation import CRDValidator, InvalidError
        except ImportError:
            return []
        problems = []
        for index, version in enumerate(crd["spec"]["versions"]):
            try:
                CRDValidator(crd, version.get("name"))
            except InvalidError as exc:
                causes = [{"reason": c.type, "message": c.message, "field": c.field} for c in exc.causes]
                # versions sharing one schema are reported once (kube's `spec.validation` form)
                problems += [c for c in causes if c not in problems]
            except Exception as exc:  # a schema or CEL rule the validator cannot compile
                problems.append(
                    errors.cause(
                        f"spec.versions[{index}].schema.openAPIV3Schema",
                        "FieldValueInvalid",
                        f"Invalid value: {exc}",
                    )
                )
        return problems

    def _register_crd(self, crd: dict[str, Any]) -> None:
        name = crd["metadata"]["name"]
        self._unregister_crd(name, keep_storage=True)
        spec = crd["spec"]
        names = spec["names"]
        registered = []
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            subresources = version.get("subresources") or {}
            rtype = ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope") == "Namespaced",
                singular=names.get("singular") or names["kind"].lower(),
                short_names=list(names.get("shortNames") or []),
                categories=list(names.get("categories") or []),
                status_subresource="status" in subresources,
                scale=subresources.get("scale"),
                generation=True,
                strategic=False,
                crd=crd,
                printer_columns=list(version.get("additionalPrinterColumns") or []),
                field_selectors=frozenset(
                    f.get("jsonPath", "").lstrip(".") for f in version.get("selectableFields") or []
                ),
            )
            self.types[(rtype.group, rtype.version, rtype.plural)] = rtype
            registered.append(rtype)
        self._crd_types[name] = registered
        self._openapi_cache.clear()

    def _unregister_crd(self, name: str, keep_storage: bool = False) -> None:
        for rtype in self._crd_types.pop(name, []):
            self.types.pop((rtype.group, rtype.version, rtype.plural), None)
            if not keep_storage:
                self.store.objects.pop(rtype.storage_key, None)
        self._openapi_cache.clear()

    # ------------------------------------------------------------------ RBAC, reviews, tokens, admission
    def _aggregate_cluster_roles(self) -> None:
        from .rbac import aggregate

        rtype = self.types[(RBAC_GROUP, "v1", "clusterroles")]
        for name, rules in aggregate(self.store.select(rtype.storage_key)).items():
            old = self.store.get(rtype.storage_key, "", name)
            if old is None:
                continue
            new = copy.deepcopy(old)
            new["rules"] = rules
            new["metadata"]["resourceVersion"] = str(self.store.next_rv())
            self.store.commit(rtype.storage_key, "MODIFIED", new, old)
            self._after_write(rtype, "MODIFIED", new)

    def _review(self, rtype: ResourceType, ns: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """SubjectAccessReview and friends: answered from RBAC, never stored."""
        user = _user.get() or ADMIN
        spec = body.get("spec") or {}
        out = {
            "apiVersion": rtype.group_version,
            "kind": rtype.kind,
            "metadata": {**(body.get("metadata") or {}), "creationTimestamp": None},
            "spec": spec,
        }
        if rtype.plural == "selfsubjectreviews":
            out["status"] = {"userInfo": user.as_dict()}
            return out
        if rtype.plural == "tokenreviews":
            record = self.authenticator.lookup(str(spec.get("token", "")), self._alive)
            out["status"] = (
                {"authenticated": True, "user": record.user.as_dict(), "audiences": record.audiences}
                if record is not None
                else {"authenticated": False, "error": "invalid bearer token"}
            )
            return out
        if rtype.plural == "selfsubjectrulesreviews":
            out["status"] = self.authorizer.rules_review(user, str(spec.get("namespace") or ""))
            return out
        if rtype.plural in ("subjectaccessreviews", "localsubjectaccessreviews"):
            if not spec.get("user") and not spec.get("groups"):
                raise errors.invalid(
                    rtype.kind,
                    rtype.group,
                    "",
                    [
                        errors.cause(
                            "spec.user",
                            "FieldValueInvalid",
                            'Invalid value: "": at least one of user or group must be specified',
                        )
                    ],
                )
            subject = UserInfo(
                str(spec.get("user") or ""), tuple(spec.get("groups") or ()), str(spec.get("uid") or "")
            )
        else:
            subject = user
        resource_attrs = spec.get("resourceAttributes")
        non_resource = spec.get("nonResourceAttributes")
        if resource_attrs is not None:
            namespace = str(resource_attrs.get("namespace") or "")
            if rtype.plural == "localsubjectaccessreviews":
                if namespace and namespace != ns:
                    raise errors.bad_request(f"spec.resourceAttributes.namespace must match namespace: {ns}")
                namespace = ns or ""
            attrs = Attributes(
                subject,
                str(resource_attrs.get("verb") or ""),
                namespace,
                str(resource_attrs.get("group") or ""),
                str(resource_attrs.get("resource") or ""),
                str(resource_attrs.get("subresource") or ""),
                str(resource_attrs.get("name") or ""),
            )
        elif non_resource is not None:
            attrs = Attributes(
                subject,
                str(non_resource.get("verb") or ""),
                path=str(non_resource.get("path") or ""),
                resource_request=False,
            )
        else:
            raise errors.invalid(
                rtype.kind,
                rtype.group,
                "",
                [
                    errors.cause(
                        "spec.resourceAttributes",
                        "FieldValueRequired",
                        "Required value: exactly one of nonResourceAttributes or resourceAttributes "
                        "must be specified",
                    )
                ],
            )
        allowed = self.authorizer.allowed(attrs)
        out["status"] = {"allowed": allowed} if allowed else {"allowed": False}
        return out

    def _token_request(self, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """serviceaccounts/token (TokenRequest): a token for the account, optionally bound to a pod/secret."""
        spec = dict(body.get("spec") or {})
        seconds = int(spec.get("expirationSeconds") or 3600)
        if seconds < 600:
            raise errors.invalid(
                "TokenRequest",
                "authentication.k8s.io",
                name,
                [
                    errors.cause(
                        "spec.expirationSeconds",
                        "FieldValueInvalid",
                        f"Invalid value: {seconds}: may not specify a duration less than 10 minutes",
                    )
                ],
            )
        bound = None
        ref = spec.get("boundObjectRef")
        if ref:
            kind = ref.get("kind")
            plural = {"Pod": "pods", "Secret": "secrets"}.get(str(kind))
            target = self.store.get(("", plural), ns, str(ref.get("name"))) if plural else None
            if target is None or (ref.get("uid") and ref["uid"] != target["metadata"]["uid"]):
                raise errors.not_found("", plural or str(kind).lower(), str(ref.get("name")))
            bound = (str(kind), ns, target["metadata"]["name"], target["metadata"]["uid"])
        account = self.store.get(("", "serviceaccounts"), ns, name)
        if account is None:
            raise errors.not_found("", "serviceaccounts", name)
        token, expires = self.authenticator.issue(
            ns, name, account["metadata"]["uid"], seconds, bound, list(spec.get("audiences") or [])
        )
        spec["expirationSeconds"] = seconds
        spec.setdefault("audiences", [])
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": now_iso()},
            "spec": spec,
            "status": {"token": token, "expirationTimestamp": expires},
        }

    def _mount_service_account_token(self, pod: dict[str, Any]) -> None:
        """The ServiceAccount admission plugin: a projected token volume on every container."""
        spec = pod.setdefault("spec", {})
        spec.setdefault("serviceAccountName", "default")
        if spec.get("automountServiceAccountToken") is False:
            return
        account = self.store.get(
            ("", "serviceaccounts"), pod["metadata"].get("namespace") or "", spec["serviceAccountName"]
        )
        if (
            spec.get("automountServiceAccountToken") is None
            and (account or {}).get("automountServiceAccountToken") is False
        ):
            return
        containers = [c for f in ("initContainers", "containers") for c in spec.get(f) or []]
        needing = [
            c
            for c in containers
            if not any(m.get("mountPath") == _SA_MOUNT for m in c.get("volumeMounts") or [])
        ]
        if not needing:
            return
        volume = "kube-api-access-" + "".join(random.choice(_GENERATE_CHARS) for _ in range(5))
        spec.setdefault("volumes", []).append(
            {
                "name": volume,
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": _SA_TOKEN_SECONDS, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                                        "path": "namespace",
                                    }
                                ]
                            }
                        },
                    ],
                },
            }
        )
        for container in needing:
            container.setdefault("volumeMounts", []).append(
                {"name": volume, "readOnly": True, "mountPath": _SA_MOUNT}
            )

    def _check_policy(self, policy: dict[str, Any]) -> None:
        problems = compile_problems(policy)
        if problems:
            raise errors.invalid(
                "ValidatingAdmissionPolicy",
                "admissionregistration.k8s.io",
                policy["metadata"].get("name", ""),
                [
                    errors.cause(path, "FieldValueInvalid", f"Invalid value: {json.dumps(expr)}: {why}")
                    for path, expr, why in problems
                ],
            )

    def _param_namespaced(self, kind: dict[str, Any]) -> bool | None:
        rtype = self._type_for_kind(kind)
        return None if rtype is None else rtype.namespaced

    def _type_for_kind(self, kind: dict[str, Any]) -> ResourceType | None:
        api_version = str(kind.get("apiVersion") or "")
        group, _, version = api_version.rpartition("/")
        return next(
            (
                t
                for t in self.types.values()
                if t.group == group and t.version == version and t.kind == kind.get("kind")
            ),
            None,
        )

    def _find_params(
        self, kind: dict[str, Any], namespace: str | None, name: str | None, selector: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        rtype = self._type_for_kind(kind)
        if rtype is None:
            return []
        items = self.store.select(rtype.storage_key, namespace if rtype.namespaced else None)
        if name:
            items = [i for i in items if i["metadata"]["name"] == name]
        elif selector is not None:
            items = [i for i in items if label_selector_matches(selector, i["metadata"].get("labels") or {})]
        else:
            items = []
        return [self._present(rtype, i) for i in items]

    def _admit(
        self,
        rtype: ResourceType,
        operation: str,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        subresource: str | None,
        query: Any,
    ) -> None:
        """Validating admission of an API request: PodSecurity, then ValidatingAdmissionPolicies."""
        user = _user.get()
        if user is None:
            return
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or "" if rtype.namespaced else ""
        name = meta.get("name") or ""
        namespace_object = self.store.get(("", "namespaces"), "", ns) if ns else None
        if rtype.group == "" and rtype.plural == "pods" and operation == "CREATE" and not subresource:
            self._pod_security(obj, namespace_object)
        elif (rtype.group, rtype.plural) in _WORKLOADS and not subresource:
            self._pod_security(obj, namespace_object, workload=True)
        request = AdmissionRequest(
            operation=operation,
            group=rtype.group,
            version=rtype.version,
            kind=rtype.kind,
            resource=rtype.plural,
            subresource=subresource or "",
            namespace=ns,
            name=name,
            namespaced=rtype.namespaced,
            obj=self._present(rtype, obj),
            old=self._present(rtype, old) if old is not None else None,
            user=user.as_dict(),
            dry_run=self._dry_run(query) if query is not None else False,
            namespace_object=namespace_object,
        )
        outcome = self.policies.admit(request)
        warnings = _warnings.get(None)
        if warnings is not None:
            warnings.extend(outcome.warnings)
        denial = outcome.denial
        if denial is not None:
            message = (
                f"ValidatingAdmissionPolicy '{denial.policy}' with binding '{denial.binding}' "
                f"denied request: {denial.message}"
            )
            error = errors.forbidden(rtype.group, rtype.plural, name, message)
            error.code = REASON_CODES.get(denial.reason, 422)
            error.reason = denial.reason
            assert error.details is not None
            error.details["causes"] = [{"message": message}]
            raise error

    def _pod_security(
        self, obj: dict[str, Any], namespace: dict[str, Any] | None, workload: bool = False
    ) -> None:
        """PodSecurity admission: a pod violating the namespace's `enforce` level is refused; `warn` levels,
        and for workloads (their pod template) the `enforce` level too, only add `would violate` warnings."""
        from ..podsecurity import check_pod, namespace_policy, violation_message

        labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
        policy = namespace_policy(labels)
        template = obj
        if workload:
            spec = obj.get("spec") or {}
            if obj.get("kind") == "CronJob":
                spec = (spec.get("jobTemplate") or {}).get("spec") or {}
            template = spec.get("template") or {}
        meta, spec = template.get("metadata") or {}, template.get("spec") or {}
        levels: list[tuple[str, str]] = []
        warn = labels.get("pod-security.kubernetes.io/warn")
        if warn in ("baseline", "restricted"):
            levels.append((warn, labels.get("pod-security.kubernetes.io/warn-version") or "latest"))
        if policy is not None and workload and policy not in levels:
            levels.append(policy)
        warnings = _warnings.get(None)
        for level, version in levels:
            if policy is not None and (level, version) == policy and not workload:
                continue  # enforced below: the refusal says it
            results = check_pod(level, meta, spec)
            if results and warnings is not None:
                warnings.append("would " + violation_message(level, version, results, verb="violate"))
        if policy is None or workload:
            return
        level, version = policy
        results = check_pod(level, meta, spec)
        if results:
            raise errors.forbidden(
                "", "pods", obj["metadata"].get("name", ""), violation_message(level, version, results)
            )

    # ------------------------------------------------------------------ discovery, version, openapi
    async def _non_resource(self, request: web.Request) -> web.Response:
        path = request.path.rstrip("/") or "/"
        if request.method != "GET":
            raise errors.method_not_allowed()
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/version":
            major, minor = self.git_version.lstrip("v").split(".")[:2]
            return self._json(
                {
                    "major": major,
                    "minor": minor,
                    "gitVersion": self.git_version,
                    "gitCommit": "emulated",
                    "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.24",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                }
            )
        if path == "/api":
            return self._json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                    ],
                }
            )
        if path == "/apis":
            return self._json({"kind": "APIGroupList", "apiVersion": "v1", "groups": self._groups()})
        if path == "/openapi/v3":
            return self._json(
                {
                    "paths": {
                        gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={doc_hash}"}
                        for gv, (doc_hash, _) in self._openapi_documents().items()
                    }
                }
            )
        if path == "/openapi/v2":
            if openapi.SWAGGER_PROTOBUF in request.headers.get("Accept", ""):
                return web.Response(
                    body=openapi.swagger_protobuf(), content_type=openapi.SWAGGER_PROTOBUF_RESPONSE
                )
            return self._json(openapi.swagger_document())
        if path.startswith("/openapi/v3/"):
            gv = path[len("/openapi/v3/") :]
            documents = self._openapi_documents()
            if gv not in documents:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self._json(documents[gv][1])
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _openapi_documents(self) -> dict[str, tuple[str, dict[str, Any]]]:
        if not self._openapi_cache:
            by_gv: dict[tuple[str, str], list[ResourceType]] = {}
            for rtype in self.types.values():
                by_gv.setdefault((rtype.group, rtype.version), []).append(rtype)
            for (group, version), types in by_gv.items():
                document = openapi.group_version_document(group, version, types)
                self._openapi_cache[openapi.gv_path(group, version)] = (
                    openapi.document_hash(document),
                    document,
                )
        return self._openapi_cache

    def _groups(self) -> list[dict[str, Any]]:
        groups: dict[str, list[str]] = {}
        preferred: dict[str, str] = {}
        for rtype in self.types.values():
            if not rtype.group:
                continue
            versions = groups.setdefault(rtype.group, [])
            if rtype.version not in versions:
                versions.append(rtype.version)
            if rtype.crd is not None:
                storage = next(
                    (v["name"] for v in rtype.crd["spec"]["versions"] if v.get("storage")), rtype.version
                )
                served = [v["name"] for v in rtype.crd["spec"]["versions"] if v.get("served", True)]
                preferred[rtype.group] = storage if storage in served else served[0]
        result = []
        for group, versions in groups.items():
            versions.sort(key=_version_priority)
            pref = preferred.get(group, versions[0])
            result.append(
                {
                    "name": group,
                    "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                    "preferredVersion": {"groupVersion": f"{group}/{pref}", "version": pref},
                }
            )
        return result

    async def _discovery(self, request: web.Request) -> web.Response:
        parts = [p for p in request.path.split("/") if p]
        if parts[0] == "api":
            if len(parts) == 2 and parts[1] == "v1":
                return self._json(self._resource_list("", "v1"))
        elif len(parts) == 2:
            groups = [g for g in self._groups() if g["name"] == parts[1]]
            if groups:
                return self._json({"kind": "APIGroup", "apiVersion": "v1", **groups[0]})
        elif len(parts) == 3 and any(
            (t.group, t.version) == (parts[1], parts[2]) for t in self.types.values()
        ):
            return self._json(self._resource_list(parts[1], parts[2]))
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources = []
        for rtype in self.types.values():
            if rtype.group != group or rtype.version != version:
                continue
            entry: dict[str, Any] = {
                "name": rtype.plural,
                "singularName": rtype.singular,
                "namespaced": rtype.namespaced,
                "kind": rtype.kind,
                "verbs": list(rtype.verbs),
            }
            if rtype.short_names:
                entry["shortNames"] = rtype.short_names
            if rtype.categories:
                entry["categories"] = rtype.categories
            resources.append(entry)
            sub_kinds = {
                "status": (rtype.kind, ["get", "patch", "update"]),
                "scale": ("Scale", ["get", "patch", "update"]),
                "log": ("Pod", ["get"]),
                "eviction": ("Eviction", ["create"]),
                "binding": ("Binding", ["create"]),
                "token": ("TokenRequest", ["create"]),
            }
            subs = [
                s
                for s in ("status", "scale", "log", "eviction", "binding", "token")
                if self._has_subresource(rtype, s)
            ]
            for sub in subs:
                kind, verbs = sub_kinds[sub]
                item: dict[str, Any] = {
                    "name": f"{rtype.plural}/{sub}",
                    "singularName": "",
                    "namespaced": rtype.namespaced,
                    "kind": kind,
                    "verbs": verbs,
                }
                if sub == "scale":
                    item.update(group="autoscaling", version="v1")
                elif sub == "eviction":
                    item.update(group="policy", version="v1")
                elif sub == "token":
                    item.update(group="authentication.k8s.io", version="v1")
                resources.append(item)
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: GA before beta before alpha, higher numbers first."""
    import re

    match = re.match(r"^v(\d+)(?:(alpha|beta)(\d+))?$", version)
    if not match:
        return (3, 0, 0)
    major, stage, minor = match.groups()
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -int(major), -int(minor or 0))


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _scaled(value: Any, total: int) -> int:
    """An int-or-percent PDB bound; percentages of the covered pods round up."""
    if isinstance(value, str) and value.endswith("%"):
        return -(-int(value[:-1]) * total // 100)
    return int(value)


def _clean_metadata(meta: dict[str, Any]) -> None:
    """Empty maps and lists in ObjectMeta are omitted, as after a round trip through the Go types."""
    for key in ("labels", "annotations", "finalizers", "ownerReferences"):
        if key in meta and not meta[key]:
            del meta[key]


def _set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    parts = [p for p in path.strip().lstrip(".").split(".") if p]
    current = obj
    for part in parts[:-1]:
        current = current.setdefault(part, {})
    current[parts[-1]] = value


def _removed_fields(previous: Any, config: Any) -> dict[str, Any]:
    """A merge patch deleting the map fields a manager applied before but not now."""
    if not isinstance(previous, dict) or not isinstance(config, dict):
        return {}
    patch: dict[str, Any] = {}
    for key, value in previous.items():
        if key not in config:
            patch[key] = None
        elif isinstance(value, dict) and isinstance(config[key], dict):
            nested = _removed_fields(value, config[key])
            if nested:
                patch[key] = nested
    return patch


def _dropped_paths(given: Any, kept: Any, prefix: str = "") -> list[str]:
    """Field paths present in the request but pruned by the schema."""
    found: list[str] = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            path = f"{prefix}.{key}" if prefix else key
            if key == "metadata" and not prefix:
                continue
            if key not in kept:
                found.append(path)
            else:
                found += _dropped_paths(value, kept[key], path)
    elif isinstance(given, list) and isinstance(kept, list):
        for index, (a, b) in enumerate(zip(given, kept, strict=False)):
            found += _dropped_paths(a, b, f"{prefix}[{index}]")
    return found


__all__ = ["ApiServer", "LogProvider", "now_iso"]
