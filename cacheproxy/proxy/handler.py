"""The entry point of every request: client check, request form, proxying, errors, access log.

It runs as a middleware, ahead of the router: a proxied request never reaches the routes (an
absolute-form ``http://origin/_cacheproxy/...`` is the origin's path, not ours).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from yarl import URL

from ..errors import Denied, MethodNotAllowed, ProxyError, error_response
from ..ops.logging import AccessRecord, log_access
from ..state import STATE, AppState
from .respond import SENT, ObjectGone
from .target import classify

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
READ_METHODS = frozenset({"GET", "HEAD"})


async def proxy_request(request: web.Request, state: AppState, url: URL) -> web.StreamResponse:
    state.access.check_url(url)
    if request.method in READ_METHODS:
        outcome = await state.cache.get(url, request.method, request.headers)
        try:
            return await state.responder.send(request, outcome)
        except ObjectGone as gone:
            state.cache.forget(gone.meta)
            outcome = await state.cache.get(url, request.method, request.headers)
            return await state.responder.send(request, outcome)
    if not state.config.rules.allow_other_methods:
        raise MethodNotAllowed(
            f"{request.method} is not allowed (only GET and HEAD; see rules.allow_other_methods)",
            headers={"Allow": "GET, HEAD"},
        )
    passthrough = await state.cache.forward(url, request.method, request.headers, request.content)
    return await state.responder.send_passthrough(request, passthrough)


@web.middleware
async def entry(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.monotonic()
    transport = request.transport
    origin = state.intercepted.get(transport) if transport is not None and state.intercepted else None
    client = state.access.client_address(request)
    response: web.StreamResponse | None = None
    result: str | None = "error"
    error = ""
    try:
        state.access.check_client(client)
        target = classify(request.raw_path, origin)
        if target.kind == "service":
            result = None
            response = await handler(request)
        else:
            assert target.url is not None
            response = await proxy_request(request, state, target.url)
            result = response.headers.get("X-Cache", "MISS").lower()
        return response
    except ProxyError as exc:
        error = exc.code
        if isinstance(exc, Denied):
            result = "denied"
            state.metrics.denied.labels(exc.code).inc()
        response = error_response(request, exc)
        return response
    except ConnectionError:  # the client went away mid-answer (reset, broken pipe): nothing left to tell it
        error = "client_gone"
        response = None
        return web.Response(status=499)
    finally:
        if result is not None:
            state.metrics.requests.labels(result).inc()
        log_access(
            AccessRecord(
                client=client,
                method=request.method,
                target=origin + request.raw_path if origin and request.raw_path.startswith("/") else request.raw_path,
                status=response.status if response is not None else 499,
                bytes=request.get(SENT, 0) or (response.content_length or 0 if response is not None else 0),
                x_cache=response.headers.get("X-Cache", "") if response is not None else "",
                seconds=time.monotonic() - started,
                error=error,
            )
        )
