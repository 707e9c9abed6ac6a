"""The aiohttp application: routes, and the middleware every request passes (OpenAI-shaped errors, never a
stack trace; the caller from the bearer token; per-user rate limit; body limits; an access log without
tokens)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from finetune_operator.api.finetunejob import API_VERSION, PLURAL
from finetune_vocabulary.labels import LABEL_COMPONENT, LABEL_JOB_UID

from . import history, jobs
from .auth import PROJECT_HEADER, Authenticator, Caller
from .config import ApiConfig
from .errors import ApiError
from .files import FileStore, check_upload_file, file_object, receive_upload
from .kube import Kube, load
from .mapping import ModelMapping, bad_param, parse_mappings, resolve_model
from .proxy import Proxy
from .ratelimit import RateLimiter

log = logging.getLogger("finetune_api")
access_log = logging.getLogger("finetune_api.access")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JOB_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
MAPPING_TTL_S = 5.0
LOG_TAIL = "200"
FILES_MAX_LIMIT = 10000  # OpenAI's default and maximum page of GET /v1/files


class State:
    """What the handlers share: the Kubernetes client, the file store, the proxy, the mapping cache."""

    def __init__(self, config: ApiConfig, kube: Kube, store: FileStore, proxy: Proxy) -> None:
        self.config = config
        self.kube = kube
        self.auth = Authenticator(kube)
        self.limiter = RateLimiter(config.rate_limit)
        self.store = store
        self.proxy = proxy
        self._mapping: tuple[float, dict[str, ModelMapping], dict[str, str]] | None = None

    async def mapping(self) -> tuple[dict[str, ModelMapping], dict[str, str]]:
        """The model mapping ConfigMap, read live (cached ≤ 5 s); missing → no models."""
        now = time.monotonic()
        if self._mapping is None or self._mapping[0] < now:
            try:
                data = await self.kube.config_map(self.config.models_namespace, self.config.models_configmap)
            except ApiError as err:
                if err.status != 404:
                    raise
                data = {}
            valid, problems = parse_mappings(data)
            self._mapping = (now + MAPPING_TTL_S, valid, problems)
        return self._mapping[1], self._mapping[2]


STATE = web.AppKey("state", State)
CALLER = web.RequestKey("caller", Caller)


def state(request: web.Request) -> State:
    return request.app[STATE]


def caller(request: web.Request) -> Caller:
    return request[CALLER]


def jobs_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
    return f"{base}/{name}" if name else base


async def json_body(request: web.Request) -> dict[str, Any]:
    """The JSON object of the request, at most --max-body-bytes (413 `request_too_large`)."""
    limit = state(request).config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


# -- middleware ----------------------------------------------------------------------------------------------
def _error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


def _http_error(err: web.HTTPException) -> ApiError:
    if err.status == 413:
        return ApiError(413, "request body too large", code="request_too_large")
    if err.status == 405:
        return ApiError(405, "method not allowed for this route", code="method_not_allowed")
    if err.status == 404:
        return ApiError(404, "unknown route: see docs/openai-api.md for what is served", code="unknown_url")
    return ApiError(err.status, err.reason or "error")


@web.middleware
async def errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    began = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as err:
        status = err.status
        return _error_response(err)
    except web.HTTPException as err:
        status = err.status
        return _error_response(_http_error(err))
    except Exception:  # never a stack trace to the client; the log has it (no token: headers are not logged)
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error_response(ApiError(500, "internal error (see the service's log)", code="server_error"))
    finally:
        who = request.get(CALLER)
        # the path and the user, never headers (the token) nor the query string
        access_log.info(
            "%s %s %s %s %d %.0fms",
            request.remote,
            who.username if who else "-",
            request.method,
            request.path,
            status,
            (time.monotonic() - began) * 1000,
        )


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Everything under /v1/ needs a Kubernetes bearer token; then the per-user rate limit."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    shared = state(request)
    who = await shared.auth.caller(
        request.headers.get("Authorization"), request.headers.get(PROJECT_HEADER), request.remote or "-"
    )
    request[CALLER] = who
    wait = shared.limiter.take(who.username)
    if wait > 0:
        raise ApiError(
            429,
            f"rate limit of {shared.config.rate_limit} requests per minute reached for {who.username}",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    return await handler(request)


# -- files ---------------------------------------------------------------------------------------------------
async def create_file(request: web.Request) -> web.StreamResponse:
    shared, who = state(request), caller(request)
    await shared.auth.require(who, "create")  # before reading the upload or touching S3
    upload = await receive_upload(request, shared.config.max_file_bytes)
    try:
        check = await asyncio.to_thread(check_upload_file, upload)
        meta = await shared.store.put(who.namespace, upload, check)
    finally:
        upload.path.unlink(missing_ok=True)
    return web.json_response(file_object(meta))


async def list_files(request: web.Request) -> web.StreamResponse:
    shared, who = state(request), caller(request)
    await shared.auth.require(who, "create")
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_param("order", f"must be asc or desc, not {order[:16]!r}")
    limit, purpose = _limit(request, default=FILES_MAX_LIMIT), request.query.get("purpose")
    files = [file_object(m) for m in await shared.store.list(who.namespace)]
    data = sorted(
        (f for f in files if not purpose or f["purpose"] == purpose),
        key=lambda f: (f["created_at"], f["id"]),
        reverse=order == "desc",
    )
    return web.json_response(jobs.page(data, request.query.get("after"), limit, max_limit=FILES_MAX_LIMIT))


async def get_file(request: web.Request) -> web.StreamResponse:
    shared, who = state(request), caller(request)
    await shared.auth.require(who, "create")
    return web.json_response(file_object(await shared.store.get(who.namespace, request.match_info["id"])))


async def file_content(request: web.Request) -> web.StreamResponse:
    shared, who = state(request), caller(request)
    await shared.auth.require(who, "create")
    file_id = request.match_info["id"]
    meta = await shared.store.get(who.namespace, file_id)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = int(meta["bytes"])
    await response.prepare(request)
    async for chunk in shared.store.content(who.namespace, file_id):
        await response.write(chunk)
    await response.write_eof()
    return response


async def delete_file(request: web.Request) -> web.StreamResponse:
    shared, who = state(request), caller(request)
    await shared.auth.require(who, "create")
    file_id = request.match_info["id"]
    await shared.store.delete(who.namespace, file_id)
    return web.json_response({"id": file_id, "object": "file", "deleted": True})


# -- fine-tuning jobs (the caller's token for every Kubernetes call) -----------------------------------------
def job_name(request: web.Request) -> str:
    name = request.match_info["id"]
    if JOB_NAME.match(name) is None:
        raise ApiError(404, f"No such fine-tuning job: {name[:64]}", code="fine_tuning_job_not_found")
    return name


async def resolve_file(shared: State, who: Caller, file_id: Any, param: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(file_id, str) or not file_id:
        raise ApiError(400, f"{param} must be a file id (file-...)", param=param)
    try:
        meta = await shared.store.get(who.namespace, file_id)
    except ApiError as err:
        raise ApiError(err.status, err.message, code=err.code, param=param) from None
    return shared.store.uri(who.namespace, file_id), meta


async def create_job(request: web.Request) -> web.StreamResponse:
    shared, who = state(request), caller(request)
    body = await json_body(request)
    await shared.auth.require(who, "create")  # before the mapping and the namespace's files in S3
    valid, problems = await shared.mapping()
    if body.get("model") in problems:
        log.error("model mapping %s is invalid: %s", body["model"], problems[body["model"]])
    mapping = resolve_model(body.get("model"), valid, problems)
    model = str(body["model"])
    training_uri, training = await resolve_file(shared, who, body.get("training_file"), "training_file")
    validation_uri = None
    if body.get("validation_file") is not None:
        validation_uri, _ = await resolve_file(shared, who, body["validation_file"], "validation_file")
    manifest = jobs.build_finetunejob(
        body,
        model,
        mapping,
        namespace=who.namespace,
        name=jobs.new_job_name(),
        training_uri=training_uri,
        validation_uri=validation_uri,
        training_objectives=tuple(training.get("objectives") or ()),
    )
    created = await shared.kube.request(
        "POST", jobs_path(who.namespace), token=who.token, body=manifest, params={"fieldValidation": "Strict"}
    )
    return web.json_response(jobs.to_openai_job(created))


def _limit(request: web.Request, default: int = 20) -> int:
    raw = request.query.get("limit", str(default))
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"limit must be an integer, got {raw[:16]!r}", param="limit") from None


async def list_jobs(request: web.Request) -> web.StreamResponse:
    shared, who = state(request), caller(request)
    limit = _limit(request)
    listing = await shared.kube.request("GET", jobs_path(who.namespace), token=who.token)
    items = sorted(
        listing.get("items") or [],
        key=lambda j: (j["metadata"].get("creationTimestamp") or "", j["metadata"]["name"]),
        reverse=True,
    )
    return web.json_response(
        jobs.page([jobs.to_openai_job(j) for j in items], request.query.get("after"), limit)
    )


async def read_job(shared: State, who: Caller, name: str) -> dict[str, Any]:
    found: dict[str, Any] = await shared.kube.request(
        "GET", jobs_path(who.namespace, name), token=who.token, not_found="fine_tuning_job_not_found"
    )
    return found


async def get_job(request: web.Request) -> web.StreamResponse:
    job = await read_job(state(request), caller(request), job_name(request))
    return web.json_response(jobs.to_openai_job(job))


async def control_job(request: web.Request, action: jobs.Action) -> web.StreamResponse:
    """Cancel, pause or resume: read the job, check its status (jobs.control_patch), patch its spec."""
    shared, who, name = state(request), caller(request), job_name(request)
    job = await read_job(shared, who, name)
    patch = jobs.control_patch(job, action)
    if patch is not None:
        job = await shared.kube.request(
            "PATCH",
            jobs_path(who.namespace, name),
            token=who.token,
            body=patch,
            content_type="application/merge-patch+json",
            params={"fieldValidation": "Strict"},
            not_found="fine_tuning_job_not_found",
        )
    return web.json_response(jobs.to_openai_job(job))


async def cancel_job(request: web.Request) -> web.StreamResponse:
    return await control_job(request, "cancel")


async def pause_job(request: web.Request) -> web.StreamResponse:
    return await control_job(request, "pause")


async def resume_job(request: web.Request) -> web.StreamResponse:
    return await control_job(request, "resume")


async def progress_lines(shared: State, who: Caller, job: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainer's progress lines from the train pods' logs (last 200 lines each); no pod or log is fine."""
    selector = f"{LABEL_JOB_UID}={job['metadata'].get('uid', '')},{LABEL_COMPONENT}=train"
    base = f"/api/v1/namespaces/{who.namespace}/pods"
    lines: list[dict[str, Any]] = []
    try:
        pods = await shared.kube.request("GET", base, token=who.token, params={"labelSelector": selector})
        for pod in pods.get("items") or []:
            text = await shared.kube.request(
                "GET",
                f"{base}/{pod['metadata']['name']}/log",
                token=who.token,
                params={"tailLines": LOG_TAIL},
                text=True,
            )
            for line in str(text).splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("event") == "progress":
                    lines.append(record)
    except ApiError as err:
        if err.status == 401:
            raise
    return lines


