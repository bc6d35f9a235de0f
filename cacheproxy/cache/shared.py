"""The shared tier: objects in OBS that several instances see, behind the local store.

The local store stays the first tier: misses are written there (streamed to clients as before),
committed, and then uploaded in the background with retries. A local body is never evicted before
its upload succeeded (``meta.remote`` set). On a local miss the cache asks OBS with one HEAD before
going to the origin, so an object another instance stored is a hit here. The listing of the bucket
(paged, at start and every ``index_refresh``) keeps a view of what the bucket holds for the
clean-up policy and the status. OBS being unreachable or refusing the credentials never stops
serving: readiness says so, lookups fall through to the origin, uploads wait.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import os
import socket
import time

from yarl import URL

from ..config import ObsConfig
from ..ops.metrics import Metrics
from ..storage.base import ObjectMeta, Spool
from ..storage.obs import ObsStore, ObsUnavailable

log = logging.getLogger(__name__)

AGE_SLICES = 4096  # most time slices of Ages (then they double in length)
KNOWN = 10_000  # remote objects whose metadata is kept after a HEAD
LEASE_RENEW = 5.0  # seconds between rewrites of a held lease (each one changes its ETag)
LEASE_STALE = 30.0  # a lease unchanged this long belongs to a fetch that died: taken over
LEASE_POLL = 0.25  # seconds between looks for another instance's object
LEASE_WAIT = 3600.0  # longest wait for another instance's fetch before fetching ourselves
UPLOAD_TRIES = 3  # in a row after a commit; then the periodic retry takes over
RETRY_SOON = 5.0  # seconds between looks at OBS while it fails (instead of index_refresh)


class Ages:
    """The bucket's bytes by when each object was written, in time slices that double in length
    whenever more than ``AGE_SLICES`` are needed: what a budget needs of a listing, in memory that
    does not grow with the bucket. (Kept whole, a listing of 1 000 000 keys took 200 MB, twice that
    while the next one came in, and the loop stalled up to 150 ms while its dict grew or was freed.)"""

    def __init__(self) -> None:
        self.width = 1  # seconds per slice
        self.slices: dict[int, int] = {}  # slice (write time // width) -> bytes
        self.total = 0

    def add(self, modified: float, size: int) -> None:
        self.total += size
        at = int(modified) // self.width
        self.slices[at] = self.slices.get(at, 0) + size
        if len(self.slices) > AGE_SLICES:
            self.width *= 2
            merged: dict[int, int] = {}
            for start, held in self.slices.items():
                merged[start // 2] = merged.get(start // 2, 0) + held
            self.slices = merged

    def cutoff(self, budget: int) -> float:
        """The write time before which objects go, oldest first, for at most ``budget`` bytes
        to stay (to a slice: what is left may be up to one slice below the budget)."""
        total = self.total
        for at in sorted(self.slices):
            if total <= budget:
                return float(at * self.width)
            total -= self.slices[at]
        return math.inf if self.slices else -math.inf  # all of it (a budget of 0), or nothing there


class SharedTier:
    def __init__(self, config: ObsConfig, remote: ObsStore, local: Spool, metrics: Metrics) -> None:
        self.config = config
        self.remote = remote
        self.local = local
        self.metrics = metrics
        self.problem: str | None = "not checked yet"
        self.failing = False  # the last call failed: lookups skip OBS until a check succeeds
        self.objects = 0  # in the bucket at the last listing
        self.ages = Ages()  # of the last listing
        self.listed_at = 0.0
        # Objects seen by a HEAD, with when: trusted for index_refresh, and dropped sooner when
        # a listing shows the object gone or rewritten (another instance revalidated it, say).
        self._known: collections.OrderedDict[str, tuple[ObjectMeta, float]] = collections.OrderedDict()
        self.pending: dict[str, ObjectMeta] = {}  # cache key -> committed local object not uploaded yet
        self._uploads: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        # Cross-instance single flight: None until the endpoint was probed, then whether it
        # honours If-None-Match: * (without it each instance fetches a cold key once).
        self.leases_work: bool | None = None
        self._leases: dict[str, asyncio.Task[None]] = {}  # key -> the task renewing our lease
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._wake = asyncio.Event()
        metrics.obs_pending_uploads.set_function(lambda: len(self.pending))
        endpoint = URL(config.endpoint or "")
        self._endpoint = ((endpoint.host or "").lower(), endpoint.port)

    # -- running ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._refresh_loop(), name="obs refresh")

    async def close(self) -> None:
        for key in list(self._leases):
            await self.release(key)
        tasks = [t for t in (self._loop_task, *self._uploads.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.remote.close()

    async def _refresh_loop(self) -> None:
        while True:
            await self.refresh()
            self.retry_pending()
            delay = self.config.index_refresh if self.problem is None else min(RETRY_SOON, self.config.index_refresh)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    def _known_by_object_key(self) -> dict[str, tuple[str, float]]:
        """What a HEAD showed, by object key: (cache key, when)."""
        return {meta.remote: (key, seen) for key, (meta, seen) in self._known.items()}

    async def refresh(self) -> None:
        """Check the bucket and list it (all pages, as they arrive: nothing per object is kept
        but the bytes by age); on failure keep the last view and say why."""
        problem = await self.remote.check_writable()
        if problem is not None:
            self._failed(problem)
            return
        started = time.monotonic()
        # What a HEAD showed: dropped when the listing shows it gone or rewritten since.
        known = self._known_by_object_key()
        changed = set(known)  # object keys, until the listing shows them unchanged
        ages = Ages()
        objects = 0
        try:
            async for entry in self.remote.entries():
                objects += 1
                ages.add(entry.modified, entry.size)
                if entry.object_key in known and entry.modified <= known[entry.object_key][1]:
                    changed.discard(entry.object_key)
        except ObsUnavailable as exc:
            self._failed(str(exc))
            return
        self.ages, self.objects, self.listed_at = ages, objects, time.time()
        log.info("listed OBS bucket %s: %d objects in %.1fs", self.remote.bucket, objects, time.monotonic() - started)
        self.failing = False
        for object_key in changed:
            self._known.pop(known[object_key][0], None)
        if self.problem is not None and self.problem != "not checked yet":
            log.info("OBS bucket %s reachable again: %d objects", self.remote.bucket, objects)
        self.problem = None
        if self.leases_work is None:
            self.leases_work = await self.remote.conditional_puts_work()
            if not self.leases_work:
                log.warning(
                    "OBS at %s does not refuse a second If-None-Match: * PUT: instances cannot agree who "
                    "fetches a cold URL, so each may fetch it once",
                    self.config.endpoint,
                )

    # -- one instance fetches a cold key --------------------------------------------------------

    async def lease(self, key: str) -> ObjectMeta | None:
        """Before fetching a key that no store has: take its lease, so the other instances wait
        for this one's upload instead of fetching too. None: fetch it (the lease is ours, or
        leases cannot be had). An ObjectMeta: another instance stored it meanwhile."""
        if not self.leases_work or self.failing:
            return None
        deadline = time.monotonic() + LEASE_WAIT
        stamp, since = None, time.monotonic()
        try:
            while time.monotonic() < deadline:
                if await self.remote.take_lease(key, self.owner):
                    self._leases[key] = asyncio.create_task(self._renew(key), name=f"lease {key}")
                    # The holder before us may have uploaded and let go just now: look once more.
                    meta = await self.remote.stat(key)
                    if meta is None:
                        return None
                    await self.release(key)
                else:
                    meta = await self.remote.stat(key)
                if meta is not None:
                    self.remember(meta)
                    return meta
                now_stamp = await self.remote.lease_stamp(key)
                if now_stamp != stamp:
                    stamp, since = now_stamp, time.monotonic()
                elif now_stamp is not None and time.monotonic() - since > LEASE_STALE:
                    log.warning("the fetch of %s by another instance stopped renewing its lease: taking over", key)
                    await self.remote.drop_lease(key)
                await asyncio.sleep(LEASE_POLL)
        except ObsUnavailable as exc:
            self._failed(str(exc))
        return None

    async def _renew(self, key: str) -> None:
        for turn in itertools.count(1):
            await asyncio.sleep(LEASE_RENEW)
            try:
                await self.remote.renew_lease(key, f"{self.owner} {turn}")
            except ObsUnavailable as exc:
                log.warning("cannot renew the lease of %s: %s", key, exc)

    async def release(self, key: str) -> None:
        """Our fetch of ``key`` is over (uploaded, or it will not be): the others may go on."""
        task = self._leases.pop(key, None)
        if task is None:
            return
        task.cancel()
        try:
            await self.remote.drop_lease(key)
        except ObsUnavailable as exc:
            log.warning("cannot drop the lease of %s (it goes stale in %.0fs): %s", key, LEASE_STALE, exc)

    async def release_unless_uploading(self, key: str) -> None:
        """After a fill: a key that was not handed to an upload gives its lease back now."""
        if key in self._leases and key not in self.pending:
            await self.release(key)

    def _failed(self, problem: str) -> None:
        self.failing = True
        if problem != self.problem:
            log.warning("%s (serving goes on from the local store and the origin)", problem)
        self.problem = problem

    # -- lookups ------------------------------------------------------------------------------

    async def lookup(self, key: str) -> ObjectMeta | None:
        """The shared store's object for ``key`` (one HEAD unless seen before), or None."""
        known = self._known.get(key)
        if known is not None and time.time() - known[1] < self.config.index_refresh:
            self._known.move_to_end(key)
            return known[0]
        if self.failing:
            self.metrics.obs_lookups.labels("skipped").inc()
            return None  # do not make every miss wait for an OBS that is down: the origin serves
        try:
            meta = await self.remote.stat(key)
        except ObsUnavailable as exc:
            self.metrics.obs_lookups.labels("error").inc()
            self._failed(str(exc))
            return None
        self.metrics.obs_lookups.labels("miss" if meta is None else "hit").inc()
        if meta is not None:
            self.remember(meta)
        return meta

    async def by_digest(self, algorithm: str, hexdigest: str) -> ObjectMeta | None:
        """The shared object whose ``algorithm`` digest is ``hexdigest`` (any instance's upload)."""
        if self.failing:
            return None
        try:
            key = await self.remote.key_by_digest(algorithm, hexdigest)
        except ObsUnavailable as exc:
            self._failed(str(exc))
            return None
        meta = await self.lookup(key) if key is not None else None
        return meta if meta is not None and meta.digests.get(algorithm) == hexdigest else None

    def remember(self, meta: ObjectMeta) -> None:
        self._known[meta.key] = (meta, time.time())
        self._known.move_to_end(meta.key)
        while len(self._known) > KNOWN:
            self._known.popitem(last=False)

    async def update_meta(self, meta: ObjectMeta) -> None:
        """A remote-only object was revalidated: its new freshness goes with it."""
        try:
            await self.remote.update_meta(meta)
        except ObsUnavailable as exc:
            self._failed(str(exc))

    async def purge(self, key: str) -> bool:
        """Remove ``key``'s object from the bucket (an operator's purge); whether it was there.
        Raise :class:`ObsUnavailable` when OBS cannot be asked."""
        self.pending.pop(key, None)
        self._known.pop(key, None)
        object_key = self.remote.object_key(key)
        stored = await self.remote.stat(key)
        there = stored is not None
        if stored is not None:
            await self.remote.delete_key(object_key)
            await self.remote.delete_digest_markers(stored)
        return there

    def is_own(self, url: URL) -> bool:
        """A URL on the OBS endpoint (a client following our redirect through the proxy)."""
        return ((url.host or "").lower(), url.port) == self._endpoint

    def signed_url(self, meta: ObjectMeta) -> str:
        return self.remote.signed_url(meta, self.config.signed_url_ttl)

    # -- uploads ------------------------------------------------------------------------------

    def upload_later(self, meta: ObjectMeta) -> None:
        """Upload a committed local object in the background (once at a time per key)."""
        self.pending[meta.key] = meta
        if meta.key not in self._uploads:
            self._uploads[meta.key] = asyncio.create_task(self._upload(meta), name=f"upload {meta.key}")

    def retry_pending(self) -> None:
        for meta in list(self.pending.values()):
            self.upload_later(meta)

    async def _upload(self, meta: ObjectMeta) -> None:
        try:
            for attempt in range(UPLOAD_TRIES):
                if self.pending.get(meta.key) is not meta:
                    return  # replaced or removed meanwhile
                try:
                    stored = await self.remote.upload(self.local.body_path(meta), meta)
                except FileNotFoundError:
                    self.pending.pop(meta.key, None)
                    return
                except ObsUnavailable as exc:
                    self.metrics.obs_uploads.labels("error").inc()
                    self._failed(str(exc))
                    await asyncio.sleep(min(30.0, 2.0**attempt))
                    continue
                self.metrics.obs_uploads.labels("ok").inc()
                meta.remote = stored.remote
                await self.local.update_meta(meta)  # the local copy may now be evicted
                self.pending.pop(meta.key, None)
                self.remember(stored)
                return
            log.info("upload of %s postponed: OBS %s", meta.url, self.problem)
        finally:
            self._uploads.pop(meta.key, None)
            await self.release(meta.key)  # uploaded, or the others must not wait for it

    # -- the bucket's budget ------------------------------------------------------------------

    @property
    def budgeted(self) -> bool:
        return self.config.max_size is not None or self.config.max_age is not None

    async def cleanup(self) -> int:
        """Oldest-first removal above ``max_size`` and of objects older than ``max_age``: a
        listing finds the write time before which objects go, a second one removes them."""
        if not self.budgeted:
            return 0
        await self.refresh()
        if self.problem is not None:
            return 0
        cutoff = -math.inf
        if self.config.max_age is not None:
            cutoff = time.time() - self.config.max_age
        if self.config.max_size is not None:
            cutoff = max(cutoff, self.ages.cutoff(self.config.max_size))
        if cutoff == -math.inf:
            return 0
        known = self._known_by_object_key()
        doomed = 0
        try:
            async for entry in self.remote.entries():
                if entry.modified < cutoff:
                    await self.remote.delete_key(entry.object_key)
                    self._known.pop(known.get(entry.object_key, ("", 0.0))[0], None)
                    doomed += 1
        except ObsUnavailable as exc:
            self._failed(str(exc))
        if doomed:
            log.info("OBS clean-up removed %d objects from bucket %s", doomed, self.remote.bucket)
        return doomed
