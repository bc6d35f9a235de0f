"""The in-memory index of stored objects: whether a key is stored never costs a disk read.

Every stored object has an *entry*: its key and one packed int (size, whether it is an error
answer and whether OBS has it, its body's file token, the first 60 bits of its sha256 and
sha512, and its last access in milliseconds). That is about 100 bytes besides the key and the digest
map, and none of it is an object the garbage collector has to walk, so a store of a million
objects costs tens of megabytes and no collection pauses. A hit changes its entry in place: the
dict keeps no access order, since moving a key to the end leaves a hole, and the holes make
CPython rebuild the whole dict now and then (80 ms at 1 000 000 objects, every few hundred
thousand hits). An eviction pass finds the least recently used itself (:meth:`Index.oldest`).

The whole :class:`ObjectMeta` (the origin's headers, freshness, the full digests) of the
``RESIDENT`` most recently used objects is kept beside the entries; for the others the cache
reads it from the store when a request needs it (:meth:`~.manager.Cache.from_store`).

Besides the key, an object is found by its sha256 or sha512 (the mirror-independent hits and the
lookups by digest). That map holds the first 60 bits of each digest as an int and the key(s)
having it; the cache confirms the whole digest on the object, so a collision of the short form
costs a comparison, never a wrong answer. It is built after the index is loaded, a slice at a
time (:meth:`Index.build_digests`), so neither the start nor the hits wait for it; a lookup
before it is done builds it at once.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
from collections.abc import Callable, Iterator

from ..storage import packed
from ..storage.base import Entry, Listed, ObjectMeta

DigestMap = dict[int, str | set[str]]
BUILD_SLICE = 1000  # objects linked between two turns of the event loop (about 1 ms; see SNAPSHOT_SLICE)
SCAN_SLICE = 2000  # objects an eviction pass looks at between two turns of the event loop (about 1 ms)
SORTED_AT_MOST = 10_000  # objects of one age band an eviction pass sorts (more: taken as they come)
RESIDENT = 20_000  # most recently used objects whose whole metadata stays in memory


class Index:
    def __init__(self) -> None:
        self._entries: dict[str, int] = {}
        self._resident: collections.OrderedDict[str, ObjectMeta] = collections.OrderedDict()
        self._by_digest: DigestMap | None = None  # None: not built yet
        self._building: DigestMap | None = None  # being built: changes go into it too
        self.total_size = 0
        self.loaded = False

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        """The keys, in no particular order."""
        return list(self._entries)

    def by_access(self) -> list[str]:
        """The keys, least recently used first (a sort of them all: for tests and small stores)."""
        return sorted(self._entries, key=lambda key: packed.accessed(self._entries[key]))

    def get(self, key: str) -> ObjectMeta | None:
        """The whole metadata of ``key`` if it is in memory (None: not stored, or read it from the store)."""
        return self._resident.get(key)

    def put(self, meta: ObjectMeta) -> None:
        """A whole object (committed, read from the store, or changed): kept, and in memory.
        A body this index knows keeps the later access time (its ``.json`` has the one of when
        it was written)."""
        entry = packed.pack(meta.listed())
        if self.same_body(meta.key, entry) and (known := self.accessed(meta.key)) > packed.accessed(entry):
            meta.last_access = known / 1000
            entry = packed.with_access(entry, meta.last_access)
        self.add(meta.key, entry)
        self._resident[meta.key] = meta
        self._resident.move_to_end(meta.key)
        while len(self._resident) > RESIDENT:
            self._resident.popitem(last=False)

    def add(self, key: str, entry: int) -> None:
        """An object as a listing names it (its metadata is read from the store when needed)."""
        old = self._entries.get(key)
        if old is not None:
            self.total_size -= packed.size(old)
            self._unlink(key, old)
            if (old ^ entry) & packed.BODY:  # another body: what is in memory is stale
                self._resident.pop(key, None)
        self._entries[key] = entry
        self.total_size += packed.size(entry)
        for digests in (self._by_digest, self._building):
            if digests is not None:
                _link(digests, key, entry)

    def remove(self, key: str) -> bool:
        self._resident.pop(key, None)
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.total_size -= packed.size(entry)
        self._unlink(key, entry)
        return True

    def listed(self, key: str) -> Listed | None:
        entry = self._entries.get(key)
        return None if entry is None else packed.unpack(key, entry)

    def by_digest(self, hexdigest: str) -> list[str]:
        """The keys whose sha256 or sha512 may be ``hexdigest`` (the caller confirms it on the object)."""
        if self._by_digest is None:
            self._by_digest = {}
            for key, entry in self._entries.items():
                _link(self._by_digest, key, entry)
        keys = self._by_digest.get(packed.short_digest(hexdigest))
        if keys is None:
            return []
        return [keys] if isinstance(keys, str) else sorted(keys)

    async def build_digests(self) -> None:
        """Build the digest map a slice at a time (after the index is loaded)."""
        if self._by_digest is not None or self._building is not None:
            return
        building: DigestMap = {}
        self._building = building
        try:
            keys = self.keys()
            for start in range(0, len(keys), BUILD_SLICE):
                for key in keys[start : start + BUILD_SLICE]:
                    entry = self._entries.get(key)
                    if entry is not None:  # not removed meanwhile (what is added goes into building too)
                        _link(building, key, entry)
                await asyncio.sleep(0)
            if self._by_digest is None:  # a lookup did not build it meanwhile
                self._by_digest = building
        finally:
            self._building = None

    def _unlink(self, key: str, entry: int) -> None:
        for digests in (self._by_digest, self._building):
            if digests is None:
                continue
            for short in packed.shorts(entry):
                keys = digests.get(short)
                if keys == key:
                    del digests[short]
                elif isinstance(keys, set):
                    keys.discard(key)
                    if len(keys) == 1:
                        digests[short] = keys.pop()

    def same_body(self, key: str, entry: int) -> bool:
        """Whether ``entry`` is of the body this index has for ``key``."""
        mine = self._entries.get(key)
        return mine is not None and not ((mine ^ entry) & packed.BODY)

    def holds(self, meta: ObjectMeta) -> bool:
        """Whether ``meta``'s body is the one this index has for its key."""
        return self.same_body(meta.key, packed.pack(meta.listed()))

    def accessed(self, key: str) -> int:
        """The last access of ``key``, in ms (0: not known)."""
        entry = self._entries.get(key)
        return 0 if entry is None else packed.accessed(entry)

    def touched(self, key: str, when: float) -> None:
        """``key`` was used at ``when``: its entry says so (in place)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = packed.with_access(entry, when)
            if key in self._resident:
                self._resident.move_to_end(key)

    async def oldest(self, size: int, now: float, spare: Callable[[str], bool]) -> list[str]:
        """The least recently used objects whose sizes add up to ``size`` (or all there are),
        leaving out what ``spare`` names: what an eviction pass removes.

        Two looks at every entry, a slice at a time: the first adds up the bytes by age band (16
        bands per doubling of the age since ``now``), which gives the youngest band that goes;
        the second takes all that is older, and the oldest of that band (sorted, when it holds
        at most ``SORTED_AT_MOST``) until ``size`` is reached. Only that band is ever sorted, so
        a pass costs about 2.5 µs of loop time an object (1 000 000: 2.5 s, in turns of 2 ms),
        however much it removes.
        """
        when = int(now * 1000)
        by_band: collections.Counter[int] = collections.Counter()

        def count(key: str, entry: int) -> None:
            by_band[_band(when, entry)] += packed.size(entry)

        await self._each(count, spare)
        if not by_band:
            return []
        cutoff, total = -1, 0
        for cutoff in sorted(by_band, reverse=True):  # the oldest band first
            total += by_band[cutoff]
            if total >= size:
                break
        older: list[str] = []
        edge: list[tuple[int, str, int]] = []
        needed = size

        def take(key: str, entry: int) -> None:
            nonlocal needed
            band = _band(when, entry)
            if band > cutoff:
                older.append(key)
                needed -= packed.size(entry)
            elif band == cutoff:
                edge.append((packed.accessed(entry), key, packed.size(entry)))

        await self._each(take, spare)
        if len(edge) <= SORTED_AT_MOST:
            edge.sort()
        for _, key, bytes_ in edge:
            if needed <= 0:
                break
            older.append(key)
            needed -= bytes_
        return older

    async def _each(self, visit: Callable[[str, int], None], spare: Callable[[str], bool] | None = None) -> None:
        """``visit`` every key there is and its entry (but those ``spare`` names), a slice at a time."""
        keys = self.keys()
        for start in range(0, len(keys), SCAN_SLICE):
            for key in keys[start : start + SCAN_SLICE]:
                entry = self._entries.get(key)
                if entry is not None and (spare is None or not spare(key)):
                    visit(key, entry)
            await asyncio.sleep(0)

    async def largest(self, n: int) -> list[str]:
        """The keys of the ``n`` largest objects, largest first (a look at every entry, a slice
        at a time: in one go it held the loop 0.24 s at 1 000 000 objects)."""
        heap: list[tuple[int, str]] = []

        def visit(key: str, entry: int) -> None:
            item = (packed.size(entry), key)
            if len(heap) < n:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

        await self._each(visit)
        return [key for _, key in sorted(heap, reverse=True)]

    def errors(self) -> list[tuple[str, int]]:
        """(key, size) of the stored error answers."""
        return [(k, packed.size(e)) for k, e in self._entries.items() if e & packed.ERROR]

    def not_uploaded(self) -> list[str]:
        """The keys OBS does not have yet (as far as the store's metadata says)."""
        return [k for k, e in self._entries.items() if not e & packed.REMOTE]

    def listing(self) -> Iterator[Entry]:
        """Every key and entry, for the snapshot: the keys of now, each with its entry as it is
        when consumed (one removed meanwhile is left out). A list of the keys is quick to take;
        a copy of the dict took up to 290 ms at 1 000 000 objects, once touches had left gaps in
        it, and requests waited for it."""
        for key in self.keys():
            entry = self._entries.get(key)
            if entry is not None:
                yield key, entry

    def keep_resident(self, other: Index) -> None:
        """Keep what ``other`` holds in memory of the objects this index has the same body of."""
        for key, meta in other._resident.items():
            if self.holds(meta):
                self._resident[key] = meta

    def replace(self, other: Index) -> None:
        """Take ``other``'s entries in place (whoever holds this index sees them)."""
        self._entries = other._entries
        self._resident = other._resident
        self._by_digest = other._by_digest
        self._building = None
        self.total_size = other.total_size
        self.loaded = other.loaded


def _band(now: int, entry: int) -> int:
    """The age band of an entry: exact below 32 ms, then 16 bands per doubling of the age (the
    larger the band, the older the object)."""
    age = max(now - packed.accessed(entry), 0)
    bits = age.bit_length()
    return age if bits <= 5 else (bits - 5) * 16 + (age >> (bits - 5))


def _link(digests: DigestMap, key: str, entry: int) -> None:
    for short in packed.shorts(entry):
        if not short:
            continue
        keys = digests.get(short)
        if keys is None:
            digests[short] = key
        elif isinstance(keys, str):
            if keys != key:
                digests[short] = {keys, key}
        else:
            keys.add(key)  # many URLs, one body (empty files, say): a set, not a scan
