"""Per-client limits (``limits.*``): a token bucket of requests and a cap on requests in flight.

The client is the address the front door settled on (PROXY protocol header, a trusted proxy's
``X-Forwarded-For``, or the peer), never the gateway's. Beyond either limit the answer is
``429 rate_limited`` with ``Retry-After``. With ``workers`` > 1 each worker keeps its own
counts (the kernel spreads a client's connections over them), so the limits hold per worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import LimitsConfig
from ..errors import RateLimited

PRUNE_EVERY = 10_000  # buckets created between sweeps of idle, full ones


class _Bucket:
    __slots__ = ("in_flight", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.in_flight = 0


class ClientLimits:
    def __init__(self, config: LimitsConfig) -> None:
        self._rate = config.per_client_rps
        self._burst = float(config.per_client_burst)
        self._concurrency = config.per_client_concurrency
        self._buckets: dict[str, _Bucket] = {}
        self._created = 0

    def _bucket(self, client: str, now: float) -> _Bucket:
        bucket = self._buckets.get(client)
        if bucket is None:
            self._created += 1
            if self._created % PRUNE_EVERY == 0:
                self._prune(now)
            bucket = self._buckets[client] = _Bucket(self._burst, now)
            return bucket
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        return bucket

    def _prune(self, now: float) -> None:
        """Forget clients whose bucket would be full again and who have nothing in flight."""
        refill = self._burst / self._rate if self._rate > 0 else math.inf
        self._buckets = {c: b for c, b in self._buckets.items() if b.in_flight or now - b.stamp < refill}

    def take(self, client: str) -> None:
        """Spend one request token of ``client``; RateLimited when none is left."""
        now = time.monotonic()
        bucket = self._bucket(client, now)
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / self._rate if self._rate > 0 else 60.0
            raise RateLimited(
                f"client {client} is over limits.per_client_rps ({self._rate:g}/s, burst {self._burst:g})",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        bucket.tokens -= 1.0

    def at_capacity(self, client: str) -> bool:
        """Whether ``client`` has all its concurrent request slots taken."""
        bucket = self._buckets.get(client)
        return bucket is not None and bucket.in_flight >= self._concurrency

    @contextmanager
    def in_flight(self, client: str) -> Iterator[None]:
        """Hold one of ``client``'s concurrent request slots; RateLimited when all are taken."""
        bucket = self._bucket(client, time.monotonic())
        if bucket.in_flight >= self._concurrency:
            raise RateLimited(
                f"client {client} has {bucket.in_flight} requests running "
                f"(limits.per_client_concurrency: {self._concurrency})",
                headers={"Retry-After": "1"},
            )
        bucket.in_flight += 1
        try:
            yield
        finally:
            bucket.in_flight -= 1

    @contextmanager
    def admit(self, client: str) -> Iterator[None]:
        """A request of ``client``: one token and one slot while it runs."""
        self.take(client)
        with self.in_flight(client):
            yield
