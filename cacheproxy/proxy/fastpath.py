"""The hit fast path: plain fresh hits answered before aiohttp sees the connection.

Most requests a build farm sends are simple: ``GET`` (or ``HEAD``) of an archive that is cached
and fresh, no Range, no conditional, no Cache-Control. :class:`HitProtocol` is the listening
socket's protocol. It reads a request head, and when :class:`FastPath` can answer it (a fresh,
indexed object whose body it holds in memory, or whose file it has open), writes the response
itself: the same headers as :meth:`Responder.send_hit`, small bodies from memory, larger ones
with sendfile. The first request it cannot answer hands the connection, with every byte read so
far, to aiohttp's protocol, which serves it and the rest of the connection as usual.

An object seen for the first time is answered by aiohttp while its body (small) or an open file
(large) is made ready in the I/O pool for the next request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from aiohttp import web

from ..cache.freshness import is_fresh
from ..errors import ProxyError
from ..ops.logging import AccessRecord, log_access
from ..state import AppState
from ..storage.base import ObjectMeta
from . import connect
from .respond import hit_headers
from .target import classify

log = logging.getLogger(__name__)

MAX_HEAD = 8 << 10  # longer request heads go to aiohttp (which enforces the real limits)
SMALL_BODY = 64 << 10  # bodies up to this size are kept in memory ...
MEMORY_BUDGET = 32 << 20  # ... up to this much in all
OPEN_FILES = 512  # objects kept ready (each holds its body file open, to notice its removal)
KNOWN_TARGETS = 10_000  # request targets remembered with their cache key
KEEPALIVE = 75.0  # seconds an idle connection stays open (as aiohttp)
# Request headers that need the full machinery (conditionals, ranges, revalidation, bodies).
COMPLEX_HEADERS = frozenset(
    {
        b"range",
        b"if-range",
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"cache-control",
        b"pragma",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"x-forwarded-for",
    }
)
HEAD_END = b"\r\n\r\n"
COPY_CHUNK = 1 << 20  # bodies through TLS are read and written in pieces of this size


class Ready:
    """A hit ready to go out: the unchanging part of its headers, its file held open (which also
    tells when another worker removed it), and for a small object the body itself."""

    __slots__ = ("body", "fd", "head", "meta", "signature")

    def __init__(self, meta: ObjectMeta, body: bytes | None, fd: int) -> None:
        self.meta = meta
        self.signature = _signature(meta)
        headers = hit_headers(meta, "HIT")
        for name in ("Date", "Age"):
            del headers[name]
        headers["Content-Length"] = str(meta.size)
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        self.body = body
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _signature(meta: ObjectMeta) -> tuple[int, str, float]:
    return id(meta), meta.file, meta.response_time


class FastPath:
    """Decides whether a request head can be answered here, and keeps what answering needs."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._ready: collections.OrderedDict[str, Ready] = collections.OrderedDict()
        self._memory = 0
        self._warming: dict[str, asyncio.Task[None]] = {}
        self.connections: set[HitProtocol] = set()
        self.tunnels: set[connect.Tunnel] = set()
        self.connects: set[asyncio.Task[None]] = set()  # CONNECTs being answered
        self.authority = state.authority  # TLS interception on
        self._targets: dict[bytes, str | None] = {}  # raw target -> cache key, None: not ours
        self._clients: dict[str, bool] = {}
        self._trusted = bool(state.config.trusted_proxies)
        self._hits = state.metrics.requests.labels("hit")
        self._cache_bytes = state.metrics.response_bytes.labels("cache")
        self._date = ""
        self._date_second = -1

    # -- deciding -----------------------------------------------------------------------------

    def lookup(self, target: bytes, peer: str) -> Ready | asyncio.Future[None] | None:
        """What to send for a simple GET/HEAD of ``target`` from ``peer``; None: not here.

        A future means: the object is a fresh hit, but its body or file is still being made
        ready; ask again when the future is done.
        """
        allowed = self._clients.get(peer)
        if allowed is None:
            allowed = self._client_allowed(peer)
        if not allowed:
            return None
        try:
            key = self._targets[target]
        except KeyError:
            key = self._key_for(target)
        if key is None:
            return None
        cache = self.state.cache
        meta = cache.index.get(key)
        if meta is None:
            # Perhaps another worker stored it: look in the store, as the full path would.
            return None if key in cache.fills else self._warm(key, None)
        if meta.vary or not is_fresh(meta.lifetime, meta.response_time, time.time()):
            return None
        ready = self._ready.get(key)
        if ready is None or ready.signature != _signature(meta):
            if ready is not None:
                self._drop(key)
            return self._warm(key, meta)
        if os.fstat(ready.fd).st_nlink == 0:
            # Evicted or purged by another worker: what we hold is no longer in the cache.
            self._drop(key)
            cache.forget(meta)
            return None
        self._ready.move_to_end(key)
        cache.touch(meta)
        return ready

    def _client_allowed(self, peer: str) -> bool:
        if self._trusted and peer:
            return False  # X-Forwarded-For may name the real client: the full path decides
        try:
            self.state.access.check_client(peer)
            allowed = True
        except ProxyError:
            allowed = False
        if len(self._clients) > KNOWN_TARGETS:
            self._clients.clear()
        self._clients[peer] = allowed
        return allowed

    def _key_for(self, target: bytes) -> str | None:
        key: str | None = None
        try:
            found = classify(target.decode("latin-1"))
            if found.url is not None:
                self.state.access.check_url(found.url)
                key = self.state.cache.key_for(found.url)
        except (ProxyError, ValueError, UnicodeError):
            key = None
        if len(self._targets) > KNOWN_TARGETS:
            self._targets.clear()
        self._targets[target] = key
        return key

    # -- keeping bodies and files ready -------------------------------------------------------

    def _warm(self, key: str, meta: ObjectMeta | None) -> asyncio.Future[None]:
        task = self._warming.get(key)
        if task is None:
            task = self._warming[key] = asyncio.get_running_loop().create_task(self._load(key, meta))
        return task

    async def _load(self, key: str, meta: ObjectMeta | None) -> None:
        """Read a small body or open a larger one; ``meta`` None: first ask the store for it."""
        try:
            if meta is None:
                meta = await self.state.cache.from_store(key)
                if meta is None:
                    return
            fd = await self.state.store.run(os.open, self.state.store.body_path(meta), os.O_RDONLY | os.O_CLOEXEC)
            body = None
            if meta.size <= SMALL_BODY:
                try:
                    body = await self.state.store.run(os.pread, fd, meta.size + 1, 0)
                except OSError:
                    os.close(fd)
                    raise
                if len(body) != meta.size:
                    os.close(fd)
                    return
            ready = Ready(meta, body, fd)
        except OSError:
            return
        finally:
            self._warming.pop(key, None)
        self._drop(key)
        self._ready[key] = ready
        self._memory += len(ready.body or b"")
        while self._memory > MEMORY_BUDGET or len(self._ready) > OPEN_FILES:
            self._drop(next(iter(self._ready)))

    def _drop(self, key: str) -> None:
        ready = self._ready.pop(key, None)
        if ready is None:
            return
        self._memory -= len(ready.body or b"")
        ready.close()

    async def close(self, grace: float) -> None:
        """Idle connections close now; answers being sent and open tunnels get ``grace`` seconds."""
        busy = [c.close_when_idle() for c in list(self.connections)]
        running: list[asyncio.Future[None]] = [task for task in busy if task is not None]
        running += [tunnel.closed for tunnel in self.tunnels] + list(self.connects)
        if running:
            await asyncio.wait(running, timeout=grace)
        for task in self.connects:
            task.cancel()
        for tunnel in list(self.tunnels):
            tunnel.abort()
        for task in self._warming.values():
            task.cancel()
        for key in list(self._ready):
            self._drop(key)

    # -- answering ----------------------------------------------------------------------------

    def status_line_and_headers(self, ready: Ready, keep_alive: bool, http10: bool) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._date_second:
            self._date, self._date_second = formatdate(now, usegmt=True), second
        age = max(0, int(now - ready.meta.response_time))
        connection = ""
        if not keep_alive:
            connection = "Connection: close\r\n"
        elif http10:
            connection = "Connection: keep-alive\r\n"
        return (
            b"HTTP/1.1 200 OK\r\n"
            + ready.head
            + f"Age: {age}\r\nDate: {self._date}\r\n{connection}\r\n".encode("latin-1")
        )

    def served(self, client: str, method: str, target: str, sent: int, started: float) -> None:
        self._hits.inc()
        if sent:
            self._cache_bytes.inc(sent)
        log_access(AccessRecord(client, method, target, 200, sent, "HIT", time.monotonic() - started))


