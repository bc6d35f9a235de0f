"""``cacheproxy prefetch``: make sure URLs are cached, through any running proxy.

Each URL is fetched in the URL-in-path form (``http://proxy:3128/https://origin/path``), so it takes
the proxy's normal path: one origin fetch shared with any client asking at the same time, retries,
mirrors, the store. A hit (``X-Cache: HIT``/``STALE``/``REVALIDATED``) is "already cached" and its
body is not read; a miss is read to the end (the proxy stores what it streams) and then checked
with a ``HEAD`` carrying ``Cache-Control: only-if-cached``: only an object the proxy can answer
from its store counts as "cached".
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Protocol

import aiohttp
from yarl import URL

from .sources import Wanted

CACHED, ALREADY_CACHED, FAILED = "cached", "already cached", "failed"
FROM_STORE = ("HIT", "STALE", "REVALIDATED")
READ_SIZE = 256 << 10
STORED_CHECKS = 5  # HEAD only-if-cached tries after a miss (another worker may still be committing)
STORED_CHECK_PAUSE = 0.2


@dataclass
class Result:
    url: str
    state: str  # CACHED, ALREADY_CACHED or FAILED
    size: int = 0  # bytes read from the proxy
    seconds: float = 0.0
    error: str | None = None
    verified: str | None = None  # the algorithm the proxy checked the body against


class Progress(Protocol):
    def begin(self, url: str) -> int: ...
    def sized(self, slot: int, total: int | None) -> None: ...
    def advance(self, slot: int, n: int) -> None: ...
    def end(self, slot: int, result: Result) -> None: ...
    def close(self) -> None: ...


def via_proxy(proxy: str, url: str) -> URL:
    """``url`` in the URL-in-path form of ``proxy``, bytes as the user wrote them."""
    return URL(f"{proxy.rstrip('/')}/{url}", encoded=True)


async def prefetch(
    wanted: Sequence[Wanted], proxy: str, progress: Progress, *, jobs: int = 4, read_timeout: float = 300.0
) -> list[Result]:
    """Fetch ``wanted`` through ``proxy``, ``jobs`` at a time; one :class:`Result` each, in order.
    A pinned entry sends its checksum: the proxy verifies the body (and refuses a wrong one)."""
    limit = asyncio.Semaphore(max(1, jobs))
    client_timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_read=read_timeout)
    connector = aiohttp.TCPConnector(limit=max(1, jobs) * 2)
    async with aiohttp.ClientSession(timeout=client_timeout, connector=connector, auto_decompress=False) as session:

        async def one(item: Wanted) -> Result:
            async with limit:
                slot = progress.begin(item.url)
                result = await _fetch(session, proxy, item, progress, slot)
                progress.end(slot, result)
                return result

        return list(await asyncio.gather(*(one(item) for item in wanted)))


async def _fetch(session: aiohttp.ClientSession, proxy: str, item: Wanted, progress: Progress, slot: int) -> Result:
    started = time.monotonic()
    url, size = item.url, 0
    try:
        target = via_proxy(proxy, url)
        async with session.get(target, headers=item.header, allow_redirects=False) as response:
            x_cache = response.headers.get("X-Cache", "").upper()
            if x_cache in FROM_STORE and response.status == 200:
                response.close()  # the body is in the store already (and matched the pin): not worth reading
                return Result(url, ALREADY_CACHED, 0, time.monotonic() - started, verified=item.algorithm)
            if response.status != 200:
                return Result(url, FAILED, 0, time.monotonic() - started, await _why(response))
            progress.sized(slot, response.content_length)
            async for chunk in response.content.iter_chunked(READ_SIZE):
                size += len(chunk)
                progress.advance(slot, len(chunk))
        if not await _stored(session, target):
            error = "fetched, but the proxy did not store it (its log says why: no-store, too large, HTML archive…)"
            return Result(url, FAILED, size, time.monotonic() - started, error)
        return Result(url, CACHED, size, time.monotonic() - started, verified=item.algorithm)
    except aiohttp.ClientPayloadError as exc:
        error = _describe(exc, proxy)
        if item.algorithm is not None:
            error = f"the body is not the one its {item.algorithm} names, or the transfer broke ({error})"
        return Result(url, FAILED, size, time.monotonic() - started, error)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return Result(url, FAILED, size, time.monotonic() - started, _describe(exc, proxy))


async def _stored(session: aiohttp.ClientSession, target: URL) -> bool:
    for attempt in range(STORED_CHECKS):
        async with session.head(target, headers={"Cache-Control": "only-if-cached"}, allow_redirects=False) as check:
            if check.headers.get("X-Cache", "").upper() in FROM_STORE:
                return True
            if check.status != 504:
                return False
        if attempt + 1 < STORED_CHECKS:
            await asyncio.sleep(STORED_CHECK_PAUSE)
    return False


async def _why(response: aiohttp.ClientResponse) -> str:
    """The proxy's own words for an error answer: its status, X-Cacheproxy-Error and first line."""
    code = response.headers.get("X-Cacheproxy-Error")
    try:
        text = (await response.content.read(500)).decode("utf-8", "replace").strip().splitlines()
    except aiohttp.ClientError:
        text = []
    detail = f" ({code})" if code else ""
    first = f": {text[0].removeprefix(f'{code}:').strip()}" if text and code else ""
    location = response.headers.get("Location")
    if location and 300 <= response.status < 400:
        first = f": redirected to {location}"
    return f"HTTP {response.status} {response.reason or ''}".rstrip() + detail + first


