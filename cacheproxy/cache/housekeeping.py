"""Keeping the store in shape: access times, the index snapshot, eviction, clean-up.

A hit writes nothing to disk: its access time goes into the index, and the index snapshot
(written at every clean-up and clean stop) keeps it for the next start, as Squid's swap.state
does (nginx keeps them in its keys zone only), rather than a rewrite of each used object's
``.json`` at every clean-up (which the snapshot's line made redundant at the next start). Several workers share
their access times through the snapshot: each clean-up takes the later of its own and the
snapshot's.

Eviction removes the least recently used objects when the store passes ``cache.high_watermark``
of ``cache.max_size``, down to ``cache.low_watermark``, never one that is being filled or that
the shared tier does not hold yet. The periodic clean-up (``cache.cleanup_interval``) also writes
the index snapshot, takes in what other workers stored or used, removes expired error
answers and leftovers of interrupted fills. Stored error answers (a 404, 410, ...) are bounded by
count and bytes on their own, so that clients asking for random missing URLs cannot crowd out
the archives.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Awaitable, Callable

from ..config import Config
from ..ops.alerts import STORE_OVER_WATERMARK, Alerts
from ..ops.metrics import Metrics
from ..storage import packed
from ..storage.base import Listed, ObjectMeta, Spool
from .fill import Fill
from .freshness import is_fresh
from .hot import HotBodies
from .index import Index
from .shared import SharedTier

log = logging.getLogger(__name__)

ERROR_ANSWERS = 10_000  # stored error answers kept at most ...
DELETE_BATCH = 100  # objects an eviction pass removes in one trip to the I/O pool
POPULAR_KEPT = 10_000  # keys whose hit count is kept for the status page
ERROR_BYTES = 64 << 20  # ... and bytes of them in all


class Housekeeper:
    def __init__(
        self,
        config: Config,
        store: Spool,
        metrics: Metrics,
        index: Index,
        shared: SharedTier | None,
        fills: dict[str, Fill],
        hot: HotBodies,
        alerts: Alerts,
        stored: Callable[[str], Awaitable[ObjectMeta | None]],
    ) -> None:
        self.config = config
        self._lookup = stored  # a key's whole metadata, from memory or the store (Cache.stored)
        self.alerts = alerts
        self.store = store
        self.metrics = metrics
        self.index = index
        self.shared = shared
        self.fills = fills
        self.hot = hot
        self._errors: collections.OrderedDict[str, int] = collections.OrderedDict()  # key -> size
        self._error_bytes = 0
        self._evicting = False
        self.requested: collections.Counter[str] = collections.Counter()  # hits per key, since start

    def touch(self, meta: ObjectMeta) -> None:
        meta.last_access = time.time()
        self.index.touched(meta.key, meta.last_access)
        self.requested[meta.key] += 1
        if len(self.requested) > POPULAR_KEPT:  # keep the counts bounded: the most requested stay
            self.requested = collections.Counter(dict(self.requested.most_common(POPULAR_KEPT // 2)))

    async def save_snapshot(self) -> None:
        await self.store.write_snapshot(self.index.listing())

    async def _meta(self, key: str) -> ObjectMeta | None:
        """``key``'s whole metadata (None: removed meanwhile, and forgotten)."""
        meta = await self._lookup(key)
        if meta is None:
            self._forget_error(key)
        return meta

    def _spared(self, key: str) -> bool:
        """Whether an eviction pass leaves ``key`` alone: being filled, or not in OBS yet (the only copy)."""
        return key in self.fills or (self.shared is not None and key in self.shared.pending)

    def capacity(self) -> int:
        total, _ = self.store.disk_usage()
        return self.config.cache.max_size.resolve(total)

    async def evict_if_needed(self) -> int:
        if self._evicting:
            return 0
        capacity = self.capacity()
        if self.index.total_size <= capacity * self.config.cache.high_watermark:
            self.alerts.condition(STORE_OVER_WATERMARK, "", False)
            return 0
        self._evicting = True
        evicted = 0
        started = time.monotonic()
        try:
            target = capacity * self.config.cache.low_watermark
            while self.index.total_size > target:
                since = time.time()
                doomed = await self.index.oldest(int(self.index.total_size - target), since, self._spared)
                removed = 0
                for start in range(0, len(doomed), DELETE_BATCH):  # a few trips to the I/O pool, not two per object
                    batch: list[Listed] = []
                    for key in doomed[start : start + DELETE_BATCH]:
                        if self.index.total_size <= target:
                            break
                        item = self.index.listed(key)
                        # Still there, not used and not being filled since the look (a pass can take minutes).
                        if item is not None and item.last_access <= since and not self._spared(key):
                            self._forget(key)
                            batch.append(item)
                    if batch:
                        await self.store.run(self.store.delete_listed_sync, batch)
                        removed += len(batch)
                evicted += removed
                if not removed:
                    break  # what is left is being filled, not in OBS yet, or just used
            self.metrics.evictions.inc(evicted)
            log.info(
                "evicted %d objects in %.1fs; store now %d bytes",
                evicted,
                time.monotonic() - started,
                self.index.total_size,
            )
            high = capacity * self.config.cache.high_watermark
            self.alerts.condition(
                STORE_OVER_WATERMARK,
                str(self.store.tmp_dir.parent),
                self.index.total_size > high,
                f"{self.index.total_size} bytes stored after evicting {evicted} objects; "
                f"the high watermark is {int(high)} bytes (objects being filled or not in OBS yet stay)",
            )
        finally:
            self._evicting = False
        return evicted

    async def stored(self, meta: ObjectMeta) -> None:
        """A new object was committed: bound the error answers, then the store."""
        if meta.status >= 400:
            self._note_error(meta.key, meta.size)
            while len(self._errors) > ERROR_ANSWERS or self._error_bytes > ERROR_BYTES:
                oldest = await self._meta(next(iter(self._errors)))
                if oldest is None:
                    self._forget_error(next(iter(self._errors)))
                    continue
                await self.purge(oldest)
        await self.evict_if_needed()

    def _note_error(self, key: str, size: int) -> None:
        self._forget_error(key)
        self._errors[key] = size
        self._error_bytes += size

    def _forget_error(self, key: str) -> None:
        size = self._errors.pop(key, None)
        if size is not None:
            self._error_bytes -= size

    async def purge(self, meta: ObjectMeta) -> None:
        self._forget(meta.key)
        await self.store.delete(meta)

    def _forget(self, key: str) -> None:
        """``key`` is being removed: out of the index and of what is kept for it."""
        self._forget_error(key)
        self.index.remove(key)
        self.hot.discard(key)

    async def reload_index(self) -> None:
        """Take in what other workers stored, used or removed since the last look: their new
        objects go to the recent end, and so do known ones another worker used since this one
        did (a folder of the store at a time)."""
        index = self.index
        listed: set[str] = set()
        async for found in self.store.listing():
            for key, entry in found:
                listed.add(key)
                if not index.same_body(key, entry):
                    index.add(key, entry)
                    if entry & packed.ERROR:
                        self._note_error(key, packed.size(entry))
                elif packed.accessed(entry) > index.accessed(key):
                    index.touched(key, packed.accessed(entry) / 1000)
        for key in index.keys():
            if key not in listed:
                index.remove(key)
                self._forget_error(key)

    def count_errors(self) -> None:
        """Take stock of the error answers the index holds (after a load)."""
        self._errors.clear()
        self._error_bytes = 0
        for key, size in self.index.errors():
            self._note_error(key, size)

    async def cleanup(self) -> None:
        """Periodic: the snapshot, eviction, leftovers of interrupted fills, expired error answers."""
        if self.config.workers > 1:
            await self.reload_index()
        await self.save_snapshot()
        await self.evict_if_needed()
        now = time.time()
        for key in list(self._errors):
            meta = await self._meta(key)
            if meta is None:
                self._forget_error(key)
            elif (
                not meta.etag
                and not meta.last_modified
                and not is_fresh(meta.lifetime, meta.response_time, now, meta.initial_age)
            ):
                await self.purge(meta)  # expired, and nothing to revalidate it with
        removed = await self.store.run(self.store.remove_stale_temp)
        if removed:
            log.info("removed %d leftover temp file(s)", removed)
        if self.shared is not None:
            await self.shared.cleanup()
