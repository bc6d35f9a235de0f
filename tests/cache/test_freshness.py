"""Freshness per rules.refresh, revalidation, stale-if-unreachable."""

from __future__ import annotations

import asyncio
import math

from multidict import CIMultiDict
from yarl import URL

from cacheproxy.cache.freshness import (
    FRESH,
    PLAIN,
    STALE_OK,
    VALIDATE,
    Freshness,
    freshness,
    is_fresh,
    parse_cache_control,
    request_directives,
    reuse,
)
from cacheproxy.config import load_config
from cacheproxy.storage.flight import FillLock

from ..conftest import MakeProxy, Proxy
from ..origin import Origin

RULES = load_config(None).refresh_rules
NOW = 1_700_000_000.0


def lifetime(path: str, status: int = 200, **headers: str) -> float:
    return fresh_for(path, status, **headers).lifetime


def fresh_for(path: str, status: int = 200, **headers: str) -> Freshness:
    fields = CIMultiDict((k.replace("_", "-"), v) for k, v in headers.items())
    return freshness(path, status, fields, NOW, RULES, negative_ttl=60)


def test_archives_are_immutable_by_override() -> None:
    assert math.isinf(lifetime("/pub/git-2.39.1.tar.xz", Cache_Control="no-cache, max-age=0"))


def test_origin_freshness_and_heuristic_cap() -> None:
    assert lifetime("/index.html", Cache_Control="max-age=120") == 120
    assert lifetime("/index.html", Cache_Control="s-maxage=5, max-age=120") == 5
    assert lifetime("/index.html", Cache_Control="no-cache") == 0
    lm = "Sun, 01 Jan 2023 00:00:00 GMT"  # years ago: 10% would exceed the 1d rule ttl
    assert lifetime("/index.html", Last_Modified=lm) == 86400
    date, lm = "Tue, 14 Nov 2023 22:13:20 GMT", "Tue, 14 Nov 2023 12:13:20 GMT"  # 10 h before
    assert lifetime("/x.txt", Date=date, Last_Modified=lm) == 3600
    assert lifetime("/x.txt", Date=date, Expires="Tue, 14 Nov 2023 22:23:20 GMT") == 600
    assert fresh_for("/x.txt", Cache_Control="max-age=9, must-revalidate").must_revalidate
    assert fresh_for("/x.txt", Cache_Control="s-maxage=9").must_revalidate  # proxy-revalidate implied


def test_no_freshness_information_means_none() -> None:
    """Heuristics only from Last-Modified, and only for statuses that allow them (RFC 9111 4.2.2)."""
    assert lifetime("/index.html") == 0
    lm = "Sun, 01 Jan 2023 00:00:00 GMT"
    assert lifetime("/index.html", 302, Last_Modified=lm) == 0
    assert lifetime("/missing.txt", 404) == 60  # rules.negative_ttl


def test_strict_parsing() -> None:
    date = "Tue, 14 Nov 2023 22:13:20 GMT"
    for bad in ("Tue, 14 Nov 2023 22:23:20 UTC", "Tue, 14 Nov 23 22:23:20 GMT", "Tue, 14-Nov-2023 22:23:20 GMT", "0"):
        assert lifetime("/x.txt", Date=date, Expires=bad) == 0, bad  # an invalid Expires: already expired
    assert lifetime("/x.txt", Date=date, Expires="Tuesday, 14-Nov-23 22:23:20 GMT") == 600  # RFC 850
    assert lifetime("/x.txt", Date=date, Expires="Tue Nov 14 22:23:20 2023") == 600  # asctime
    assert lifetime("/x.txt", Cache_Control='extension="max-age=3600", max-age=1') == 1  # quotes hold
    assert lifetime("/x.txt", Cache_Control="max-age='3600'") == 0
    assert parse_cache_control('a="x, y", B=2') == {"a": "x, y", "b": "2"}


def test_request_directives_decide_reuse() -> None:
    fresh = {"lifetime": 100.0, "must_revalidate": False, "initial": 10.0, "response_time": NOW, "now": NOW + 20}
    assert reuse(**fresh, req=PLAIN) == FRESH  # age 30 of 100
    assert reuse(**fresh, req=request_directives({"Cache-Control": "max-age=20"})) == VALIDATE
    assert reuse(**fresh, req=request_directives({"Cache-Control": "min-fresh=80"})) == VALIDATE
    assert reuse(**fresh, req=request_directives({"Pragma": "no-cache"})) == VALIDATE
    stale = {**fresh, "now": NOW + 200}
    assert reuse(**stale, req=request_directives({"Cache-Control": "max-stale"})) == STALE_OK
    assert reuse(**stale, req=request_directives({"Cache-Control": "max-stale=10"})) == VALIDATE
    assert reuse(**{**stale, "must_revalidate": True}, req=request_directives({"Cache-Control": "max-stale"})) == (
        VALIDATE
    )


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


async def test_vary_never_answers_with_another_variant(proxy: Proxy, origin: Origin) -> None:
    """RFC 9111 4.1: the stored variant answers only requests that match it; another language is
    fetched (and then stored in its place)."""
    route = origin.add("/v.txt", body=b"de", headers={"Vary": "Accept-Language", "Cache-Control": "max-age=3600"})
    url = origin.url("/v.txt")
    await proxy.get(url, headers={"Accept-Language": "de"})
    await proxy.wait_idle()
    response, body = await proxy.get(url, headers={"Accept-Language": "de"})
    assert response.headers["X-Cache"] == "HIT" and body == b"de"
    route.body = b"en"
    response, body = await proxy.get(url, headers={"Accept-Language": "en"})
    assert response.headers["X-Cache"] == "MISS" and body == b"en"
    await proxy.wait_idle()
    response, body = await proxy.get(url, headers={"Accept-Language": "en"})
    assert response.headers["X-Cache"] == "HIT" and body == b"en"
    response, body = await proxy.get(url)  # no Accept-Language at all: not the "en" variant either
    assert response.headers["X-Cache"] == "MISS"


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
