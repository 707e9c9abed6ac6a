"""Token buckets: requests per minute per user, and failed authentications per client IP (so a flood of bad
tokens cannot hammer the API server's TokenReview)."""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_KEYS = 100_000  # buckets kept; the fullest (idle) ones are dropped first when there are more


class RateLimiter:
    """`per_minute` requests per key, burst = the same; 0 = no limit."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.per_minute), now))
        return min(float(self.per_minute), tokens + (now - at) * self.per_minute / 60.0)

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may make a request (0: now), without taking a token."""
        if self.per_minute <= 0:
            return 0.0
        tokens = self._level(key, self.clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) * 60.0 / self.per_minute

    def take(self, key: str) -> float:
        """Take one token: 0 when allowed, else the seconds to wait (nothing taken)."""
        if self.per_minute <= 0:
            return 0.0
        now = self.clock()
        tokens = self._level(key, now)
        if tokens < 1.0:
            return (1.0 - tokens) * 60.0 / self.per_minute
        if len(self._buckets) >= MAX_KEYS and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._level(k, now) >= self.per_minute]
        for key in full or list(self._buckets)[: MAX_KEYS // 10]:
            del self._buckets[key]