def _describe(exc: BaseException, proxy: str) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot reach the proxy at {proxy}: {exc.os_error.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- showing it -----------------------------------------------------------------------------------


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def line_for(result: Result) -> str:
    if result.state == FAILED:
        return f"failed          {result.url}: {result.error}"
    checked = f", {result.verified} verified" if result.verified else ""
    if result.state == ALREADY_CACHED:
        return f"already cached  {result.url}" + (f" ({result.verified} verified)" if result.verified else "")
    return f"cached          {result.url} ({human(result.size)} in {result.seconds:.1f} s{checked})"


def summary(results: Sequence[Result]) -> str:
    counts = {state: sum(r.state == state for r in results) for state in (CACHED, ALREADY_CACHED, FAILED)}
    return ", ".join(f"{n} {state}" for state, n in counts.items())


class Lines:
    """Not a terminal: one plain line per URL when it is done."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def begin(self, url: str) -> int:
        return 0

    def sized(self, slot: int, total: int | None) -> None:
        pass

    def advance(self, slot: int, n: int) -> None:
        pass

    def end(self, slot: int, result: Result) -> None:
        print(line_for(result), file=self.out, flush=True)

    def close(self) -> None:
        pass


class Bars:
    """A terminal: a bar per running download (bytes, rate, ETA) under one for all of them."""

    def __init__(self, count: int, jobs: int, out: IO[str]) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.out = out
        self.count = count
        self.finished = 0
        options = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "file": sys.stderr, "dynamic_ncols": True}
        self.options = options
        self.overall = tqdm(total=0, desc=f"0/{count} done", position=0, **options)
        self.free = list(range(jobs, 0, -1))
        self.bars: dict[int, tqdm] = {}  # type: ignore[type-arg]

    def begin(self, url: str) -> int:
        slot = self.free.pop()
        name = url.rstrip("/").rsplit("/", 1)[-1][-32:] or url[-32:]
        self.bars[slot] = self._tqdm(total=None, desc=name, position=slot, leave=False, **self.options)
        return slot

    def sized(self, slot: int, total: int | None) -> None:
        if total is not None:
            self.bars[slot].total = total
            self.overall.total += total
            self.bars[slot].refresh()
            self.overall.refresh()

    def advance(self, slot: int, n: int) -> None:
        self.bars[slot].update(n)
        self.overall.update(n)

    def end(self, slot: int, result: Result) -> None:
        self.bars.pop(slot).close()
        self.free.append(slot)
        self.finished += 1
        self.overall.set_description_str(f"{self.finished}/{self.count} done")
        self._tqdm.write(line_for(result), file=self.out)

    def close(self) -> None:
        self.overall.close()
