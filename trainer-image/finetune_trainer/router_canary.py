"""The adapter router's canary side: weighted sticky picks between the versions of a stable name, the live
per-version figures the operator's rollout reads (`GET /state` "stats"), injected faults for chaos tests, and
the Prometheus text of `GET /metrics`. Standard library only: it runs on the request path."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from finetune_vocabulary.capture import LATENCY_BUCKETS_MS

MAX_FAULTS = 64


class CanaryError(ValueError):
    """A weights or faults entry the router refuses (the message names it)."""


def check_weights(
    document: Any, adapters: Mapping[str, str], routes: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    """The state's `weights` (absent or null: {}): per stable name, integer percents summing to 100 over
    loaded versions, one of them the route (the champion)."""
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise CanaryError("weights must be an object")
    weights: dict[str, dict[str, int]] = {}
    for model, split in document.items():
        if model not in routes:
            raise CanaryError(f"weights.{model}: not among the routes (every weighted name needs a route)")
        if not isinstance(split, Mapping) or not split:
            raise CanaryError(f"weights.{model}: must be an object of versioned name -> percent")
        for version, percent in split.items():
            if version not in adapters:
                raise CanaryError(f"weights.{model}.{version}: not among the adapters")
            if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
                raise CanaryError(f"weights.{model}.{version}: {percent!r} is not an integer percent 0..100")
        if sum(split.values()) != 100:
            raise CanaryError(f"weights.{model}: the percents sum to {sum(split.values())}, not 100")
        if routes[model] not in split:
            raise CanaryError(f"weights.{model}: the route {routes[model]!r} (the champion) must be weighted")
        weights[model] = {str(v): int(p) for v, p in split.items()}
    return weights


def sticky_bucket(key: str) -> int:
    """0..99: the same key always lands in the same bucket (sha256, so every replica agrees)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100


def pick(split: Mapping[str, int], key: str | None, draw: Any = random.random) -> str:
    """The version a request goes to: the sticky key's bucket (or a random one) against the cumulative
    weights in the order of the versioned names sorted."""
    bucket = sticky_bucket(key) if key else draw() * 100
    total = 0
    chosen = ""
    for version in sorted(split):
        if split[version] <= 0:
            continue
        chosen = version
        total += split[version]
        if bucket < total:
            return version
    return chosen


@dataclass(frozen=True)
class Routed:
    """Where one request goes: the body as forwarded, the model it names, the stable name when it is one
    (with its route, the champion), and the versioned name it is sent to."""

    body: bytes
    model: str | None = None
    stable: str | None = None
    version: str | None = None
    champion: str | None = None
    document: dict[str, Any] | None = None

    def to(self, version: str) -> Routed:
        assert self.document is not None
        return replace(self, version=version, body=json.dumps({**self.document, "model": version}).encode())


def route_request(
    body: bytes, routes: Mapping[str, str], canary: Canary | None = None, conversation: str | None = None
) -> Routed:
    """A request routed: a stable name goes to its weighted pick (sticky by the body's `user`, else the
    conversation header), or to its route when it has no weights."""
    try:
        document = json.loads(body) if body else None
    except ValueError:  # not JSON: vLLM answers it
        return Routed(body)
    if not isinstance(document, dict) or not isinstance(model := document.get("model"), str):
        return Routed(body)
    if model not in routes:
        return Routed(body, model, version=model)
    user = document.get("user")
    key = user if isinstance(user, str) and user else conversation
    version = canary.choose(model, routes[model], key) if canary is not None else routes[model]
    routed = Routed(body, model, model, routes[model], routes[model], document)
    return routed.to(version)


def bucket_index(ms: float) -> int:
    for index, bound in enumerate(LATENCY_BUCKETS_MS):
        if ms <= bound:
            return index
    return len(LATENCY_BUCKETS_MS)


class Figures:
    """Requests, errors and a latency histogram of one version (under one lock held by Canary)."""

    __slots__ = ("buckets", "errors", "requests", "sum_seconds")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.sum_seconds = 0.0

    def add(self, seconds: float, error: bool) -> None:
        self.requests += 1
        self.errors += int(error)
        self.buckets[bucket_index(seconds * 1000)] += 1
        self.sum_seconds += seconds


