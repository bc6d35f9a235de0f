"""Single-flight fills: one upstream fetch per key, however many clients ask at once.

A :class:`Fill` runs as its own task, independent of the clients that wait on it. Its body goes to
a temp file of the store; every client (the first and the followers alike) reads that file as it
grows, so followers get bytes as they arrive and a client that goes away stops nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field

from multidict import CIMultiDict

from ..storage.base import Digests, ObjectMeta
from ..upstream.http import Response
from .checksums import Expected
from .hot import Ready


@dataclass
class Head:
    """What a client needs to start its response to a streaming fill."""

    headers: CIMultiDict[str]  # end-to-end headers for the client
    size: int | None  # Content-Length, when known
    status: int = 200


@dataclass
class Streaming:
    fill: Fill
    head: Head


@dataclass
class Buffered:
    """A small answer held in memory: an origin's error that is not stored, shared by its waiters."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    x_cache: str = "MISS"


RemoteReader = Callable[[int, int], AsyncGenerator[bytes, None]]  # (start, stop) -> the body's pieces


@dataclass
class Hit:
    """A stored object answers the request. The cache decides where its body comes from: the
    local store (``ready`` when it is kept in memory or open), or, for an object only the shared
    store holds, a signed URL to send the client to (``redirect``) or a reader (``remote``)."""

    meta: ObjectMeta
    x_cache: str = "HIT"  # HIT, REVALIDATED or STALE
    ready: Ready | None = None
    source: str | None = None  # another URL whose stored body the request's expected checksum names
    redirect: str | None = None
    remote: RemoteReader | None = None


@dataclass
class Passthrough:
    """A response that is not shared or stored: exactly one client takes the live upstream body."""

    response: Response
    x_cache: str = "MISS"
    _claimed: bool = field(default=False, repr=False)

    def claim(self) -> Response | None:
        if self._claimed:
            return None
        self._claimed = True
        return self.response


Outcome = Streaming | Buffered | Hit | Passthrough


class Fill:
    def __init__(self, key: str, request_headers: Mapping[str, str] | None = None, url: str = "") -> None:
        self.key = key
        self.url = url  # what is fetched (credentials masked): the status page shows it
        self.started = time.time()
        self.request_headers: Mapping[str, str] = request_headers or {}  # the first client's (Vary)
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[Outcome] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()  # the fill is over (committed or not)
        # The whole body's digests once known (None: never, e.g. a relayed body); clients that
        # expect a checksum hold their last bytes back until then, and their expectations
        # decide whether the body is committed.
        self.digests: asyncio.Future[Digests | None] = loop.create_future()
        self.expectations: list[Expected] = []
        self.written = 0
        self.finished = False  # the whole body is in the file
        self.error: str | None = None  # the body cannot be completed
        self.task: asyncio.Task[None] | None = None
        self._read_fd: int | None = None
        self._waiters: list[asyncio.Future[None]] = []
        # Relay: past ``relay_at`` the body no longer goes to the file (over max_object_size, or a
        # store that cannot take it) but to the readers from memory, the slowest one setting the pace.
        self.relay_at: int | None = None
        self._relay: list[bytes] = []
        self._relay_start = 0  # body offset of the first byte in _relay
        self._readers: dict[int, int] = {}  # reader id -> its position
        self._drained: list[asyncio.Future[None]] = []

    @property
    def size(self) -> int | None:
        """The body's length, once the origin has said it (the status page's progress)."""
        if not self.head.done() or self.head.cancelled() or self.head.exception() is not None:
            return None
        outcome = self.head.result()
        return outcome.head.size if isinstance(outcome, Streaming) else None

    # -- the filling side ---------------------------------------------------------------------

    def start_streaming(self, path: os.PathLike[str] | str, head: Head) -> None:
        self._read_fd = os.open(path, os.O_RDONLY)
        self.set_outcome(Streaming(self, head))

    def set_outcome(self, outcome: Outcome) -> None:
        if not self.head.done():
            self.head.set_result(outcome)

    def set_error(self, exc: BaseException) -> None:
        """Before the head: every waiting client gets ``exc``. After: the transfer is broken."""
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # mark retrieved: a fill nobody waits for is no error
        self.error = str(exc) or type(exc).__name__
        self._wake()

    def grown(self) -> int:
        """Bytes the body file holds beyond ``written`` (when another process writes it)."""
        assert self._read_fd is not None, "not streaming"
        return os.fstat(self._read_fd).st_size - self.written

    def advance(self, n: int) -> None:
        self.written += n
        self._wake()

    def start_relay(self) -> None:
        """From the bytes written so far on, the body goes to the readers through memory."""
        self.relay_at = self._relay_start = self.written

    async def relay(self, chunk: bytes, window: int) -> bool:
        """Hand ``chunk`` to the readers; wait while more than ``window`` bytes are unread.
        False when no reader is left (the rest of the body would be fetched for no one)."""
        self._relay.append(chunk)
        self.advance(len(chunk))
        while self.written - self._relay_start > window:
            if not self._readers:
                return False
            waiter = asyncio.get_running_loop().create_future()
            self._drained.append(waiter)
            await waiter
        return bool(self._readers)

    def relayed(self, position: int) -> bytes:
        """The relayed bytes from ``position`` on that are here now."""
        offset = position - self._relay_start
        assert offset >= 0, "a reader fell behind the relay"
        if len(self._relay) > 1:
            self._relay = [b"".join(self._relay)]
        return self._relay[0][offset:] if self._relay else b""

    def reader_at(self, reader: int, position: int | None) -> None:
        """Where a reader is (None: it is gone); frees the relayed bytes every reader has."""
        if position is None:
            self._readers.pop(reader, None)
        else:
            self._readers[reader] = position
        if self.relay_at is None:
            return
        low = min(self._readers.values(), default=self.written)
        while self._relay and self._relay_start + len(self._relay[0]) <= low:
            self._relay_start += len(self._relay.pop(0))
        drained, self._drained = self._drained, []
        for waiter in drained:
            if not waiter.done():
                waiter.set_result(None)

    def finish(self) -> None:
        self.finished = True
        self._wake()

    def set_digests(self, digests: Digests | None) -> None:
        if not self.digests.done():
            self.digests.set_result(digests)

    def close(self) -> None:
        self.set_digests(None)
        if not self.done.done():
            self.done.set_result(None)
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None
        if not self.finished and self.error is None:
            self.set_error(RuntimeError("fill ended early"))

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- the reading side ---------------------------------------------------------------------

    def open_reader(self) -> int:
        """A file descriptor of the growing body, the caller's to close."""
        assert self._read_fd is not None, "not streaming"
        return os.dup(self._read_fd)

    async def wait_beyond(self, position: int) -> None:
        """Return when more than ``position`` bytes were written, or the fill ended either way."""
        while self.written <= position and not self.finished and self.error is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
