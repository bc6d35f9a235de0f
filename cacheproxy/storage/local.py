"""The local-disk backend.

Layout under ``cache.dir``::

    tmp/<digest>.<token>.part          a body being written (never visible)
    objects/<d0d1>/<digest>.<token>    a committed body
    objects/<d0d1>/<digest>.json       its metadata; its ``file`` names the body

An object becomes visible when its ``.json`` is renamed into place, after the body was flushed and
renamed. A crash at any point leaves at most files that no ``.json`` names; :meth:`scan` removes
them at start. Several worker processes share one store: a fill holds the key's lock in ``tmp/``
(see :mod:`cacheproxy.storage.flight`) until its commit is done, and leftovers are removed only
when nobody holds their key's lock, so one worker's clean-up never touches another's fill.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import select
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from . import flight, packed
from .base import Digests, Entry, Listed, ObjectMeta, Spool, SpoolWriter, key_digest

log = logging.getLogger(__name__)
_T = TypeVar("_T")

HASH_CHUNK = 1 << 20
IOV_MAX = 1024
SPLICE_CHUNK = 1 << 20  # pipe size asked for, and bytes moved per splice
REPORT_BYTES = 1 << 20  # the splicer reports progress every this many bytes ...
REPORT_SECONDS = 0.02  # ... or this often
F_SETPIPE_SZ = 1031


def _read_small(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


READ_PIECE = 1 << 20
SNAPSHOT_HEADER = b"cacheproxy index snapshot 3\n"
# Snapshot lines made between two turns of the event loop (about 0.5 ms): a request needs several
# turns (read, handler, send), and each may wait for a slice.
SNAPSHOT_SLICE = 100


class _SnapshotReader:
    """The index snapshot's lines, a folder at a time (they are grouped by folder, in order)."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO | None = None
        self._next = b""
        try:
            self._file = open(path, "rb")  # closed by close()
        except FileNotFoundError:
            return
        if self._file.readline() != SNAPSHOT_HEADER:
            log.warning("ignoring the index snapshot %s: not in this version's format", path)
            self.close()
            return
        self._next = self._file.readline()

    def folder(self, name: str) -> dict[str, bytes]:
        """The lines of folder ``name`` by the object's key digest (earlier folders are skipped)."""
        prefix = name.encode()
        lines: dict[str, bytes] = {}
        while self._next and self._file is not None and self._next[:2] <= prefix:
            if self._next[:2] == prefix:
                lines[self._next[:64].decode("ascii", "replace")] = self._next
            self._next = self._file.readline()
        return lines

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _parse_line(line: bytes) -> Entry | None:
    """A snapshot line: the key digest, the packed entry in hex, the key (None: damaged)."""
    try:
        _, entry, key = line.decode().rstrip("\n").split("\t", 2)
        return key, int(entry, 16)
    except ValueError:
        return None


