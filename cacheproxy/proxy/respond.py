"""Writing an :data:`~cacheproxy.cache.fill.Outcome` to the client.

Hits go out with sendfile from the stored body, honouring HEAD, a single Range (206/416) and
If-None-Match / If-Modified-Since (304) against the origin's validators kept with the object.
Misses are read from the fill's growing file as bytes arrive. A transfer that cannot be
completed resets the client connection: wget and curl must see an error, never a short file.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import socket
import struct
import time
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import web
from multidict import CIMultiDict

from ..cache.checksums import Expected
from ..cache.fill import Buffered, Fill, Hit, Outcome, Passthrough, Streaming
from ..cache.freshness import current_age, http_date
from ..cache.hot import Ready
from ..errors import SERVER, TransferAborted, UpstreamFailed
from ..headers import end_to_end, with_via
from ..ops.metrics import Metrics
from ..storage.base import ObjectMeta, Spool, StorageUnavailable
from ..upstream.http import BODY_ERRORS
from .sendfile import send_file

log = logging.getLogger(__name__)
_KNOWN = frozenset(int(s) for s in HTTPStatus)
READ_CHUNK = 1 << 20
HOLD_BACK = 64 << 10  # bytes of a miss held back until the body is verified against an expected checksum
VERDICT_TIMEOUT = 600.0  # seconds the hashing of a complete body may take
SOURCE_HEADER = "X-Cacheproxy-Source"  # the URL whose stored body answered (matched by checksum)
SENT = web.RequestKey("sent", int)  # body bytes sent, for the access log
ANSWERED = web.RequestKey("answered", web.StreamResponse)  # the response whose head went out


async def _prepare(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Send the head; from now on the access log names this response even if the client leaves."""
    request[ANSWERED] = response
    await response.prepare(request)


class ObjectGone(Exception):
    """The body of an indexed object is gone: another worker evicted or replaced it."""

    def __init__(self, meta: ObjectMeta) -> None:
        super().__init__(meta.key)
        self.meta = meta


def _count(request: web.BaseRequest, metrics: Metrics, source: str, n: int) -> None:
    request[SENT] = request.get(SENT, 0) + n
    metrics.response_bytes.labels(source).inc(n)


def abort_connection(request: web.BaseRequest) -> None:
    """Reset the client connection (RST, not FIN) so the client cannot take a short body for whole."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def _single_range(request: web.BaseRequest, size: int) -> tuple[int, int] | str | None:
    """(start, end-exclusive), None for the whole body, or "unsatisfiable"."""
    header = request.headers.get("Range")
    if not header or "," in header:  # multiple ranges: answer with the whole body
        return None
    try:
        rng = request.http_range
    except ValueError:
        return None  # a malformed Range is ignored (RFC 9110 14.2)
    start, stop = rng.start, rng.stop
    if start is None:
        return None
    if start < 0:  # suffix: the last -start bytes
        start = max(0, size + start)
        stop = size
    else:
        stop = size if stop is None else min(stop, size)
    if start >= size or stop <= start:
        return "unsatisfiable"
    return start, stop


def _etag_matches(header: str, etag: str | None) -> bool:
    if etag is None:
        return False
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in header.split(","))


def _not_modified(request: web.BaseRequest, meta: ObjectMeta) -> bool:
    inm = request.headers.get("If-None-Match")
    if inm is not None:
        return _etag_matches(inm, meta.etag)
    since = request.headers.get("If-Modified-Since")
    if since is None:
        return False
    ims = http_date(since)
    modified = http_date(meta.last_modified)
    return ims is not None and modified is not None and modified <= ims


def _if_range_allows(request: web.BaseRequest, meta: ObjectMeta) -> bool:
    value = request.headers.get("If-Range")
    if value is None:
        return True
    if value.startswith(('"', "W/")):
        return meta.etag is not None and not meta.etag.startswith("W/") and value == meta.etag
    return meta.last_modified is not None and value == meta.last_modified


def hit_headers(meta: ObjectMeta, x_cache: str) -> CIMultiDict[str]:
    """The stored response's headers as a hit replays them (RFC 9111 3.1, 4), with ours."""
    now = time.time()
    headers: CIMultiDict[str] = CIMultiDict((k, v) for k, v in meta.header_pairs())
    if meta.status == 200:
        headers.setdefault("Content-Type", "application/octet-stream")
        headers["Accept-Ranges"] = "bytes"
        headers["X-Checksum-Sha256"] = meta.sha256
        if meta.sha512:
            headers["X-Checksum-Sha512"] = meta.sha512
        headers["X-Checksum-Md5"] = meta.md5
    headers["Age"] = str(int(current_age(meta.initial_age, meta.response_time, now)))
    headers.setdefault("Date", http_now(now))
    headers.setdefault("Server", SERVER)
    with_via(headers)
    headers["X-Cache"] = x_cache
    return headers


