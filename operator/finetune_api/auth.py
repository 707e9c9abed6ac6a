"""Who is calling and in which namespace: the bearer token → TokenReview (positive answers cached ≤ 10 s by
the token's sha256, never the token itself), the namespace from `OpenAI-Project` or the ServiceAccount's own,
and SubjectAccessReview for what is not a Kubernetes object (files in S3)."""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune_vocabulary.labels import API_GROUP

from .errors import ApiError
from .kube import INVALID_KEY, Kube
from .ratelimit import RateLimiter

REVIEW_TTL_S = 10.0
FAILED_AUTH_PER_MINUTE = 60  # per client IP: bad tokens beyond this get 429 before any TokenReview
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SA_PREFIX = "system:serviceaccount:"
PROJECT_HEADER = "OpenAI-Project"


@dataclass(frozen=True)
class Caller:
    token: str = field(repr=False)  # never logged
    user: dict[str, Any] = field(repr=False)
    username: str
    namespace: str


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(header: str | None) -> str:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "missing API key: send Authorization: Bearer <Kubernetes token>", code="invalid_api_key"
        )
    return token.strip()


def namespace_of(username: str, project: str | None) -> str:
    """The namespace: the OpenAI-Project header when given (a DNS label), else the ServiceAccount's own."""
    if project is not None:
        if DNS_LABEL.match(project) is None:
            raise ApiError(
                400,
                f"{PROJECT_HEADER} must be a namespace name (a DNS label), got {project[:64]!r}",
                code="invalid_project",
                param=PROJECT_HEADER,
            )
        return project
    if username.startswith(SA_PREFIX):
        parts = username[len(SA_PREFIX) :].split(":")
        if len(parts) == 2 and DNS_LABEL.match(parts[0]):
            return parts[0]
    raise ApiError(
        400,
        f"no namespace: {username} is not a ServiceAccount, so name the namespace with the {PROJECT_HEADER} "
        "header (the client's project=...)",
        code="project_required",
        param=PROJECT_HEADER,
    )


class Authenticator:
    def __init__(self, kube: Kube, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.clock = clock
        self._reviews: dict[str, tuple[float, dict[str, Any]]] = {}  # sha256(token) → (expires, user)
        self.failures = RateLimiter(FAILED_AUTH_PER_MINUTE, clock)

    async def user(self, token: str, client_ip: str) -> dict[str, Any]:
        """The token's user (TokenReview, cached); 401 when not authenticated, 429 after too many failures."""
        key = token_key(token)
        now = self.clock()
        cached = self._reviews.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        wait = self.failures.retry_after(client_ip)
        if wait > 0:
            raise ApiError(
                429,
                "too many failed authentications from this address",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        user = await self.kube.token_review(token)
        if user is None or not user.get("username"):
            self.failures.take(client_ip)
            raise ApiError(401, INVALID_KEY, code="invalid_api_key")
        if len(self._reviews) > 10_000:
            self._reviews = {k: v for k, v in self._reviews.items() if v[0] > now}
        self._reviews[key] = (now + REVIEW_TTL_S, user)
        return user

    async def caller(self, authorization: str | None, project: str | None, client_ip: str) -> Caller:
        token = bearer(authorization)
        user = await self.user(token, client_ip)
        username = str(user["username"])
        return Caller(token, user, username, namespace_of(username, project))

    async def require(
        self, caller: Caller, verb: str, resource: str = "finetunejobs", group: str = API_GROUP
    ) -> None:
        """SubjectAccessReview for what the service does itself on the caller's behalf (files in S3)."""
        attributes = {"verb": verb, "group": group, "resource": resource, "namespace": caller.namespace}
        if not await self.kube.access_review(caller.user, attributes):
            raise ApiError(
                403,
                f'{caller.username} may not {verb} {resource}.{group} in namespace "{caller.namespace}"',
                code="permission_denied",
            )