class HitProtocol(asyncio.Protocol):
    """One client connection: fast hits here, anything else handed to aiohttp for good."""

    def __init__(self, fast: FastPath, fallback: Callable[[], asyncio.Protocol], origin: str | None = None) -> None:
        self._fast = fast
        self._fallback = fallback
        # Inside an intercepted CONNECT: origin-form targets are paths of this https origin.
        self._origin = origin.encode("latin-1") if origin is not None else None
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._peer = ""
        self._busy: asyncio.Task[None] | None = None  # a sendfile, or a wait for a body to be ready
        self._idle: asyncio.TimerHandle | None = None
        self._active = time.monotonic()  # when the last request came
        self._closing = False
        self._writable: asyncio.Future[None] | None = None  # set while the transport's buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and sendfile body: no Nagle wait
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if peer else ""
        self._fast.connections.add(self)
        self._arm_idle()
        if self._buffer:  # TLS (intercepted CONNECT): a request may come before start_tls returns
            self._process()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._busy is None:
            self._process()

    def eof_received(self) -> bool | None:
        self._closing = True
        if self._busy is not None:
            return True  # the answer being sent closes the connection when done
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._detach()
        if self._writable is not None:
            self._writable.cancel()
            self._writable = None
        if self._busy is not None:
            self._busy.cancel()

    def _detach(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._fast.connections.discard(self)
        self._transport = None

    # -- requests -----------------------------------------------------------------------------

    def _process(self, waited: bool = False) -> None:
        transport = self._transport
        while transport is not None and not self._closing:
            end = self._buffer.find(HEAD_END)
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._hand_off()
                return
            started = time.monotonic()
            if self._buffer.startswith(b"CONNECT "):
                if self._origin is None:
                    self._connect(transport, end)
                else:
                    self._hand_off()  # no CONNECT inside a tunnel: aiohttp refuses it
                return
            parsed = _parse_head(self._buffer, end)
            if parsed is None:
                self._hand_off()
                return
            method, target, http10, keep_alive = parsed
            if self._origin is not None and target.startswith(b"/"):
                target = self._origin + target
            ready = self._fast.lookup(target, self._peer)
            if isinstance(ready, asyncio.Future) and not waited:
                waited = True
                self._wait(ready)
                return
            if not isinstance(ready, Ready):
                self._hand_off()
                return
            waited = False
            del self._buffer[: end + len(HEAD_END)]
            self._active = started
            head = self._fast.status_line_and_headers(ready, keep_alive, http10)
            head_only = method == b"HEAD"
            if not keep_alive:
                self._closing = True
            if head_only or ready.body is not None:
                transport.write(head if head_only or ready.body is None else head + ready.body)  # one send
                sent = 0 if head_only else ready.meta.size
                self._fast.served(self._peer, method.decode(), target.decode("latin-1"), sent, started)
                if not keep_alive:
                    transport.close()
                continue
            transport.write(head)
            fd = os.dup(ready.fd)
            transport.pause_reading()
            self._busy = asyncio.get_running_loop().create_task(
                self._send_file(transport, fd, ready, method.decode(), target.decode("latin-1"), started)
            )
            return

    def _wait(self, ready: asyncio.Future[None]) -> None:
        """The next answer waits for its body to be made ready (once)."""
        assert self._transport is not None
        self._transport.pause_reading()

        async def then_answer() -> None:
            await asyncio.shield(ready)
            self._busy = None
            self._resume(waited=True)

        self._busy = asyncio.get_running_loop().create_task(then_answer())

    def _resume(self, waited: bool = False) -> None:
        if self._transport is None:
            return
        if self._closing and not self._buffer:
            self._transport.close()
            return
        self._transport.resume_reading()
        self._process(waited)

    async def _send_file(
        self, transport: asyncio.Transport, fd: int, ready: Ready, method: str, target: str, started: float
    ) -> None:
        file = os.fdopen(fd, "rb", buffering=0)
        try:
            if self._origin is None:
                await asyncio.get_running_loop().sendfile(transport, file, 0, ready.meta.size)
            else:
                await self._copy(transport, fd, ready.meta.size)
        except (OSError, RuntimeError):
            transport.abort()
            return
        finally:
            file.close()
            self._busy = None
        self._fast.served(self._peer, method, target, ready.meta.size, started)
        self._resume()

    def _connect(self, transport: asyncio.Transport, end: int) -> None:
        """The connection belongs to a CONNECT from now on (a tunnel, or TLS interception)."""
        head = bytes(self._buffer[:end])
        early = bytes(self._buffer[end + len(HEAD_END) :])
        self._buffer.clear()
        self._detach()
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(
            connect.serve_connect(self._fast, transport, head, early, self._peer, self._fallback)
        )
        self._fast.connects.add(task)
        task.add_done_callback(self._fast.connects.discard)

    async def _copy(self, transport: asyncio.Transport, fd: int, size: int) -> None:
        """The body through TLS (an intercepted CONNECT): read in the I/O pool, written with flow
        control. asyncio's sendfile fallback stalled on these connections (nothing was sent)."""
        loop = asyncio.get_running_loop()
        position = 0
        while position < size:
            data = await loop.run_in_executor(None, os.pread, fd, min(COPY_CHUNK, size - position), position)
            if not data:
                raise OSError(f"the body file ended at {position} of {size} bytes")
            if transport.is_closing():
                raise ConnectionResetError("client went away")
            transport.write(data)
            position += len(data)
            if self._writable is not None:
                await self._writable

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set_result(None)
            self._writable = None

    def _hand_off(self) -> None:
        """aiohttp takes the connection, with what was read and not yet answered."""
        transport = self._transport
        if transport is None:
            return
        self._detach()
        protocol = self._fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            protocol.data_received(data)

    def _arm_idle(self) -> None:
        self._idle = asyncio.get_running_loop().call_at(self._active + KEEPALIVE, self._idle_timeout)

    def _idle_timeout(self) -> None:
        """Close after KEEPALIVE seconds without a request (one timer, re-armed only when it fires)."""
        if self._transport is None:
            return
        if self._busy is not None or time.monotonic() < self._active + KEEPALIVE:
            self._arm_idle()
            return
        self._transport.close()

    def close_when_idle(self) -> asyncio.Task[None] | None:
        """At shutdown: an idle connection closes now, a running answer closes when done."""
        self._closing = True
        if self._busy is None and self._transport is not None:
            self._transport.close()
        return self._busy


def _parse_head(buffer: bytearray, end: int) -> tuple[bytes, bytes, bool, bool] | None:
    """(method, target, HTTP/1.0?, keep-alive?) of a simple GET/HEAD, else None."""
    lines = bytes(buffer[:end]).split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if method not in (b"GET", b"HEAD") or version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    http10 = version == b"HTTP/1.0"
    keep_alive = not http10
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
            return None  # malformed or folded: aiohttp's parser answers it
        name = name.lower()
        if name in COMPLEX_HEADERS:
            return None
        if name == b"connection" or name == b"proxy-connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
            if b"upgrade" in tokens:
                return None
    return method, target, http10, keep_alive


class ProxySite(web.BaseSite):
    """A TCP listening socket whose connections start on the hit fast path."""

    __slots__ = ("_fast", "_host", "_port", "_reuse_port", "_state")

    def __init__(
        self, runner: web.BaseRunner, state: AppState, host: str, port: int, *, reuse_port: bool = False, **kw: Any
    ) -> None:
        super().__init__(runner, **kw)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._state = state
        self._fast: FastPath | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        fast = self._fast = FastPath(self._state)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HitProtocol(fast, server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )

    async def stop(self) -> None:
        await super().stop()
        if self._fast is not None:
            await self._fast.close(self._runner._shutdown_timeout)
