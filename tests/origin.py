"""A real HTTP origin for tests: an aiohttp app with fault switches and a request log."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from dataclasses import dataclass, field
from email.utils import formatdate

from aiohttp import web

CHUNK = 64 << 10


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    etag: str | None = '"v1"'
    last_modified: str | None = formatdate(1_600_000_000, usegmt=True)
    headers: dict[str, str] = field(default_factory=dict)
    ranges: bool = True  # honour Range (206) and advertise Accept-Ranges
    chunked: bool = False  # no Content-Length, chunked transfer encoding
    delay: float = 0.0  # before the headers
    rate: float | None = None  # bytes per second
    drop_after: int | None = None  # abort the connection after this many body bytes ...
    drops: int = 1  # ... in this many responses
    fail_first: int = 0  # answer 503 to the first K requests
    redirect_to: str | None = None
    repeat: int = 1  # the body is sent this many times over (a long stream from a short body)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    peer: object = None  # the client's (address, port): which connection it came on


class Origin:
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.routes: dict[str, Route] = {}
        self.log: list[Seen] = []
        self._served: dict[str, int] = {}
        self.port = 0
        self.runner: web.AppRunner | None = None

    def add(self, path: str, route: Route | None = None, **kwargs: object) -> Route:
        self.routes[path] = route or Route(**kwargs)  # type: ignore[arg-type]
        return self.routes[path]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def hits(self, path: str, method: str = "GET") -> int:
        return sum(1 for s in self.log if s.path == path and s.method == method)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path_qs
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        self.log.append(Seen(request.method, path, dict(request.headers), peer))
        route = self.routes.get(path)
        if route is None:
            return web.Response(status=404, text="no such file\n")
        count = self._served[path] = self._served.get(path, 0) + 1
        if route.delay:
            await asyncio.sleep(route.delay)
        if count <= route.fail_first:
            return web.Response(status=503, text="try later\n")
        if route.redirect_to:
            raise web.HTTPFound(route.redirect_to)
        headers = {"Content-Type": route.content_type, **route.headers}
        if route.etag:
            headers["ETag"] = route.etag
        if route.last_modified:
            headers["Last-Modified"] = route.last_modified
        if route.ranges:
            headers["Accept-Ranges"] = "bytes"
        if route.etag and request.headers.get("If-None-Match") == route.etag:
            return web.Response(status=304, headers=headers)
        if route.status != 200:
            return web.Response(status=route.status, body=route.body, headers=headers)
        body, status = route.body * route.repeat if route.repeat > 1 and not route.chunked else route.body, 200
        wanted = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if route.ranges and wanted and (if_range is None or if_range in (route.etag, route.last_modified)):
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            body, status = body[start:], 206
        response = web.StreamResponse(status=status, headers=headers)
        if route.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        limit = route.drop_after if route.drop_after is not None and count - route.fail_first <= route.drops else None
        sent = 0
        if route.chunked and route.repeat > 1:
            for _ in range(route.repeat):
                await response.write(body)
            await response.write_eof()
            return response
        for offset in range(0, len(body), CHUNK):
            piece = body[offset : offset + CHUNK]
            if limit is not None and sent + len(piece) > limit:
                await response.write(piece[: limit - sent])
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write(piece)
            sent += len(piece)
            if route.rate:
                await asyncio.sleep(len(piece) / route.rate)
        await response.write_eof()
        return response
