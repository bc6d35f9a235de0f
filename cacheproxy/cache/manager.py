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
import logging
import time
from collections.abc import Mapping

from yarl import URL

from ..config import Config
from ..ops.metrics import Metrics
from ..storage.base import ObjectMeta, Spool
from ..upstream.http import HttpUpstream, end_to_end
from ..upstream.retry import RetryBudget
from .fetch import FORWARDED_REQUEST_HEADERS, Failure, FailureLog, Fetcher
from .fill import Buffered, Fill, Hit, Negative, Outcome, Passthrough
from .freshness import client_wants_revalidation, is_fresh
from .hot import HotBodies
from .housekeeping import Housekeeper
from .index import Index
from .keys import MirrorMap
from .shared import SharedTier

log = logging.getLogger(__name__)

SNAPSHOT_AFTER = 1000  # entries read one by one at start that make a new snapshot worth writing
KNOWN_KEYS = 10_000  # URLs whose cache key is remembered


class Cache:
    def __init__(
        self,
        config: Config,
        store: Spool,
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
        self.fills: dict[str, Fill] = {}
        self.negative: Negative = {}
        self.failures = FailureLog()
        self.hot = HotBodies(store, self.forget)
        self.housekeeper = Housekeeper(config, store, metrics, self.index, shared, self.fills, self.negative, self.hot)
        self.fetcher = Fetcher(
            config,
            store,
            upstream,
            metrics,
            self.index,
            shared,
            self.fills,
            self.negative,
            self.failures,
            self.mirrors,
            hit=self.hit,
            from_store=self.from_store,
            touch=self.touch,
            evict=self.evict_if_needed,
        )
        self._keys: dict[URL, str] = {}  # cache keys of the URLs asked for last
        self._snapshot: asyncio.Task[None] | None = None
        metrics.bind_store(lambda: len(self.index), lambda: self.index.total_size)

    # -- the jobs behind it -------------------------------------------------------------------

    @property
    def recent_failures(self) -> collections.deque[Failure]:
        return self.failures.recent

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

    async def close(self, grace: float = 0.0) -> None:
        fills = [f.task for f in self.fills.values() if f.task is not None]
        if fills and grace > 0:
            await asyncio.wait(fills, timeout=grace)
        for task in fills:
            task.cancel()
        if fills:
            await asyncio.gather(*fills, return_exceptions=True)
        self.fetcher.pump.close()
        self.hot.close()
        await self.housekeeper.flush_access_times()
        if self._snapshot is not None:
            await asyncio.gather(self._snapshot, return_exceptions=True)
        await self.save_snapshot()
        if self.shared is not None:
            await self.shared.close()

    def key_for(self, url: URL) -> str:
        key = self._keys.get(url)
        if key is None:
            key = self.mirrors.key(url)
            if len(self._keys) >= KNOWN_KEYS:
                self._keys.clear()
            self._keys[url] = key
        return key

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
        negative = self.negative.get(key)
        if negative is not None and not revalidate:
            if negative[0] > time.monotonic():
                return Buffered(negative[1].status, negative[1].headers, negative[1].body, "HIT")
            del self.negative[key]
        if method == "HEAD" and meta is None:
            return await self.bypass(url, "HEAD", headers, x_cache="MISS")
        fill = self.fills.get(key)
        if fill is None:
            fill = self.fetcher.start(key, url, meta, headers)
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
