"""The one pipeline every request goes through, whichever part of cacheproxy answers it.

client address (the door's: PROXY header or peer; then a trusted proxy's ``X-Forwarded-For``)
→ client check → route: the proxy's own endpoints, ``CONNECT``, or a proxied request → limits →
answer → one observation (request metrics and the access line, :mod:`..ops.observe`).

A fresh hit is one branch of the answer (its body ready in memory or as an open file), not a
second server; requests inside an intercepted CONNECT come through here too, with their origin.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiohttp import web
from aiohttp.http import HttpVersion10, RawRequestMessage
from yarl import URL

from ..cache.checksums import expected_from
from ..errors import VIA, Denied, LoopDetected, MethodNotAllowed, NotFound, ProxyError, error_response
from ..guard.limits import ClientLimits
from ..ops.observe import Observation, Observer
from ..state import AppState
from . import connect
from .door import FrontDoor
from .respond import ANSWERED, SENT, ObjectGone, Responder, plain_hit
from .target import TargetCache

log = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD"})
# Request headers that ask for more than the plain answer (a part, a condition, a body, a say in
# freshness, credentials that are part of the key).
NOT_PLAIN = frozenset(
    {
        b"range",
        b"if-range",
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"expect",
        b"cache-control",
        b"pragma",
        b"authorization",
        b"via",  # the loop check
        b"x-checksum-sha256",  # an expected checksum: verified on the general path
        b"x-checksum-sha512",
        b"x-checksum-md5",
        b"integrity",
    }
)
Service = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Pipeline:
    """The request handler of every :class:`~.door.FrontDoor`."""

    def __init__(
        self,
        state: AppState,
        services: Mapping[str, Service],
        observe: Observer,
        routes: Sequence[tuple[str, Service]] = (),
    ) -> None:
        self.state = state
        self.services = services  # path -> read-only endpoint (GET, HEAD)
        self.routes = routes  # (path prefix, handler of every method under it), the first match wins
        self.observe = observe
        self.limits = ClientLimits(state.config.limits)
        self.targets = TargetCache(tuple(prefix for prefix, _ in routes))
        self._cache_bytes = state.metrics.response_bytes.labels("cache")
        self.responder = Responder(state.store, state.metrics)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        door = request.protocol
        assert isinstance(door, FrontDoor)
        door.request_started()
        started = time.monotonic()
        raw = request.raw_path
        target = door.origin + raw if door.origin is not None and raw.startswith("/") else raw
        record = Observation(door.client_ip, request.method, target, 0, 0, "", 0.0)
        response: web.StreamResponse | None = None
        try:
            response = await self._route(request, door, record)
            return response
        except ProxyError as exc:
            record.error = exc.code
            record.result = "denied" if isinstance(exc, Denied) else "error"
            response = error_response(request, exc)
            if request.method == "CONNECT":
                response.force_close()  # the bytes after a refused CONNECT are not HTTP
            return response
        except ConnectionError:  # the client went away mid-answer: nothing left to tell it
            record.error = "client_gone"
            response = request.get(ANSWERED)
            return web.Response(status=499)
        finally:
            door.request_finished()
            if not record.reported:  # a CONNECT that took its connection over reported itself
                record.status = response.status if response is not None else 499
                record.bytes = request.get(SENT, 0) or (response.content_length or 0 if response is not None else 0)
                if not record.x_cache and response is not None:
                    record.x_cache = response.headers.get("X-Cache", "")
                record.seconds = time.monotonic() - started
                self.observe(record)

    async def _route(self, request: web.BaseRequest, door: FrontDoor, record: Observation) -> web.StreamResponse:
        state = self.state
        client = state.access.client_from(door.client_ip, request.headers.get("X-Forwarded-For", ""))
        record.client = client
        state.access.check_client(client)
        if request.method == "CONNECT":
            if door.origin is not None:
                raise MethodNotAllowed("CONNECT inside an intercepted CONNECT is not supported")
            self.limits.take(client)
            record.result = "tunnel"
            return await connect.serve(request, door, state, self.limits, record, self.observe)
        found = self.targets.classify(request.raw_path, door.origin)
        if found.url is None:  # the proxy's own endpoints (an object by digest is a hit)
            response = await self._service(request)
            record.result = response.headers["X-Cache"].lower() if "X-Cache" in response.headers else None
            return response
        self.limits.take(client)
        with self.limits.in_flight(client):
            response = await proxy_request(request, state, self.responder, found.url)
        record.result = response.headers.get("X-Cache", "MISS").lower()
        return response

    def answer_now(self, door: FrontDoor, message: RawRequestMessage) -> bool:
        """The pipeline's synchronous branch, for a message the door has just parsed: a plain
        GET/HEAD of a fresh hit whose body is in memory is answered here, in one write, and
        observed like any request. False: the general path (``__call__``) takes the message, and
        answers or refuses it itself, with the same steps."""
        method = message.method
        headers = message.headers
        if method not in READ_METHODS:
            return False
        for name, _ in message.raw_headers:
            if name.lower() in NOT_PLAIN:
                return False
        started = time.monotonic()
        state = self.state
        try:
            client = state.access.client_from(door.client_ip, headers.get("X-Forwarded-For", ""))
            state.access.check_client(client)
            found = self.targets.classify(message.path, door.origin)
            if found.url is None:
                return False
            state.access.check_url(found.url)
            hit = state.cache.fresh(found.url, headers)
            if hit is None or hit.ready is None or self.limits.at_capacity(client):
                return False
            data = plain_hit(hit.meta, hit.ready, method, message.version == HttpVersion10, not message.should_close)
            if data is None:
                return False
            self.limits.take(client)
            state.cache.touch(hit.meta)
        except (ProxyError, FileNotFoundError):
            return False
        transport = door.transport
        if transport is None or transport.is_closing():
            return True  # the client is gone: nothing to answer
        transport.write(data)
        sent = 0 if method == "HEAD" else hit.meta.size
        self._cache_bytes.inc(sent)
        path = message.path
        target = door.origin + path if door.origin is not None and path.startswith("/") else path
        self.observe(Observation(client, method, target, 200, sent, "HIT", time.monotonic() - started, result="hit"))
        return True

    async def _service(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = self.services.get(request.path)
        if handler is None:
            for prefix, route in self.routes:
                if request.path.startswith(prefix):
                    return await route(request)  # it checks methods (and tokens) itself
        if handler is None:
            raise NotFound(f"no such endpoint: {request.path[:200]}")
        if request.method not in READ_METHODS:
            raise MethodNotAllowed(f"{request.method} is not allowed here", headers={"Allow": "GET, HEAD"})
        return await handler(request)


LOOP_HOPS = 2  # our Via this many times in a request: it is going round in circles


async def proxy_request(
    request: web.BaseRequest, state: AppState, responder: Responder, url: URL
) -> web.StreamResponse:
    state.access.check_url(url)
    if "Via" in request.headers and _our_hops(request.headers.getall("Via")) >= LOOP_HOPS:
        raise LoopDetected(
            f"the request already went through cacheproxy {LOOP_HOPS} times: "
            "the proxy is its own origin or parent (check upstream.parent_proxy and the URL)"
        )
    if request.method in READ_METHODS:
        expected = expected_from(request.headers)
        outcome = await state.cache.answer(url, request.method, request.headers, expected)
        try:
            return await responder.send(request, outcome, expected)
        except ObjectGone as gone:
            state.cache.forget(gone.meta)
            outcome = await state.cache.answer(url, request.method, request.headers, expected)
            return await responder.send(request, outcome, expected)
    if not state.config.rules.allow_other_methods:
        raise MethodNotAllowed(
            f"{request.method} is not allowed (only GET and HEAD; see rules.allow_other_methods)",
            headers={"Allow": "GET, HEAD"},
        )
    passthrough = await state.cache.forward(url, request.method, request.headers, request.content)
    return await responder.send_passthrough(request, passthrough)


def _our_hops(values: list[str]) -> int:
    return sum(1 for value in values for hop in value.split(",") if hop.strip() == VIA)
