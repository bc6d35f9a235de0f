"""HTTP(S) origins: one shared client session, redirects, retries, mirrors and resume."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from .. import __version__
from ..config import UpstreamConfig
from ..errors import Denied, MethodNotAllowed, ProxyError, UpstreamFailed, UpstreamTimeout
from ..guard.access import AccessRules
from ..guard.ssrf import GuardedResolver, PrivateUpstreamError, SsrfGuard
from ..ops.metrics import Metrics
from . import tunnel
from .ftp import FtpResponse, FtpUpstream
from .retry import RetryBudget

log = logging.getLogger(__name__)

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
RETRY_STATUSES = frozenset({429}) | frozenset(range(500, 600))
READ_BUFSIZE = 1 << 18
BODY_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError)
USER_AGENT = f"cacheproxy/{__version__}"


@dataclass
class UpstreamResponse:
    """A response from the origin after redirects; the caller reads the body and releases it."""

    raw: aiohttp.ClientResponse
    url: URL  # the final URL
    request_time: float = 0.0  # wall clock when the request that got this response went out

    @property
    def status(self) -> int:
        return self.raw.status

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.raw.headers

    @property
    def content_length(self) -> int | None:
        value = self.raw.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def request_headers(self) -> Mapping[str, str]:
        return self.raw.request_info.headers

    async def read_chunk(self) -> bytes:
        """The next bytes of the body (b"" at its clean end); raise on a broken transfer."""
        return await self.raw.content.readany()

    async def read_body(self, limit: int) -> bytes:
        """The body, or its first ``limit + 1`` bytes when it is longer."""
        return await self.raw.content.read(limit + 1)

    def detach_socket(self) -> tuple[bytes, int | None] | None:
        """Take the rest of a plain-TCP body of known length out of aiohttp's hands.

        Returns the body bytes aiohttp already holds and a duplicate of the connection's socket,
        with aiohttp no longer reading from it, so the rest can be spliced from the socket into a
        file without passing through Python. The connection cannot be reused afterwards: close
        the response when done. The socket is None when aiohttp still holds bytes it has read
        (or the whole body arrived while draining): the caller keeps reading through aiohttp.
        None when this is not possible (TLS, chunked, unknown length, the body is in already).
        """
        conn = self.raw.connection
        protocol = conn.protocol if conn is not None else None
        if protocol is None or self.content_length is None:
            return None
        if "chunked" in self.raw.headers.get("Transfer-Encoding", "").lower():
            return None
        transport = protocol.transport
        if transport is None or transport.is_closing() or transport.get_extra_info("sslcontext") is not None:
            return None
        sock = transport.get_extra_info("socket")
        content = self.raw.content
        if sock is None or content.exception() is not None or content.is_eof():
            return None
        # Drain until nothing is buffered. A read can make aiohttp resume a paused parser, which
        # feeds bytes it held (even the rest of the body, which releases the connection) back
        # into the stream, so read until a read comes back empty.
        pieces: list[bytes] = []
        try:
            while piece := content.read_nowait():
                pieces.append(piece)
        except RuntimeError:  # someone is waiting on the stream
            if not pieces:
                return None
        held = b"".join(pieces)
        if content.is_eof() or self.raw.connection is None or transport.is_closing():
            return held, None
        protocol.pause_reading()  # also stops aiohttp's read timeout: the splicer has its own
        return held, os.dup(sock.fileno())

    def release(self) -> None:
        self.raw.release()

    def close(self) -> None:
        self.raw.close()


Response = UpstreamResponse | FtpResponse


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def map_client_error(exc: BaseException) -> ProxyError:
    """A failed attempt as the error the client will see if it is the last one."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, PrivateUpstreamError):
        return Denied(str(exc.os_error), code="private_upstream")
    if isinstance(exc, PrivateUpstreamError):
        return Denied(str(exc), code="private_upstream")
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"upstream timed out: {describe(exc)}")
    return UpstreamFailed(f"upstream failed: {describe(exc)}")


