"""CONNECT (SPEC section 5): a byte tunnel to the origin, or TLS interception.

A CONNECT comes through the pipeline like any request (client address, client check, a rate
token), then :func:`serve` checks ``rules.connect_ports`` and the upstream host rules; a refusal
is an ordinary error answer and the connection closes. Then either

- a **tunnel**: a TCP connection to the origin (SSRF guard and parent proxy as for fetches),
  ``200 Connection established``, and the client connection is taken over by a :class:`Tunnel`
  that moves bytes both ways until either side closes or nothing moves for
  ``upstream.tunnel_idle_timeout``; it holds one of the client's concurrent request slots; or
- **interception** (``tls_intercept.enabled`` and the host not in ``bypass_hosts``): ``200``, a
  TLS handshake with a certificate for the host signed by the local CA, and a new
  :class:`~.door.FrontDoor` on the decrypted stream whose origin-form requests mean
  ``https://host[:port]/path`` and go through the pipeline like any other.

The CONNECT's handler lives as long as the connection it took over, and reports one access line:
for a tunnel when it closes (bytes sent to the client), for interception after the handshake.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from fnmatch import fnmatchcase
from typing import cast

from aiohttp import web

from ..errors import BadRequest, Denied
from ..guard.limits import ClientLimits
from ..ops.observe import Observation, Observer
from ..state import AppState
from ..upstream.tunnel import authority_of
from .door import FrontDoor, TunnelEnd

log = logging.getLogger(__name__)

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
HANDSHAKE_TIMEOUT = 30.0


class TakenOver(web.StreamResponse):
    """The handler's answer once it owned the connection: aiohttp has nothing left to write."""

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def parse_authority(target: str) -> tuple[str, int]:
    """(host, port) of a CONNECT target ``host:port`` / ``[v6]:port``; BadRequest otherwise."""
    host, sep, port_text = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    valid_host = host.isascii() and host.isprintable() and "/" not in host and "@" not in host
    if not sep or not host or not valid_host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadRequest(f"CONNECT needs host:port, got {target[:200]!r}")
    return host.lower(), int(port_text)


def origin_of(host: str, port: int) -> str:
    """The URL prefix of requests inside an intercepted connection (default port left out)."""
    name = f"[{host}]" if ":" in host else host
    return f"https://{name}" if port == 443 else f"https://{name}:{port}"


async def serve(
    request: web.BaseRequest,
    door: FrontDoor,
    state: AppState,
    limits: ClientLimits,
    record: Observation,
    observe: Observer,
) -> web.StreamResponse:
    """Answer one CONNECT; ProxyError for a refusal (the pipeline answers it and closes)."""
    host, port = parse_authority(request.raw_path)
    record.target = authority_of(host, port)
    if port not in state.config.rules.connect_ports:
        ports = ", ".join(map(str, state.config.rules.connect_ports)) or "none"
        raise Denied(f"CONNECT to port {port} is not allowed (rules.connect_ports: {ports})", code="port_denied")
    state.access.check_host(host)
    if state.authority is not None and not _bypassed(host, state.config.tls_intercept.bypass_hosts):
        record.x_cache = "INTERCEPT"
        await _intercept(request, door, state, host, port, record, observe)
    else:
        record.x_cache = "TUNNEL"
        with limits.in_flight(record.client):
            await Tunnel(door, state, record, observe).run(request, host, port)
    return TakenOver()


def _bypassed(host: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(host, p.lower()) for p in patterns)


async def _intercept(
    request: web.BaseRequest,
    door: FrontDoor,
    state: AppState,
    host: str,
    port: int,
    record: Observation,
    observe: Observer,
) -> None:
    assert state.authority is not None
    started = time.monotonic()
    if door.early_bytes():  # a TLS ClientHello sent before our answer: clients wait for the 200 first
        raise BadRequest("data after CONNECT before the 200 answer: wait for the answer before the TLS handshake")
    context = state.authority.context_for(host)
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    inner = door.server.inner(origin_of(host, port), record.client)
    transport.write(ESTABLISHED)
    record.status, record.result = 200, None  # the requests inside are counted, not the CONNECT
    try:
        tls = await asyncio.get_running_loop().start_tls(
            transport, inner, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
        )
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
        transport.abort()
        door.release()
        log.info("TLS handshake with %s for %s failed: %s", record.client, record.target, exc)
        record.error = "tls_handshake_failed"
        _report(record, started, observe)
        return
    tls = cast(asyncio.Transport, tls)  # uvloop transports are not asyncio classes
    inner.connection_made(tls)
    _report(record, started, observe)
    try:
        await inner.closed
    finally:
        tls.close()
        door.release()


