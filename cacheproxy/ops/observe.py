"""One observation per request, at the end of the pipeline: request metrics and the access line.

Whatever answered a request (a hit, a fill, a service endpoint, a refusal at the door, a CONNECT
tunnel when it closes), the pipeline reports it here once; nothing else writes the request
counters or the access log.
"""

from __future__ import annotations

from dataclasses import dataclass

from .logging import AccessRecord, log_access
from .metrics import Metrics


@dataclass
class Observation(AccessRecord):
    # requests_total{result}: the lower-cased X-Cache value, denied, error or tunnel;
    # None for the proxy's own endpoints, which are not proxied requests.
    result: str | None = "error"
    reported: bool = False  # observed already (a CONNECT reports itself when its tunnel ends)


class Observer:
    def __init__(self, metrics: Metrics) -> None:
        self._requests = metrics.requests
        self._denied = metrics.denied
        self._ratelimited = metrics.ratelimited
        self._by_result = {name: metrics.requests.labels(name) for name in ("hit", "miss", "error", "denied")}

    def __call__(self, observation: Observation) -> None:
        result = observation.result
        if result is not None:
            counter = self._by_result.get(result)
            if counter is None:
                counter = self._by_result[result] = self._requests.labels(result)
            counter.inc()
        if result == "denied":
            self._denied.labels(observation.error).inc()
        if observation.error == "rate_limited":
            self._ratelimited.inc()
        log_access(observation)
