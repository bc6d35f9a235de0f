"""Freshness per rules.refresh, revalidation, stale-if-unreachable."""

from __future__ import annotations

import asyncio
import math

from yarl import URL

from cacheproxy.cache.freshness import freshness, is_fresh
from cacheproxy.config import load_config
from cacheproxy.storage.flight import FillLock

from ..conftest import MakeProxy, Proxy
from ..origin import Origin

RULES = load_config(None).refresh_rules
NOW = 1_700_000_000.0


def test_archives_are_immutable_by_override() -> None:
    f = freshness("/pub/git-2.39.1.tar.xz", {"Cache-Control": "no-cache, max-age=0"}, NOW, RULES)
    assert math.isinf(f.lifetime)


def test_origin_freshness_and_heuristic_cap() -> None:
    assert freshness("/index.html", {"Cache-Control": "max-age=120"}, NOW, RULES).lifetime == 120
    assert freshness("/index.html", {"Cache-Control": "s-maxage=5, max-age=120"}, NOW, RULES).lifetime == 5
    assert freshness("/index.html", {"Cache-Control": "no-cache"}, NOW, RULES).lifetime == 0
    lm = "Sun, 01 Jan 2023 00:00:00 GMT"  # years ago: 10% would exceed the 1d rule ttl
    assert freshness("/index.html", {"Last-Modified": lm}, NOW, RULES).lifetime == 86400
    date, lm = "Tue, 14 Nov 2023 22:13:20 GMT", "Tue, 14 Nov 2023 12:13:20 GMT"  # 10 h before
    assert freshness("/x.txt", {"Date": date, "Last-Modified": lm}, NOW, RULES).lifetime == 3600
    expires = {"Date": "Tue, 14 Nov 2023 22:13:20 GMT", "Expires": "Tue, 14 Nov 2023 22:23:20 GMT"}
    assert freshness("/x.txt", expires, NOW, RULES).lifetime == 600
    assert freshness("/x.txt", {"Cache-Control": "max-age=9, must-revalidate"}, NOW, RULES).must_revalidate


async def test_stale_object_revalidated_with_304(proxy: Proxy, origin: Origin) -> None:
    origin.add("/repodata.xml", body=b"<repo/>", headers={"Cache-Control": "max-age=0"})
    url = origin.url("/repodata.xml")
    response, _ = await proxy.get(url)
    assert response.headers["X-Cache"] == "MISS"
    await proxy.wait_idle()
    response, body = await proxy.get(url)
    assert response.headers["X-Cache"] == "REVALIDATED" and body == b"<repo/>"
    conditional = [s for s in origin.log if s.path == "/repodata.xml"][-1]
    assert conditional.headers["If-None-Match"] == '"v1"'


async def test_changed_object_replaced(proxy: Proxy, origin: Origin) -> None:
    route = origin.add("/list.txt", body=b"one", headers={"Cache-Control": "max-age=0"})
    url = origin.url("/list.txt")
    await proxy.get(url)
    await proxy.wait_idle()
    route.body, route.etag = b"two", '"v2"'
    response, body = await proxy.get(url)
    assert body == b"two" and response.headers["X-Cache"] == "MISS"
    await proxy.wait_idle()
    assert proxy.state.cache.index.get(url).etag == '"v2"'


async def test_stale_served_when_origin_is_down(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(upstream__retries=0)
    route = origin.add("/notes.txt", body=b"notes", headers={"Cache-Control": "max-age=0"})
    url = origin.url("/notes.txt")
    await proxy.get(url)
    await proxy.wait_idle()
    route.fail_first = 1000
    response, body = await proxy.get(url)
    assert response.status == 503  # the origin answered: its 5xx passes through
    await origin.stop()  # now it is unreachable
    response, body = await proxy.get(url)
    assert response.status == 200 and response.headers["X-Cache"] == "STALE" and body == b"notes"


async def test_must_revalidate_forbids_stale(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(upstream__retries=0)
    origin.add("/strict.txt", body=b"s", headers={"Cache-Control": "max-age=0, must-revalidate"})
    url = origin.url("/strict.txt")
    await proxy.get(url)
    await proxy.wait_idle()
    await origin.stop()
    response, _ = await proxy.get(url)
    assert response.status == 502


async def test_client_no_cache_forces_revalidation(proxy: Proxy, origin: Origin) -> None:
    origin.add("/pkg-2.tar.gz", body=b"p" * 100)
    url = origin.url("/pkg-2.tar.gz")
    await proxy.get(url)
    await proxy.wait_idle()
    response, _ = await proxy.get(url)
    assert response.headers["X-Cache"] == "HIT"
    response, _ = await proxy.get(url, headers={"Cache-Control": "no-cache"})
    assert response.headers["X-Cache"] == "REVALIDATED"
    response, _ = await proxy.get(url, headers={"Pragma": "no-cache"})
    assert response.headers["X-Cache"] == "REVALIDATED"
    assert origin.hits("/pkg-2.tar.gz") == 3


async def test_vary_mismatch_bypasses(proxy: Proxy, origin: Origin) -> None:
    origin.add("/v.txt", body=b"v", headers={"Vary": "Accept-Language"})
    url = origin.url("/v.txt")
    await proxy.get(url, headers={"Accept-Language": "en"})
    await proxy.wait_idle()
    response, _ = await proxy.get(url, headers={"Accept-Language": "en"})
    assert response.headers["X-Cache"] == "HIT"
    response, _ = await proxy.get(url, headers={"Accept-Language": "zh"})
    assert response.headers["X-Cache"] == "BYPASS"


def test_a_clock_stepped_back_makes_nothing_fresh() -> None:
    assert not is_fresh(0.0, 1000.0, 999.5)  # now is before the response: age 0, lifetime 0
    assert is_fresh(10.0, 1000.0, 999.5) and not is_fresh(10.0, 1000.0, 1010.0)


async def test_a_fill_that_stored_nothing_new_does_not_make_a_stale_object_a_hit(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    """A fill ending while its lock is still held (released in the I/O pool a moment after its
    client got an answer) is followed by the next request: what the store then holds is the same
    stale object, which must be revalidated (here: served STALE, the origin being down), not
    served as a fresh HIT."""
    proxy = await make_proxy(upstream__retries=0)
    origin.add("/notes.txt", body=b"notes", headers={"Cache-Control": "max-age=0"})
    url = origin.url("/notes.txt")
    await proxy.get(url)
    await proxy.wait_idle()
    await origin.stop()
    lock = FillLock.for_key(proxy.state.cache.store.tmp_dir, proxy.state.cache.key_for(URL(url)))
    assert lock.try_acquire()
    asyncio.get_running_loop().call_later(0.2, lock.release)
    response, body = await proxy.get(url)
    assert response.headers["X-Cache"] == "STALE" and body == b"notes"
