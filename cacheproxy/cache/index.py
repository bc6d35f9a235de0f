"""The in-memory index of stored objects: a lookup never touches the disk."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from ..storage.base import ObjectMeta


class Index:
    def __init__(self) -> None:
        self._objects: dict[str, ObjectMeta] = {}
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
        self._objects[meta.key] = meta
        self.total_size += meta.size

    def remove(self, key: str) -> ObjectMeta | None:
        meta = self._objects.pop(key, None)
        if meta is not None:
            self.total_size -= meta.size
        return meta

    def replace(self, other: Index) -> None:
        """Take ``other``'s entries in place (whoever holds this index sees them)."""
        self._objects = other._objects
        self.total_size = other.total_size
        self.loaded = other.loaded

    def least_recently_used(self) -> list[ObjectMeta]:
        return sorted(self._objects.values(), key=lambda m: m.last_access or m.stored_at)

    def largest(self, n: int) -> list[ObjectMeta]:
        return heapq.nlargest(n, self._objects.values(), key=lambda m: m.size)