async def job_events(request: web.Request) -> web.StreamResponse:
    shared, who, name = state(request), caller(request), job_name(request)
    job = await read_job(shared, who, name)
    listing = await shared.kube.request(
        "GET",
        f"/api/v1/namespaces/{who.namespace}/events",
        token=who.token,
        params={"fieldSelector": f"involvedObject.name={name}"},
    )
    events = [
        e
        for e in listing.get("items") or []
        if (e.get("involvedObject") or {}).get("name") == name
        and (e.get("involvedObject") or {}).get("kind") in (None, "FineTuneJob")
    ]
    data = history.to_events(job, events, await progress_lines(shared, who, job))
    return web.json_response(jobs.page(data, request.query.get("after"), _limit(request)))


async def job_checkpoints(request: web.Request) -> web.StreamResponse:
    job = await read_job(state(request), caller(request), job_name(request))
    return web.json_response(
        jobs.page(history.to_checkpoints(job), request.query.get("after"), _limit(request))
    )


# -- models and chat -----------------------------------------------------------------------------------------
async def list_models(request: web.Request) -> web.StreamResponse:
    return web.json_response(await state(request).proxy.models(caller(request)))


async def get_model(request: web.Request) -> web.StreamResponse:
    return web.json_response(await state(request).proxy.model(caller(request), request.match_info["model"]))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    return await state(request).proxy.chat(request, caller(request), body)


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


