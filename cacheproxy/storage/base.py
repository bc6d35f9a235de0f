"""The storage interface: what a cache backend must do, and the metadata kept with each object."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, TypeVar

_T = TypeVar("_T")


class StorageUnavailable(Exception):
    """A store cannot be reached or answer (a remote store's network or service failing)."""


def key_digest(key: str) -> str:
    """The hex sha256 of a cache key: how stores name an object's files."""
    return hashlib.sha256(key.encode()).hexdigest()


class DigestFields(TypedDict):
    sha256: str
    sha512: str
    md5: str


@dataclass(frozen=True)
class Digests:
    """Hex digests of one body ("" for one that was not computed: objects stored before sha512)."""

    sha256: str
    sha512: str
    md5: str

    def get(self, algorithm: str) -> str:
        return str(getattr(self, algorithm))

    def fields(self) -> DigestFields:
        """As :class:`ObjectMeta` keeps them (``ObjectMeta(..., **digests.fields())``)."""
        return {"sha256": self.sha256, "sha512": self.sha512, "md5": self.md5}


class Listed(NamedTuple):
    """What the index keeps of an object, as a store's listing names it: its whole
    :class:`ObjectMeta` is read when a request needs it."""

    key: str
    size: int
    last_access: float
    token: str  # what tells this body from an earlier one of the key (the body file's suffix)
    remote: bool  # OBS has it
    error: bool  # an error answer (status >= 400)
    sha256: str  # the digests, or their first hex digits ("" when not computed)
    sha512: str


Entry = tuple[str, int]  # a key and its index entry, packed (storage.packed)


@dataclass
class ObjectMeta:
    """One stored object. ``key`` is the normalized URL; everything else describes the body."""

    key: str
    url: str
    size: int
    sha256: str
    md5: str
    stored_at: float
    response_time: float  # when the origin last confirmed this body (fill or 304)
    sha512: str = ""  # "" for objects stored before sha512 was kept
    lifetime: float = math.inf  # freshness lifetime in seconds from response_time
    must_revalidate: bool = False
    content_type: str | None = None
    content_disposition: str | None = None
    content_encoding: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    vary: dict[str, str | None] = field(default_factory=dict)  # request header -> its value (None: absent)
    status: int = 200
    # The origin's end-to-end headers, replayed on hits. Tuples, not JSON's lists: the garbage
    # collector stops tracking a tuple of strings, and the metadata of 20 000 objects stays in
    # memory (lists made 120 000 objects that each full collection walked: 18 ms).
    headers: tuple[tuple[str, str], ...] = ()
    initial_age: float = 0.0  # the response's corrected age when received (RFC 9111 4.2.3)
    last_access: float = 0.0
    file: str = ""  # the body file in the local store ("" when only the shared store has it)
    remote: str = ""  # the object's key in OBS once uploaded

    @property
    def digests(self) -> Digests:
        return Digests(self.sha256, self.sha512, self.md5)

    def listed(self) -> Listed:
        return Listed(
            self.key,
            self.size,
            self.last_access or self.stored_at,
            self.file.partition(".")[2],
            bool(self.remote),
            self.status >= 400,
            self.sha256,
            self.sha512,
        )

    def to_json(self) -> str:
        data = dict(self.__dict__)  # flat fields, a flat dict and a list of pairs: no deep copy needed
        data["lifetime"] = None if math.isinf(self.lifetime) else self.lifetime
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ObjectMeta:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectMeta:
        if not data.keys() <= _FIELDS:
            data = {k: v for k, v in data.items() if k in _FIELDS}  # written by a newer version
        if data.get("lifetime") is None:
            data["lifetime"] = math.inf
        data["headers"] = tuple((k, v) for k, v in data.get("headers", ()))
        return cls(**data)

    def header_pairs(self) -> tuple[tuple[str, str], ...]:
        """The origin's headers kept with the object (made from its fields for objects stored
        before whole headers were kept)."""
        if self.headers:
            return self.headers
        legacy = [
            ("Content-Type", self.content_type),
            ("Content-Disposition", self.content_disposition),
            ("Content-Encoding", self.content_encoding),
            ("ETag", self.etag),
            ("Last-Modified", self.last_modified),
        ]
        return tuple((k, v) for k, v in legacy if v)

    def public(self) -> dict[str, Any]:
        """The fields the admin API and status page show."""
        return {
            "url": self.url,
            "key": self.key,
            "size": self.size,
            "sha256": self.sha256,
            "sha512": self.sha512,
            "md5": self.md5,
            "content_type": self.content_type,
            "stored_at": self.stored_at,
            "last_access": self.last_access,
            "etag": self.etag,
            "last_modified": self.last_modified,
        }


_FIELDS = frozenset(f.name for f in dataclasses.fields(ObjectMeta))


class Writer(ABC):
    """A body being written. Nothing is visible until :meth:`commit`; :meth:`abort` leaves nothing."""

    @property
    @abstractmethod
    def written(self) -> int: ...

    @abstractmethod
    async def write(self, data: bytes | list[bytes]) -> None:
        """Append ``data`` (or the chunks, in order): visible to readers of the file at once."""

    @abstractmethod
    async def digests(self) -> Digests:
        """sha256, sha512 and md5 of everything written."""

    @abstractmethod
    async def commit(self, meta: ObjectMeta) -> ObjectMeta: ...

    @abstractmethod
    async def abort(self) -> None: ...


class Storage(ABC):
    """A place for bodies and their metadata, addressed by cache key."""

    @abstractmethod
    def scan(self) -> AsyncIterator[ObjectMeta]:
        """Every committed object (and clean up what an interrupted write left)."""

    @abstractmethod
    async def stat(self, key: str) -> ObjectMeta | None: ...

    @abstractmethod
    def read(self, meta: ObjectMeta, start: int = 0, stop: int | None = None) -> AsyncIterator[bytes]:
        """The body bytes [start, stop) in pieces."""

    @abstractmethod
    async def begin_write(self, key: str) -> Writer: ...

    @abstractmethod
    async def update_meta(self, meta: ObjectMeta) -> None:
        """Rewrite the metadata of a committed object (after revalidation)."""

    @abstractmethod
    async def delete(self, meta: ObjectMeta) -> None: ...

    @abstractmethod
    async def check_writable(self) -> str | None:
        """None when writes work, else the reason they do not."""


class SpoolWriter(Writer):
    """A body being written into a file that readers may follow while it grows."""

    path: Path  # the temp file: clients of the fill (and other workers) read it as it grows

    @abstractmethod
    def splice_sync(
        self, source: int, count: int, progress: Callable[[int], None], stop: threading.Event, timeout: float
    ) -> None:
        """Move ``count`` bytes from the socket ``source`` into the file, kernel to kernel
        (blocking: run it in a thread); ``progress(n)`` as bytes land."""

    @abstractmethod
    def adopt(self, n: int) -> None:
        """Count ``n`` bytes that :meth:`splice_sync` put into the file (on the event loop)."""


class Spool(Storage):
    """The first tier: a store on a local file system, which single-flight fills stream through.

    Besides :class:`Storage` it gives what streaming needs: bodies as files (sendfile for hits,
    reads of a fill's growing temp file), a folder for the lock files of fills
    (:mod:`.flight`), blocking helpers for the I/O pool, and the bookkeeping of a disk store
    (snapshot, leftovers of interrupted fills, disk usage).
    """

    tmp_dir: Path  # temp files of fills and their lock and head files
    scan_reads: int  # entries the last scan read one by one (not from the snapshot)

    @abstractmethod
    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in the store's I/O pool."""

    @abstractmethod
    def body_path(self, meta: ObjectMeta) -> Path: ...

    @abstractmethod
    def stat_sync(self, key: str) -> ObjectMeta | None:
        """:meth:`stat`, blocking (for work that goes to the I/O pool in one piece)."""

    @abstractmethod
    async def begin_write(self, key: str) -> SpoolWriter: ...

    @abstractmethod
    def listing(self) -> AsyncIterator[list[Entry]]:
        """Every committed object, a batch at a time, the fast way (from the index snapshot
        where it can), cleaning up what interrupted writes left."""

    @abstractmethod
    async def write_snapshot(self, entries: Iterable[Entry]) -> None:
        """Write the index snapshot that makes the next start fast."""

    @abstractmethod
    def delete_listed_sync(self, items: Iterable[Listed]) -> None:
        """Remove these objects (blocking): an eviction pass's batch, named by the index."""

    @abstractmethod
    def remove_stale_temp(self) -> int:
        """Remove what fills no process runs any more left behind (blocking); how many files."""

    @abstractmethod
    def disk_usage(self) -> tuple[int, int]:
        """(total, free) bytes of the file system holding the store."""
