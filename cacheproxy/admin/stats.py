"""The figures operators see (the stats call and the status page), and their last hour.

The figures are this process's (with ``workers`` > 1 each worker counts what it served); the
store's usage and objects are the instance's.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass

from ..state import AppState

SAMPLE_EVERY = 60.0  # seconds between points of the charts
SAMPLES = 61  # one hour of points, and the one before it


@dataclass
class Sample:
    time: float
    hits: float  # requests answered from the cache (HIT, STALE, REVALIDATED)
    misses: float  # requests that went to the origin (MISS, BYPASS)
    cache_bytes: float
    upstream_bytes: float


CACHED = ("hit", "stale", "revalidated")
FETCHED = ("miss", "bypass")


class Stats:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.started = time.time()
        self.history: collections.deque[Sample] = collections.deque(maxlen=SAMPLES)
        self.history.append(Sample(self.started, 0, 0, 0, 0))  # the charts count from the start

    def sample(self) -> None:
        """A point of the charts (every :data:`SAMPLE_EVERY` seconds)."""
        self.history.append(self._now())

    def _now(self) -> Sample:
        requests = self._requests()
        metrics = self.state.metrics
        return Sample(
            time.time(),
            sum(requests.get(r, 0) for r in CACHED),
            sum(requests.get(r, 0) for r in FETCHED),
            metrics.response_bytes.labels("cache")._value.get(),
            metrics.response_bytes.labels("upstream")._value.get(),
        )

    def _requests(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for metric in self.state.metrics.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    found[sample.labels["result"]] = sample.value
        return found

    def last_hour(self) -> list[dict[str, float]]:
        """Per minute: requests from the cache and from the origin, and the bytes of each."""
        points = [*self.history, self._now()]
        out = []
        for before, after in itertools.pairwise(points):
            out.append(
                {
                    "time": after.time,
                    "hits": after.hits - before.hits,
                    "misses": after.misses - before.misses,
                    "cache_bytes": after.cache_bytes - before.cache_bytes,
                    "upstream_bytes": after.upstream_bytes - before.upstream_bytes,
                }
            )
        return out[-(SAMPLES - 1) :]

    async def snapshot(self) -> dict[str, object]:
        state = self.state
        cache = state.cache
        config = state.config.cache
        requests = self._requests()
        hits = sum(requests.get(r, 0) for r in CACHED)
        fetched = sum(requests.get(r, 0) for r in FETCHED)
        total, free = state.store.disk_usage()
        keeper = cache.housekeeper
        by_size = [m for m in [await cache.stored(k) for k in await cache.index.largest(10)] if m is not None]
        popular = [(cache.index.get(k), n) for k, n in keeper.requested.most_common(20)]
        return {
            "instance": cache.alerts.instance,
            "uptime_seconds": round(time.time() - self.started, 1),
            "requests": requests,
            "hit_ratio": round(hits / (hits + fetched), 4) if hits + fetched else None,
            "bytes": {
                "cache": state.metrics.response_bytes.labels("cache")._value.get(),
                "upstream": state.metrics.response_bytes.labels("upstream")._value.get(),
            },
            "store": {
                "dir": str(state.store.tmp_dir.parent),
                "objects": len(cache.index),
                "bytes": cache.index.total_size,
                "max_size": keeper.capacity(),
                "high_watermark": config.high_watermark,
                "low_watermark": config.low_watermark,
                "disk_total": total,
                "disk_free": free,
            },
            "fills": [
                {
                    "url": fill.url,
                    "written": fill.written,
                    "size": fill.size,
                    "seconds": round(time.time() - fill.started, 1),
                }
                for fill in list(cache.fills.values())
            ],
            "obs": (await cache.readiness()).get("obs"),
            "recent_failures": [vars(f) for f in list(cache.alerts.recent_failures)[-20:]][::-1],
            "recent_alerts": [a.payload() | {"channels": a.channels} for a in list(cache.alerts.recent_alerts)[-20:]][
                ::-1
            ],
            "largest": [{"url": m.url, "size": m.size} for m in by_size],
            "most_requested": [{"url": m.url, "hits": n, "size": m.size} for m, n in popular if m is not None][:10],
            "last_hour": self.last_hour(),
        }