class Canary:
    """The weights in force, the rollout figures per (stable name, version) since the name's weights last
    changed, and the counters since the process started (Prometheus)."""

    def __init__(self) -> None:
        self.weights: dict[str, dict[str, int]] = {}
        self.stats: dict[str, dict[str, Figures]] = {}
        self.codes: dict[tuple[str, str, str], int] = {}  # (model, version, code) -> requests
        self.durations: dict[str, Figures] = {}  # version -> all requests since start
        self.lock = threading.Lock()

    def set_weights(self, weights: Mapping[str, Mapping[str, int]]) -> None:
        """New weights; a stable name whose split changed (to or from absent included) starts from zero."""
        with self.lock:
            for model in set(self.weights) | set(weights):
                if self.weights.get(model) != weights.get(model):
                    self.stats.pop(model, None)
            self.weights = {m: dict(s) for m, s in weights.items()}

    def choose(self, model: str, route: str, key: str | None) -> str:
        split = self.weights.get(model)
        return pick(split, key) if split else route

    def record(
        self, model: str | None, version: str, code: str, seconds: float, error: bool, stable: str | None
    ) -> None:
        """One answer of `version` (to a request naming `model`; `stable` when that is a stable name)."""
        key = (model or "", version, code)
        with self.lock:
            self.codes[key] = self.codes.get(key, 0) + 1
            self.durations.setdefault(version, Figures()).add(seconds, error)
            if stable is not None:
                self.stats.setdefault(stable, {}).setdefault(version, Figures()).add(seconds, error)

    def report(self) -> dict[str, Any]:
        """`GET /state`'s "stats": per versioned name (summed over the stable names that sent to it)."""
        merged: dict[str, dict[str, Any]] = {}
        with self.lock:
            for versions in self.stats.values():
                for version, fig in versions.items():
                    row = merged.setdefault(
                        version, {"requests": 0, "errors": 0, "latencyBuckets": [0] * len(fig.buckets)}
                    )
                    row["requests"] += fig.requests
                    row["errors"] += fig.errors
                    row["latencyBuckets"] = [
                        a + b for a, b in zip(row["latencyBuckets"], fig.buckets, strict=True)
                    ]
        return merged

    def prometheus(self) -> list[str]:
        lines = [
            "# HELP finetune_router_requests_total Answers by model named, version and status code.",
            "# TYPE finetune_router_requests_total counter",
        ]
        with self.lock:
            for (model, version, code), count in sorted(self.codes.items()):
                labels = _labels(model=model, version=version, code=code)
                lines.append(f"finetune_router_requests_total{labels} {count}")
            lines += [
                "# HELP finetune_router_request_duration_seconds Time to the engine's response headers.",
                "# TYPE finetune_router_request_duration_seconds histogram",
            ]
            for version, fig in sorted(self.durations.items()):
                lines += _histogram("finetune_router_request_duration_seconds", version, fig)
        return lines


def _labels(**values: str) -> str:
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in values.items()) + "}"


def _histogram(name: str, version: str, fig: Figures) -> list[str]:
    lines, seen = [], 0
    bounds: Sequence[str] = [f"{b / 1000:g}" for b in LATENCY_BUCKETS_MS] + ["+Inf"]
    for bound, count in zip(bounds, fig.buckets, strict=True):
        seen += count
        lines.append(f"{name}_bucket{_labels(version=version, le=bound)} {seen}")
    lines.append(f"{name}_sum{_labels(version=version)} {fig.sum_seconds:.6f}")
    lines.append(f"{name}_count{_labels(version=version)} {fig.requests}")
    return lines


class Faults:
    """Injected faults (chaos tests): versioned name -> (status, rate); only with --fault-injection."""

    def __init__(self, enabled: bool = False, draw: Any = random.random) -> None:
        self.enabled = enabled
        self.table: dict[str, dict[str, Any]] = {}
        self.draw = draw

    def replace(self, document: Any) -> dict[str, dict[str, Any]]:
        """Check and install a new table (`{}` clears it); CanaryError naming the bad entry."""
        if not isinstance(document, Mapping) or len(document) > MAX_FAULTS:
            raise CanaryError(f"faults must be an object of at most {MAX_FAULTS} versioned names")
        table: dict[str, dict[str, Any]] = {}
        for version, fault in document.items():
            if not isinstance(fault, Mapping):
                raise CanaryError(f"faults.{version}: must be an object {{status, rate}}")
            status, rate = fault.get("status", 500), fault.get("rate", 1.0)
            if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
                raise CanaryError(f"faults.{version}.status: {status!r} is not an HTTP error status 400..599")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise CanaryError(f"faults.{version}.rate: {rate!r} is not a fraction 0..1")
            table[str(version)] = {"status": status, "rate": float(rate)}
        self.table = table
        return dict(table)

    def hit(self, version: str) -> int | None:
        """The status to answer `version`'s request with instead of asking the engine, or None."""
        fault = self.table.get(version)
        if fault is None or self.draw() >= fault["rate"]:
            return None
        return int(fault["status"])
