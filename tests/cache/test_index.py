"""The compact index: every object has a small entry, and only the most recently used keep their
whole metadata in memory; the others are read from the store when a request needs them."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from yarl import URL

from cacheproxy.cache import index as index_module
from cacheproxy.cache.index import Index
from cacheproxy.storage import packed
from cacheproxy.storage.base import Listed, ObjectMeta

from ..conftest import MakeProxy, Proxy, curl
from ..origin import Origin


def body(i: int) -> bytes:
    return b"%d" % i * 3000


async def test_objects_not_in_memory_are_answered_from_the_store(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_module, "RESIDENT", 2)
    store = tmp_path / "store"
    a = await make_proxy(store, cache__max_size=20_000, cache__high_watermark=0.9, cache__low_watermark=0.5)
    urls = [origin.url(f"/p{i}.tar.gz") for i in range(5)]
    for i, url in enumerate(urls):
        origin.add(f"/p{i}.tar.gz", body=body(i), etag=f'"e{i}"', headers={"X-Release": f"r{i}"})
        await a.get(url)
        await a.wait_idle()
    await a.get(urls[0])  # p0 becomes the most recently used
    index = a.state.cache.index
    assert [index.get(u) is not None for u in urls] == [True, False, False, False, True]  # p0 read back
    assert index.by_access() == [*urls[1:], urls[0]]
    await a.state.cache.close()  # writes the snapshot

    b = await make_proxy(store, cache__max_size=20_000, cache__high_watermark=0.9, cache__low_watermark=0.5)
    index = b.state.cache.index
    assert b.state.store.scan_reads == 0, "every entry came from the snapshot"
    assert index.by_access() == [*urls[1:], urls[0]], "the access order survived the restart"
    assert index.total_size == sum(len(body(i)) for i in range(5))
    assert all(index.get(u) is None for u in urls), "nothing is read before it is asked for"
    for i, url in enumerate(urls):
        result = await curl(b, url, "-D", "-")
        head = result.stdout.decode(errors="replace").lower()
        assert "x-cache: hit" in head and f'etag: "e{i}"' in head and f"x-release: r{i}" in head
        assert result.stdout.endswith(body(i))
        assert origin.hits(f"/p{i}.tar.gz") == 1
    response, _ = await b.get(urls[3], headers={"If-None-Match": '"e3"'})
    assert response.status == 304
    assert sum(index.get(u) is not None for u in urls) == 2, "at most RESIDENT whole entries stay"
    # Found by digest while not in memory (p1 was pushed out by the later hits).
    assert index.get(urls[1]) is None
    response, got = await b.get(urls[1].replace("/p1.", "/elsewhere."), headers={
        "X-Checksum-Sha256": hashlib.sha256(body(1)).hexdigest()})  # fmt: skip
    assert response.headers["X-Cache"] == "HIT" and got == body(1)
    assert response.headers["X-Cacheproxy-Source"] == urls[1]
    # Eviction takes entries that are not in memory too, least recently used first.
    await b.get(urls[4])
    origin.add("/big.tar.gz", body=b"b" * 5000)  # 20 000 bytes: over the high watermark (18 000)
    await b.get(origin.url("/big.tar.gz"))
    await b.wait_idle()
    kept = [urls[4], origin.url("/big.tar.gz")]
    assert index.by_access() == kept  # p1, p2, p3, p0 went, oldest first, down to the low watermark
    files = {p.name.split(".")[0] for p in (store / "objects").rglob("*") if p.is_file()}
    assert files == {hashlib.sha256(u.encode()).hexdigest() for u in kept}, "the evicted objects' files are gone"


async def test_a_body_named_with_a_token_of_zeros_is_kept(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    """A body file is ``<digest>.<16 hex digits>``, drawn at random: all zeros is a name like any
    other, through a scan of the store, the snapshot and an eviction."""
    store = tmp_path / "store"
    origin.add("/z.tar.gz", body=b"z" * 1000)
    a = await make_proxy(store)
    await a.get(origin.url("/z.tar.gz"))
    await a.wait_idle()
    (meta,) = await a.stored()
    await a.state.cache.close()
    folder = a.state.store.body_path(meta).parent
    (folder / meta.file).rename(folder / (zeros := meta.file.split(".")[0] + "." + "0" * 16))
    meta_path = folder / (meta.file.split(".")[0] + ".json")
    meta_path.write_text(meta_path.read_text().replace(meta.file, zeros))
    (store / "index.snapshot").unlink()
    small = {"cache__max_size": 1500, "cache__high_watermark": 0.9, "cache__low_watermark": 0.5}

    async def hit(proxy: Proxy) -> None:
        response, got = await proxy.get(origin.url("/z.tar.gz"))
        assert response.headers["X-Cache"] == "HIT" and got == b"z" * 1000
        assert (folder / zeros).exists()

    b = await make_proxy(store, **small)
    assert b.state.store.scan_reads == 1  # read from its .json
    await hit(b)
    await b.state.cache.close()  # writes the snapshot
    c = await make_proxy(store, **small)
    assert c.state.store.scan_reads == 0  # taken from the snapshot
    await hit(c)
    origin.add("/y.tar.gz", body=b"y" * 1000)  # over the high watermark: z, the oldest, goes
    await c.get(origin.url("/y.tar.gz"))
    await c.wait_idle()
    assert not (folder / zeros).exists() and not meta_path.exists()


async def test_a_snapshot_of_the_old_format_is_ignored(make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> None:
    store = tmp_path / "store"
    a = await make_proxy(store)
    origin.add("/x.tar.gz", body=b"x" * 100)
    await a.get(origin.url("/x.tar.gz"))
    await a.wait_idle()
    await a.state.cache.close()
    (store / "index.json").write_text("[]")  # what versions before 2 wrote
    (store / "index.snapshot").write_bytes(b"[\n{}\n]\n")
    b = await make_proxy(store)
    assert b.state.store.scan_reads == 1 and origin.url("/x.tar.gz") in b.state.cache.index
    assert not (store / "index.json").exists()


def test_an_entry_keeps_what_the_index_needs() -> None:
    index = Index()
    meta = ObjectMeta("k", "k", 12345, "ab" * 32, "", 1.0, 1.0, sha512="cd" * 64, status=404, last_access=1700000000.25,
                      file="digest.0123456789abcdef", remote="obj/k")  # fmt: skip
    index.put(meta)
    ((key, entry),) = index.listing()
    assert packed.unpack(key, entry) == meta.listed()._replace(sha256="ab" * 7 + "a", sha512="cd" * 7 + "c")
    assert index.listed("k") == packed.unpack(key, entry)
    assert index.errors() == [("k", 12345)] and index.not_uploaded() == []
    assert index.by_digest("ab" * 32) == ["k"] and index.by_digest("cd" * 64) == ["k"]
    assert index.holds(meta) and not index.holds(replace(meta, file="digest.fedcba9876543210"))
    assert index.holds(replace(meta, last_access=5.0, remote=""))  # the same body, used or uploaded since


def test_metadata_kept_in_memory_is_not_walked_by_the_garbage_collector() -> None:
    """20 000 objects keep their whole metadata in memory: their headers must not be objects
    each full collection walks (lists of lists were 120 000 of them, 18 ms a collection)."""
    stored = ObjectMeta("k", "k", 1, "", "", 1.0, 1.0, headers=(("Server", "nginx"), ("ETag", '"x"')))
    meta = ObjectMeta.from_json(stored.to_json())
    assert meta.headers == (("Server", "nginx"), ("ETag", '"x"'))
    gc.collect()
    gc.collect()  # the pairs are let go at the first, the tuple holding them at the second
    assert not gc.is_tracked(meta.headers)


async def test_an_object_used_while_the_digest_map_is_built_is_in_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "BUILD_SLICE", 1)
    index = Index()
    metas = [ObjectMeta(f"k{i}", f"k{i}", 1, str(i) * 64, "", 1.0, 1.0, file=f"d.{i:016x}") for i in range(1, 4)]
    for meta in metas:
        index.add(meta.key, packed.pack(meta.listed()))
    building = asyncio.create_task(index.build_digests())
    await asyncio.sleep(0)  # the first slice is linked
    index.touched("k3", 1234.5)  # a hit on an object not linked yet changes its entry
    await building
    assert [index.by_digest(m.sha256) for m in metas] == [["k1"], ["k2"], ["k3"]]


async def test_a_hit_writes_nothing_and_its_access_time_outlives_a_restart(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Access times live in the index and its snapshot: hits and a clean-up leave every ``.json``
    as it was, an object read back from the store keeps the time of its last hit (not the one its
    ``.json`` was written with), and the next start has them."""
    monkeypatch.setattr(index_module, "RESIDENT", 1)
    store = tmp_path / "store"
    a = await make_proxy(store)
    urls = [origin.url(f"/t{i}.tar.gz") for i in range(3)]
    for i, url in enumerate(urls):
        origin.add(f"/t{i}.tar.gz", body=body(i))
        await a.get(url)
        await a.wait_idle()
    written = {path: path.read_bytes() for path in (store / "objects").rglob("*.json")}
    assert len(written) == 3
    await asyncio.sleep(0.01)  # the hits' time differs from the commit's by a few ms at least
    for url in (urls[0], urls[1]):  # t0 is read from the store, then pushed out of memory by t1
        response, _ = await a.get(url)
        assert response.headers["X-Cache"] == "HIT"
    index = a.state.cache.index
    hit_at = index.accessed(urls[0])
    assert index.get(urls[0]) is None
    meta = await a.state.cache.stored(urls[0])  # read back from its .json
    assert meta is not None and meta.last_access == hit_at / 1000
    assert index.accessed(urls[0]) == hit_at
    await a.state.cache.housekeeper.cleanup()
    await a.state.cache.close()
    assert {path: path.read_bytes() for path in (store / "objects").rglob("*.json")} == written

    b = await make_proxy(store)
    assert b.state.store.scan_reads == 0, "every entry came from the snapshot"
    assert [b.state.cache.index.accessed(u) for u in urls] == [index.accessed(u) for u in urls]
    assert index.accessed(urls[1]) > hit_at > index.accessed(urls[2])


