"""The origin end of a CONNECT tunnel: a TCP connection to ``host:port``, directly or through the
parent proxy, checked by the SSRF guard like every other upstream connection."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import Callable
from typing import cast

from aiohttp.abc import AbstractResolver
from yarl import URL

from ..errors import UpstreamFailed

ProtocolFactory = Callable[[], asyncio.Protocol]
HEAD_END = b"\r\n\r\n"
MAX_PARENT_HEAD = 16 << 10


def authority_of(host: str, port: int) -> str:
    """``host:port`` as a CONNECT target (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def connect(
    host: str,
    port: int,
    factory: ProtocolFactory,
    *,
    resolver: AbstractResolver,
    connect_timeout: float,
    parent: URL | None = None,
    parent_auth: tuple[str, str] | None = None,
) -> asyncio.Transport:
    """A connected transport whose protocol ``factory`` made; OSError/TimeoutError on failure."""
    async with asyncio.timeout(connect_timeout):
        if parent is not None:
            return await _through_parent(host, port, factory, parent, parent_auth)
        return await _direct(host, port, factory, resolver)


async def _direct(host: str, port: int, factory: ProtocolFactory, resolver: AbstractResolver) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    results = await resolver.resolve(host.strip("[]"), port, family=socket.AF_UNSPEC)  # the guard checks them
    last: OSError | None = None
    for result in results:
        try:
            transport, _ = await loop.create_connection(factory, result["host"], port)
        except OSError as exc:
            last = exc
            continue
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio classes
        return transport
    raise last or OSError(f"{host} has no address")


class _ParentHandshake(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.done.done() and (HEAD_END in self.buffer or len(self.buffer) > MAX_PARENT_HEAD):
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("the parent proxy closed the connection"))


async def _through_parent(
    host: str, port: int, factory: ProtocolFactory, parent: URL, auth: tuple[str, str] | None
) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    assert parent.host is not None and parent.port is not None
    transport, handshake = await loop.create_connection(_ParentHandshake, parent.host, parent.port)
    transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio classes
    try:
        authority = authority_of(host, port)
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await handshake.done
        head, _, rest = bytes(handshake.buffer).partition(HEAD_END)
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            raise UpstreamFailed(f"parent proxy refused CONNECT {authority}: {status_line[:200]}")
        protocol = factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if rest:
            protocol.data_received(rest)
        return transport
    except BaseException:
        transport.abort()
        raise