_date_cache: tuple[int, str] = (0, "")


def http_now(now: float) -> str:
    """The Date header for ``now`` (made once a second)."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, formatdate(second, usegmt=True))
    return _date_cache[1]


CONNECTION = {  # (keep-alive, HTTP/1.0) -> the Connection header of a plain hit
    (True, False): "",
    (True, True): "Connection: keep-alive\r\n",
    (False, False): "Connection: close\r\n",
    (False, True): "Connection: close\r\n",
}


def plain_hit(meta: ObjectMeta, ready: Ready, method: str, http10: bool, keep_alive: bool) -> bytes | None:
    """The whole answer to a plain GET/HEAD of a fresh hit whose body is in memory: the same
    status and headers :meth:`Responder.send_hit` sends, as bytes for the connection (the door
    writes them when nothing else is in flight on it). None when the body is not in memory."""
    body = ready.body
    if body is None:
        return None
    head = ready.head
    if head is None:  # what does not change from one answer to the next, made once
        headers = hit_headers(meta, "HIT")
        del headers["Age"]
        ready.dated = any(k.lower() == "date" for k, _ in meta.header_pairs())
        if not ready.dated:
            del headers["Date"]
        if meta.status != 204:
            headers["Content-Length"] = str(meta.size)
        status = f"{meta.status} {HTTPStatus(meta.status).phrase}" if meta.status in _KNOWN else str(meta.status)
        head = ready.head = (f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())).encode()
    now = time.time()
    connection = CONNECTION[keep_alive, http10]
    date = "" if ready.dated else f"Date: {http_now(now)}\r\n"
    age = int(current_age(meta.initial_age, meta.response_time, now))
    tail = f"Age: {age}\r\n{date}{connection}\r\n".encode()
    return head + tail if method == "HEAD" else b"".join((head, tail, body))


async def _copy_fd(response: web.StreamResponse, fd: int, start: int, stop: int) -> None:
    """Write bytes [start, stop) of a file through the response (chunked bodies)."""
    loop = asyncio.get_running_loop()
    while start < stop:
        data = await loop.run_in_executor(None, os.pread, fd, min(READ_CHUNK, stop - start), start)
        if not data:
            raise TransferAborted("the body file is shorter than written")
        await response.write(data)
        start += len(data)


def _threshold(position: int, size: int | None, hold: int) -> int:
    """How many bytes must be written before a reader at ``position`` may send more while it
    holds the last ``hold`` bytes back (waiting past ``size`` means: until the fill ends)."""
    if not hold:
        return position
    if size is None:
        return position + hold
    return position if position < size - hold else size


async def _verdict(fill: Fill, expected: Expected | None) -> None:
    """Raise TransferAborted unless the fill's whole body has the ``expected`` digests."""
    assert expected is not None
    try:
        digests = await asyncio.wait_for(asyncio.shield(fill.digests), VERDICT_TIMEOUT)
    except TimeoutError:
        digests = None
    if digests is None:
        raise TransferAborted(f"{fill.url}: the body could not be verified against the expected checksum")
    if not expected.matches(digests):
        raise TransferAborted(f"{fill.url}: the body is not the one the request's checksum names")


def _open_body(path: os.PathLike[str]) -> io.FileIO:
    return open(path, "rb", buffering=0)  # closed by the caller