async def test_workers_share_their_access_times_through_the_snapshot(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    """Two processes on one store: what one used since the other looked goes to the other's
    recent end at its next clean-up, so neither evicts what the other's clients use."""
    store = tmp_path / "store"
    a = await make_proxy(store)
    b = await make_proxy(store)
    urls = [origin.url(f"/w{i}.tar.gz") for i in range(3)]
    for i, url in enumerate(urls):
        origin.add(f"/w{i}.tar.gz", body=body(i))
        await a.get(url)
        await a.wait_idle()
    await b.state.cache.housekeeper.reload_index()
    assert sorted(b.state.cache.index.keys()) == sorted(urls), "b took in what a stored"
    await asyncio.sleep(0.01)
    response, _ = await a.get(urls[0])
    assert response.headers["X-Cache"] == "HIT"
    await a.state.cache.housekeeper.cleanup()  # writes the snapshot
    await b.state.cache.housekeeper.reload_index()
    assert b.state.cache.index.by_access()[-1] == urls[0]
    assert b.state.cache.index.accessed(urls[0]) == a.state.cache.index.accessed(urls[0])


async def test_an_eviction_pass_finds_the_least_recently_used_without_keeping_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hit changes its entry in place (a key moved to the end leaves a hole in the dict, and
    holes make CPython rebuild all of it: 80 ms at a million objects); an eviction pass finds the
    oldest objects by age band, and is exact where a band is sorted."""
    monkeypatch.setattr(index_module, "SCAN_SLICE", 64)
    rng = random.Random(15)
    now = 1_800_000_000.0
    index = Index()
    sizes: dict[str, int] = {}
    for i in range(3000):
        key = f"k{i}"
        sizes[key] = rng.randrange(1, 5000)
        age = rng.choice([rng.uniform(0, 0.03), rng.uniform(0, 60), rng.uniform(0, 90 * 86400)])
        index.add(key, packed.pack(Listed(key, sizes[key], now - age, f"{i:016x}", False, False, "", "")))
    order = index.keys()
    for key in rng.sample(order, 500):
        index.touched(key, now - rng.uniform(0, 0.5))
    assert index.keys() == order, "hits moved no key"
    spared = set(rng.sample(order, 300))
    expected = [key for key in index.by_access() if key not in spared]
    for size in (1, 4999, 250_000, 3_000_000, sum(sizes.values())):
        doomed = await index.oldest(size, now, spared.__contains__)
        want, total = [], 0
        for key in expected:
            if total >= size:
                break
            want.append(key)
            total += sizes[key]
        assert sorted(doomed) == sorted(want), size


async def test_an_eviction_pass_keeps_what_was_used_after_it_looked(
    make_proxy: MakeProxy, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a million objects a pass takes minutes from its look to its last removal: an object hit
    in between stays, and the next oldest goes instead."""
    proxy = await make_proxy(cache__max_size=10_000, cache__high_watermark=0.8, cache__low_watermark=0.7)
    for name in "abcd":
        origin.add(f"/{name}.tar.gz", body=name.encode() * 2000)
        await proxy.get(origin.url(f"/{name}.tar.gz"))
        await proxy.wait_idle()
    index = proxy.state.cache.index
    looked = index.oldest

    async def then_a_hit(size: int, now: float, spare: Callable[[str], bool]) -> list[str]:
        doomed = await looked(size, now, spare)
        if origin.url("/a.tar.gz") in doomed:
            await asyncio.sleep(0.002)
            response, _ = await proxy.get(origin.url("/a.tar.gz"))  # the oldest, hit after the look
            assert response.headers["X-Cache"] == "HIT"
        return doomed

    monkeypatch.setattr(index, "oldest", then_a_hit)
    origin.add("/e.tar.gz", body=b"e" * 2000)  # 10 000 bytes: over the high watermark, down to 7 000
    await proxy.get(origin.url("/e.tar.gz"))
    await proxy.wait_idle()
    assert sorted(URL(m.url).path for m in await proxy.stored()) == ["/a.tar.gz", "/d.tar.gz", "/e.tar.gz"]


async def test_the_largest_objects_are_found_a_slice_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The status page asks for the largest objects: a look at every entry, which must let
    requests through between slices (in one go it held the loop 0.24 s at a million objects)."""
    monkeypatch.setattr(index_module, "SCAN_SLICE", 100)
    index = Index()
    sizes = {f"k{i}": i * 7919 % 1000 + 1 for i in range(1000)}  # 1 to 1000, each once
    for key, size in sizes.items():
        index.add(key, packed.pack(Listed(key, size, 1.0, "0" * 16, False, False, "", "")))
    turns = 0

    async def requests() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    others = asyncio.create_task(requests())
    await asyncio.sleep(0)
    largest = await index.largest(5)
    others.cancel()
    assert largest == sorted(sizes, key=lambda key: -sizes[key])[:5]
    assert turns >= 10
