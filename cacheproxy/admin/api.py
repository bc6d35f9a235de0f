"""The admin API under ``/_cacheproxy/api/`` (SPEC section 7): JSON in, JSON out.

| call | what |
|---|---|
| ``GET objects?url=URL`` | what is stored for URL; 404 if nothing |
| ``PUT objects?url=URL`` | store the body as URL's object (``X-Checksum-Sha256``/``-Md5`` checked); 201 |
| ``DELETE objects?url=URL`` | purge (OBS too); 204 / 404 |
| ``POST prefetch`` ``{"urls": [...]}`` | 202 and a job; ``GET prefetch/ID`` shows it |
| ``GET stats`` | counters and store usage |

Calls that change state need ``Authorization: Bearer <token>`` with a token of ``admin.tokens``
(401 without one, 403 with a wrong one, 403 when none is configured); every caller must be an
allowed client (the pipeline checks that before any endpoint). Every refusal is a JSON error
with ``X-Cacheproxy-Error``, never a 500.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from yarl import URL

from ..cache.upload import Upload, UploadRefused
from ..errors import (
    BadRequest,
    Conflict,
    Denied,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    TooLarge,
    Unauthorized,
    Unavailable,
    error_response,
)
from ..guard.ssrf import PrivateUpstreamError
from ..proxy.target import parse_origin_url
from ..state import AppState
from ..storage.obs import ObsUnavailable
from .jobs import MAX_URLS, Jobs
from .stats import Stats

PREFIX = "/_cacheproxy/api/"
MAX_JSON = 1 << 20  # bytes of a JSON request body
READ = frozenset({"GET", "HEAD"})

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class AdminApi:
    def __init__(self, state: AppState, stats: Stats, jobs: Jobs) -> None:
        self.state = state
        self.stats = stats
        self.jobs = jobs
        self._tokens = [t.encode() for t in state.config.admin.tokens if t.strip()]  # "${TOKEN:-}" unset: none

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self._route(request)
        except ProxyError as exc:
            return error_response(request, exc, as_json=True)

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path[len(PREFIX) :]
        method = request.method
        if path == "objects":
            handlers: dict[str, Handler] = {
                "GET": self.object_info,
                "HEAD": self.object_info,
                "PUT": self.upload,
                "DELETE": self.purge,
            }
        elif path == "prefetch":
            handlers = {"POST": self.prefetch}
        elif path.startswith("prefetch/"):
            handlers = {"GET": self.prefetch_job, "HEAD": self.prefetch_job}
        elif path == "stats":
            handlers = {"GET": self.stats_call, "HEAD": self.stats_call}
        else:
            raise NotFound(f"no such API call: {request.path[:200]}")
        handler = handlers.get(method)
        if handler is None:
            allow = ", ".join(handlers)
            raise MethodNotAllowed(f"{method} is not allowed here (allowed: {allow})", headers={"Allow": allow})
        if method not in READ:
            self._authorize(request)
        return await handler(request)

    def _authorize(self, request: web.BaseRequest) -> None:
        if not self._tokens:
            raise Denied("state-changing calls are off: no admin.tokens are configured", code="forbidden")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this call needs Authorization: Bearer <token> (a token of admin.tokens)")
        given = token.strip().encode()
        matched = False
        for known in self._tokens:  # every token compared, each in constant time
            matched |= hmac.compare_digest(given, known)
        if not matched:
            raise Denied("the token is not one of admin.tokens", code="forbidden")

    def _url(self, text: str | None) -> URL:
        """A URL the proxy would fetch, or the 4xx it would answer."""
        if not text:
            raise BadRequest("the url parameter is missing (…?url=https://origin/path)", code="bad_url")
        url = parse_origin_url(text)
        self.state.access.check_url(url)
        try:
            self.state.upstream.guard.check_literal(url.host or "")
        except PrivateUpstreamError as exc:
            raise Denied(str(exc), code="private_upstream") from None
        return url

    # -- objects ------------------------------------------------------------------------------

    async def object_info(self, request: web.BaseRequest) -> web.Response:
        url = self._url(request.query.get("url"))
        meta = await self.state.cache.lookup(url)
        if meta is None:
            raise NotFound(f"not cached: {url.with_password('***') if url.password else url}")
        info = meta.public()
        first = await self.state.cache.first_seen(url)
        if first is not None:  # an immutable URL: its first body's digest, and whether it changed since
            info["first_seen"] = dataclasses.asdict(first)
        return _json(info)

    async def upload(self, request: web.BaseRequest) -> web.Response:
        url = self._url(request.query.get("url"))
        expected = {}
        for name in ("sha256", "sha512", "md5"):
            value = request.headers.get(f"X-Checksum-{name.capitalize()}")
            if value is not None:
                expected[name] = value.strip()
        try:
            upload = Upload(
                _body(request),
                request.content_length,
                request.headers.get("Content-Type", "application/octet-stream"),
                expected,
            )
            meta = await self.state.cache.put(url, upload)
        except UploadRefused as exc:
            if exc.code == "too_large":
                raise TooLarge(exc.reason) from None
            if exc.code == "busy":
                raise Conflict(exc.reason, code="busy") from None
            raise BadRequest(exc.reason, code=exc.code) from None
        return _json(meta.public(), status=201)

    async def purge(self, request: web.BaseRequest) -> web.Response:
        url = self._url(request.query.get("url"))
        try:
            found = await self.state.cache.purge_url(url)
        except ObsUnavailable as exc:
            raise Unavailable(f"removed here; OBS could not be asked: {exc}", code="obs_unavailable") from None
        if not found:
            raise NotFound("not cached")
        return web.Response(status=204)

    # -- prefetch -----------------------------------------------------------------------------

    async def prefetch(self, request: web.BaseRequest) -> web.Response:
        data = await _json_body(request)
        urls = data.get("urls") if isinstance(data, dict) else None
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise BadRequest('expected {"urls": ["https://origin/path", ...]} with at least one URL')
        if len(urls) > MAX_URLS:
            raise TooLarge(f"at most {MAX_URLS} URLs in one job")
        parsed = []
        for given in urls:
            try:
                parsed.append((given, self._url(given)))
            except ProxyError as exc:
                exc.reason = f"{given[:200]}: {exc.reason}"
                raise
        job = await self.jobs.start(parsed)
        return _json(job, status=202, headers={"Location": f"{PREFIX}prefetch/{job['id']}"})

    async def prefetch_job(self, request: web.BaseRequest) -> web.Response:
        job = await self.jobs.get(request.path.rsplit("/", 1)[-1])
        if job is None:
            raise NotFound("no such prefetch job (finished jobs are kept for a day)")
        return _json(job)

    async def stats_call(self, request: web.BaseRequest) -> web.Response:
        return _json(await self.stats.snapshot())


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data, indent=1) + "\n", content_type="application/json", headers=headers
    )


async def _json_body(request: web.BaseRequest) -> object:
    if request.content_length is not None and request.content_length > MAX_JSON:
        raise TooLarge(f"a JSON body is at most {MAX_JSON} bytes")
    raw = await request.content.read(MAX_JSON + 1)
    if len(raw) > MAX_JSON:
        raise TooLarge(f"a JSON body is at most {MAX_JSON} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}", code="bad_json") from None


async def _body(request: web.BaseRequest) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(1 << 20):
        yield chunk
