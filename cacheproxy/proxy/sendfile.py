"""A file's bytes to a client connection with ``sendfile``, whichever event loop runs.

asyncio's own loop has ``loop.sendfile``. uvloop (what ``cacheproxy serve`` runs on) has none, so
for a plain TCP connection the kernel call is made here: whenever the transport has nothing
queued, ``os.sendfile`` moves as much as the socket takes; when the socket is full, one piece is
read and queued on the transport, which sends it as room comes, and the next ``sendfile`` waits
until that queue is empty again (so bytes never overtake each other). A TLS connection cannot
take ``sendfile`` (the bytes must be encrypted): pieces are read and written through it.
"""

from __future__ import annotations

import asyncio
import os
from typing import BinaryIO, cast

from aiohttp import web

PIECE = 256 << 10  # bytes read and queued at once when the socket is full
TLS_PIECE = 1 << 20  # bytes read and encrypted at once (1 MiB ran twice as fast as 256 KiB)


async def send_file(request: web.BaseRequest, fileobj: BinaryIO, offset: int, count: int) -> None:
    """Send ``count`` bytes of ``fileobj`` from ``offset`` after what the response wrote so far;
    ConnectionResetError when the client went away."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.BaseEventLoop):  # asyncio's own loop: its sendfile (native or not)
        await loop.sendfile(transport, fileobj, offset, count)  # type: ignore[arg-type]
        return
    transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
    await request.writer.drain()
    sock = transport.get_extra_info("socket")
    # Never raw sendfile under TLS (it would put plaintext on the wire): an intercepted connection
    # is TLS whatever the transport says (uvloop's TLS transport names no SSL context).
    tls = getattr(request.protocol, "origin", None) is not None or any(
        transport.get_extra_info(name) is not None for name in ("sslcontext", "ssl_object")
    )
    low, high = transport.get_write_buffer_limits()
    if not tls:
        transport.set_write_buffer_limits(high=0)  # drain() now waits until nothing is queued
    try:
        await _send(request, transport, fileobj.fileno(), None if tls or sock is None else sock.fileno(), offset, count)
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)


async def _send(
    request: web.BaseRequest, transport: asyncio.Transport, in_fd: int, out_fd: int | None, offset: int, count: int
) -> None:
    loop = asyncio.get_running_loop()
    end = offset + count
    while offset < end:
        if transport.is_closing():
            raise ConnectionResetError("client went away")
        if out_fd is not None and transport.get_write_buffer_size() == 0:
            try:
                sent = os.sendfile(out_fd, in_fd, offset, end - offset)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise ConnectionResetError(f"sending the body failed: {exc}") from None
            if sent:
                offset += sent
                continue
        size = PIECE if out_fd is not None else TLS_PIECE
        piece = await loop.run_in_executor(None, os.pread, in_fd, min(size, end - offset), offset)
        if not piece:
            raise ConnectionResetError(f"the body file ended at {offset} of {end} bytes")
        transport.write(piece)
        offset += len(piece)
        await request.writer.drain()