class LocalWriter(SpoolWriter):
    """A body written to ``tmp/``; its digests follow behind the writes.

    Writes only copy bytes into the file, so readers of the growing file see them at once. A
    background task reads back what was written (from the page cache) and hashes it, sha256,
    sha512 and md5 in parallel threads; :meth:`digests` waits for it to reach the end. Hashing never holds
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
        self._sha512 = hashlib.sha512()
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
        self.adopt(sum(len(c) for c in chunks))

    def splice_sync(
        self, source: int, count: int, progress: Callable[[int], None], stop: threading.Event, timeout: float
    ) -> None:
        """Move ``count`` bytes from the socket ``source`` into the body, kernel to kernel (blocking).

        ``progress(n)`` reports bytes as they land (in batches); ``stop`` ends the copy early. A
        silence of ``timeout`` seconds raises TimeoutError, an early end ConnectionResetError.
        """
        assert self._fd is not None
        pipe_r, pipe_w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_w, F_SETPIPE_SZ, SPLICE_CHUNK)
        poller = select.poll()
        poller.register(source, select.POLLIN | select.POLLERR | select.POLLHUP)
        moved = reported = 0
        last_report = idle_since = time.monotonic()
        try:
            while moved < count and not stop.is_set():
                try:
                    n = os.splice(source, pipe_w, min(SPLICE_CHUNK, count - moved), flags=os.SPLICE_F_MOVE)
                except BlockingIOError:
                    if moved > reported:
                        progress(moved - reported)
                        reported, last_report = moved, time.monotonic()
                    if not poller.poll(500):
                        if time.monotonic() - idle_since > timeout:
                            raise TimeoutError(f"no data from the origin for {timeout:.0f}s") from None
                    continue
                if n == 0:
                    raise ConnectionResetError(f"the origin closed the connection after {moved} of {count} bytes")
                left = n
                while left:
                    left -= os.splice(pipe_r, self._fd, left, flags=os.SPLICE_F_MOVE)
                moved += n
                now = idle_since = time.monotonic()
                if moved - reported >= REPORT_BYTES or now - last_report >= REPORT_SECONDS:
                    progress(moved - reported)
                    reported, last_report = moved, now
        finally:
            if moved > reported:
                progress(moved - reported)
            os.close(pipe_r)
            os.close(pipe_w)

    def adopt(self, n: int) -> None:
        """Count ``n`` bytes that :meth:`splice_sync` put into the file (on the event loop)."""
        self._written += n
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
            # hashlib releases the GIL on large buffers: the three run side by side.
            await asyncio.gather(*(self._store.run(h.update, data) for h in (self._sha256, self._sha512, self._md5)))
            self._hashed += len(data)

    async def _quiesce(self) -> None:
        """Wait for a running hash step: the file descriptor is in use until it ends."""
        if self._hashing is not None:
            await asyncio.shield(asyncio.gather(self._hashing, return_exceptions=True))

    async def digests(self) -> Digests:
        await self._quiesce()
        await self._hash_behind()
        return Digests(self._sha256.hexdigest(), self._sha512.hexdigest(), self._md5.hexdigest())

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
        previous = self._store.stat_sync(self._key)
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


class LocalStore(Spool):
    def __init__(self, root: Path, executor: ThreadPoolExecutor | None = None) -> None:
        self.root = root
        self.objects_dir = root / "objects"
        self.tmp_dir = root / "tmp"
        self.snapshot_path = root / "index.snapshot"
        self.scan_reads = 0  # entries the last scan read from their .json (not from the snapshot)
        self._executor = executor

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def body_path(self, meta: ObjectMeta) -> Path:
        return self.objects_dir / key_digest(meta.key)[:2] / meta.file

    def _meta_path(self, key: str) -> Path:
        digest = key_digest(key)
        return self.objects_dir / digest[:2] / f"{digest}.json"

    def stat_sync(self, key: str) -> ObjectMeta | None:
        digest = key_digest(key)
        try:
            return ObjectMeta.from_json(_read_small(f"{self.objects_dir}/{digest[:2]}/{digest}.json"))
        except FileNotFoundError:
            return None

    def write_meta_sync(self, meta: ObjectMeta) -> None:
        path = self._meta_path(meta.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(meta.to_json(), encoding="utf-8")
        os.replace(tmp, path)

    # -- Storage --------------------------------------------------------------------------

    def _start_scan_sync(self) -> tuple[list[str], _SnapshotReader]:
        """The folders of the store, and the snapshot to take their objects from."""
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        flight.remove_unowned(self.tmp_dir)  # interrupted fills
        self.snapshot_path.with_name("index.json").unlink(missing_ok=True)  # the format before 2
        folders = sorted(entry.name for entry in os.scandir(self.objects_dir) if entry.is_dir())
        return folders, _SnapshotReader(self.snapshot_path)

    def _list_folder(self, name: str, snapshot: _SnapshotReader) -> tuple[list[Entry], int]:
        """The objects of one ``objects/<d0d1>`` folder, and how many leftover files it removed.
        A snapshot line is taken when the folder still holds its ``.json`` and its body (a
        replaced object has a new body name); anything else is read from its ``.json``."""
        folder = f"{self.objects_dir}/{name}"
        names = os.listdir(folder)
        present = set(names)
        lines = snapshot.folder(name)
        found: list[Entry] = []
        referenced: set[str] = set()
        for entry in names:
            if not entry.endswith(".json"):
                continue
            digest = entry[:-5]
            listed = _parse_line(line) if (line := lines.get(digest)) is not None else None
            if listed is None or (body := f"{digest}.{packed.token(listed[1])}") not in present:
                self.scan_reads += 1  # no line, a damaged one, or one of an earlier body
                meta = self._read_entry(folder, f"{folder}/{entry}")
                if meta is None:
                    continue
                listed, body = (meta.key, packed.pack(meta.listed())), meta.file
            referenced.add(body)
            found.append(listed)
        removed = 0
        for entry in present - referenced:
            if entry.endswith((".json", ".tmp")):
                continue
            if flight.digest_unowned(self.tmp_dir, entry.split(".", 1)[0]):  # no worker is committing it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{folder}/{entry}")
                    removed += 1
        return found, removed

    async def write_snapshot(self, entries: Iterable[Entry]) -> None:
        """Save the index for a fast next start: a line per object (its key digest, its packed
        entry in hex, its key), grouped by folder, each group a buffer (no object per line stays
        around). The lines are made on the event loop a slice at a time, not in a thread: Python
        work in a thread makes every system call of the loop wait for the GIL (up to 5 ms each),
        which is what requests felt as latency."""
        groups: dict[str, bytearray] = collections.defaultdict(bytearray)
        for n, (key, entry) in enumerate(entries, 1):
            digest = key_digest(key)
            groups[digest[:2]] += f"{digest}\t{entry:x}\t{key}\n".encode()
            if n % SNAPSHOT_SLICE == 0:
                await asyncio.sleep(0)
        await self.run(self._write_snapshot_sync, groups)

    def _write_snapshot_sync(self, groups: dict[str, bytearray]) -> None:
        tmp = self.snapshot_path.with_name(f"{self.snapshot_path.name}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "wb") as f:
            f.write(SNAPSHOT_HEADER)
            for name in sorted(groups):
                f.write(groups.pop(name))
        os.replace(tmp, self.snapshot_path)

    def delete_listed_sync(self, items: Iterable[Listed]) -> None:
        """Remove these objects' files (blocking; run in the pool): what an eviction pass does
        with a batch, without reading their metadata."""
        for item in items:
            digest = key_digest(item.key)
            folder = f"{self.objects_dir}/{digest[:2]}"
            for name in (f"{digest}.json", f"{digest}.{item.token}" if item.token else ""):
                if name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{folder}/{name}")

    def _read_entry(self, folder: str, path: str) -> ObjectMeta | None:
        """One committed object, checked against its body; a broken entry is removed."""
        problem = "its body is missing"
        for _ in range(2):  # a second look, in case another worker replaced the object meanwhile
            try:
                meta = ObjectMeta.from_json(_read_small(path))
            except FileNotFoundError:
                return None
            except (OSError, ValueError, TypeError) as exc:
                problem = f"unreadable: {exc}"
                break
            try:
                size = os.stat(f"{folder}/{meta.file}").st_size
            except FileNotFoundError:
                continue
            if size == meta.size:
                return meta
            problem = f"body has {size} bytes, expected {meta.size}"
            break
        log.warning("removing cache entry %s: %s", path, problem)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return None

    async def listing(self) -> AsyncIterator[list[Entry]]:
        self.scan_reads = 0
        folders, snapshot = await self.run(self._start_scan_sync)
        removed = 0
        try:
            for name in folders:
                found, gone = await self.run(self._list_folder, name, snapshot)
                removed += gone
                yield found
        finally:
            snapshot.close()
        if removed:
            log.info("removed %d leftover file(s) of interrupted writes", removed)

    async def scan(self) -> AsyncIterator[ObjectMeta]:
        async for found in self.listing():
            for key, _ in found:
                meta = await self.stat(key)
                if meta is not None:
                    yield meta

    async def stat(self, key: str) -> ObjectMeta | None:
        return await self.run(self.stat_sync, key)

    async def read(self, meta: ObjectMeta, start: int = 0, stop: int | None = None) -> AsyncIterator[bytes]:
        stop = meta.size if stop is None else stop
        fd = await self.run(os.open, self.body_path(meta), os.O_RDONLY | os.O_CLOEXEC)
        try:
            while start < stop:
                data = await self.run(os.pread, fd, min(READ_PIECE, stop - start), start)
                if not data:
                    raise OSError(f"{self.body_path(meta)} ends at {start} of {stop} bytes")
                start += len(data)
                yield data
        finally:
            os.close(fd)

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
        current = self.stat_sync(meta.key)
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

    def disk_usage(self) -> tuple[int, int]:
        """(total, free) bytes of the filesystem holding the store."""
        usage = shutil.disk_usage(self.root)
        return usage.total, usage.free
