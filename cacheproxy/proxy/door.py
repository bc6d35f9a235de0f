"""The front door: the one protocol that owns every client connection.

Every connection accepted on a listening socket, and the decrypted stream of every intercepted
CONNECT, is a :class:`FrontDoor`: aiohttp's request handler, whose llhttp parser is strict (bare
CR or LF, NUL bytes, a repeated ``Host``, obsolete line folding, ``Transfer-Encoding`` beside
``Content-Length`` are refused) and enforces the head limits, with what belongs at the door added:

- ``limits.max_connections``: a connection beyond it gets ``503`` and is closed;
- ``proxy_protocol``: the PROXY header must come first; its address is the client's;
- ``limits.head_timeout``: a request head must be complete this long after its first byte (or
  after the connection opened); otherwise ``408`` and close (slow clients, slowloris);
- a malformed head is answered with cacheproxy's own error (``400``, or ``431`` when too large)
  and one access-log line, never a traceback.

Every parsed request then goes to the one pipeline (:mod:`.pipeline`), whatever answers it.
The door has the first look at each message aiohttp's parser yields: while nothing else is in
flight on the connection, the pipeline's synchronous branch may answer it on the spot (a plain
fresh hit with its body in memory: no request and response objects, one write); every other
message goes on to aiohttp's handler and the pipeline's general path, in order.

This builds on aiohttp's ``RequestHandler`` beyond its documented surface (its parser attribute,
the bytes kept after a CONNECT head, its keep-alive deadline): ``setup.cfg`` admits only the
aiohttp minor version the tests ran with.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, InvalidURLError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from ..config import Config
from ..errors import (
    BadRequest,
    BadUrl,
    HeadTimeout,
    HeadTooLarge,
    Overloaded,
    ProxyError,
    error_response,
    raw_error_response,
)
from ..ops.logging import redact
from ..ops.observe import Observation, Observer
from .proxy_protocol import ProxyHeaderError, parse_proxy_header

log = logging.getLogger(__name__)

# Request head limits (SPEC section 6: 431 beyond them).
MAX_LINE_SIZE = 8 << 10
MAX_FIELD_SIZE = 8 << 10
MAX_HEADERS = 100
KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection closes after this long


class TunnelEnd:
    """The client side of a CONNECT tunnel: what the connection it took over reports (:mod:`.connect`)."""

    def client_data(self, data: bytes) -> None: ...

    def client_eof(self) -> bool:
        """The client half-closed; True keeps the connection open for the other direction."""
        return False

    def client_lost(self) -> None: ...

    def client_paused(self) -> None: ...

    def client_resumed(self) -> None: ...


AnswerNow = Callable[["FrontDoor", RawRequestMessage], bool]


class _DoorParser:
    """aiohttp's request parser (llhttp), with the door's first look at what it parsed."""

    def __init__(self, parser: Any, door: FrontDoor) -> None:
        self._parser = parser
        self._door = door

    def feed_data(self, data: bytes) -> tuple[list[tuple[Any, Any]], bool, bytes]:
        messages, upgraded, tail = self._parser.feed_data(data)
        kept: list[tuple[Any, Any]] = []
        # The parser stops yielding at its queue limit and keeps the rest of a pipelined burst;
        # aiohttp asks again only as its own queue drains. What the door answered never reached
        # that queue, so ask again here while the door keeps answering.
        while messages:
            batch = self._door.first_look(messages)
            kept += batch
            if len(batch) == len(messages) or upgraded:
                break
            messages, upgraded, tail = self._parser.feed_data(b"")
        return kept, upgraded, tail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class Door:
    """What the connections of one process share: the counts and settings of the door."""

    def __init__(self, config: Config, observe: Observer) -> None:
        limits = config.limits
        self.max_connections = math.ceil(limits.max_connections / config.workers)  # per worker process
        self.head_timeout = limits.head_timeout
        self.proxy_protocol = config.proxy_protocol
        self.observe = observe
        self.open_connections = 0
        self._warned_no_header = False

    def warn_no_header_once(self, client: str, reason: str) -> None:
        if not self._warned_no_header:
            self._warned_no_header = True
            log.warning(
                "connection from %s without a PROXY protocol header closed (%s); proxy_protocol is on, "
                "so every connection must come through the gateway (further ones: access log only)",
                client,
                reason,
            )


class FrontDoor(RequestHandler):
    """One client connection (or the decrypted stream inside an intercepted CONNECT)."""

    def __init__(self, manager: DoorServer, *, door: Door, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.door = door
        self.server = manager
        self.client_ip = ""  # the peer, or the PROXY header's source address
        self.origin: str | None = None  # inside an intercepted CONNECT: https://host[:port]
        self.tunnel: TunnelEnd | None = None  # set while a CONNECT tunnel owns the connection
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._counted = False
        self._refused = False
        self._awaiting_proxy_header = False
        self._proxy_buffer = b""
        self._head_timer: asyncio.TimerHandle | None = None
        self._busy = False  # a request is being handled
        self._parsed = False  # the data just received completed a head
        self._handed = 0  # messages passed on to aiohttp's handler and not answered yet
        self._writing_paused = False  # the client does not read fast enough: no answers ahead of it
        self._answer_now: AnswerNow | None = manager.answer_now
        self._parser = _DoorParser(self._parser, self)  # type: ignore[assignment]

    # -- the connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        door = self.door
        inner = self.origin is not None  # counted, checked and timed as its CONNECT's connection
        if not self.client_ip:
            peer = transport.get_extra_info("peername")
            self.client_ip = peer[0] if peer else ""
        if not inner:
            if door.open_connections >= door.max_connections:
                self._refused = True
                limit = f"more than {door.max_connections} connections (limits.max_connections)"
                self._refuse(transport, Overloaded(limit))
                return
            door.open_connections += 1
            self._counted = True
            self._awaiting_proxy_header = door.proxy_protocol
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and not inner:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a head and its body: no Nagle wait
        if not inner:
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        if self._counted:
            self._counted = False
            self.door.open_connections -= 1
        self._cancel_head_timer()
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.client_lost()
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def _refuse(self, transport: asyncio.BaseTransport, exc: ProxyError, method: str = "-") -> None:
        """Answer ``exc`` on a connection no request handler serves, and close it."""
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio classes
        if not transport.is_closing():
            transport.write(raw_error_response(exc))
            transport.close()
        self.door.observe(Observation(self.client_ip, method, "-", exc.status, 0, "", 0.0, exc.code, result="error"))

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.client_data(data)
            return
        if self._awaiting_proxy_header:
            data = self._take_proxy_header(data)
            if not data:
                return
        self._parsed = False
        super().data_received(data)
        if data and not self._parsed and self._head_timer is None and not self._busy and self.transport is not None:
            self._arm_head_timer()  # part of a head came: it has limits.head_timeout to complete

    def _take_proxy_header(self, data: bytes) -> bytes:
        """Consume the PROXY header; return what follows it (b"" while it is incomplete)."""
        buffer = self._proxy_buffer + data
        try:
            parsed = parse_proxy_header(buffer)
        except ProxyHeaderError as exc:
            self._awaiting_proxy_header = False
            self.door.warn_no_header_once(self.client_ip, str(exc))
            if self.transport is not None:
                self._refuse(self.transport, BadRequest(str(exc), code="bad_proxy_header"))
            self.force_close()
            return b""
        if parsed is None:
            self._proxy_buffer = buffer
            return b""
        length, address = parsed
        if address is not None:
            self.client_ip = address
        self._awaiting_proxy_header = False
        self._proxy_buffer = b""
        return buffer[length:]

    # -- the head timer -----------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self.door.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._busy:
            return
        self._refuse(
            self.transport,
            HeadTimeout(f"the request head was not complete within {self.door.head_timeout:g}s (limits.head_timeout)"),
        )
        self.force_close()

    def first_look(self, messages: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """Answer what can be answered at once (in order: only while nothing is in flight, and
        while the client reads what it is sent); the rest goes on to aiohttp's handler, which
        waits for the client and stops reading from it when its queue is full."""
        self._parsed = True
        self._cancel_head_timer()  # a head is complete
        answer_now = self._answer_now
        kept: list[tuple[Any, Any]] = []
        for message, payload in messages:
            if kept or self._handed or self._writing_paused or answer_now is None or payload is not EMPTY_PAYLOAD:
                kept.append((message, payload))
            elif answer_now(self, message):
                if self._parser is not None:
                    self._parser.message_consumed()
                self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
                if message.should_close:
                    self.force_close()
                    return []
            else:
                kept.append((message, payload))
        self._handed += len(kept)
        return kept

    def request_started(self) -> None:
        """The pipeline took a request: its head is complete."""
        self._cancel_head_timer()
        self._busy = True

    def request_finished(self) -> None:
        self._busy = False
        self._handed = max(0, self._handed - 1)

    # -- a tunnel owning the connection -------------------------------------------------------

    def early_bytes(self) -> bytes:
        """What the client sent after its CONNECT head (the parser keeps it aside)."""
        return bytes(self._message_tail)

    def take_over(self, tunnel: TunnelEnd) -> None:
        """From now on the connection's bytes are the tunnel's (after what came with the CONNECT)."""
        early, self._message_tail = self._message_tail, b""
        self.tunnel = tunnel
        if early:
            tunnel.client_data(bytes(early))

    def release(self) -> None:
        """The connection was handed on (TLS interception) and has ended there: forget it here."""
        self.connection_lost(None)

    def pause_writing(self) -> None:
        self._writing_paused = True
        super().pause_writing()
        if self.tunnel is not None:
            self.tunnel.client_paused()

    def resume_writing(self) -> None:
        self._writing_paused = False
        super().resume_writing()
        if self.tunnel is not None:
            self.tunnel.client_resumed()

    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self.tunnel is not None:
            return self.tunnel.client_eof()
        return None

    # -- malformed requests -------------------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A head the parser refused (or, as a bug, a handler that raised): our error answer."""
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        error: ProxyError
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
            error = HeadTooLarge(
                f"request head too large (at most {MAX_LINE_SIZE} bytes a line, {MAX_HEADERS} header fields)"
            )
        elif isinstance(exc, BadHttpMessage) or status == 400:
            first_line = (message or str(exc) or "malformed request").strip().splitlines()[0]
            if isinstance(exc, InvalidURLError) or "://" in first_line:
                error = BadUrl(f"not a valid URL (a proxied URL needs a host: scheme://host/path): {first_line}")
            else:
                error = BadRequest(f"malformed request: {first_line}")
        else:
            log.error("request from %s failed", self.client_ip, exc_info=exc)  # a bug, not the client's
            error = ProxyError("internal error")
        if exc is not None:
            log.debug("refused request from %s: %s", self.client_ip, redact(str(exc)))
        self.door.observe(Observation(self.client_ip, "-", "-", error.status, 0, "", 0.0, error.code, result="error"))
        response = error_response(request, error)
        response.force_close()
        return response


class DoorServer(web.Server):
    """aiohttp's low-level server whose connections are :class:`FrontDoor` s."""

    def __init__(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], door: Door, **kwargs: Any
    ) -> None:
        self._door_kwargs: dict[str, Any] = dict(
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
            access_log=None,
            **kwargs,
        )
        super().__init__(handler, **self._door_kwargs)
        self.door = door
        self.answer_now: AnswerNow | None = getattr(handler, "answer_now", None)

    def __call__(self) -> FrontDoor:
        return FrontDoor(self, door=self.door, loop=self._loop, **self._door_kwargs)

    def inner(self, origin: str, client_ip: str) -> FrontDoor:
        """A door for the decrypted stream of an intercepted CONNECT from ``client_ip``."""
        door = self()
        door.origin = origin
        door.client_ip = client_ip
        return door
