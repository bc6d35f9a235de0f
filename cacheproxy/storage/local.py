"""The local-disk backend.

Layout under ``cache.dir``::

    tmp/<digest>.<token>.part          a body being written (never visible)
    objects/<d0d1>/<digest>.<token>    a committed body
    objects/<d0d1>/<digest>.json       its metadata; its ``file`` names the body

An object becomes visible when its ``.json`` is renamed into place, after the body was flushed and
renamed. A crash at any point leaves at most files that no ``.json`` names; :meth:`scan` removes
them at start. Several worker processes share one store: a fill holds the key's lock in ``tmp/``
(see :mod:`cacheproxy.cache.flight`) until its commit is done, and leftovers are removed only
when nobody holds their key's lock, so one worker's clean-up never touches another's fill.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..cache import flight
from ..cache.keys import key_digest
from .base import ObjectMeta, Storage, Writer

log = logging.getLogger(__name__)

HASH_CHUNK = 8 << 20
IOV_MAX = 1024


class LocalWriter(Writer):
    """A body written to ``tmp/``; sha256 and md5 follow behind the writes.

    Writes only copy bytes into the file, so readers of the growing file see them at once. A
    background task reads back what was written (from the page cache) and hashes it, sha256 and
    md5 in parallel threads; :meth:`digests` waits for it to reach the end. Hashing never holds
    the transfer back, and memory stays bounded by one chunk.
    """

    def __init__(self, store: LocalStore, key: str, path: Path, fd: int) -> None:
        self._store = store
        self._key = key
        self.path = path
        self._fd: int | None = fd
        self._written = 0
        self._hashed = 0
        self._hashing: asyncio.Task[None] | None = None
        self._stopped = False
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5()

    @property
    def written(self) -> int:
        return self._written

    def _write_sync(self, chunks: list[bytes]) -> None:
        assert self._fd is not None
        for start in range(0, len(chunks), IOV_MAX):
            views = [memoryview(c) for c in chunks[start : start + IOV_MAX]]
            while views:
                n = os.writev(self._fd, views)
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if views and n:
                    views[0] = views[0][n:]

    async def write(self, data: bytes | list[bytes]) -> None:
        chunks = [data] if isinstance(data, bytes) else data
        await self._store.run(self._write_sync, chunks)
        self._written += sum(len(c) for c in chunks)
        if self._hashing is None or self._hashing.done():
            self._hashing = asyncio.ensure_future(self._hash_behind())

    async def _hash_behind(self) -> None:
        """Hash what was written and not hashed yet (each executor step finishes before we return)."""
        while not self._stopped and self._fd is not None and self._hashed < self._written:
            data = await self._store.run(
                os.pread, self._fd, min(HASH_CHUNK, self._written - self._hashed), self._hashed
            )
            if not data:
                raise OSError(f"{self.path} is shorter than written")
            # hashlib releases the GIL on large buffers: the two run side by side.
            await asyncio.gather(self._store.run(self._sha256.update, data), self._store.run(self._md5.update, data))
            self._hashed += len(data)

    async def _quiesce(self) -> None:
        """Wait for a running hash step: the file descriptor is in use until it ends."""
        if self._hashing is not None:
            await asyncio.shield(asyncio.gather(self._hashing, return_exceptions=True))

    async def digests(self) -> tuple[str, str]:
        await self._quiesce()
        await self._hash_behind()
        return self._sha256.hexdigest(), self._md5.hexdigest()

    def _commit_sync(self, meta: ObjectMeta) -> ObjectMeta:
        assert self._fd is not None
        os.fdatasync(self._fd)
        os.close(self._fd)
        self._fd = None
        digest = key_digest(self._key)
        folder = self._store.objects_dir / digest[:2]
        folder.mkdir(parents=True, exist_ok=True)
        token = self.path.name.split(".")[1]
        body = folder / f"{digest}.{token}"
        os.rename(self.path, body)
        meta.file = body.name
        previous = self._store.read_meta_sync(self._key)
        self._store.write_meta_sync(meta)
        if previous is not None and previous.file != meta.file:
            (folder / previous.file).unlink(missing_ok=True)
        return meta

    async def commit(self, meta: ObjectMeta) -> ObjectMeta:
        return await self._store.run(self._commit_sync, meta)

    def _abort_sync(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)

    async def abort(self) -> None:
        self._stopped = True  # the hashing stops after its current step
        await self._quiesce()
        await self._store.run(self._abort_sync)


class LocalStore(Storage):
    def __init__(self, root: Path, executor: ThreadPoolExecutor | None = None) -> None:
        self.root = root
        self.objects_dir = root / "objects"
        self.tmp_dir = root / "tmp"
        self._executor = executor

    async def run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def body_path(self, meta: ObjectMeta) -> Path:
        return self.objects_dir / key_digest(meta.key)[:2] / meta.file

    def _meta_path(self, key: str) -> Path:
        digest = key_digest(key)
        return self.objects_dir / digest[:2] / f"{digest}.json"

    def read_meta_sync(self, key: str) -> ObjectMeta | None:
        try:
            return ObjectMeta.from_json(self._meta_path(key).read_bytes())
        except FileNotFoundError:
            return None

    def write_meta_sync(self, meta: ObjectMeta) -> None:
        path = self._meta_path(meta.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(meta.to_json(), encoding="utf-8")
        os.replace(tmp, path)

    # -- Storage --------------------------------------------------------------------------

    def _scan_sync(self) -> list[ObjectMeta]:
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        flight.remove_unowned(self.tmp_dir)  # interrupted fills
        found: list[ObjectMeta] = []
        removed = 0
        for folder in self.objects_dir.iterdir():
            if not folder.is_dir():
                continue
            names = set(os.listdir(folder))
            referenced: set[str] = set()
            for name in names:
                if not name.endswith(".json"):
                    continue
                path = folder / name
                try:
                    meta = ObjectMeta.from_json(path.read_bytes())
                    size = (folder / meta.file).stat().st_size
                except (OSError, ValueError, TypeError) as exc:
                    log.warning("removing unreadable cache entry %s: %s", path, exc)
                    path.unlink(missing_ok=True)
                    continue
                if size != meta.size:
                    log.warning("removing cache entry %s: body has %d bytes, expected %d", path, size, meta.size)
                    path.unlink(missing_ok=True)
                    continue
                referenced.add(meta.file)
                found.append(meta)
            for name in names - referenced:
                if name.endswith(".json") or name.endswith(".tmp"):
                    continue
                digest = name.split(".", 1)[0]
                if flight.digest_unowned(self.tmp_dir, digest):
                    (folder / name).unlink(missing_ok=True)  # not being committed by another worker
                    removed += 1
        if removed:
            log.info("removed %d leftover file(s) of interrupted writes", removed)
        return found

    async def scan(self) -> AsyncIterator[ObjectMeta]:
        for meta in await self.run(self._scan_sync):
            yield meta

    async def stat(self, key: str) -> ObjectMeta | None:
        return await self.run(self.read_meta_sync, key)

    def _begin_sync(self, key: str) -> LocalWriter:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        path = self.tmp_dir / f"{key_digest(key)}.{secrets.token_hex(8)}.part"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)  # read back for hashing
        return LocalWriter(self, key, path, fd)

    async def begin_write(self, key: str) -> LocalWriter:
        return await self.run(self._begin_sync, key)

    async def update_meta(self, meta: ObjectMeta) -> None:
        await self.run(self.write_meta_sync, meta)

    def _delete_sync(self, meta: ObjectMeta) -> None:
        current = self.read_meta_sync(meta.key)
        self._meta_path(meta.key).unlink(missing_ok=True)
        self.body_path(meta).unlink(missing_ok=True)
        if current is not None and current.file != meta.file:
            self.body_path(current).unlink(missing_ok=True)

    async def delete(self, meta: ObjectMeta) -> None:
        await self.run(self._delete_sync, meta)

    def _check_sync(self) -> str | None:
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            probe = self.tmp_dir / f".probe.{secrets.token_hex(4)}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            return f"cache directory {self.root} is not writable: {exc.strerror or exc}"
        return None

    async def check_writable(self) -> str | None:
        return await self.run(self._check_sync)

    def remove_stale_temp(self) -> int:
        """Remove temp files of fills that no process runs any more (blocking; run in the pool)."""
        return flight.remove_unowned(self.tmp_dir)

    def touch_sync(self, meta: ObjectMeta) -> None:
        """Persist ``meta.last_access`` unless another worker replaced or removed the object."""
        current = self.read_meta_sync(meta.key)
        if current is None or current.file != meta.file or current.last_access >= meta.last_access:
            return
        current.last_access = meta.last_access
        self.write_meta_sync(current)

    def disk_usage(self) -> tuple[int, int]:
        """(total, free) bytes of the filesystem holding the store."""
        usage = shutil.disk_usage(self.root)
        return usage.total, usage.free
