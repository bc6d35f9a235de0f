"""The in-memory index of stored objects: a lookup never touches the disk.

Besides the key, an object is found by its sha256 or sha512 (the mirror-independent hits and the
lookups by digest). That map holds the first 64 bits of each digest as an int and the key(s)
having it; a lookup confirms the whole digest on the object, so a collision of the short form
costs a comparison, never a wrong answer. It is built after the index is loaded, a slice at a
time (:meth:`Index.build_digests`), so neither the start nor the hits wait for it; a lookup
before it is done builds it at once.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
from collections.abc import Iterator

from ..storage.base import ObjectMeta

DigestMap = dict[int, str | set[str]]
BUILD_SLICE = 10_000  # objects linked between two turns of the event loop


class Index:
    def __init__(self) -> None:
        # In access order, least recently used first (touched objects move to the end), so an
        # eviction pass takes the oldest without sorting the whole store on the event loop.
        self._objects: collections.OrderedDict[str, ObjectMeta] = collections.OrderedDict()
        self._by_digest: DigestMap | None = None  # None: not built yet
        self._building: DigestMap | None = None  # being built: changes go into it too
        self.total_size = 0
        self.loaded = False

    def __len__(self) -> int:
        return len(self._objects)

    def __iter__(self) -> Iterator[ObjectMeta]:
        return iter(list(self._objects.values()))

    def get(self, key: str) -> ObjectMeta | None:
        return self._objects.get(key)

    def put(self, meta: ObjectMeta) -> None:
        old = self._objects.get(meta.key)
        if old is not None:
            self.total_size -= old.size
            self._unlink(old)
        self._objects[meta.key] = meta
        self.total_size += meta.size
        for digests in (self._by_digest, self._building):
            if digests is not None:
                _link(digests, meta)

    def remove(self, key: str) -> ObjectMeta | None:
        meta = self._objects.pop(key, None)
        if meta is not None:
            self.total_size -= meta.size
            self._unlink(meta)
        return meta

    def by_digest(self, algorithm: str, hexdigest: str) -> list[ObjectMeta]:
        """The objects whose ``algorithm`` (sha256 or sha512) digest is ``hexdigest``."""
        if self._by_digest is None:
            self._by_digest = {}
            for meta in self._objects.values():
                _link(self._by_digest, meta)
        keys = self._by_digest.get(int(hexdigest[:16], 16))
        if keys is None:
            return []
        found = [self._objects.get(k) for k in ((keys,) if isinstance(keys, str) else sorted(keys))]
        return [m for m in found if m is not None and m.digests.get(algorithm) == hexdigest]

    async def build_digests(self) -> None:
        """Build the digest map a slice at a time (after the index is loaded)."""
        if self._by_digest is not None or self._building is not None:
            return
        building: DigestMap = {}
        self._building = building
        try:
            metas = list(self._objects.values())
            for start in range(0, len(metas), BUILD_SLICE):
                for meta in metas[start : start + BUILD_SLICE]:
                    if self._objects.get(meta.key) is meta:  # not replaced or removed meanwhile
                        _link(building, meta)
                await asyncio.sleep(0)
            if self._by_digest is None:  # a lookup did not build it meanwhile
                self._by_digest = building
        finally:
            self._building = None

    def _unlink(self, meta: ObjectMeta) -> None:
        for digests in (self._by_digest, self._building):
            if digests is None:
                continue
            for short in _short_digests(meta):
                keys = digests.get(short)
                if keys == meta.key:
                    del digests[short]
                elif isinstance(keys, set):
                    keys.discard(meta.key)
                    if len(keys) == 1:
                        digests[short] = keys.pop()

    def replace(self, other: Index) -> None:
        """Take ``other``'s entries in place (whoever holds this index sees them)."""
        self._objects = other._objects
        self._by_digest = other._by_digest
        self._building = None
        self.total_size = other.total_size
        self.loaded = other.loaded

    def touched(self, key: str) -> None:
        """``key`` was just used: it goes to the most recently used end."""
        if key in self._objects:
            self._objects.move_to_end(key)

    def order_by_access(self) -> None:
        """Put the entries in access order (after a load, which adds them in store order)."""
        ordered = sorted(self._objects.values(), key=lambda m: m.last_access or m.stored_at)
        self._objects = collections.OrderedDict((m.key, m) for m in ordered)

    def least_recently_used(self, count: int) -> list[ObjectMeta]:
        """The ``count`` least recently used objects, oldest first."""
        return list(itertools.islice(self._objects.values(), count))

    def largest(self, n: int) -> list[ObjectMeta]:
        return heapq.nlargest(n, self._objects.values(), key=lambda m: m.size)


def _short_digests(meta: ObjectMeta) -> list[int]:
    return [int(d[:16], 16) for d in (meta.sha256, meta.sha512) if len(d) >= 16]


def _link(digests: DigestMap, meta: ObjectMeta) -> None:
    for short in _short_digests(meta):
        keys = digests.get(short)
        if keys is None:
            digests[short] = meta.key
        elif isinstance(keys, str):
            if keys != meta.key:
                digests[short] = {keys, meta.key}
        else:
            keys.add(meta.key)  # many URLs, one body (empty files, say): a set, not a scan
