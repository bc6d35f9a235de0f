"""Bodies of recently hit objects, kept ready so that a hit costs no file open.

A build farm asks for the same archives again and again. The first hit of an object answers
from the store as usual while, in the I/O pool, its body is read into memory (small objects, up
to ``SMALL_BODY``, within ``MEMORY_BUDGET`` in all) or its file is opened and held (larger
ones, up to ``OPEN_FILES``). Later hits take the body from here: from memory in one write, or
with sendfile from a duplicate of the held descriptor.

A held descriptor also tells when another worker removed the object (its link count drops to
0), looked at once a second at most: then the entry is dropped and the object forgotten, and the
caller looks it up afresh. Until that look, this worker may still answer with the body it holds
(the right bytes of an object another worker evicted a moment ago).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable

from ..storage.base import ObjectMeta, Spool

SMALL_BODY = 64 << 10  # bodies up to this size are kept in memory ...
MEMORY_BUDGET = 32 << 20  # ... up to this much in all
OPEN_FILES = 512  # objects kept ready (each holds its body file open)
RECHECK = 1.0  # seconds between looks at whether another worker removed a ready object


class Ready:
    """One object's body, ready to go out: in memory (``body``) or as an open file (``fd``)."""

    __slots__ = ("body", "checked", "dated", "fd", "head", "signature")

    def __init__(self, meta: ObjectMeta, body: bytes | None, fd: int) -> None:
        self.signature = _signature(meta)
        self.body = body
        self.fd = fd
        self.checked = time.monotonic()
        self.head: bytes | None = None  # the unchanging part of the answer's head, made on first use
        self.dated = False  # the head holds the origin's Date (else each answer gets the time now)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _signature(meta: ObjectMeta) -> tuple[int, str, float]:
    return id(meta), meta.file, meta.response_time


class HotBodies:
    def __init__(self, store: Spool, forget: Callable[[ObjectMeta], None]) -> None:
        self._store = store
        self._forget = forget
        self._ready: collections.OrderedDict[str, Ready] = collections.OrderedDict()
        self._memory = 0
        self._warming: dict[str, asyncio.Task[None]] = {}

    def get(self, meta: ObjectMeta) -> Ready | None:
        """The body of ``meta`` if it is ready; None (and made ready for next time) otherwise.

        Raise FileNotFoundError when another worker removed the object (it is forgotten here).
        """
        if not meta.file:
            return None  # only the shared store has it
        key = meta.key
        ready = self._ready.get(key)
        if ready is None or ready.signature != _signature(meta):
            if ready is not None:
                self._drop(key)
            if key not in self._warming:
                self._warming[key] = asyncio.get_running_loop().create_task(self._load(meta))
            return None
        now = time.monotonic()
        if now - ready.checked >= RECHECK:  # a look costs a system call: once a second is enough
            ready.checked = now
            if os.fstat(ready.fd).st_nlink == 0:
                self._drop(key)
                self._forget(meta)
                raise FileNotFoundError(meta.file)
        self._ready.move_to_end(key)
        return ready

    async def read(self, key: str) -> tuple[ObjectMeta | None, Ready | None]:
        """``key``'s metadata from the store and, if the body is small, the body, in one trip to
        the I/O pool: a hit of an object whose metadata was not in memory costs no more. That
        body is for this answer only (no descriptor is held): an object becomes ready here when
        it is hit again while its metadata is in memory."""
        return await self._store.run(self._read_sync, key)

    def _read_sync(self, key: str) -> tuple[ObjectMeta | None, Ready | None]:
        meta = self._store.stat_sync(key)
        if meta is None or not meta.file or meta.size > SMALL_BODY:
            return meta, None
        ready = self._ready_sync(meta)
        if ready is not None:
            ready.close()  # the body is in memory
        return meta, ready

    def _ready_sync(self, meta: ObjectMeta) -> Ready | None:
        """The body of ``meta`` opened, and read if it is small (None: it is gone or damaged)."""
        try:
            fd = os.open(self._store.body_path(meta), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            body = os.pread(fd, meta.size + 1, 0) if meta.size <= SMALL_BODY else None
            if body is None or len(body) == meta.size:
                return Ready(meta, body, fd)
        except OSError:
            pass
        os.close(fd)
        return None

    async def _load(self, meta: ObjectMeta) -> None:
        try:
            ready = await self._store.run(self._ready_sync, meta)
        finally:
            self._warming.pop(meta.key, None)
        if ready is not None:
            self._keep(meta.key, ready)

    def _keep(self, key: str, ready: Ready) -> None:
        self._drop(key)
        self._ready[key] = ready
        self._memory += len(ready.body or b"")
        while self._memory > MEMORY_BUDGET or len(self._ready) > OPEN_FILES:
            self._drop(next(iter(self._ready)))

    def _drop(self, key: str) -> None:
        ready = self._ready.pop(key, None)
        if ready is None:
            return
        self._memory -= len(ready.body or b"")
        ready.close()

    def discard(self, key: str) -> None:
        """The object was purged or replaced here."""
        self._drop(key)

    def close(self) -> None:
        for task in self._warming.values():
            task.cancel()
        for key in list(self._ready):
            self._drop(key)
