"""The cache: lookups against the index, single-flight fills from the origin, eviction.

``Cache.get`` answers every GET/HEAD with an :data:`~.fill.Outcome`; the proxy layer turns that
into bytes for the client. Nothing here writes to a client.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

from ..config import Config
from ..errors import ProxyError, TransferAborted, UpstreamFailed
from ..ops.logging import redact
from ..ops.metrics import Metrics
from ..storage.base import ObjectMeta
from ..storage.flight import FillLock, HeadFile, Watch
from ..storage.local import LocalStore, LocalWriter
from ..upstream.http import BODY_ERRORS, HttpUpstream, Response, describe, end_to_end
from ..upstream.retry import RetryBudget
from .fill import Buffered, Fill, Head, Hit, Outcome, Passthrough
from .freshness import client_wants_revalidation, freshness, is_fresh, unstorable_reason
from .hot import HotBodies
from .index import Index
from .keys import MirrorMap
from .shared import SharedTier

log = logging.getLogger(__name__)

FORWARDED_REQUEST_HEADERS = ("User-Agent", "Accept", "Accept-Language")
BUFFER_LIMIT = 64 << 10  # origin error bodies up to this size are shared with every waiting client
WRITE_MIN = 1 << 20  # a write waits for this many bytes ...
WRITE_WAIT = 0.05  # ... or this many seconds, so that slow origins still stream promptly
WRITE_BATCH = 8 << 20  # bytes gathered while the previous write is still running
SNAPSHOT_AFTER = 1000  # entries read one by one at start that make a new snapshot worth writing
SPLICERS = 32  # plain-HTTP bodies copied by threads at once (more use the event loop path)
FOLLOW_POLL = 0.005  # seconds between looks at another worker's fill
FOLLOW_ROUNDS = 3  # fills of other workers followed before giving up on a key
KNOWN_KEYS = 10_000  # URLs whose cache key is remembered
ARCHIVE = re.compile(r"\.(tar|tgz|tbz2?|txz|gz|xz|bz2|zst|lz|lzma|zip|7z|rpm|srpm|deb|jar|gem|crate|whl)$", re.I)


def strong_validator(headers: Mapping[str, str]) -> str | None:
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


@dataclass
class Failure:
    url: str
    error: str
    time: float


class Cache:
    def __init__(
        self,
        config: Config,
        store: LocalStore,
        upstream: HttpUpstream,
        metrics: Metrics,
        shared: SharedTier | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.shared = shared  # OBS behind the local store (storage.backend: obs)
        self.upstream = upstream
        self.metrics = metrics
        self.index = Index()
        self.mirrors = MirrorMap(config.upstream.mirrors)
        self.rules = config.refresh_rules
        self.fills: dict[str, Fill] = {}
        self.hot = HotBodies(store, self.forget)
        self._keys: dict[URL, str] = {}  # cache keys of the URLs asked for last
        self.recent_failures: collections.deque[Failure] = collections.deque(maxlen=100)
        self._negative: dict[str, tuple[float, Buffered]] = {}
        self._dirty: set[str] = set()
        self._evicting = False
        self._splicing = 0
        self._snapshot: asyncio.Task[None] | None = None
        self._splicer_pool = ThreadPoolExecutor(max_workers=SPLICERS, thread_name_prefix="cacheproxy-splice")
        metrics.bind_store(lambda: len(self.index), lambda: self.index.total_size)

    # -- start and stop -----------------------------------------------------------------------

    async def load(self) -> None:
        started = time.monotonic()
        async for meta in self.store.scan():
            self.index.put(meta)
        self.index.loaded = True
        log.info(
            "index loaded: %d objects, %d bytes in %.2fs (%d read one by one)",
            len(self.index),
            self.index.total_size,
            time.monotonic() - started,
            self.store.scan_reads,
        )
        if self.store.scan_reads > SNAPSHOT_AFTER:  # in the background: serving starts now
            self._snapshot = asyncio.create_task(self.save_snapshot())
        if self.shared is not None:
            for meta in self.index:
                if not meta.remote:  # committed before an upload could finish: upload it now
                    self.shared.upload_later(meta)
            self.shared.start()

    async def save_snapshot(self) -> None:
        await self.store.run(self.store.write_snapshot_sync, list(self.index))

    async def close(self, grace: float = 0.0) -> None:
        fills = [f.task for f in self.fills.values() if f.task is not None]
        if fills and grace > 0:
            await asyncio.wait(fills, timeout=grace)
        for task in fills:
            task.cancel()
        if fills:
            await asyncio.gather(*fills, return_exceptions=True)
        self._splicer_pool.shutdown(wait=True)
        self.hot.close()
        await self.flush_access_times()
        if self._snapshot is not None:
            await asyncio.gather(self._snapshot, return_exceptions=True)
        await self.save_snapshot()
        if self.shared is not None:
            await self.shared.close()

    # -- lookups ------------------------------------------------------------------------------

    def key_for(self, url: URL) -> str:
        key = self._keys.get(url)
        if key is None:
            key = self.mirrors.key(url)
            if len(self._keys) >= KNOWN_KEYS:
                self._keys.clear()
            self._keys[url] = key
        return key

    def touch(self, meta: ObjectMeta) -> None:
        meta.last_access = time.time()
        self._dirty.add(meta.key)

    def _vary_matches(self, meta: ObjectMeta, headers: Mapping[str, str]) -> bool:
        return all(headers.get(name, "") == value for name, value in meta.vary.items())

    async def from_store(self, key: str) -> ObjectMeta | None:
        """An object this process does not know yet, stored by another worker or instance."""
        meta = await self.store.stat(key)
        if meta is not None:
            self.index.put(meta)
        return meta

    def forget(self, meta: ObjectMeta) -> None:
        """The body went away under us (evicted or replaced by another worker)."""
        if self.index.get(meta.key) is meta:
            self.index.remove(meta.key)
        self.hot.discard(meta.key)

    def fresh(self, url: URL, headers: Mapping[str, str]) -> Hit | None:
        """The fresh hit for this request that this process can answer at once, or None.

        Raise FileNotFoundError when the object turned out removed by another worker (it is
        forgotten here; a new lookup goes on from the store).
        """
        meta = self.index.get(self.key_for(url))
        if meta is None or (meta.vary and not self._vary_matches(meta, headers)):
            return None
        if not is_fresh(meta.lifetime, meta.response_time, time.time()) or client_wants_revalidation(headers):
            return None
        ready = self.hot.get(meta)
        self.touch(meta)
        return Hit(meta, ready=ready)

    def hit(self, meta: ObjectMeta, x_cache: str = "HIT") -> Hit:
        """A hit of ``meta``, with where its body comes from."""
        if meta.file or self.shared is None:
            return Hit(meta, x_cache)
        shared = self.shared
        if shared.config.serve_hits == "redirect":  # the client fetches it from OBS, with a URL that expires
            return Hit(meta, x_cache, redirect=shared.signed_url(meta))
        return Hit(meta, x_cache, remote=lambda start, stop: shared.remote.read(meta, start, stop))

    async def get(self, url: URL, method: str, headers: Mapping[str, str]) -> Outcome:
        if self.shared is not None and self.shared.is_own(url):
            # A signed URL of our own bucket, fetched through us: pass it on, never a second copy.
            return await self.bypass(url, method, headers)
        try:
            hit = self.fresh(url, headers)
        except FileNotFoundError:  # another worker removed it: look again below
            hit = None
        if hit is not None:
            return hit
        key = self.key_for(url)
        meta = self.index.get(key)
        if meta is None and key not in self.fills:
            meta = await self.from_store(key)
            if meta is None and self.shared is not None:
                meta = await self.shared.lookup(key)  # another instance may have stored it
        if meta is not None and not self._vary_matches(meta, headers):
            return await self.bypass(url, method, headers, x_cache="BYPASS")
        revalidate = client_wants_revalidation(headers)
        if meta is not None and not revalidate and is_fresh(meta.lifetime, meta.response_time, time.time()):
            try:
                ready = self.hot.get(meta)
            except FileNotFoundError:  # removed by another worker just now: fetch it again
                return await self.get(url, method, headers)
            self.touch(meta)
            hit = self.hit(meta)
            hit.ready = ready
            return hit
        negative = self._negative.get(key)
        if negative is not None and not revalidate:
            if negative[0] > time.monotonic():
                return Buffered(negative[1].status, negative[1].headers, negative[1].body, "HIT")
            del self._negative[key]
        if method == "HEAD" and meta is None:
            return await self.bypass(url, "HEAD", headers, x_cache="MISS")
        fill = self.fills.get(key)
        if fill is None:
            fill = self._start_fill(key, url, meta, headers)
        outcome = await asyncio.shield(fill.head)
        if isinstance(outcome, Passthrough) and outcome.claim() is None:
            return await self.bypass(url, method, headers, x_cache=outcome.x_cache)
        return outcome

    async def bypass(self, url: URL, method: str, headers: Mapping[str, str], x_cache: str = "BYPASS") -> Passthrough:
        """Fetch a GET/HEAD for this client alone; nothing is stored."""
        forward = {k: v for k, v in headers.items() if k in FORWARDED_REQUEST_HEADERS or k == "Range"}
        response = await self.upstream.open(self.mirrors.candidates(url), forward, self.upstream.new_budget(), method)
        passthrough = Passthrough(response, x_cache)
        passthrough.claim()
        return passthrough

    async def forward(self, url: URL, method: str, headers: Mapping[str, str], body: object) -> Passthrough:
        """Another method (``rules.allow_other_methods``): forwarded once, never retried or stored."""
        forward = {k: v for k, v in end_to_end(headers).items() if k.lower() != "host"}
        response = await self.upstream.open([url], forward, RetryBudget(0, 0), method, data=body)
        passthrough = Passthrough(response, "BYPASS")
        passthrough.claim()
        return passthrough

    # -- fills --------------------------------------------------------------------------------

    def _start_fill(self, key: str, url: URL, stale: ObjectMeta | None, headers: Mapping[str, str]) -> Fill:
        fill = Fill(key)
        self.fills[key] = fill
        forward = {k: headers[k] for k in FORWARDED_REQUEST_HEADERS if k in headers}
        fill.task = asyncio.create_task(self._run_fill(fill, url, stale, forward), name=f"fill {key}")
        self.metrics.fills_in_progress.inc()
        return fill

    def record_failure(self, url: URL | str, error: str) -> None:
        self.recent_failures.append(Failure(redact(str(url)), redact(error), time.time()))

    async def _run_fill(self, fill: Fill, url: URL, stale: ObjectMeta | None, forward: dict[str, str]) -> None:
        lock = FillLock.for_key(self.store.tmp_dir, fill.key)
        try:
            for _ in range(FOLLOW_ROUNDS):
                if await self.store.run(lock.try_acquire):
                    break
                if await self._follow(fill):  # another worker fills this key
                    return
            else:
                raise UpstreamFailed("another worker's fill of this URL did not produce a response; try again")
            current = await self.store.stat(fill.key)
            if current is not None and (
                stale is None or (current.file, current.response_time) != (stale.file, stale.response_time)
            ):
                self.index.put(current)
                fill.set_outcome(self.hit(current))  # another worker stored it just before we got the lock
                fill.finish()
                return
            await self._fetch(fill, url, stale, forward, lock)
        except ProxyError as exc:
            fill.set_error(exc)
        except asyncio.CancelledError:
            fill.set_error(UpstreamFailed("the fill was cancelled (shutting down)"))
            raise
        except Exception as exc:  # a bug or an I/O error: the clients must see an error, not hang
            log.exception("fill of %s failed", url)
            fill.set_error(UpstreamFailed(f"internal error: {describe(exc)}") if not fill.head.done() else exc)
        finally:
            # Leave self.fills first: a request from now on must not join a fill that is over.
            fill.close()
            self.fills.pop(fill.key, None)
            self.metrics.fills_in_progress.dec()
            if lock.held:
                await self.store.run(lock.release)

    async def _follow(self, fill: Fill) -> bool:
        """Serve this process's clients from another worker's fill of the same key.

        False when that fill ended without anything to follow (an error answer, say): then this
        process fetches the key itself.
        """
        watch = await self.store.run(Watch, self.store.tmp_dir, fill.key)
        try:
            while (head := await self.store.run(watch.head)) is None:
                if await self.store.run(watch.owner_done):
                    return await self._follow_done(fill, None)
                await asyncio.sleep(FOLLOW_POLL)
            try:
                fill.start_streaming(head.part, Head(CIMultiDict(head.headers), head.size))
            except FileNotFoundError:  # committed (renamed) between reading the head and opening it
                return await self._follow_done(fill, None)
            while True:
                done = await self.store.run(watch.owner_done)
                grown = fill.grown()
                if grown:
                    fill.advance(grown)
                if done:
                    return await self._follow_done(fill, head.size)
                await asyncio.sleep(FOLLOW_POLL)
        finally:
            watch.close()

    async def _follow_done(self, fill: Fill, size: int | None) -> bool:
        """The other worker's fill ended: complete our clients' bodies, or answer from the store."""
        current = await self.from_store(fill.key)
        if fill.head.done():
            if current is not None and current.size == fill.written and size in (None, fill.written):
                fill.finish()
            else:
                fill.set_error(TransferAborted(f"the fill in another worker broke after {fill.written} bytes"))
            return True
        if current is None:
            return False
        fill.set_outcome(self.hit(current))
        fill.finish()
        return True

    async def _fetch(
        self, fill: Fill, url: URL, stale: ObjectMeta | None, forward: dict[str, str], lock: FillLock
    ) -> None:
        started = time.monotonic()
        budget = self.upstream.new_budget()
        response: Response | None = None
        try:
            request_headers = dict(forward)
            if stale is not None:
                if stale.etag:
                    request_headers["If-None-Match"] = stale.etag
                if stale.last_modified:
                    request_headers["If-Modified-Since"] = stale.last_modified
            try:
                response = await self.upstream.open(self.mirrors.candidates(url), request_headers, budget)
            except UpstreamFailed as exc:
                self.record_failure(url, exc.reason)
                if stale is not None and not stale.must_revalidate:
                    log.warning("serving stale %s: %s", url, exc.reason)
                    fill.set_outcome(self.hit(stale, "STALE"))
                    fill.finish()
                    return
                raise
            owned, response = response, None  # from here the helpers release or hand it over
            if owned.status == 304 and stale is not None:
                owned.release()
                await self._revalidated(fill, stale, owned)
                return
            if owned.status != 200:
                await self._origin_error(fill, url, owned)
                return
            await self._fill_body(fill, url, owned, budget, forward, lock)
            self.metrics.upstream_fetch_seconds.observe(time.monotonic() - started)
        finally:
            if response is not None:
                response.release()

    async def _revalidated(self, fill: Fill, stale: ObjectMeta, response: Response) -> None:
        # The 304 may update validators and freshness; what it leaves out stays as stored.
        merged: CIMultiDict[str] = CIMultiDict()
        if stale.etag:
            merged["ETag"] = stale.etag
        if stale.last_modified:
            merged["Last-Modified"] = stale.last_modified
        for name in ("ETag", "Last-Modified", "Cache-Control", "Expires", "Date"):
            if name in response.headers:
                merged[name] = response.headers[name]
        now = time.time()
        fresh = freshness(URL(stale.url).path, merged, now, self.rules)
        stale.response_time = now
        stale.lifetime = fresh.lifetime
        stale.must_revalidate = fresh.must_revalidate
        stale.etag = merged.get("ETag") or None
        stale.last_modified = merged.get("Last-Modified") or None
        if not stale.file and self.shared is not None:  # only the shared store has the body
            await self.shared.update_meta(stale)
        else:
            self.touch(stale)
            self.index.put(stale)
            await self.store.update_meta(stale)
        fill.set_outcome(self.hit(stale, "REVALIDATED"))
        fill.finish()

    async def _origin_error(self, fill: Fill, url: URL, response: Response) -> None:
        """A non-200 final answer: shared with every waiter when small, remembered if 404/410."""
        if response.status >= 400:
            self.record_failure(url, f"origin answered {response.status}")
        length = response.content_length
        if length is not None and length > BUFFER_LIMIT:
            fill.set_outcome(Passthrough(response))
            return
        try:
            body = await response.read_body(BUFFER_LIMIT)
        except BODY_ERRORS as exc:
            response.close()
            raise UpstreamFailed(f"upstream failed: {describe(exc)}") from None
        if len(body) > BUFFER_LIMIT:
            response.close()
            raise UpstreamFailed(f"origin answered {response.status} with an error body over {BUFFER_LIMIT} bytes")
        response.release()
        buffered = Buffered(response.status, end_to_end(response.headers), body)
        if response.status in (404, 410) and self.config.rules.negative_ttl > 0:
            self._negative[fill.key] = (time.monotonic() + self.config.rules.negative_ttl, buffered)
        fill.set_outcome(buffered)

    async def _fill_body(
        self,
        fill: Fill,
        url: URL,
        response: Response,
        budget: RetryBudget,
        forward: dict[str, str],
        lock: FillLock,
    ) -> None:
        headers = response.headers
        size = response.content_length
        not_stored = unstorable_reason(headers)
        max_size = self.config.cache.max_object_size
        if not_stored is None and size is not None and size > max_size:
            not_stored = f"larger than cache.max_object_size ({size} > {max_size})"
        html = "text/html" in headers.get("Content-Type", "").lower()
        if not_stored is None and html and self.config.rules.refuse_html_archives and ARCHIVE.search(url.path):
            self.record_failure(url, "origin answered an HTML page for an archive URL")
            not_stored = "HTML body for an archive URL"
        if not_stored is not None:
            log.info("not storing %s: %s", url, not_stored)
            fill.set_outcome(Passthrough(response))
            return
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        writer = await self.store.begin_write(fill.key)
        try:
            head = Head(end_to_end(headers), size)
            await self.store.run(lock.publish, HeadFile(writer.path, list(head.headers.items()), size))
            fill.start_streaming(writer.path, head)
            response = await self._tee(fill, response, writer, budget, forward, size)
            if size is not None and writer.written != size:
                raise TransferAborted(f"got {writer.written} of {size} bytes")
            fill.finish()
            storable = (size is not None or chunked) and writer.written <= max_size
            if not storable:
                log.info("not storing %s: body length unknown (no Content-Length, not chunked)", url)
                await writer.abort()
                return
            await self._commit(fill.key, url, response, writer)
        except BaseException as exc:
            await writer.abort()
            if isinstance(exc, TransferAborted):
                self.record_failure(url, str(exc))
                log.warning("fill of %s aborted: %s", url, exc)
                fill.set_error(exc)
                return
            raise
        finally:
            response.release()

    async def _tee(
        self,
        fill: Fill,
        response: Response,
        writer: LocalWriter,
        budget: RetryBudget,
        forward: dict[str, str],
        size: int | None,
    ) -> Response:
        """Copy the body into the writer; resume with Range after a drop. Return the last response."""
        validator = strong_validator(response.headers)
        pending: asyncio.Task[None] | None = None
        buffer: list[bytes] = []
        buffered = 0
        loop = asyncio.get_running_loop()
        last_flush = loop.time()

        async def flush(chunks: list[bytes], size: int) -> None:
            await writer.write(chunks)
            fill.advance(size)

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
                if size is not None and self._splicing < SPLICERS and (detached := response.detach_socket()):
                    await drain()
                    try:
                        await self._splice_rest(fill, writer, size, *detached)
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
                    response = await self._resume(response, writer.written, validator, budget, forward, exc)
                    continue
                if not chunk:
                    break
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

    async def _splice_rest(self, fill: Fill, writer: LocalWriter, size: int, held: bytes, sock: int) -> None:
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
                self._splicer_pool,
                writer.splice_sync,
                sock,
                remaining,
                report,
                stop,
                self.config.upstream.read_timeout,
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
        forward: dict[str, str],
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

    async def _commit(self, key: str, url: URL, response: Response, writer: LocalWriter) -> None:
        now = time.time()
        sha256, md5 = await writer.digests()
        fresh = freshness(url.path, response.headers, now, self.rules)
        vary = {}
        for name in response.headers.get("Vary", "").split(","):
            name = name.strip()
            if name and name.lower() != "accept-encoding":  # we always fetch the identity encoding
                vary[name] = response.request_headers.get(name, "")
        h = response.headers
        meta = ObjectMeta(
            key=key,
            url=str(url.with_user(None)),  # no FTP credentials in the store
            size=writer.written,
            sha256=sha256,
            md5=md5,
            stored_at=now,
            response_time=now,
            lifetime=fresh.lifetime,
            must_revalidate=fresh.must_revalidate,
            content_type=h.get("Content-Type"),
            content_disposition=h.get("Content-Disposition"),
            content_encoding=h.get("Content-Encoding"),
            etag=h.get("ETag"),
            last_modified=h.get("Last-Modified"),
            vary=vary,
            last_access=now,
        )
        meta = await writer.commit(meta)
        self.index.put(meta)
        log.info("stored %s (%d bytes, sha256 %s)", url, meta.size, sha256)
        if self.shared is not None:
            self.shared.upload_later(meta)
        await self.evict_if_needed()

    async def readiness(self) -> dict[str, dict[str, object]]:
        """Each check readyz shows: the store takes writes, the index is loaded, OBS answers."""
        checks: dict[str, dict[str, object]] = {}
        problem = await self.store.check_writable()
        checks["store_writable"] = {"ok": problem is None, **({"error": problem} if problem else {})}
        checks["index_loaded"] = {"ok": self.index.loaded, "objects": len(self.index)}
        if self.shared is not None:
            shared = self.shared
            problem = shared.problem
            checks["obs"] = {
                "ok": problem is None,
                "bucket": shared.remote.bucket,
                "objects": len(shared.entries),
                "pending_uploads": len(shared.pending),
                **({"error": problem} if problem else {}),
            }
        return checks

    # -- housekeeping -------------------------------------------------------------------------

    def capacity(self) -> int:
        total, _ = self.store.disk_usage()
        return self.config.cache.max_size.resolve(total)

    async def evict_if_needed(self) -> int:
        if self._evicting:
            return 0
        capacity = self.capacity()
        if self.index.total_size <= capacity * self.config.cache.high_watermark:
            return 0
        self._evicting = True
        evicted = 0
        try:
            target = capacity * self.config.cache.low_watermark
            for meta in self.index.least_recently_used():
                if self.index.total_size <= target:
                    break
                if meta.key in self.fills:
                    continue
                if self.shared is not None and not meta.remote:
                    continue  # not in OBS yet: the local copy is the only one
                await self.purge(meta)
                evicted += 1
            self.metrics.evictions.inc(evicted)
            log.info("evicted %d objects; store now %d bytes", evicted, self.index.total_size)
        finally:
            self._evicting = False
        return evicted

    async def purge(self, meta: ObjectMeta) -> None:
        self.index.remove(meta.key)
        self._dirty.discard(meta.key)
        self.hot.discard(meta.key)
        await self.store.delete(meta)

    async def flush_access_times(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            meta = self.index.get(key)
            if meta is not None:
                await self.store.run(self.store.touch_sync, meta)

    async def reload_index(self) -> None:
        """Take in what other workers stored or removed since the last look."""
        fresh = Index()
        async for meta in self.store.scan():
            known = self.index.get(meta.key)
            if known is not None and known.file == meta.file:
                meta.last_access = max(meta.last_access, known.last_access)
            fresh.put(meta)
        fresh.loaded = True
        self.index = fresh

    async def cleanup(self) -> None:
        """Periodic: persist access times, evict, remove leftovers of interrupted fills."""
        await self.flush_access_times()
        if self.config.workers > 1:
            await self.reload_index()
        await self.save_snapshot()
        await self.evict_if_needed()
        now = time.monotonic()
        self._negative = {k: v for k, v in self._negative.items() if v[0] > now}
        removed = await self.store.run(self.store.remove_stale_temp)
        if removed:
            log.info("removed %d leftover temp file(s)", removed)
        if self.shared is not None:
            await self.shared.cleanup()
