"""Single flight and consistent hits across processes sharing one store.

Two proxies on one cache directory stand in for two workers: they share nothing but the files
(their own index, fills, event loop tasks and upstream connections), exactly as forked workers do.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import aiohttp

from cacheproxy.cache.hot import RECHECK

from ..conftest import MakeProxy, Proxy, curl
from ..origin import Origin
from .test_fill import stored_bodies, temp_files

EMPTY = hashlib.sha256().digest()


async def _download(session: aiohttp.ClientSession, proxy: Proxy, url: str, first_byte: list[float]) -> str:
    digest = hashlib.sha256()
    async with session.get(url, proxy=proxy.url) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            if digest.digest() == EMPTY:  # this client's first bytes
                first_byte.append(time.monotonic())
            digest.update(chunk)
    return digest.hexdigest()


def full_fetches(origin: Origin, path: str) -> int:
    """GETs of ``path`` from the start (a resume attempt sends Range)."""
    return sum(1 for seen in origin.log if seen.path == path and "Range" not in seen.headers)


async def test_one_fetch_for_clients_of_two_workers(make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> None:
    a = await make_proxy(tmp_path / "shared")
    b = await make_proxy(tmp_path / "shared")
    route = origin.add("/shared.tar.xz", body=os.urandom(4 << 20), rate=8 << 20)  # about 0.5 s
    url = origin.url("/shared.tar.xz")
    first_byte: list[float] = []
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        digests = await asyncio.gather(*(_download(session, (a, b)[i % 2], url, first_byte) for i in range(20)))
    fill_time = time.monotonic() - started
    assert origin.hits("/shared.tar.xz") == 1
    assert digests == [route.sha256] * 20
    # The other worker's clients get bytes as they arrive, not after the fill.
    assert max(first_byte) - started < fill_time / 2, (max(first_byte) - started, fill_time)
    await a.wait_idle()
    await b.wait_idle()
    for proxy in (a, b):
        response, body = await proxy.get(url)
        assert response.headers["X-Cache"] == "HIT" and body == route.body
    assert origin.hits("/shared.tar.xz") == 1
    assert len(stored_bodies(a)) == 1 and temp_files(a) == []


async def test_object_stored_by_one_worker_is_a_hit_on_the_other(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    a = await make_proxy(tmp_path / "shared")
    b = await make_proxy(tmp_path / "shared")  # loaded its index before the object existed
    route = origin.add("/later.tar.gz", body=os.urandom(100_000))
    url = origin.url("/later.tar.gz")
    response, _ = await a.get(url)
    assert response.headers["X-Cache"] == "MISS"
    await a.wait_idle()
    response, body = await b.get(url)
    assert response.headers["X-Cache"] == "HIT" and body == route.body
    assert origin.hits("/later.tar.gz") == 1


async def test_broken_fill_in_one_worker_resets_the_others_clients(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    a = await make_proxy(tmp_path / "shared")
    b = await make_proxy(tmp_path / "shared")
    origin.add("/cut.tar.gz", body=os.urandom(2 << 20), rate=4 << 20, drop_after=1 << 20, drops=100, ranges=False)
    url = origin.url("/cut.tar.gz")
    owner = asyncio.create_task(curl(a, url, "-o", str(tmp_path / "a.out")))
    await asyncio.sleep(0.1)  # a's fill runs; b follows it
    follower = await curl(b, url, "-o", str(tmp_path / "b.out"))
    assert follower.rc != 0, "the follower's client must see the broken transfer"
    assert (await owner).rc != 0
    assert full_fetches(origin, "/cut.tar.gz") == 1
    await a.wait_idle()
    await b.wait_idle()
    assert stored_bodies(a) == [] and temp_files(a) == []


async def test_origin_error_in_one_worker_reaches_the_other(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    a = await make_proxy(tmp_path / "shared")
    b = await make_proxy(tmp_path / "shared")
    origin.add("/gone.tar.gz", status=404, body=b"not here\n", delay=0.3)
    url = origin.url("/gone.tar.gz")
    (ra, _), (rb, body) = await asyncio.gather(a.get(url), b.get(url))
    assert ra.status == 404 and rb.status == 404 and body == b"not here\n"


async def test_starting_worker_leaves_a_running_fill_alone(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    a = await make_proxy(tmp_path / "shared")
    route = origin.add("/long.tar.gz", body=os.urandom(2 << 20), rate=4 << 20)  # about 0.5 s
    url = origin.url("/long.tar.gz")
    download = asyncio.create_task(a.get(url))
    await asyncio.sleep(0.15)
    assert temp_files(a), "the fill writes to tmp/"
    await make_proxy(tmp_path / "shared")  # a new worker scans the store and cleans up leftovers
    _, body = await download
    assert body == route.body
    await a.wait_idle()
    assert a.state.cache.index.get(url) is not None and len(stored_bodies(a)) == 1


async def test_evicted_by_another_worker_is_fetched_again(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    a = await make_proxy(tmp_path / "shared")
    b = await make_proxy(tmp_path / "shared")
    route = origin.add("/evict.tar.gz", body=os.urandom(50_000))
    url = origin.url("/evict.tar.gz")
    await a.get(url)
    await a.wait_idle()
    response, _ = await b.get(url)
    assert response.headers["X-Cache"] == "HIT"
    meta = a.state.cache.index.get(url)
    assert meta is not None
    await a.state.cache.purge(meta)  # a evicts it; b still has it in its index
    # b may answer from the body it holds ready until its next look at the file (RECHECK); the
    # answer after that comes from the origin again.
    await asyncio.sleep(RECHECK + 0.1)
    response, body = await b.get(url)
    assert response.status == 200 and body == route.body and response.headers["X-Cache"] == "MISS"
    assert origin.hits("/evict.tar.gz") == 2


async def test_restart_takes_the_index_snapshot_and_checks_it(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    store = tmp_path / "shared"
    a = await make_proxy(store)
    for name in ("keep", "gone"):
        origin.add(f"/{name}.tar.gz", body=name.encode() * 100)
        await a.get(origin.url(f"/{name}.tar.gz"))
    await a.wait_idle()
    await a.state.cache.close()  # as at shutdown: writes the snapshot
    snapshot = store / "index.snapshot"
    assert snapshot.exists()
    restarted = await make_proxy(store)
    assert restarted.state.store.scan_reads == 0, "every entry came from the snapshot"
    assert len(restarted.state.cache.index) == 2
    # After the snapshot: one object removed, one added (by another worker, say).
    gone = await restarted.state.cache.stored(origin.url("/gone.tar.gz"))
    assert gone is not None
    await restarted.state.cache.purge(gone)
    origin.add("/new.tar.gz", body=b"new" * 100)
    await restarted.get(origin.url("/new.tar.gz"))
    await restarted.wait_idle()
    third = await make_proxy(store)
    index = third.state.cache.index
    assert origin.url("/gone.tar.gz") not in index
    assert origin.url("/keep.tar.gz") in index and origin.url("/new.tar.gz") in index
    assert third.state.store.scan_reads == 1, "only the entry the snapshot did not know was read"
    response, body = await third.get(origin.url("/new.tar.gz"))
    assert response.headers["X-Cache"] == "HIT" and body == b"new" * 100
    # A damaged snapshot is ignored: the entries are read one by one.
    snapshot.write_text("cacheproxy index snapshot 3\nnot\ta line\n")
    fourth = await make_proxy(store)
    assert len(fourth.state.cache.index) == 2 and fourth.state.store.scan_reads == 2
