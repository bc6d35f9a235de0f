"""Single-flight fills: one origin fetch per key, in this process and across workers.

A fill takes the key's lock file (another worker holding it is followed instead: its growing temp
file is streamed), fetches from the origin with the first client's end-to-end headers, retries
and mirrors, revalidates a stale object with its validators, shares a small error answer that may
not be stored with every waiting client, streams a storable response (of any status RFC 9111
allows) into the store through the :class:`~.pump.Pump`, and commits it: hashed, renamed and
indexed before it is ever a hit.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping

from multidict import CIMultiDict
from yarl import URL

from ..config import Config
from ..errors import ProxyError, TransferAborted, UpstreamFailed
from ..headers import end_to_end, for_storage, request_to_origin, updated
from ..ops.alerts import CONTENT_CHANGED, STORE_UNWRITABLE, Alerts
from ..ops.logging import redact
from ..ops.metrics import Metrics
from ..storage.base import ObjectMeta, Spool, SpoolWriter
from ..storage.flight import FillLock, HeadFile, Watch
from ..upstream.http import BODY_ERRORS, HttpUpstream, Response, describe
from ..upstream.retry import RetryBudget
from .fill import Buffered, Fill, Head, Hit, Passthrough
from .freshness import freshness, initial_age, match_rule, unstorable_reason
from .index import Index
from .keys import MirrorMap
from .provenance import Provenance
from .pump import NoReaders, Pump
from .shared import SharedTier
from .variants import nominated, vary_matches

log = logging.getLogger(__name__)

BUFFER_LIMIT = 64 << 10  # error answers up to this size are shared with every waiting client, or stored
FOLLOW_POLL = 0.005  # seconds between looks at another worker's fill
FOLLOW_ROUNDS = 3  # fills of other workers followed before giving up on a key
ARCHIVE = re.compile(r"\.(tar|tgz|tbz2?|txz|gz|xz|bz2|zst|lz|lzma|zip|7z|rpm|srpm|deb|jar|gem|crate|whl)$", re.I)


class Fetcher:
    def __init__(
        self,
        config: Config,
        store: Spool,
        upstream: HttpUpstream,
        metrics: Metrics,
        index: Index,
        shared: SharedTier | None,
        fills: dict[str, Fill],
        alerts: Alerts,
        mirrors: MirrorMap,
        *,
        hit: Callable[[ObjectMeta, str], Hit],
        reusable: Callable[[ObjectMeta, Mapping[str, str]], bool],
        from_store: Callable[[str], Awaitable[ObjectMeta | None]],
        touch: Callable[[ObjectMeta], None],
        stored: Callable[[ObjectMeta], Awaitable[None]],
        provenance: Provenance,
    ) -> None:
        self.config = config
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.index = index
        self.shared = shared
        self.fills = fills
        self.alerts = alerts
        self.hit = hit
        self.reusable = reusable
        self.from_store = from_store
        self.touch = touch
        self.stored = stored
        self.mirrors = mirrors
        self.provenance = provenance
        self.rules = config.refresh_rules
        self.pump = Pump(upstream, config.upstream.read_timeout)

    def start(self, key: str, url: URL, stale: ObjectMeta | None, headers: Mapping[str, str]) -> Fill:
        fill = Fill(key, headers, redact(str(url)))
        self.fills[key] = fill
        forward = request_to_origin(headers, fill=True)
        fill.task = asyncio.create_task(self._run(fill, url, stale, forward), name=f"fill {key}")
        self.metrics.fills_in_progress.inc()
        return fill

    async def _run(self, fill: Fill, url: URL, stale: ObjectMeta | None, forward: CIMultiDict[str]) -> None:
        lock = FillLock.for_key(self.store.tmp_dir, fill.key)
        try:
            for _ in range(FOLLOW_ROUNDS):
                try:
                    taken = await self.store.run(lock.try_acquire)
                except OSError as exc:  # a read-only or broken store: serve, store nothing
                    self._unwritable(url, exc)
                    await self._fetch(fill, url, None, forward, None)
                    return
                if taken:
                    break
                if await self._follow(fill, stale):  # another worker fills this key
                    return
            else:
                raise UpstreamFailed("another worker's fill of this URL did not produce a response; try again")
            current = await self.store.stat(fill.key)
            if current is not None and _newer(current, stale) and vary_matches(current.vary, fill.request_headers):
                # Another worker stored it after this request looked: answered by the same rules as
                # any stored object (a no-cache answer, or a request's no-cache, validates it).
                self.index.put(current)
                if self._answered_from(fill, current):
                    return
                stale = current
            if self.shared is not None and stale is None:
                other = await self.shared.lease(fill.key)  # another instance may be fetching it
                if other is not None and vary_matches(other.vary, fill.request_headers):
                    if self._answered_from(fill, other):
                        return
                    stale = other
            try:
                await self._fetch(fill, url, stale, forward, lock)
            finally:
                if self.shared is not None:
                    await self.shared.release_unless_uploading(fill.key)
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

    def _failed(self, url: URL, error: str) -> None:
        self.alerts.failed(str(url), error)

    def _unwritable(self, url: URL, exc: OSError) -> None:
        log.warning("the store cannot take %s (%s): passing it on uncached", url, describe(exc))
        self.alerts.condition(STORE_UNWRITABLE, str(self.store.tmp_dir.parent), True, describe(exc))

    async def _follow(self, fill: Fill, stale: ObjectMeta | None) -> bool:
        """Serve this process's clients from another worker's fill of the same key.

        False when that fill ended without anything to follow (an error answer, say): then this
        process fetches the key itself.
        """
        watch = await self.store.run(Watch, self.store.tmp_dir, fill.key)
        try:
            # Wait for a body that is still arriving. One whose last byte is in is not joined, as
            # in this process (Cache.get): what it stores answers by the rules of any stored object.
            while (head := await self.store.run(watch.head)) is None or await self.store.run(watch.complete, head):
                if await self.store.run(watch.owner_done):
                    return await self._follow_done(fill, None, stale)
                await asyncio.sleep(FOLLOW_POLL)
            try:
                fill.start_streaming(head.part, Head(CIMultiDict(head.headers), head.size, head.status))
            except FileNotFoundError:  # committed (renamed) between reading the head and opening it
                return await self._follow_done(fill, None, stale)
            while True:
                done = await self.store.run(watch.owner_done)
                grown = fill.grown()
                if grown:
                    fill.advance(grown)
                if done:
                    return await self._follow_done(fill, head.size, stale)
                await asyncio.sleep(FOLLOW_POLL)
        finally:
            watch.close()

    async def _follow_done(self, fill: Fill, size: int | None, stale: ObjectMeta | None) -> bool:
        """The other worker's fill ended: complete our clients' bodies, or answer from the store.

        A fill that ended without storing anything new (an error answer, or a fill of this very
        process whose lock was not released yet) leaves the stale object we came for: then this
        process fetches the key itself.
        """
        current = await self.from_store(fill.key)
        if fill.head.done():
            if current is not None and current.size == fill.written and size in (None, fill.written):
                fill.set_digests(current.digests)
                fill.finish()
            else:
                fill.set_error(TransferAborted(f"the fill in another worker broke after {fill.written} bytes"))
            return True
        if current is None or not _newer(current, stale) or not vary_matches(current.vary, fill.request_headers):
            return False
        return self._answered_from(fill, current)  # False: this process validates it under the lock

    def _answered_from(self, fill: Fill, stored: ObjectMeta) -> bool:
        """Answer ``fill`` with what another worker or instance stored after its request looked,
        if that may be used without validation (False: it must be validated first)."""
        if not self.reusable(stored, fill.request_headers):
            return False
        fill.set_outcome(self.hit(stored, "HIT"))
        fill.finish()
        return True

    async def _fetch(
        self, fill: Fill, url: URL, stale: ObjectMeta | None, forward: CIMultiDict[str], lock: FillLock | None
    ) -> None:
        """Fetch and answer; ``lock`` None: the store cannot take anything, the answer only passes."""
        started = time.monotonic()
        budget = self.upstream.new_budget()
        response: Response | None = None
        try:
            request_headers = CIMultiDict(forward)
            if stale is not None:
                if stale.etag:
                    request_headers["If-None-Match"] = stale.etag
                if stale.last_modified:
                    request_headers["If-Modified-Since"] = stale.last_modified
            try:
                response = await self.upstream.open(self.mirrors.candidates(url), request_headers, budget)
            except UpstreamFailed as exc:
                self._failed(url, exc.reason)
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
            if owned.status >= 400:
                self._failed(url, f"origin answered {owned.status}")
            # An ftp:// answer is private to its login, which is part of its key: the rule for
            # Authorization (RFC 9111 3.5) is about sharing one user's HTTP answer with others.
            asked = forward if url.scheme != "ftp" else {k: v for k, v in forward.items() if k != "Authorization"}
            not_stored = unstorable_reason(owned.status, owned.headers, asked)
            if owned.status != 200 and (not_stored is not None or owned.status == 304):
                await self._not_stored(fill, owned)
                return
            if lock is None:
                fill.set_outcome(Passthrough(owned, "BYPASS"))
                return
            await self._fill_body(fill, url, owned, budget, forward, lock, not_stored)
            self.metrics.upstream_fetch_seconds.observe(time.monotonic() - started)
        finally:
            if response is not None:
                response.release()

    async def _revalidated(self, fill: Fill, stale: ObjectMeta, response: Response) -> None:
        """RFC 9111 4.3.4: the 304's fields replace the stored ones; freshness starts again."""
        now = time.time()
        stale.headers = updated(stale.header_pairs(), response.headers)
        merged = CIMultiDict((k, v) for k, v in stale.headers)
        fresh = freshness(URL(stale.url).path, stale.status, merged, now, self.rules, self.config.rules.negative_ttl)
        stale.response_time = now
        stale.initial_age = initial_age(response.headers, response.request_time, now)
        stale.lifetime = fresh.lifetime
        stale.must_revalidate = fresh.must_revalidate
        stale.etag = merged.get("ETag") or None
        stale.last_modified = merged.get("Last-Modified") or None
        stale.content_type = merged.get("Content-Type") or stale.content_type
        if not stale.file and self.shared is not None:  # only the shared store has the body
            await self.shared.update_meta(stale)
        else:
            self.touch(stale)
            self.index.put(stale)
            await self.store.update_meta(stale)
        fill.set_outcome(self.hit(stale, "REVALIDATED"))
        fill.finish()

    async def _not_stored(self, fill: Fill, response: Response) -> None:
        """An answer other than 200 that may not be stored: shared with every waiter when small."""
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
        fill.set_outcome(Buffered(response.status, end_to_end(response.headers), body))

    async def _fill_body(
        self,
        fill: Fill,
        url: URL,
        response: Response,
        budget: RetryBudget,
        forward: CIMultiDict[str],
        lock: FillLock,
        not_stored: str | None,
    ) -> None:
        headers = response.headers
        size = response.content_length
        # An error answer is kept only when small: the archives are what the store is for.
        max_size = self.config.cache.max_object_size if response.status < 400 else BUFFER_LIMIT
        if not_stored is None and size is not None and size > max_size:
            not_stored = f"larger than the limit for status {response.status} ({size} > {max_size})"
        html = "text/html" in headers.get("Content-Type", "").lower()
        if not_stored is None and html and self.config.rules.refuse_html_archives and ARCHIVE.search(url.path):
            self._failed(url, "origin answered an HTML page for an archive URL")
            not_stored = "HTML body for an archive URL"
        if not_stored is not None:
            log.info("not storing %s: %s", url, not_stored)
            fill.set_outcome(Passthrough(response))
            return
        if size is not None and size > (free := self.store.disk_usage()[1]):
            log.warning("the store has %d bytes free, %s has %d: passing it on uncached", free, url, size)
            fill.set_outcome(Passthrough(response, "BYPASS"))
            return
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        first = response  # a resumed transfer ends with a 206: the object is what the first answered
        try:
            writer = await self.store.begin_write(fill.key)
        except OSError as exc:
            self._unwritable(url, exc)
            fill.set_outcome(Passthrough(response, "BYPASS"))
            return
        try:
            head = Head(end_to_end(headers), size, response.status)
            await self.store.run(lock.publish, HeadFile(writer.path, list(head.headers.items()), size, response.status))
            fill.start_streaming(writer.path, head)
            response = await self.pump.tee(fill, response, writer, budget, forward, size, max_size)
            if size is not None and fill.written != size:
                raise TransferAborted(f"got {fill.written} of {size} bytes")
            fill.finish()
            if fill.relay_at is not None:  # passed on, not stored (the pump said why)
                await writer.abort()
                return
            storable = (size is not None or chunked) and writer.written <= max_size
            if not storable:
                log.info("not storing %s: body length unknown (no Content-Length, not chunked)", url)
                await writer.abort()
                return
            await self._commit(fill, url, first, writer)
        except BaseException as exc:
            await writer.abort()
            if isinstance(exc, NoReaders):
                log.info("stopped fetching %s: %s", url, exc)
                fill.set_error(TransferAborted(str(exc)))
                return
            if isinstance(exc, TransferAborted):
                self._failed(url, str(exc))
                log.warning("fill of %s aborted: %s", url, exc)
                fill.set_error(exc)
                return
            raise
        finally:
            response.release()
            first.release()

    async def _commit(self, fill: Fill, url: URL, response: Response, writer: SpoolWriter) -> None:
        key = fill.key
        digests = await writer.digests()
        fill.set_digests(digests)  # clients holding their last bytes back learn the verdict now
        for expected in fill.expectations:
            if not expected.matches(digests):
                wanted = ", ".join(f"{a} {h}" for a, h in expected.wanted)
                error = f"the body (sha256 {digests.sha256}) is not what a client expected ({wanted})"
                log.warning("not storing %s: %s", url, error)
                self.metrics.checksum_mismatches.labels("miss").inc()
                self._failed(url, error)
                await writer.abort()
                return
        now = time.time()
        h = response.headers
        fresh = freshness(url.path, response.status, h, now, self.rules, self.config.rules.negative_ttl)
        meta = ObjectMeta(
            key=key,
            url=str(url.with_user(None)),  # no FTP credentials in the store
            size=writer.written,
            **digests.fields(),
            stored_at=now,
            response_time=now,
            lifetime=fresh.lifetime,
            must_revalidate=fresh.must_revalidate,
            content_type=h.get("Content-Type"),
            content_disposition=h.get("Content-Disposition"),
            content_encoding=h.get("Content-Encoding"),
            etag=h.get("ETag"),
            last_modified=h.get("Last-Modified"),
            vary=nominated(h, response.request_headers),
            last_access=now,
            status=response.status,
            headers=for_storage(h),
            initial_age=initial_age(h, response.request_time, now),
        )
        meta = await writer.commit(meta)
        self.index.put(meta)
        log.info("stored %s (%d bytes, sha256 %s)", url, meta.size, meta.sha256)
        if self.shared is not None:
            self.shared.upload_later(meta)
        await self.stored(meta)
        rule = match_rule(url.path, self.rules)
        if rule is not None and rule.override and meta.status == 200:
            await self._check_provenance(meta)

    async def _check_provenance(self, meta: ObjectMeta) -> None:
        """An immutable URL's body must stay what it was when first stored: tell when it is not."""
        try:
            earlier = await self.store.run(self.provenance.observe, meta.key, meta.url, meta.sha256, meta.size)
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot record the sha256 of %s: %s", redact(meta.url), exc)
            return
        if earlier is None:
            return
        change = (
            f"the body changed under an immutable URL: sha256 {meta.sha256} ({meta.size} bytes) now, "
            f"{earlier.sha256} ({earlier.size} bytes) when first stored"
        )
        log.warning("content changed: %s: %s", redact(meta.url), change)
        self.metrics.content_changed.inc()
        self.alerts.raise_alert(CONTENT_CHANGED, meta.url, meta.url, 0, change)


def _newer(current: ObjectMeta, stale: ObjectMeta | None) -> bool:
    """Whether the store holds something else than the stale object a fill was started for."""
    return stale is None or (current.file, current.response_time) != (stale.file, stale.response_time)
