"""The cache: what answers a GET/HEAD, and the parts that keep it.

``Cache.get`` answers every GET/HEAD with an :data:`~.fill.Outcome` (a hit with where its body
comes from, a fill to stream, a small buffered answer, or a passthrough); the proxy layer turns
that into bytes for the client. Nothing here writes to a client. The jobs behind it live in
their own modules: :mod:`.fetch` (single-flight fills and commits), :mod:`.pump` (the body into
the store as it arrives), :mod:`.housekeeping` (access times, snapshot, eviction, clean-up),
:mod:`.hot` (bodies kept ready for hits), :mod:`.shared` (the OBS tier).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Mapping

from multidict import CIMultiDict, MultiMapping
from yarl import URL

from ..config import Config
from ..errors import PreconditionFailed
from ..headers import request_to_origin
from ..ops.alerts import OBS_UNREACHABLE, STORE_UNWRITABLE, Alerts, Failure
from ..ops.metrics import Metrics
from ..storage.base import ObjectMeta, Spool
from ..upstream.http import HttpUpstream
from ..upstream.retry import RetryBudget
from .checksums import Expected, hash_file
from .fetch import Fetcher
from .fill import Buffered, Fill, Hit, Outcome, Passthrough, Streaming
from .freshness import (
    FRESH,
    PLAIN,
    REVALIDATE_LATER,
    VALIDATE,
    RequestDirectives,
    request_directives,
    reuse,
    stale_while_revalidate,
)
from .hot import HotBodies, Ready
from .housekeeping import Housekeeper
from .index import Index
from .keys import Credentials, MirrorMap
from .provenance import Provenance, Record
from .shared import SharedTier
from .upload import Upload, UploadRefused, store_upload
from .variants import nominated, vary_matches

log = logging.getLogger(__name__)

SNAPSHOT_AFTER = 1000  # entries read one by one at start that make a new snapshot worth writing
KNOWN_KEYS = 10_000  # URLs whose cache key is remembered
COMMIT_WAIT = 30.0  # seconds a request waits for the commit of a fill whose body is complete
UNSAFE_KEEP = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # methods that invalidate nothing


class Cache:
    def __init__(
        self,
        config: Config,
        store: Spool,
        upstream: HttpUpstream,
        metrics: Metrics,
        shared: SharedTier | None = None,
        alerts: Alerts | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.shared = shared  # OBS behind the local store (storage.backend: obs)
        self.upstream = upstream
        self.metrics = metrics
        self.index = Index()
        self.mirrors = MirrorMap(config.upstream.mirrors)
        self.fills: dict[str, Fill] = {}
        self.alerts = alerts or Alerts(config.alerts, metrics, store.tmp_dir.parent / "alerts")
        self.credentials = Credentials(store.tmp_dir.parent / "credentials.key")
        self.hot = HotBodies(store, self.forget)
        self.provenance = Provenance(store.tmp_dir.parent / "provenance.sqlite3")
        self.housekeeper = Housekeeper(
            config, store, metrics, self.index, shared, self.fills, self.hot, self.alerts, self.stored
        )
        self.fetcher = Fetcher(
            config,
            store,
            upstream,
            metrics,
            self.index,
            shared,
            self.fills,
            self.alerts,
            self.mirrors,
            hit=self.hit,
            reusable=self.reusable,
            from_store=self.from_store,
            touch=self.touch,
            stored=self.housekeeper.stored,
            provenance=self.provenance,
        )
        self._keys: dict[URL, str] = {}  # cache keys of the URLs asked for last
        self._snapshot: asyncio.Task[None] | None = None
        self._digests: asyncio.Task[None] | None = None
        metrics.bind_store(lambda: len(self.index), lambda: self.index.total_size)

    # -- the jobs behind it -------------------------------------------------------------------

    @property
    def recent_failures(self) -> collections.deque[Failure]:
        return self.alerts.recent_failures

    def touch(self, meta: ObjectMeta) -> None:
        self.housekeeper.touch(meta)

    async def save_snapshot(self) -> None:
        await self.housekeeper.save_snapshot()

    async def evict_if_needed(self) -> int:
        return await self.housekeeper.evict_if_needed()

    async def purge(self, meta: ObjectMeta) -> None:
        await self.housekeeper.purge(meta)

    async def cleanup(self) -> None:
        await self.housekeeper.cleanup()

    # -- start, stop, lookups ------------------------------------------------------------------

    async def load(self) -> None:
        started = time.monotonic()
        async for found in self.store.listing():
            for key, entry in found:
                self.index.add(key, entry)
        self.index.loaded = True
        self.housekeeper.count_errors()
        log.info(
            "index loaded: %d objects, %d bytes in %.2fs (%d read one by one)",
            len(self.index),
            self.index.total_size,
            time.monotonic() - started,
            self.store.scan_reads,
        )
        if self.store.scan_reads > SNAPSHOT_AFTER:  # in the background: serving starts now
            self._snapshot = asyncio.create_task(self.save_snapshot())
        self._digests = asyncio.create_task(self.index.build_digests(), name="digest index")
        if self.shared is not None:
            for key in self.index.not_uploaded():  # committed before an upload could finish: upload it now
                meta = await self.from_store(key)
                if meta is not None and not meta.remote:
                    self.shared.upload_later(meta)
            self.shared.start()

    async def close(self, grace: float = 0.0) -> None:
        fills = [f.task for f in self.fills.values() if f.task is not None]
        if fills and grace > 0:
            await asyncio.wait(fills, timeout=grace)
        for task in fills:
            task.cancel()
        if fills:
            await asyncio.gather(*fills, return_exceptions=True)
        if self._digests is not None:
            self._digests.cancel()
        self.fetcher.pump.close()
        self.hot.close()
        if self._snapshot is not None:
            await asyncio.gather(self._snapshot, return_exceptions=True)
        await self.save_snapshot()
        await self.store.run(self.provenance.close)
        if self.shared is not None:
            await self.shared.close()

    def key_for(self, url: URL, headers: Mapping[str, str] | None = None) -> str:
        """The cache key of a request: its URL's, plus its credentials' keyed hash if it has any."""
        key = self._keys.get(url)
        if key is None:
            key = self.mirrors.key(url)
            if url.raw_user is not None:
                key += self.credentials.suffix(f"{url.raw_user}:{url.raw_password or ''}")
            if len(self._keys) >= KNOWN_KEYS:
                self._keys.clear()
            self._keys[url] = key
        if headers is not None and (authorization := headers.get("Authorization")) is not None:
            key += self.credentials.suffix(authorization)
        return key

    async def from_store(self, key: str) -> ObjectMeta | None:
        """What the store has for ``key``: an object whose metadata is not in memory, or one
        this process does not know yet (stored by another worker or instance)."""
        return (await self._read(key))[0]

    async def _read(self, key: str) -> tuple[ObjectMeta | None, Ready | None]:
        """:meth:`from_store`, with a small body read in the same trip to the I/O pool."""
        meta, ready = await self.hot.read(key)
        if meta is not None:
            self.index.put(meta)
        elif key in self.index:
            self.index.remove(key)  # removed by another worker
        return meta, ready

    async def stored(self, key: str) -> ObjectMeta | None:
        """The stored object of ``key``, from memory or from the store."""
        return self.index.get(key) or await self.from_store(key)

    def forget(self, meta: ObjectMeta) -> None:
        """The body went away under us (evicted or replaced by another worker)."""
        if self.index.holds(meta):
            self.index.remove(meta.key)
        self.hot.discard(meta.key)

    def _usable(self, meta: ObjectMeta, headers: Mapping[str, str], req: RequestDirectives) -> str:
        if meta.vary and not vary_matches(meta.vary, headers):
            return VALIDATE  # another variant: this request needs its own answer
        now = time.time()
        usable = reuse(meta.lifetime, meta.must_revalidate, meta.initial_age, meta.response_time, now, req)
        if usable == VALIDATE and req == PLAIN and (window := stale_while_revalidate(meta.header_pairs())):
            return reuse(meta.lifetime, meta.must_revalidate, meta.initial_age, meta.response_time, now, req, window)
        return usable

    def reusable(self, meta: ObjectMeta, headers: Mapping[str, str]) -> bool:
        """Whether a request with ``headers`` may be answered with ``meta`` without validating it."""
        return self._usable(meta, headers, request_directives(headers)) == FRESH

    def fresh(self, url: URL, headers: Mapping[str, str]) -> Hit | None:
        """The fresh hit for a plain request (no credentials, no Cache-Control) that this process
        can answer at once, or None. The caller :meth:`touch`-es it when it answers with it.

        Raise FileNotFoundError when the object turned out removed by another worker (it is
        forgotten here; a new lookup goes on from the store).
        """
        meta = self.index.get(self.key_for(url))
        if meta is None or self._usable(meta, headers, PLAIN) != FRESH:
            return None
        return Hit(meta, ready=self.hot.get(meta))  # touched once it is answered

    def hit(self, meta: ObjectMeta, x_cache: str = "HIT") -> Hit:
        """A hit of ``meta``, with where its body comes from."""
        if meta.file or self.shared is None:
            return Hit(meta, x_cache)
        shared = self.shared
        if shared.config.serve_hits == "redirect":  # the client fetches it from OBS, with a URL that expires
            return Hit(meta, x_cache, redirect=shared.signed_url(meta))
        return Hit(meta, x_cache, remote=lambda start, stop: shared.remote.read(meta, start, stop))

    async def answer(
        self, url: URL, method: str, headers: Mapping[str, str], expected: Expected | None = None
    ) -> Outcome:
        """What answers a GET/HEAD of ``url``. With ``expected`` (the request pins the body's
        checksum): a stored body that matches answers whatever its freshness, and so does another
        URL's body named by sha256/sha512; a stored body that differs is refused (412); a fill's
        clients verify the body before its last bytes go out (:class:`~.fill.Fill`)."""
        if expected is not None:
            pinned = await self._pinned(url, headers, expected)
            if pinned is not None:
                return pinned
        outcome = await self.get(url, method, headers)
        if expected is not None and isinstance(outcome, Hit) and outcome.meta.status == 200:
            await self._verify(outcome.meta, expected, url)
        return outcome

    async def _pinned(self, url: URL, headers: Mapping[str, str], expected: Expected) -> Hit | None:
        key = self.key_for(url, headers)
        meta = await self.stored(key)
        if meta is not None and meta.status == 200:
            meta = await self._verify(meta, expected, url)
            return self.hit_for(meta)
        if meta is not None or key in self.fills:
            return None
        for algorithm, hexdigest in expected.strong():
            other = await self.by_digest(algorithm, hexdigest)
            if other is not None and expected.matches(other.digests):
                hit = self.hit_for(other)
                if hit is not None:
                    hit.source = other.url
                    self.metrics.digest_hits.inc()
                    log.info("%s answered with the body of %s (%s %s)", url, other.url, algorithm, hexdigest)
                    return hit
        return None

    async def by_digest(self, algorithm: str, hexdigest: str) -> ObjectMeta | None:
        """A stored 200 whose sha256/sha512 is ``hexdigest``: here, or uploaded by any instance."""
        for key in self.index.by_digest(hexdigest):
            meta = await self.stored(key)
            if meta is not None and meta.status == 200 and meta.digests.get(algorithm) == hexdigest:
                return meta
        if self.shared is not None:
            return await self.shared.by_digest(algorithm, hexdigest)
        return None

    def hit_for(self, meta: ObjectMeta) -> Hit | None:
        """A hit of ``meta`` with its body ready (None: the body is gone just now)."""
        try:
            ready = self.hot.get(meta)
        except FileNotFoundError:  # removed by another worker just now
            return None
        self.touch(meta)
        hit = self.hit(meta, "HIT")
        hit.ready = ready
        return hit

    async def _verify(self, meta: ObjectMeta, expected: Expected, url: URL) -> ObjectMeta:
        """``meta`` with every digest ``expected`` pins (computed now for an older object), or
        PreconditionFailed when the stored body is not the expected one."""
        if expected.unknown_in(meta.digests) and meta.file:
            digests = await self.store.run(hash_file, str(self.store.body_path(meta)))
            meta = dataclasses.replace(meta, **digests.fields())
            self.index.put(meta)
            await self.store.update_meta(meta)
        if len(expected.unknown_in(meta.digests)) == len(expected.wanted):
            raise PreconditionFailed(
                f"the stored body of {url} has no {'/'.join(a for a, _ in expected.wanted)} digest "
                "(stored before it was kept, and only in OBS): pin its sha256, or purge it"
            )
        try:
            expected.check(meta.digests, f"the stored body of {url}")
        except PreconditionFailed as exc:
            self.metrics.checksum_mismatches.labels("hit").inc()
            log.warning("checksum mismatch: %s", exc.reason)
            raise
        return meta

    async def get(self, url: URL, method: str, headers: Mapping[str, str], *, waited: bool = False) -> Outcome:
        if self.shared is not None and self.shared.is_own(url):
            # A signed URL of our own bucket, fetched through us: pass it on, never a second copy.
            return await self.bypass(url, method, headers)
        req = request_directives(headers)
        if req.no_store:  # nothing of this exchange may be stored
            return await self.bypass(url, method, headers)
        key = self.key_for(url, headers)
        meta = self.index.get(key)
        ready: Ready | None = None
        if meta is None and key not in self.fills:
            meta, ready = await self._read(key)
            if meta is None and self.shared is not None:
                meta = await self.shared.lookup(key)  # another instance may have stored it
        if meta is not None:
            usable = self._usable(meta, headers, req)
            if usable != VALIDATE:
                try:
                    ready = ready or self.hot.get(meta)
                except FileNotFoundError:  # removed by another worker just now: fetch it again
                    return await self.get(url, method, headers)
                self.touch(meta)
                if usable == REVALIDATE_LATER and key not in self.fills:
                    self.fetcher.start(key, url, meta, headers)  # in the background: this client has its answer
                hit = self.hit(meta, "HIT" if usable == FRESH else "STALE")
                hit.ready = ready
                return hit
            if meta.vary and not vary_matches(meta.vary, headers):
                meta = None  # not a stale copy of what this request asks for
        fill = self.fills.get(key)
        if fill is not None and fill.finished and fill.error is None and not waited:
            # The origin's last byte is in: the object is about to be a hit (hashes, sync, rename).
            await asyncio.wait([asyncio.shield(fill.done)], timeout=COMMIT_WAIT)
            return await self.get(url, method, headers, waited=True)
        if req.only_if_cached:
            return Buffered(504, CIMultiDict({"Content-Type": "text/plain"}), b"not in the cache (only-if-cached)\n")
        if fill is not None:
            outcome = await asyncio.shield(fill.head)
            if fill.relay_at is not None or _other_variant(outcome, fill, headers):
                return await self.bypass(url, method, headers)  # a relayed body cannot be joined late
        elif method == "HEAD" and meta is None:
            return await self.bypass(url, "HEAD", headers, x_cache="MISS")
        else:
            fill = self.fetcher.start(key, url, meta, headers)
            outcome = await asyncio.shield(fill.head)
        if isinstance(outcome, Passthrough) and outcome.claim() is None:
            return await self.bypass(url, method, headers, x_cache=outcome.x_cache)
        return outcome

    async def bypass(self, url: URL, method: str, headers: Mapping[str, str], x_cache: str = "BYPASS") -> Passthrough:
        """Fetch a GET/HEAD for this client alone; nothing is stored."""
        forward = request_to_origin(headers)
        response = await self.upstream.open(self.mirrors.candidates(url), forward, self.upstream.new_budget(), method)
        passthrough = Passthrough(response, x_cache)
        passthrough.claim()
        return passthrough

    async def forward(self, url: URL, method: str, headers: Mapping[str, str], body: object) -> Passthrough:
        """Another method (``rules.allow_other_methods``): forwarded once, never retried or stored.
        A success invalidates what is stored for the URL and for its ``Location`` and
        ``Content-Location`` on the same host (RFC 9111 4.4)."""
        response = await self.upstream.open([url], request_to_origin(headers), RetryBudget(0, 0), method, data=body)
        if method not in UNSAFE_KEEP and response.status < 400:
            await self.invalidate(url, headers)
            for name in ("Location", "Content-Location"):
                if (value := response.headers.get(name)) is not None:
                    target = url.join(URL(value, encoded=True))
                    if target.host == url.host and target.port == url.port:
                        await self.invalidate(target, headers)
        passthrough = Passthrough(response, "BYPASS")
        passthrough.claim()
        return passthrough

    async def invalidate(self, url: URL, headers: Mapping[str, str]) -> None:
        for key in {self.key_for(url), self.key_for(url, headers)}:
            meta = await self.stored(key)
            if meta is not None and key not in self.fills:
                await self.purge(meta)

    # -- an operator's calls (the admin API) ----------------------------------------------------

    async def lookup(self, url: URL) -> ObjectMeta | None:
        """What is stored for ``url`` (this process, the store, or the shared store)."""
        key = self.key_for(url)
        meta = await self.stored(key)
        if meta is None and self.shared is not None:
            meta = await self.shared.lookup(key)
        return meta

    async def first_seen(self, url: URL) -> Record | None:
        """The digest ``url`` had when it was first stored, if it is an immutable URL."""
        return await self.store.run(self.provenance.get, self.key_for(url))

    async def purge_url(self, url: URL) -> bool:
        """Remove ``url``'s object from the store and from OBS; whether there was one."""
        key = self.key_for(url)
        meta = await self.stored(key)
        if meta is not None:
            await self.purge(meta)
        if self.shared is not None:
            return await self.shared.purge(key) or meta is not None
        return meta is not None

    async def put(self, url: URL, upload: Upload) -> ObjectMeta:
        """Store an uploaded body as ``url``'s object (see :func:`.upload.store_upload`)."""
        key = self.key_for(url)
        if key in self.fills:
            raise UploadRefused("busy", "the URL is being fetched right now; try again when the fill is over")
        meta = await store_upload(self.config, self.store, key, url, upload)
        self.hot.discard(key)
        self.index.put(meta)
        await self.housekeeper.stored(meta)
        if self.shared is not None:
            self.shared.upload_later(meta)
        return meta

    async def prefetch(self, url: URL) -> tuple[str, str | None]:
        """Make sure ``url`` is stored, through the same fill as a client's GET (a client asking
        at the same time shares the fetch). Return (``cached`` | ``already_cached`` | ``failed``,
        the error)."""
        outcome = await self.get(url, "GET", {})
        if isinstance(outcome, Hit):
            return ("already_cached" if outcome.x_cache == "HIT" else "cached"), None
        if isinstance(outcome, Buffered):
            return "failed", f"the origin answered {outcome.status}"
        if isinstance(outcome, Passthrough):
            response = outcome.response
            response.close()
            if response.status >= 400:
                return "failed", f"the origin answered {response.status}"
            return "failed", f"not stored ({outcome.x_cache}: see the log for why)"
        fill = outcome.fill
        await asyncio.shield(fill.done)
        if fill.error is not None:
            return "failed", str(fill.error)
        meta = self.index.get(fill.key)
        if meta is None:
            return "failed", "the body was passed on but not stored (see the log for why)"
        return (
            "cached" if meta.status == 200 else "failed"
        ), None if meta.status == 200 else f"the origin answered {meta.status}"

    async def watch(self) -> None:
        """Periodic: tell the alerts how the store and OBS are doing."""
        checks = await self.readiness()
        store = checks["store_writable"]
        self.alerts.condition(
            STORE_UNWRITABLE, str(self.store.tmp_dir.parent), not store["ok"], str(store.get("error", ""))
        )
        if "obs" in checks:
            obs = checks["obs"]
            where = f"OBS bucket {obs['bucket']}"
            self.alerts.condition(
                OBS_UNREACHABLE, where, not obs["ok"], str(obs.get("error", "")), after=self.config.alerts.window
            )
        self.alerts.prune()

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
                "objects": shared.objects,
                "pending_uploads": len(shared.pending),
                **({"error": problem} if problem else {}),
            }
        return checks


def _other_variant(outcome: Outcome, fill: Fill, headers: Mapping[str, str]) -> bool:
    """Whether a fill started for another client answers with a variant this request did not ask
    for (its ``Vary`` names a header the two requests differ in)."""
    response_headers: MultiMapping[str]
    if isinstance(outcome, Streaming):
        response_headers = outcome.head.headers
    elif isinstance(outcome, Hit):
        return bool(outcome.meta.vary) and not vary_matches(outcome.meta.vary, headers)
    elif isinstance(outcome, Buffered):
        response_headers = outcome.headers
    else:
        response_headers = outcome.response.headers
    if "Vary" not in response_headers:
        return False
    return not vary_matches(nominated(response_headers, fill.request_headers), headers)
