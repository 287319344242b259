"""Rate limits per API key: a token bucket each (``EMBER_RATE_LIMIT_PER_S``, ``EMBER_RATE_LIMIT_BURST``)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_BUCKETS = 100_000  # keys remembered; the least recently used one is forgotten (and starts full again)


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.burst = per_s, burst
        self._now = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, key: str) -> _Bucket:
        """``key``'s bucket, refilled up to now."""
        now = self._now()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            if len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.per_s)
            bucket.at = now
        return bucket

    def _until(self, bucket: _Bucket) -> float:
        return (1.0 - bucket.tokens) / self.per_s if self.per_s > 0 else math.inf

    def take(self, key: str) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if allowed, else the seconds until one is there."""
        bucket = self._bucket(key)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return self._until(bucket)

    def wait(self, key: str) -> float:
        """The seconds until ``key``'s bucket has a token (0.0: it has one now), spending none."""
        bucket = self._bucket(key)
        return 0.0 if bucket.tokens >= 1.0 else self._until(bucket)
