"""Fault injection and request accounting for tests and benchmarks."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

from .errors import ApiError, conflict, internal, too_many_requests

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def _agent_matches(wanted: str | tuple[str, ...] | None, agent: str | None) -> bool:
    if wanted is None:
        return True
    return agent in ((wanted,) if isinstance(wanted, str) else wanted)


@dataclass
class Fault:
    """Answer matching requests with an error instead of serving them."""

    verb: str  # "get", "list", "watch", "create", "update", "patch", "delete", "deletecollection" or "*"
    resource: str  # "pods", "pods/status", "finetunejobs.finetune.dev", or "*"
    status: int  # 409, 429 or 500
    rate: float = 1.0  # probability that a matching request fails
    count: int | None = None  # fail at most this many requests, then disarm
    retry_after: int = 1  # seconds, for 429
    namespace: str | None = None
    # Only requests whose User-Agent product is one of these (e.g. "kopf"): chaos for one client only.
    agent: str | tuple[str, ...] | None = None
    hits: int = 0

    def matches(
        self, verb: str, resource: str, group: str, namespace: str | None, agent: str | None = None
    ) -> bool:
        if self.count is not None and self.hits >= self.count:
            return False
        if not _agent_matches(self.agent, agent):
            return False
        if self.verb != "*" and self.verb != verb:
            return False
        if self.namespace is not None and self.namespace != namespace:
            return False
        if self.resource == "*":
            return True
        base, _, sub = resource.partition("/")
        qualified = f"{base}.{group}" + (f"/{sub}" if sub else "") if group else resource
        return self.resource in (resource, qualified)

    def error(self, group: str, resource: str, name: str) -> ApiError:
        if self.status == 409:
            return conflict(group, resource.split("/")[0], name or "", "injected conflict (fault injection)")
        if self.status == 429:
            return too_many_requests(self.retry_after)
        if self.status == 500:
            return internal("injected failure (fault injection)")
        return ApiError(self.status, "InternalError", f"injected failure with status {self.status}")


@dataclass
class Latency:
    seconds: float
    verb: str = "*"
    resource: str = "*"
    rate: float = 1.0  # probability that a matching request is slowed
    agent: str | tuple[str, ...] | None = None  # as for Fault
    hits: int = 0

    def matches(self, verb: str, resource: str, agent: str | None) -> bool:
        return (
            self.verb in ("*", verb)
            and self.resource in ("*", resource, resource.split("/")[0])
            and _agent_matches(self.agent, agent)
        )


@dataclass
class RequestCounters:
    """Requests served, by (verb, resource); `writes` counts the mutating verbs only. `by_agent` keys on the
    client's User-Agent product (`kopf`, `kubectl`, `localcluster-controllers`, ...) as well, so a benchmark
    can count one client's writes while controllers and the kubelet write too."""

    requests: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    writes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    by_agent: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    errors: collections.Counter[int] = field(default_factory=collections.Counter)
    # Requests by authenticated user name, and the RBAC denials by (user, verb, resource).
    by_user: collections.Counter[str] = field(default_factory=collections.Counter)
    forbidden: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)

    def record(self, verb: str, resource: str, agent: str = "") -> None:
        self.requests[(verb, resource)] += 1
        self.by_agent[(agent, verb, resource)] += 1
        if verb in WRITE_VERBS:
            self.writes[(verb, resource)] += 1

    def total_requests(self, resource: str | None = None, agent: str | None = None) -> int:
        return sum(
            n
            for (who, _, res), n in self.by_agent.items()
            if (resource is None or res.split("/")[0] == resource) and (agent is None or who == agent)
        )

    def total_writes(self, resource: str | None = None, agent: str | None = None) -> int:
        return sum(
            n
            for (who, verb, res), n in self.by_agent.items()
            if verb in WRITE_VERBS
            and (resource is None or res.split("/")[0] == resource)
            and (agent is None or who == agent)
        )

    def reset(self) -> None:
        self.requests.clear()
        self.writes.clear()
        self.by_agent.clear()
        self.errors.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {
            "requests": {f"{v} {r}": n for (v, r), n in sorted(self.requests.items())},
            "writes": {f"{v} {r}": n for (v, r), n in sorted(self.writes.items())},
            "by_agent": {f"{a} {v} {r}": n for (a, v, r), n in sorted(self.by_agent.items())},
        }


class FaultInjector:
    def __init__(self, seed: int = 0) -> None:
        self.faults: list[Fault] = []
        self.latencies: list[Latency] = []
        self._random = random.Random(seed)

    def check(
        self, verb: str, resource: str, group: str, namespace: str | None, name: str, agent: str | None = None
    ) -> None:
        for fault in self.faults:
            if fault.matches(verb, resource, group, namespace, agent) and self._random.random() < fault.rate:
                fault.hits += 1
                raise fault.error(group, resource, name)

    def delay(self, verb: str, resource: str, agent: str | None = None) -> float:
        total = 0.0
        for lat in self.latencies:
            if lat.matches(verb, resource, agent) and (lat.rate >= 1 or self._random.random() < lat.rate):
                lat.hits += 1
                total += lat.seconds
        return total