class Responder:
    def __init__(self, store: Spool, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    async def send(
        self, request: web.BaseRequest, outcome: Outcome, expected: Expected | None = None
    ) -> web.StreamResponse:
        """``outcome`` to the client; a body not yet verified against ``expected`` (a miss, a
        passthrough) has its last bytes held back until it is, and a mismatch resets the connection."""
        if isinstance(outcome, Hit):
            return await self.send_hit(request, outcome)
        if isinstance(outcome, Streaming):
            return await self.send_streaming(request, outcome, expected)
        if isinstance(outcome, Buffered):
            return self.send_buffered(outcome)
        return await self.send_passthrough(request, outcome, expected)

    async def send_hit(self, request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        meta, ready = hit.meta, hit.ready
        headers = hit_headers(meta, hit.x_cache)
        if hit.source is not None:
            headers[SOURCE_HEADER] = hit.source
        whole = meta.status == 200  # conditions and ranges apply to a stored 200 only
        if meta.status == 204:
            return web.Response(status=204, headers=headers)
        if whole and _not_modified(request, meta):
            for name in ("Content-Length", "Content-Type", "Content-Encoding", "Content-Range"):
                headers.popall(name, None)
            return web.Response(status=304, headers=headers)
        span = _single_range(request, meta.size) if whole and _if_range_allows(request, meta) else None
        if span == "unsatisfiable":
            headers["Content-Range"] = f"bytes */{meta.size}"
            return web.Response(status=416, headers=headers)
        if hit.redirect is not None:  # only the shared store has the body: the client fetches it there
            headers["Location"] = hit.redirect
            for name in ("Accept-Ranges", "Content-Length"):
                headers.popall(name, None)
            return web.Response(status=302, headers=headers)
        start, stop = span if isinstance(span, tuple) else (0, meta.size)
        status = 206 if isinstance(span, tuple) else meta.status
        if isinstance(span, tuple):
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{meta.size}"
        head_only = request.method == "HEAD"
        if ready is not None and ready.body is not None and not head_only:
            # A small body kept in memory: headers and body in one write.
            if not head_only:
                _count(request, self._metrics, "cache", stop - start)
            body = ready.body if stop - start == meta.size else ready.body[start:stop]
            return web.Response(status=status, body=body, headers=headers)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = stop - start
        if hit.remote is not None:
            return await self._stream_remote(request, response, hit, start, stop)
        if ready is not None and ready.fd >= 0:
            fileobj = os.fdopen(os.dup(ready.fd), "rb", buffering=0)
        else:
            loop = asyncio.get_running_loop()
            try:
                fileobj = await loop.run_in_executor(None, _open_body, self._store.body_path(meta))
            except FileNotFoundError:
                raise ObjectGone(meta) from None
        try:
            await _prepare(request, response)
            if not head_only and stop > start:
                await send_file(request, fileobj, start, stop - start)
                _count(request, self._metrics, "cache", stop - start)
            await response.write_eof()
        finally:
            fileobj.close()
        return response

    async def _stream_remote(
        self, request: web.BaseRequest, response: web.StreamResponse, hit: Hit, start: int, stop: int
    ) -> web.StreamResponse:
        """The bytes of an object only the shared store holds, through the proxy (serve_hits: stream)."""
        assert hit.remote is not None
        pieces = hit.remote(start, stop)
        try:
            first = await anext(pieces) if request.method != "HEAD" and stop > start else b""
        except StorageUnavailable as exc:
            raise UpstreamFailed(f"the shared store failed: {exc}") from None
        await _prepare(request, response)
        if request.method == "HEAD" or stop <= start:
            await response.write_eof()
            return response
        try:
            await response.write(first)
            _count(request, self._metrics, "cache", len(first))
            async for piece in pieces:
                await response.write(piece)
                _count(request, self._metrics, "cache", len(piece))
        except StorageUnavailable as exc:
            log.warning("streaming %s from the shared store broke: %s", hit.meta.url, exc)
            abort_connection(request)
            return response
        finally:
            await pieces.aclose()
        await response.write_eof()
        return response

    async def send_streaming(
        self, request: web.BaseRequest, streaming: Streaming, expected: Expected | None = None
    ) -> web.StreamResponse:
        fill, size = streaming.fill, streaming.head.size
        # With an expected checksum, the last HOLD_BACK bytes wait for the whole body's digests
        # (and the expectation has its say in whether the fill is stored).
        hold = HOLD_BACK if expected is not None and streaming.head.status == 200 and request.method == "GET" else 0
        if hold:
            assert expected is not None
            fill.expectations.append(expected)
        headers = with_via(CIMultiDict(streaming.head.headers))
        headers.setdefault("Server", SERVER)
        headers["X-Cache"] = "MISS"
        status, start, stop = streaming.head.status, 0, size
        if size is not None and status == 200:
            headers["Accept-Ranges"] = "bytes"
            span = _single_range(request, size) if "If-Range" not in request.headers else None
            if span == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{size}"
                return web.Response(status=416, headers=headers)
            if isinstance(span, tuple):
                status, (start, stop) = 206, span
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        if stop is not None:
            response.content_length = stop - start
        await _prepare(request, response)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        fileobj = os.fdopen(fill.open_reader(), "rb", buffering=0)
        position = start
        reader = id(request)
        fill.reader_at(reader, position)
        try:
            while stop is None or position < stop:
                if hold and fill.finished and fill.error is None:
                    await _verdict(fill, expected)  # the whole body is in: is it the expected one?
                    hold = 0
                await fill.wait_beyond(_threshold(position, size, hold))
                available = fill.written if stop is None else min(fill.written, stop)
                if hold:
                    if fill.error is not None:
                        raise TransferAborted(fill.error)
                    if fill.finished:
                        continue  # the verdict first
                    available = min(available, max(position, (fill.written if size is None else size) - hold))
                in_file = available if fill.relay_at is None else min(available, fill.relay_at)
                if in_file > position:
                    if stop is not None:
                        await send_file(request, fileobj, position, in_file - position)
                    else:
                        await _copy_fd(response, fileobj.fileno(), position, in_file)
                    _count(request, self._metrics, "upstream", in_file - position)
                    position = in_file
                    fill.reader_at(reader, position)
                    continue
                if available > position:  # past the file: the relayed bytes (not stored)
                    data = fill.relayed(position)[: available - position]
                    await response.write(data)
                    _count(request, self._metrics, "upstream", len(data))
                    position += len(data)
                    fill.reader_at(reader, position)
                    continue
                if fill.error is not None:
                    raise TransferAborted(fill.error)
                if fill.finished:
                    break
        except TransferAborted:
            abort_connection(request)
            return response
        finally:
            fill.reader_at(reader, None)
            fileobj.close()
        await response.write_eof()
        return response

    def send_buffered(self, buffered: Buffered) -> web.Response:
        headers = with_via(CIMultiDict(buffered.headers))
        headers.setdefault("Server", SERVER)
        headers["X-Cache"] = buffered.x_cache
        return web.Response(status=buffered.status, body=buffered.body, headers=headers)

    async def send_passthrough(
        self, request: web.BaseRequest, passthrough: Passthrough, expected: Expected | None = None
    ) -> web.StreamResponse:
        upstream = passthrough.response
        verify = expected is not None and upstream.status == 200 and request.method == "GET"
        hashes = {a: hashlib.new(a) for a, _ in expected.wanted} if verify and expected is not None else {}
        held = b""  # the last chunk, sent once the body is verified
        try:
            headers = with_via(end_to_end(upstream.headers))
            headers.setdefault("Server", SERVER)
            headers["X-Cache"] = passthrough.x_cache
            response = web.StreamResponse(status=upstream.status, headers=headers)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await _prepare(request, response)
            if request.method == "HEAD" or upstream.status in (204, 304):
                await response.write_eof()
                return response
            while True:
                try:
                    chunk = await upstream.read_chunk()
                except BODY_ERRORS:
                    abort_connection(request)
                    return response
                if not chunk:
                    break
                if verify:
                    for h in hashes.values():
                        h.update(chunk)
                    chunk, held = held, chunk
                if chunk:
                    await response.write(chunk)
                    _count(request, self._metrics, "upstream", len(chunk))
            if verify and expected is not None:
                actual = {a: h.hexdigest() for a, h in hashes.items()}
                if any(actual[a] != want for a, want in expected.wanted):
                    self._metrics.checksum_mismatches.labels("miss").inc()
                    wanted = ", ".join(f"{a} {h}" for a, h in expected.wanted)
                    log.warning("checksum mismatch: %s has %s, the request expects %s", upstream.url, actual, wanted)
                    abort_connection(request)
                    return response
                if held:
                    await response.write(held)
                    _count(request, self._metrics, "upstream", len(held))
            await response.write_eof()
            return response
        finally:
            upstream.release()
