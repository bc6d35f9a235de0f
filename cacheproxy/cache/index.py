"""The in-memory index of stored objects: a lookup never touches the disk.

Besides the key, an object is found by its sha256 or sha512 (the mirror-independent hits and the
lookups by digest). That map holds the first 64 bits of each digest as an int and the keys
having it; a lookup confirms the whole digest on the object, so a collision of the short form
costs a comparison, never a wrong answer.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from ..storage.base import ObjectMeta


class Index:
    def __init__(self) -> None:
        self._objects: dict[str, ObjectMeta] = {}
        self._by_digest: dict[int, str | tuple[str, ...]] = {}
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
            self._unlink_digests(old)
        self._objects[meta.key] = meta
        self.total_size += meta.size
        for short in _short_digests(meta):
            keys = self._by_digest.get(short)
            if keys is None:
                self._by_digest[short] = meta.key
            elif isinstance(keys, str):
                if keys != meta.key:
                    self._by_digest[short] = (keys, meta.key)
            elif meta.key not in keys:
                self._by_digest[short] = (*keys, meta.key)

    def remove(self, key: str) -> ObjectMeta | None:
        meta = self._objects.pop(key, None)
        if meta is not None:
            self.total_size -= meta.size
            self._unlink_digests(meta)
        return meta

    def by_digest(self, algorithm: str, hexdigest: str) -> list[ObjectMeta]:
        """The objects whose ``algorithm`` (sha256 or sha512) digest is ``hexdigest``."""
        keys = self._by_digest.get(int(hexdigest[:16], 16))
        if keys is None:
            return []
        found = [self._objects.get(k) for k in ((keys,) if isinstance(keys, str) else keys)]
        return [m for m in found if m is not None and m.digests.get(algorithm) == hexdigest]

    def _unlink_digests(self, meta: ObjectMeta) -> None:
        for short in _short_digests(meta):
            keys = self._by_digest.get(short)
            if keys == meta.key:
                del self._by_digest[short]
            elif isinstance(keys, tuple):
                rest = tuple(k for k in keys if k != meta.key)
                self._by_digest[short] = rest[0] if len(rest) == 1 else rest

    def replace(self, other: Index) -> None:
        """Take ``other``'s entries in place (whoever holds this index sees them)."""
        self._objects = other._objects
        self._by_digest = other._by_digest
        self.total_size = other.total_size
        self.loaded = other.loaded

    def least_recently_used(self) -> list[ObjectMeta]:
        return sorted(self._objects.values(), key=lambda m: m.last_access or m.stored_at)

    def largest(self, n: int) -> list[ObjectMeta]:
        return heapq.nlargest(n, self._objects.values(), key=lambda m: m.size)


def _short_digests(meta: ObjectMeta) -> list[int]:
    return [int(d[:16], 16) for d in (meta.sha256, meta.sha512) if len(d) >= 16]
