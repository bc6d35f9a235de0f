"""What can go wrong on a proxied request, and how it is answered (SPEC section 6).

Every error cacheproxy makes itself is a :class:`ProxyError`; :func:`error_response` is the one
place that turns it into a status, an ``X-Cacheproxy-Error`` code and a one-line reason.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web

ERROR_HEADER = "X-Cacheproxy-Error"
VIA = "1.1 cacheproxy"
SERVER = "cacheproxy"  # on answers cacheproxy makes itself (hits, errors); never a version


class ProxyError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, reason: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class BadUrl(BadRequest):
    code = "bad_url"


class UnsupportedScheme(BadRequest):
    code = "unsupported_scheme"


class HeadTooLarge(BadRequest):
    """A request line, header field or header count over the limits (431, code ``bad_request``)."""

    status = 431


class HeadTimeout(ProxyError):
    """The request head did not arrive within ``limits.head_timeout``."""

    status = 408
    code = "head_timeout"


class PreconditionFailed(ProxyError):
    """The client's expected checksum (``X-Checksum-*``, ``Integrity``) is not the body's."""

    status = 412
    code = "checksum_mismatch"


class Denied(ProxyError):
    """403; ``code`` is one of client_denied, host_denied, suffix_denied, private_upstream, port_denied."""

    status = 403
    code = "denied"


class NotFound(ProxyError):
    """No such endpoint of the proxy's own (``/_cacheproxy/...``)."""

    status = 404
    code = "not_found"


class Unauthorized(ProxyError):
    """An admin call without a token (401; a wrong token is :class:`Denied`, 403)."""

    status = 401
    code = "unauthorized"

    def __init__(self, reason: str) -> None:
        super().__init__(reason, headers={"WWW-Authenticate": 'Bearer realm="cacheproxy"'})


class Conflict(ProxyError):
    status = 409
    code = "conflict"


class TooLarge(ProxyError):
    status = 413
    code = "too_large"


class Unavailable(ProxyError):
    status = 503
    code = "unavailable"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"


class LoopDetected(ProxyError):
    """The request came back through this proxy (its own ``Via`` seen again)."""

    status = 508
    code = "loop_detected"


class RateLimited(ProxyError):
    status = 429
    code = "rate_limited"


class Overloaded(ProxyError):
    """More connections than ``limits.max_connections``: 503 and close."""

    status = 503
    code = "too_many_connections"

    def __init__(self, reason: str) -> None:
        super().__init__(reason, headers={"Retry-After": "1"})


class UpstreamFailed(ProxyError):
    """No usable response after all retries (connect/TLS error, truncation before the first byte)."""

    status = 502
    code = "upstream_failed"


class UpstreamTimeout(UpstreamFailed):
    status = 504
    code = "upstream_timeout"


class TransferAborted(Exception):
    """Bytes already reached the client and the transfer cannot be completed."""


def error_response(request: web.BaseRequest, exc: ProxyError, *, as_json: bool = False) -> web.Response:
    """``exc`` as an answer: plain text, or JSON when the client accepts it (or ``as_json``)."""
    headers = {ERROR_HEADER: exc.code, "Via": VIA, "Server": SERVER, **exc.headers}
    if as_json or "application/json" in request.headers.get("Accept", ""):
        body = json.dumps({"error": exc.code, "status": exc.status, "reason": exc.reason}) + "\n"
        return web.Response(status=exc.status, text=body, content_type="application/json", headers=headers)
    return web.Response(status=exc.status, text=_plain(exc), headers=headers)


def _plain(exc: ProxyError) -> str:
    reason = " ".join(exc.reason.split())  # one line, whatever the cause said
    return f"{exc.code}: {reason}\n"


def raw_error_response(exc: ProxyError) -> bytes:
    """The same answer as :func:`error_response`, as bytes for a connection aiohttp does not
    serve (a refused CONNECT); the connection closes after it."""
    body = _plain(exc).encode()
    headers = {
        ERROR_HEADER: exc.code,
        "Via": VIA,
        "Server": SERVER,
        **exc.headers,
        "Content-Type": "text/plain; charset=utf-8",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    lines = [f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
