"""Prometheus metrics (SPEC section 7), one registry per app."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = "cacheproxy_"
        self.requests = Counter(p + "requests", "Proxied requests by result", ["result"], registry=r)
        self.response_bytes = Counter(p + "response_bytes", "Body bytes sent to clients", ["source"], registry=r)
        self.upstream_requests = Counter(
            p + "upstream_requests", "Upstream requests by outcome", ["scheme", "outcome"], registry=r
        )
        self.upstream_retries = Counter(p + "upstream_retries", "Upstream attempts repeated", registry=r)
        self.upstream_fetch_seconds = Histogram(
            p + "upstream_fetch_seconds",
            "Time from the first upstream attempt to the end of the body",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.cache_objects = Gauge(p + "cache_objects", "Objects in the store", registry=r)
        self.cache_size_bytes = Gauge(p + "cache_size_bytes", "Bytes in the store", registry=r)
        self.fills_in_progress = Gauge(p + "fills_in_progress", "Upstream fills running", registry=r)
        self.evictions = Counter(p + "evictions", "Objects evicted", registry=r)
        self.checksum_mismatches = Counter(
            p + "checksum_mismatches",
            "Bodies that were not what the request's expected checksum named (where: hit or miss)",
            ["where"],
            registry=r,
        )
        self.digest_hits = Counter(
            p + "digest_hits", "Requests answered with another URL's body named by their expected checksum", registry=r
        )
        self.alerts_sent = Counter(p + "alerts_sent", "Alerts sent", ["channel"], registry=r)
        self.alerts_failed = Counter(
            p + "alerts_failed", "Alerts a channel did not take (after its retries)", ["channel"], registry=r
        )
        self.content_changed = Counter(
            p + "content_changed", "Immutable URLs whose new body differs from the one recorded", registry=r
        )
        self.denied = Counter(p + "denied", "Requests denied by a rule", ["reason"], registry=r)
        self.ratelimited = Counter(p + "ratelimited", "Requests refused by a rate limit", registry=r)
        self.obs_uploads = Counter(p + "obs_uploads", "Uploads to OBS by outcome (ok, error)", ["outcome"], registry=r)
        self.obs_pending_uploads = Gauge(p + "obs_pending_uploads", "Committed objects not in OBS yet", registry=r)
        self.obs_lookups = Counter(
            p + "obs_lookups",
            "OBS lookups on a local miss by result (hit, miss, error, skipped)",
            ["result"],
            registry=r,
        )

    def bind_store(self, objects: Callable[[], float], size: Callable[[], float]) -> None:
        self.cache_objects.set_function(objects)
        self.cache_size_bytes.set_function(size)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
