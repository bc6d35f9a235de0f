"""The byte pump of a fill: the origin's body into the store's temp file as it arrives.

A plain-HTTP body with a length is spliced socket -> pipe -> file by a thread (kernel to kernel,
up to ``SPLICERS`` at once); other bodies (chunked, https, ftp) are gathered and written with
writev while the previous write runs. A body that breaks is resumed with ``Range`` + ``If-Range``
within the retry budget, or the transfer is aborted. Clients read the growing file
(:class:`~.fill.Fill`), so they get the bytes as they land.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from ..errors import ProxyError, TransferAborted
from ..storage.base import SpoolWriter
from ..upstream.http import BODY_ERRORS, HttpUpstream, Response, describe
from ..upstream.retry import RetryBudget
from .fill import Fill

log = logging.getLogger(__name__)

WRITE_MIN = 1 << 20  # a write waits for this many bytes ...
WRITE_WAIT = 0.05  # ... or this many seconds, so that slow origins still stream promptly
WRITE_BATCH = 8 << 20  # bytes gathered while the previous write is still running
SPLICERS = 32  # plain-HTTP bodies copied by threads at once (more use the event loop path)
RELAY_WINDOW = 8 << 20  # bytes a relayed body runs ahead of its slowest reader


class NoReaders(Exception):
    """A relayed body has no reader left: the rest would be fetched for no one."""


def strong_validator(headers: Mapping[str, str]) -> str | None:
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


class Pump:
    def __init__(self, upstream: HttpUpstream, read_timeout: float) -> None:
        self.upstream = upstream
        self._read_timeout = read_timeout
        self._splicing = 0
        self.splicers = SPLICERS  # bodies spliced at once; more go through the event loop
        self._pool = ThreadPoolExecutor(max_workers=SPLICERS, thread_name_prefix="cacheproxy-splice")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def tee(
        self,
        fill: Fill,
        response: Response,
        writer: SpoolWriter,
        budget: RetryBudget,
        forward: Mapping[str, str],
        size: int | None,
        max_size: int,
    ) -> Response:
        """Copy the body into the writer; resume with Range after a drop. Return the last response.

        A body of unknown length that passes ``max_size``, or that the store cannot take (full,
        read-only), goes on to the readers through the fill's relay and is not stored.
        """
        validator = strong_validator(response.headers)
        pending: asyncio.Task[None] | None = None
        buffer: list[bytes] = []
        buffered = 0
        loop = asyncio.get_running_loop()
        last_flush = loop.time()

        async def relay(chunks: list[bytes]) -> None:
            for chunk in chunks:
                if not await fill.relay(chunk, RELAY_WINDOW):
                    raise NoReaders("every client went away")

        async def flush(chunks: list[bytes], size: int) -> None:
            if fill.relay_at is None:
                try:
                    await writer.write(chunks)
                except OSError as exc:
                    log.warning("the store cannot take the body of %s (%s): passing it on uncached", fill.key, exc)
                    fill.start_relay()
                else:
                    fill.advance(size)
                    return
            await relay(chunks)

        def start_flush() -> asyncio.Task[None]:
            nonlocal buffer, buffered
            task = asyncio.ensure_future(flush(buffer, buffered))
            buffer, buffered = [], 0
            return task

        async def drain() -> None:
            nonlocal pending
            if buffer:
                if pending is not None:
                    await pending
                pending = start_flush()
            if pending is not None:
                await pending
                pending = None

        try:
            while True:
                if size is not None and self._splicing < self.splicers and (detached := response.detach_socket()):
                    held, sock = detached
                    if sock is None:  # aiohttp holds more (or all) of the body: take what it has, read on
                        if held:
                            buffer.append(held)
                            buffered += len(held)
                        continue
                    await drain()
                    try:
                        await self._splice_rest(fill, writer, size, held, sock)
                    except BODY_ERRORS as exc:
                        response.close()
                        response = await self._resume(response, writer.written, validator, budget, forward, exc)
                        continue
                    response.close()  # the connection was taken from aiohttp: not reusable
                    break
                try:
                    chunk = await response.read_chunk()
                except BODY_ERRORS as exc:
                    await drain()
                    response.close()
                    response = await self._resume(response, fill.written, validator, budget, forward, exc)
                    continue
                if not chunk:
                    break
                if fill.relay_at is None and size is None and writer.written + buffered + len(chunk) > max_size:
                    await drain()
                    log.info("not storing %s: the body passed cache.max_object_size (%d)", fill.key, max_size)
                    fill.start_relay()
                if fill.relay_at is not None and pending is None and not buffer:
                    await relay([chunk])
                    continue
                buffer.append(chunk)
                buffered += len(chunk)
                if pending is not None and pending.done():
                    pending.result()
                    pending = None
                if pending is not None:
                    if buffered < WRITE_BATCH:
                        continue  # gather more while the previous write runs
                    await pending
                elif buffered < WRITE_MIN and loop.time() - last_flush < WRITE_WAIT:
                    continue
                last_flush = loop.time()
                pending = start_flush()
            await drain()
        finally:
            if pending is not None:  # let a running write end: the file is closed after us
                await asyncio.gather(pending, return_exceptions=True)
        return response

    async def _splice_rest(self, fill: Fill, writer: SpoolWriter, size: int, held: bytes, sock: int) -> None:
        """The rest of a plain-TCP body, from the socket to the file in a thread, kernel to kernel."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def landed(n: int) -> None:
            writer.adopt(n)
            fill.advance(n)

        def report(n: int) -> None:  # in the splicer thread; lands before the job's result does
            loop.call_soon_threadsafe(landed, n)

        self._splicing += 1
        try:
            if held:
                await writer.write(held)
                fill.advance(len(held))
            remaining = size - writer.written
            if remaining <= 0:
                return
            job = loop.run_in_executor(
                self._pool,
                writer.splice_sync,
                sock,
                remaining,
                report,
                stop,
                self._read_timeout,
            )
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                stop.set()
                await asyncio.gather(job, return_exceptions=True)
                raise
        finally:
            self._splicing -= 1
            os.close(sock)

    async def _resume(
        self,
        response: Response,
        offset: int,
        validator: str | None,
        budget: RetryBudget,
        forward: Mapping[str, str],
        cause: BaseException,
    ) -> Response:
        reason = describe(cause)
        while True:
            if validator is None or response.headers.get("Accept-Ranges", "").lower() == "none":
                raise TransferAborted(f"transfer broke at byte {offset} ({reason}) and the origin cannot resume")
            if not await budget.spend():
                raise TransferAborted(f"transfer broke at byte {offset} ({reason}); retries exhausted")
            log.info("resuming %s at byte %d after: %s", response.url, offset, reason)
            try:
                resumed = await self.upstream.resume(response.url, offset, validator, forward)
            except (*BODY_ERRORS, ProxyError) as exc:
                reason = describe(exc)
                continue
            if resumed is None:
                raise TransferAborted(f"transfer broke at byte {offset} and the origin did not resume it")
            return resumed