def create_app(
    config: ApiConfig,
    *,
    kube: Kube | None = None,
    s3_client: Any = None,
    resolver: aiohttp.abc.AbstractResolver | None = None,
) -> web.Application:
    """The service; `kube`, `s3_client` and `resolver` (the proxy's DNS) are for tests and default to the
    configured cluster, the AWS_* env and the system's resolver."""
    kube = kube or load(config.kubeconfig)
    shared = State(config, kube, FileStore(config, s3_client), Proxy(kube, resolver))
    app = web.Application(
        middlewares=[errors_and_access_log, authenticate], client_max_size=config.max_body_bytes
    )
    app[STATE] = shared
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{id}", get_file)
    app.router.add_delete("/v1/files/{id}", delete_file)
    app.router.add_get("/v1/files/{id}/content", file_content)
    app.router.add_post("/v1/fine_tuning/jobs", create_job)
    app.router.add_get("/v1/fine_tuning/jobs", list_jobs)
    app.router.add_get("/v1/fine_tuning/jobs/{id}", get_job)
    app.router.add_post("/v1/fine_tuning/jobs/{id}/cancel", cancel_job)
    app.router.add_post("/v1/fine_tuning/jobs/{id}/pause", pause_job)
    app.router.add_post("/v1/fine_tuning/jobs/{id}/resume", resume_job)
    app.router.add_get("/v1/fine_tuning/jobs/{id}/events", job_events)
    app.router.add_get("/v1/fine_tuning/jobs/{id}/checkpoints", job_checkpoints)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)

    async def close(_: web.Application) -> None:
        await shared.proxy.close()
        await kube.close()

    app.on_cleanup.append(close)
    return app