class HttpUpstream:
    def __init__(self, config: UpstreamConfig, access: AccessRules, guard: SsrfGuard, metrics: Metrics) -> None:
        self.config = config
        self._access = access
        self._guard = self.guard = guard
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._once: aiohttp.ClientSession | None = None  # requests with a body
        self._resolver: GuardedResolver | None = None
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        self._ftp = FtpUpstream(config, guard)
        if config.parent_proxy:
            proxy = URL(config.parent_proxy)
            if proxy.user is not None:
                self._proxy_auth = aiohttp.BasicAuth(proxy.user, proxy.password or "")
            self._proxy = proxy.with_user(None)
            guard.exempt_hosts.add((proxy.host or "").lower())

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.config.ca_bundle is not None:
            context.load_verify_locations(cafile=str(self.config.ca_bundle))
        return context

    async def start(self) -> None:
        self._resolver = GuardedResolver(self._guard)
        self._session = self._new_session(force_close=False)
        # A request with a body (a forwarded PUT or POST) is sent once and never retried, so it
        # never goes out on a pooled keep-alive connection the origin may be closing just then
        # ("Can not write request body"): it gets a connection of its own.
        self._once = self._new_session(force_close=True)

    def _new_session(self, *, force_close: bool) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            limit=0,
            ssl=self.ssl_context(),
            enable_cleanup_closed=False,
            force_close=force_close,
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.connect_timeout,
            sock_connect=self.config.connect_timeout,
            sock_read=self.config.read_timeout,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,  # bytes are stored and served exactly as the origin sent them
            trust_env=False,
            read_bufsize=READ_BUFSIZE,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        for session in (self._session, self._once):
            if session is not None:
                await session.close()

    def new_budget(self) -> RetryBudget:
        return RetryBudget(self.config.retries, self.config.retry_backoff, self._metrics.upstream_retries.inc)

    async def _request_once(self, method: str, url: URL, headers: Mapping[str, str], data: object = None) -> Response:
        assert self._session is not None and self._once is not None and self._resolver is not None
        session = self._session if data is None else self._once
        for _ in range(MAX_REDIRECTS + 1):
            self._access.check_url(url)
            if url.scheme == "ftp":  # directly: an HTTP parent proxy is not asked for ftp:// (see README)
                if method not in ("GET", "HEAD"):
                    raise MethodNotAllowed(f"{method} is not possible for ftp:// URLs", headers={"Allow": "GET, HEAD"})
                return await self._ftp.open(method, url, headers, self._resolver)
            self._guard.check_literal(url.host or "")
            if self._proxy is not None and self._resolver is not None:
                await self._guard.check_name(self._resolver, url.host or "", url.port or 0)
            sent = time.time()
            raw = await session.request(
                method,
                url,
                headers=headers,
                allow_redirects=False,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
                data=data,
            )
            location = raw.headers.get("Location")
            if raw.status not in REDIRECTS or not location:
                return UpstreamResponse(raw, url, sent)
            raw.release()
            url = url.join(URL(location, encoded=True))
            if raw.status == 303 and method != "HEAD":
                method = "GET"
        raise UpstreamFailed(f"more than {MAX_REDIRECTS} redirects")

    async def open(
        self,
        candidates: Sequence[URL],
        headers: Mapping[str, str],
        budget: RetryBudget,
        method: str = "GET",
        data: object = None,
    ) -> Response:
        """The first usable response, trying mirrors in order and retrying with backoff.

        A 5xx or 429 still returned after the budget is spent is given back (the origin's own
        error passes through); a connect error or timeout becomes UpstreamFailed/UpstreamTimeout.
        """
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        if data is not None:
            candidates = candidates[:1]  # a request body can be sent once
        while True:
            last: ProxyError | None = None
            for i, url in enumerate(candidates):
                try:
                    response = await self._request_once(method, url, headers, data)
                except Denied:
                    raise
                except (TimeoutError, aiohttp.ClientError, OSError, UpstreamFailed) as exc:
                    last = map_client_error(exc)
                    if isinstance(last, Denied):
                        raise last from None
                    self._metrics.upstream_requests.labels(url.scheme, "error").inc()
                    log.info("upstream %s %s failed: %s", method, url, last.reason)
                    continue
                outcome = "ok" if response.status < 400 else f"{response.status // 100}xx"
                self._metrics.upstream_requests.labels(url.scheme, outcome).inc()
                if response.status not in RETRY_STATUSES:
                    return response
                if budget.left == 0 and i == len(candidates) - 1:
                    return response
                log.info("upstream %s %s answered %d", method, url, response.status)
                last = UpstreamFailed(f"upstream answered {response.status}")
                response.release()
            assert last is not None
            if not await budget.spend():
                raise last

    async def open_tunnel(self, host: str, port: int, factory: tunnel.ProtocolFactory) -> asyncio.Transport:
        """A TCP connection to ``host:port`` for a CONNECT tunnel; raise a ProxyError on failure."""
        assert self._resolver is not None
        auth = (self._proxy_auth.login, self._proxy_auth.password) if self._proxy_auth is not None else None
        try:
            self._guard.check_literal(host)
            if self._proxy is not None:
                await self._guard.check_name(self._resolver, host, port)
            return await tunnel.connect(
                host,
                port,
                factory,
                resolver=self._resolver,
                connect_timeout=self.config.connect_timeout,
                parent=self._proxy,
                parent_auth=auth,
            )
        except (OSError, TimeoutError) as exc:
            self._metrics.upstream_requests.labels("tunnel", "error").inc()
            raise map_client_error(exc) from None

    async def resume(self, url: URL, offset: int, validator: str | None, headers: Mapping[str, str]) -> Response | None:
        """The rest of a body from ``offset``, or None when the origin would send something else."""
        if validator is None:
            return None
        ranged = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        ranged.update({"Range": f"bytes={offset}-", "If-Range": validator})
        try:
            response = await self._request_once("GET", url, ranged)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._metrics.upstream_requests.labels(url.scheme, "error").inc()
            log.info("resume of %s at %d failed: %s", url, offset, describe(exc))
            raise
        content_range = response.headers.get("Content-Range", "")
        if response.status == 206 and content_range.startswith(f"bytes {offset}-"):
            self._metrics.upstream_requests.labels(url.scheme, "ok").inc()
            return response
        response.release()
        return None
