"""Misses: streaming tee, one fetch per object, retries, resume, and what is never stored."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import aiohttp
from yarl import URL

from ..conftest import MakeProxy, Proxy, curl, wget
from ..origin import Origin


def stored_bodies(proxy: Proxy) -> list[Path]:
    return [p for p in (proxy.cache_dir / "objects").rglob("*") if p.is_file() and not p.name.endswith(".json")]


def temp_files(proxy: Proxy) -> list[Path]:
    return list((proxy.cache_dir / "tmp").glob("*"))


async def test_miss_then_hit_with_digests(proxy: Proxy, origin: Origin) -> None:
    route = origin.add("/pkg-1.0.tar.gz", body=os.urandom(300_000))
    response, body = await proxy.get(origin.url("/pkg-1.0.tar.gz"))
    assert response.status == 200 and response.headers["X-Cache"] == "MISS"
    assert hashlib.sha256(body).hexdigest() == route.sha256
    await proxy.wait_idle()
    response, body = await proxy.get(origin.url("/pkg-1.0.tar.gz"))
    assert response.headers["X-Cache"] == "HIT"
    assert response.headers["X-Checksum-Sha256"] == route.sha256
    assert response.headers["X-Checksum-Md5"] == hashlib.md5(route.body).hexdigest()
    assert body == route.body
    assert origin.hits("/pkg-1.0.tar.gz") == 1


async def test_fifty_concurrent_clients_one_fetch_bytes_as_they_arrive(proxy: Proxy, origin: Origin) -> None:
    route = origin.add("/big.tar.xz", body=os.urandom(4 << 20), rate=8 << 20)  # about 0.5 s to send
    url = origin.url("/big.tar.xz")
    first_byte: list[float] = []

    async def client(session: aiohttp.ClientSession) -> str:
        digest = hashlib.sha256()
        async with session.get(url, proxy=proxy.url) as response:
            assert response.status == 200
            first = True
            async for chunk in response.content.iter_any():
                if first:
                    first_byte.append(time.monotonic())
                    first = False
                digest.update(chunk)
        return digest.hexdigest()

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        digests = await asyncio.gather(*(client(session) for _ in range(50)))
    fill_time = time.monotonic() - started
    assert origin.hits("/big.tar.xz") == 1
    assert digests == [route.sha256] * 50
    # Followers stream as the bytes arrive: every first byte well before the fill ended.
    assert max(first_byte) - started < fill_time / 2, (max(first_byte) - started, fill_time)


async def test_client_disconnect_does_not_stop_the_fill(proxy: Proxy, origin: Origin) -> None:
    route = origin.add("/slow.tar.gz", body=os.urandom(1 << 20), rate=2 << 20)
    async with aiohttp.ClientSession() as session:
        async with session.get(origin.url("/slow.tar.gz"), proxy=proxy.url) as response:
            await response.content.readexactly(100_000)
        # leaving the block closes the connection mid-body
    await proxy.wait_idle()
    meta = proxy.state.cache.index.get(origin.url("/slow.tar.gz"))
    assert meta is not None and meta.sha256 == route.sha256
    response, body = await proxy.get(origin.url("/slow.tar.gz"))
    assert response.headers["X-Cache"] == "HIT" and body == route.body


async def test_truncated_origin_nothing_stored_and_clients_fail(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    origin.add("/broken.tar.gz", body=os.urandom(500_000), drop_after=200_000, drops=100, ranges=False)
    url = origin.url("/broken.tar.gz")
    result = await curl(proxy, url, "-o", str(tmp_path / "c.out"))
    assert result.rc != 0, "curl must not take a truncated body for a whole one"
    result = await wget(proxy, url, tmp_path / "w.out")
    assert result.rc != 0, "wget must report the broken transfer"
    await proxy.wait_idle()
    assert proxy.state.cache.index.get(url) is None
    assert stored_bodies(proxy) == [] and temp_files(proxy) == []


async def test_5xx_then_ok_is_retried(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(upstream__retries=3)
    route = origin.add("/flaky.tar.gz", body=b"x" * 10_000, fail_first=2)
    response, body = await proxy.get(origin.url("/flaky.tar.gz"))
    assert response.status == 200 and body == route.body
    assert origin.hits("/flaky.tar.gz") == 3


async def test_5xx_after_all_retries_passes_through_unstored(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(upstream__retries=1)
    origin.add("/down.tar.gz", body=b"x", fail_first=100)
    response, body = await proxy.get(origin.url("/down.tar.gz"))
    assert response.status == 503 and body == b"try later\n"
    assert origin.hits("/down.tar.gz") == 2
    assert proxy.state.cache.index.get(origin.url("/down.tar.gz")) is None


async def test_connect_failure_is_502(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(upstream__retries=1)
    response, body = await proxy.get("http://127.0.0.1:9/nothing.tar.gz")  # discard port: refused
    assert response.status == 502
    assert response.headers["X-Cacheproxy-Error"] == "upstream_failed"
    assert b"\n" == body[-1:] and body.count(b"\n") == 1


async def test_drop_mid_body_resumes_with_range(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    route = origin.add("/resume.tar.gz", body=os.urandom(600_000), drop_after=250_000)
    out = tmp_path / "out"
    result = await curl(proxy, origin.url("/resume.tar.gz"), "-o", str(out))
    assert result.rc == 0, result.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == route.sha256
    resumed = [s for s in origin.log if s.path == "/resume.tar.gz" and "Range" in s.headers]
    assert [s.headers["Range"] for s in resumed] == ["bytes=250000-"]
    assert resumed[0].headers["If-Range"] == '"v1"'
    await proxy.wait_idle()
    assert proxy.state.cache.index.get(origin.url("/resume.tar.gz")).sha256 == route.sha256  # type: ignore[union-attr]


async def test_not_stored_no_store_private_and_errors(proxy: Proxy, origin: Origin) -> None:
    origin.add("/a.tar.gz", body=b"a" * 100, headers={"Cache-Control": "no-store"})
    origin.add("/b.tar.gz", body=b"b" * 100, headers={"Cache-Control": "private, max-age=60"})
    origin.add("/c.tar.gz", body=b"gone", status=403)
    for path, status in (("/a.tar.gz", 200), ("/b.tar.gz", 200), ("/c.tar.gz", 403)):
        for _ in range(2):
            response, _ = await proxy.get(origin.url(path))
            assert response.status == status
            assert response.headers["X-Cache"] == "MISS"
        await proxy.wait_idle()
        assert origin.hits(path) == 2, path
    assert len(proxy.state.cache.index) == 0


async def test_html_for_an_archive_is_passed_on_but_not_stored(proxy: Proxy, origin: Origin) -> None:
    origin.add("/x-1.0.tar.gz", body=b"<html>mirror error</html>", content_type="text/html; charset=utf-8")
    response, body = await proxy.get(origin.url("/x-1.0.tar.gz"))
    assert response.status == 200 and body == b"<html>mirror error</html>"
    await proxy.wait_idle()
    assert proxy.state.cache.index.get(origin.url("/x-1.0.tar.gz")) is None
    assert proxy.state.cache.recent_failures[-1].url == origin.url("/x-1.0.tar.gz")


async def test_over_max_object_size_is_streamed_not_stored(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(cache__max_object_size="1KiB")
    origin.add("/large.tar.gz", body=b"L" * 5000)
    response, body = await proxy.get(origin.url("/large.tar.gz"))
    assert response.status == 200 and len(body) == 5000
    await proxy.wait_idle()
    assert len(proxy.state.cache.index) == 0


async def test_chunked_body_stored_only_when_it_ended_cleanly(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    good = origin.add("/good.tar.gz", body=os.urandom(200_000), chunked=True)
    origin.add("/cut.tar.gz", body=os.urandom(200_000), chunked=True, drop_after=100_000, drops=10, ranges=False)
    _response, body = await proxy.get(origin.url("/good.tar.gz"))
    assert body == good.body
    result = await curl(proxy, origin.url("/cut.tar.gz"), "-o", str(tmp_path / "cut"))
    assert result.rc != 0
    await proxy.wait_idle()
    assert proxy.state.cache.index.get(origin.url("/good.tar.gz")) is not None
    assert proxy.state.cache.index.get(origin.url("/cut.tar.gz")) is None


async def test_redirects_followed_and_stored_under_requested_url(proxy: Proxy, origin: Origin) -> None:
    route = origin.add("/real/pkg.tar.gz", body=b"R" * 1000)
    origin.add("/hop2", redirect_to="/real/pkg.tar.gz")
    origin.add("/dl/pkg.tar.gz", redirect_to=origin.url("/hop2"))
    response, body = await proxy.get(origin.url("/dl/pkg.tar.gz"))
    assert response.status == 200 and body == route.body
    await proxy.wait_idle()
    assert proxy.state.cache.index.get(origin.url("/dl/pkg.tar.gz")) is not None
    response, _ = await proxy.get(origin.url("/dl/pkg.tar.gz"))
    assert response.headers["X-Cache"] == "HIT"


async def test_too_many_redirects_is_502(proxy: Proxy, origin: Origin) -> None:
    origin.add("/loop", redirect_to="/loop")
    response, _ = await proxy.get(origin.url("/loop"))
    assert response.status == 502 and response.headers["X-Cacheproxy-Error"] == "upstream_failed"


async def test_negative_ttl_replays_404(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(rules__negative_ttl="60s")
    for expected in ("MISS", "HIT"):
        response, body = await proxy.get(origin.url("/missing.tar.gz"))
        assert response.status == 404 and body == b"no such file\n"
        assert response.headers["X-Cache"] == expected
    assert origin.hits("/missing.tar.gz") == 1


async def test_mirrors_share_a_key_and_fail_over(make_proxy: MakeProxy, origin: Origin) -> None:
    primary, mirror = origin.url("/gnu/"), origin.url("/mirror/")
    proxy = await make_proxy(upstream__mirrors=[[primary, mirror]], upstream__retries=0)
    route = origin.add("/mirror/make-4.4.tar.gz", body=b"M" * 2000)  # the primary 404s... not a failure
    origin.add("/gnu/make-4.4.tar.gz", body=b"", fail_first=10)  # the primary is down
    response, body = await proxy.get(origin.url("/gnu/make-4.4.tar.gz"))
    assert response.status == 200 and body == route.body
    await proxy.wait_idle()
    response, body = await proxy.get(origin.url("/mirror/make-4.4.tar.gz"))
    assert response.headers["X-Cache"] == "HIT" and body == route.body
    assert origin.hits("/mirror/make-4.4.tar.gz") == 1


async def test_slow_origin_times_out_with_504(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(upstream__read_timeout="300ms", upstream__retries=1)
    origin.add("/stuck.tar.gz", body=b"s", delay=2.0)
    started = time.monotonic()
    response, _ = await proxy.get(origin.url("/stuck.tar.gz"))
    assert response.status == 504 and response.headers["X-Cacheproxy-Error"] == "upstream_timeout"
    assert time.monotonic() - started < 1.9
    assert origin.hits("/stuck.tar.gz") == 2


async def test_body_that_stalls_is_resumed_then_aborted(make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> None:
    proxy = await make_proxy(upstream__read_timeout="300ms", upstream__retries=1)
    # 64 KiB, then a second of silence per chunk: longer than read_timeout every time.
    origin.add("/stall.tar.gz", body=os.urandom(256 << 10), rate=64 << 10)
    started = time.monotonic()
    result = await curl(proxy, origin.url("/stall.tar.gz"), "-o", str(tmp_path / "s.out"))
    assert result.rc != 0, "a stalled transfer must not end cleanly"
    assert time.monotonic() - started < 3.5
    ranged = [s for s in origin.log if s.path == "/stall.tar.gz" and "Range" in s.headers]
    assert len(ranged) == 1, "one resume (retries=1) after the first stall"
    await proxy.wait_idle()
    assert stored_bodies(proxy) == [] and temp_files(proxy) == []


async def test_parent_proxy_carries_upstream_traffic(make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> None:
    parent = await make_proxy(tmp_path / "parent")
    child = await make_proxy(tmp_path / "child", upstream__parent_proxy=parent.url)
    route = origin.add("/via-parent.tar.gz", body=os.urandom(10_000))
    response, body = await child.get(origin.url("/via-parent.tar.gz"))
    assert response.status == 200 and body == route.body
    await child.wait_idle()
    await parent.wait_idle()
    assert parent.state.cache.index.get(origin.url("/via-parent.tar.gz")) is not None, "went through the parent"
    assert child.state.cache.index.get(origin.url("/via-parent.tar.gz")) is not None
    assert origin.hits("/via-parent.tar.gz") == 1


async def test_eviction_takes_the_least_recently_used_first(make_proxy: MakeProxy, origin: Origin) -> None:
    """Objects are kept in access order: a hit moves one to the recent end, and an eviction pass
    takes the oldest without sorting the whole store."""
    proxy = await make_proxy(cache__max_size=10_000, cache__high_watermark=0.8, cache__low_watermark=0.5)
    for name in "abcd":
        origin.add(f"/{name}.tar.gz", body=name.encode() * 2000)
        await proxy.get(origin.url(f"/{name}.tar.gz"))
        await proxy.wait_idle()
    response, _ = await proxy.get(origin.url("/a.tar.gz"))  # a is now the most recently used
    assert response.headers["X-Cache"] == "HIT"
    origin.add("/e.tar.gz", body=b"e" * 2000)  # 10 000 bytes: over the high watermark
    await proxy.get(origin.url("/e.tar.gz"))
    await proxy.wait_idle()
    kept = sorted(URL(m.url).path for m in await proxy.stored())
    assert kept == ["/a.tar.gz", "/e.tar.gz"]  # b, c, d went, oldest first, down to the low watermark
    assert proxy.state.metrics.evictions._value.get() == 3