def _report(record: Observation, started: float, observe: Observer) -> None:
    record.seconds = time.monotonic() - started
    record.reported = True
    observe(record)


class _OriginEnd(asyncio.Protocol):
    """The origin side of a tunnel."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio classes
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.tunnel.to_client(data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.tunnel.origin_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()

    def pause_writing(self) -> None:
        self.tunnel.pause_client()

    def resume_writing(self) -> None:
        self.tunnel.resume_client()


class Tunnel(TunnelEnd):
    """Client and origin connections joined, with an idle timeout and one access line at the end."""

    def __init__(self, door: FrontDoor, state: AppState, record: Observation, observe: Observer) -> None:
        self._door = door
        self._state = state
        self._record = record
        self._observe = observe
        self._started = time.monotonic()
        self._idle_timeout = state.config.upstream.tunnel_idle_timeout
        self._origin = _OriginEnd(self)
        self._client: asyncio.Transport | None = None
        self._client_eof = False
        self._active = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._bytes_metric = state.metrics.response_bytes.labels("upstream")

    async def run(self, request: web.BaseRequest, host: str, port: int) -> None:
        """Connect to the origin, answer 200, move bytes until the tunnel closes."""
        state = self._state
        await state.upstream.open_tunnel(host, port, lambda: self._origin)
        state.metrics.upstream_requests.labels("tunnel", "ok").inc()
        client = request.transport
        if client is None or client.is_closing():  # the client left while we connected
            self.close()
            return
        self._client = client
        client.write(ESTABLISHED)
        self._record.status = 200
        self._door.take_over(self)
        self._arm()
        try:
            await self.closed
        finally:
            self.abort()  # cancelled (shutdown after the grace period): both sides go now

    # -- bytes --------------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        self._active = time.monotonic()
        if self._origin.transport is not None:
            self._origin.transport.write(data)

    def to_client(self, data: bytes) -> None:
        self._active = time.monotonic()
        self._record.bytes += len(data)
        self._bytes_metric.inc(len(data))
        if self._client is not None:
            self._client.write(data)

    def client_eof(self) -> bool:
        self._client_eof = True
        origin = self._origin.transport
        if origin is None or self._origin.eof or not origin.can_write_eof():
            self.close()
            return False
        origin.write_eof()  # half-close: the other way may still carry bytes
        return True

    def origin_eof(self) -> bool:
        client = self._client
        if client is None or self._client_eof or not client.can_write_eof():
            self.close()
            return False
        client.write_eof()
        return True

    def client_lost(self) -> None:
        self.close()

    # -- flow control: a full buffer on one side stops reading on the other --------------------

    def client_paused(self) -> None:
        if self._origin.transport is not None:
            self._origin.transport.pause_reading()

    def client_resumed(self) -> None:
        if self._origin.transport is not None:
            self._origin.transport.resume_reading()

    def pause_client(self) -> None:
        if self._client is not None:
            self._client.pause_reading()

    def resume_client(self) -> None:
        if self._client is not None:
            self._client.resume_reading()

    # -- the end ------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, self._active + self._idle_timeout - time.monotonic()), self._check_idle
        )

    def _check_idle(self) -> None:
        if self.closed.done():
            return
        if time.monotonic() - self._active >= self._idle_timeout:
            record = self._record
            log.info("tunnel %s of %s idle for %.0fs: closing", record.target, record.client, self._idle_timeout)
            self.close()
            return
        self._arm()

    def close(self) -> None:
        if self.closed.done():
            return
        self.closed.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
        for transport in (self._client, self._origin.transport):
            if transport is not None:
                transport.close()  # sends what is still buffered, then closes
        if self._client is not None:  # the 200 went out: the tunnel reports itself
            _report(self._record, self._started, self._observe)

    def abort(self) -> None:
        if self.closed.done():
            return
        for transport in (self._client, self._origin.transport):
            if transport is not None:
                transport.abort()
        self.close()
