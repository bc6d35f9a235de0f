"""Single flight across processes: one upstream fetch per key, whichever worker is asked.

Workers share the store's ``tmp/`` directory. The worker that fills a key holds an exclusive
``flock`` on ``tmp/<digest>.lock`` for the whole fill, commit included; once the body starts it
publishes ``tmp/<digest>.head`` (the client headers, the size and the name of the growing part
file). Another worker asked for the same key finds the lock taken and *follows*: it reads the part
file as it grows and watches the lock; when the lock is released the object is either committed
(the follower's clients get the complete body) or not (they are reset, as any broken transfer).

The owner unlinks the lock file before it releases the lock, so a lock file's inode is used by one
owner only, and a follower watching that inode learns exactly when that fill ended. All functions
here block (they are small file system calls): run them in the I/O pool.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .base import key_digest

LOCK = ".lock"
HEAD = ".head"


@dataclass
class HeadFile:
    part: Path  # the growing body
    headers: list[tuple[str, str]]
    size: int | None
    status: int = 200


class FillLock:
    """The exclusive right to fill one key (blocking calls)."""

    def __init__(self, spool: Path, digest: str) -> None:
        self.path = spool / f"{digest}{LOCK}"
        self.head_path = spool / f"{digest}{HEAD}"
        self._fd: int | None = None

    @classmethod
    def for_key(cls, spool: Path, key: str) -> FillLock:
        return cls(spool, key_digest(key))

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the spool folder was removed under us: make it again
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # the previous owner unlinked it as we opened it: take the new one

    def publish(self, head: HeadFile) -> None:
        data = {"part": head.part.name, "headers": head.headers, "size": head.size, "status": head.status}
        tmp = self.head_path.with_name(self.head_path.name + ".new")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.head_path)

    def release(self) -> None:
        if self._fd is None:
            return
        self.head_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


class Watch:
    """A follower's view of another process's fill of one key (blocking calls)."""

    def __init__(self, spool: Path, key: str) -> None:
        self._spool = spool
        digest = key_digest(key)
        self._head_path = spool / f"{digest}{HEAD}"
        self._fd: int | None
        try:
            self._fd = os.open(spool / f"{digest}{LOCK}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._fd = None

    def owner_done(self) -> bool:
        """True once the fill this watch was opened on has ended (or there was none)."""
        if self._fd is None:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return True

    def head(self) -> HeadFile | None:
        try:
            data = json.loads(self._head_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        headers = [(str(k), str(v)) for k, v in data["headers"]]
        return HeadFile(self._spool / data["part"], headers, data["size"], int(data.get("status", 200)))

    def complete(self, head: HeadFile) -> bool:
        """Whether the owner has all of the body (it is committing it): the part file is as long
        as the head says, or was renamed into the store already."""
        if head.size is None:
            return False
        try:
            return head.part.stat().st_size >= head.size
        except FileNotFoundError:
            return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_unowned(spool: Path, keep: set[str] | None = None) -> int:
    """Remove spool files of fills that no process runs any more. Returns how many went."""
    by_digest: dict[str, list[Path]] = {}
    for path in spool.iterdir():
        digest = path.name.split(".", 1)[0]
        if len(digest) == 64:
            by_digest.setdefault(digest, []).append(path)
    removed = 0
    for digest, paths in by_digest.items():
        if keep is not None and digest in keep:
            continue
        lock = FillLock(spool, digest)
        if not lock.try_acquire():
            continue  # a fill runs, here or in another worker
        try:
            for path in paths:
                if not path.name.endswith(LOCK):
                    path.unlink(missing_ok=True)
                    removed += 1
        finally:
            lock.release()
    return removed


def digest_unowned(spool: Path, digest: str) -> bool:
    """True when no process fills ``digest`` (so its leftovers may go)."""
    lock = FillLock(spool, digest)
    if lock.try_acquire():
        lock.release()
        return True
    return False
