"""CONNECT (SPEC section 5): a byte tunnel to the origin, or TLS interception.

:class:`~.fastpath.HitProtocol` sees every request head first and gives a CONNECT to
:func:`serve_connect` together with the connection. The checks are those of any proxied request
(client network, upstream host rules) plus ``rules.connect_ports``; a refusal is answered and the
connection closed. Then either

- a **tunnel**: a TCP connection to the origin (SSRF guard and parent proxy as for fetches),
  ``200 Connection established``, and bytes both ways until either side closes or nothing moves
  for ``upstream.tunnel_idle_timeout``; or
- **interception** (``tls_intercept.enabled`` and the host not in ``bypass_hosts``): ``200``, a
  TLS handshake with a certificate for the host signed by the local CA, and a new
  :class:`HitProtocol` on the decrypted stream whose origin-form requests mean
  ``https://host[:port]/path``, served through the cache like any other.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from ..errors import BadRequest, Denied, ProxyError, raw_error_response
from ..ops.logging import AccessRecord, log_access
from ..upstream.tunnel import authority_of

if TYPE_CHECKING:
    from .fastpath import FastPath

log = logging.getLogger(__name__)

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
HANDSHAKE_TIMEOUT = 30.0


def parse_connect(head: bytes) -> tuple[str, int, dict[str, str]]:
    """(host, port, headers) of a CONNECT request head; BadRequest when it is not one.

    The Host header is optional (urllib sends none, pip no header at all): the target names the
    origin.
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "CONNECT" or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(f"not a CONNECT request line: {lines[0][:200]!r}")
    target = parts[1]
    host, sep, port_text = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    valid_host = host.isascii() and host.isprintable() and "/" not in host and "@" not in host
    if not sep or not host or not valid_host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadRequest(f"CONNECT needs host:port, got {target[:200]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return host.lower(), int(port_text), headers


def origin_of(host: str, port: int) -> str:
    """The URL prefix of requests inside an intercepted connection (default port left out)."""
    name = f"[{host}]" if ":" in host else host
    return f"https://{name}" if port == 443 else f"https://{name}:{port}"


async def serve_connect(
    fast: FastPath,
    transport: asyncio.Transport,
    head: bytes,
    early: bytes,
    peer: str,
    fallback: Callable[[], asyncio.Protocol],
) -> None:
    """Answer one CONNECT on ``transport`` (reading paused); ``early``: bytes that followed it."""
    state = fast.state
    started = time.monotonic()
    client, target = peer, head.split(b" ", 2)[1].decode("latin-1", "replace") if b" " in head else "?"
    try:
        host, port, headers = parse_connect(head)
        target = authority_of(host, port)
        client = state.access.client_from(peer, headers.get("x-forwarded-for", ""))
        state.access.check_client(client)
        if port not in state.config.rules.connect_ports:
            ports = ", ".join(map(str, state.config.rules.connect_ports)) or "none"
            raise Denied(f"CONNECT to port {port} is not allowed (rules.connect_ports: {ports})", code="port_denied")
        state.access.check_host(host)
        if fast.authority is not None and not _bypassed(host, state.config.tls_intercept.bypass_hosts):
            record = AccessRecord(client, "CONNECT", target, 200, 0, "INTERCEPT", 0.0)
            await _intercept(fast, transport, host, port, early, fallback, record)
        else:
            record = AccessRecord(client, "CONNECT", target, 200, 0, "TUNNEL", 0.0)
            await Tunnel(fast, transport, record, started).open(host, port, early)
    except ProxyError as exc:
        if isinstance(exc, Denied):
            state.metrics.denied.labels(exc.code).inc()
            state.metrics.requests.labels("denied").inc()
        else:
            state.metrics.requests.labels("error").inc()
        if not transport.is_closing():
            transport.write(raw_error_response(exc))
            transport.close()
        elapsed = time.monotonic() - started
        log_access(AccessRecord(client, "CONNECT", target, exc.status, 0, "", elapsed, exc.code))
    except Exception:  # a bug: log it, and do not leave the client waiting
        log.exception("CONNECT %s from %s failed", target, client)
        transport.abort()


def _bypassed(host: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(host, p.lower()) for p in patterns)


async def _intercept(
    fast: FastPath,
    transport: asyncio.Transport,
    host: str,
    port: int,
    early: bytes,
    fallback: Callable[[], asyncio.Protocol],
    record: AccessRecord,
) -> None:
    from .fastpath import HitProtocol  # the two modules use each other

    assert fast.authority is not None
    started = time.monotonic()
    if early:  # a TLS ClientHello sent before our answer: clients wait for the 200 first
        raise BadRequest("data after CONNECT before the 200 answer: wait for the answer before the TLS handshake")
    context = fast.authority.context_for(host)
    origin = origin_of(host, port)
    protocol = HitProtocol(fast, fallback, origin=origin)
    transport.write(ESTABLISHED)
    loop = asyncio.get_running_loop()
    try:
        tls = await loop.start_tls(
            transport, protocol, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
        )
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
        transport.abort()
        log.info("TLS handshake with %s for %s failed: %s", record.client, record.target, exc)
        record.error, record.status = "tls_handshake_failed", 200
        record.seconds = time.monotonic() - started
        log_access(record)
        return
    assert isinstance(tls, asyncio.Transport)
    fast.state.intercepted[tls] = origin
    protocol.connection_made(tls)
    record.seconds = time.monotonic() - started
    log_access(record)


class _End(asyncio.Protocol):
    """One side of a tunnel: what it reads goes to the other side's transport."""

    def __init__(self, tunnel: Tunnel, to_client: bool) -> None:
        self.tunnel = tunnel
        self.to_client = to_client  # bytes read here are written to the client
        self.transport: asyncio.Transport | None = None
        self.peer: _End | None = None
        self.eof = False
        self._early: list[bytes] = []  # read before the other side was ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, data: bytes) -> None:
        """Write ``data`` to this side (or keep it until this side is connected)."""
        if self.transport is None:
            self._early.append(data)
        else:
            self.transport.write(data)

    def flush_early(self) -> None:
        for data in self._early:
            self.send(data)
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.tunnel.moved(len(data), self.to_client)
        self.peer.send(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.eof or not peer.transport.can_write_eof():
            self.tunnel.close()
            return False
        peer.transport.write_eof()  # half-close: the other way may still carry bytes
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Tunnel:
    """Client and origin connections joined, with an idle timeout and one access log line."""

    def __init__(self, fast: FastPath, client: asyncio.Transport, record: AccessRecord, started: float) -> None:
        self._fast = fast
        self._record = record
        self._started = started
        self._idle_timeout = fast.state.config.upstream.tunnel_idle_timeout
        self.client = _End(self, to_client=False)
        self.origin = _End(self, to_client=True)
        self.client.peer, self.origin.peer = self.origin, self.client
        self._client_transport = client
        self._active = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._bytes_metric = fast.state.metrics.response_bytes.labels("upstream")

    async def open(self, host: str, port: int, early: bytes) -> None:
        """Connect to the origin, answer 200 and start moving bytes; ProxyError when it cannot."""
        state = self._fast.state
        await state.upstream.open_tunnel(host, port, lambda: self.origin)
        state.metrics.upstream_requests.labels("tunnel", "ok").inc()
        state.metrics.requests.labels("tunnel").inc()
        client = self._client_transport
        if client.is_closing():  # the client left while we connected
            self.close()
            return
        client.write(ESTABLISHED)
        client.set_protocol(self.client)
        self.client.connection_made(client)
        if early:
            self.client.data_received(early)
        self.origin.flush_early()
        client.resume_reading()
        self._fast.tunnels.add(self)
        self._arm()

    def moved(self, n: int, to_client: bool) -> None:
        self._active = time.monotonic()
        if to_client:
            self._record.bytes += n
            self._bytes_metric.inc(n)

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
        for end in (self.client, self.origin):
            if end.transport is not None:
                end.transport.close()  # sends what is still buffered, then closes
        self._fast.tunnels.discard(self)
        self._record.seconds = time.monotonic() - self._started
        log_access(self._record)

    def abort(self) -> None:
        for end in (self.client, self.origin):
            if end.transport is not None:
                end.transport.abort()
        self.close()
