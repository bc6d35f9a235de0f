"""Hits: HEAD, Range, conditional requests, headers, objects over 4 GiB."""

from __future__ import annotations

import os
import time
from pathlib import Path

from yarl import URL

from cacheproxy.cache.keys import normalize
from cacheproxy.storage.base import ObjectMeta
from cacheproxy.storage.local import LocalStore

from ..conftest import MakeProxy, Proxy, curl, run
from ..origin import Origin


async def cached(proxy: Proxy, origin: Origin, path: str, body: bytes, **route: object) -> str:
    origin.add(path, body=body, **route)  # type: ignore[arg-type]
    url = origin.url(path)
    response, _ = await proxy.get(url)
    assert response.headers["X-Cache"] == "MISS"
    await proxy.wait_idle()
    return url


async def test_hit_headers(proxy: Proxy, origin: Origin) -> None:
    url = await cached(
        proxy,
        origin,
        "/h.tar.gz",
        b"abc" * 1000,
        content_type="application/x-gzip",
        headers={"Content-Disposition": "attachment; filename=h.tar.gz"},
    )
    response, _body = await proxy.get(url)
    h = response.headers
    assert (h["X-Cache"], h["Via"], h["Accept-Ranges"]) == ("HIT", "1.1 cacheproxy", "bytes")
    assert h["Content-Type"] == "application/x-gzip"
    assert h["Content-Disposition"] == "attachment; filename=h.tar.gz"
    assert h["ETag"] == '"v1"' and h["Last-Modified"] == origin.routes["/h.tar.gz"].last_modified
    assert int(h["Age"]) >= 0 and int(h["Content-Length"]) == 3000


async def test_head_hit_and_miss(proxy: Proxy, origin: Origin) -> None:
    origin.add("/head.tar.gz", body=b"z" * 4321)
    response, body = await proxy.request("HEAD", origin.url("/head.tar.gz"))
    assert response.status == 200 and body == b"" and response.headers["Content-Length"] == "4321"
    url = await cached(proxy, origin, "/head2.tar.gz", b"y" * 1234)
    response, body = await proxy.request("HEAD", url)
    assert response.headers["X-Cache"] == "HIT" and response.headers["Content-Length"] == "1234" and body == b""


async def test_range_206_and_416(proxy: Proxy, origin: Origin) -> None:
    data = os.urandom(10_000)
    url = await cached(proxy, origin, "/r.tar.gz", data)
    for header, expected, content_range in (
        ("bytes=100-199", data[100:200], "bytes 100-199/10000"),
        ("bytes=9990-", data[9990:], "bytes 9990-9999/10000"),
        ("bytes=-10", data[-10:], "bytes 9990-9999/10000"),
        ("bytes=9000-20000", data[9000:], "bytes 9000-9999/10000"),
    ):
        response, body = await proxy.get(url, headers={"Range": header})
        assert response.status == 206, header
        assert body == expected and response.headers["Content-Range"] == content_range
    response, _ = await proxy.get(url, headers={"Range": "bytes=10000-"})
    assert response.status == 416 and response.headers["Content-Range"] == "bytes */10000"
    response, body = await proxy.get(url, headers={"Range": "bytes=0-1", "If-Range": '"other"'})
    assert response.status == 200 and body == data


async def test_conditional_304(proxy: Proxy, origin: Origin) -> None:
    url = await cached(proxy, origin, "/c.tar.gz", b"c" * 500)
    lm = origin.routes["/c.tar.gz"].last_modified
    response, body = await proxy.get(url, headers={"If-None-Match": '"v1"'})
    assert response.status == 304 and body == b"" and response.headers["ETag"] == '"v1"'
    response, _ = await proxy.get(url, headers={"If-Modified-Since": lm})
    assert response.status == 304
    response, _ = await proxy.get(url, headers={"If-None-Match": '"v0"'})
    assert response.status == 200
    response, _ = await proxy.get(url, headers={"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"})
    assert response.status == 200


async def test_range_on_a_miss_is_served_from_the_fill(proxy: Proxy, origin: Origin) -> None:
    data = os.urandom(300_000)
    origin.add("/m.tar.gz", body=data)
    response, body = await proxy.get(origin.url("/m.tar.gz"), headers={"Range": "bytes=250000-"})
    assert response.status == 206 and body == data[250000:]
    await proxy.wait_idle()
    assert proxy.state.cache.index.get(origin.url("/m.tar.gz")).size == 300_000  # type: ignore[union-attr]


async def test_object_over_4gib_range_near_the_end(make_proxy: MakeProxy, tmp_path: Path) -> None:
    """A sparse 5 GiB body in the store: a Range across and past the 4 GiB mark returns the right bytes."""
    size = 5 << 30
    cache_dir = tmp_path / "cache"
    store = LocalStore(cache_dir)
    key = normalize(URL("http://example.org/huge.iso.tar"))
    writer = store._begin_sync(key)
    os.close(writer._fd)  # type: ignore[arg-type]
    writer._fd = None
    marker_at = (4 << 30) - 3
    tail = b"cacheproxy-over-4-GiB" * 10
    with open(writer.path, "r+b") as f:
        f.truncate(size)
        f.seek(marker_at)
        f.write(tail)
        f.seek(size - 6)
        f.write(b"THEEND")
    writer._fd = os.open(writer.path, os.O_WRONLY)
    now = time.time()
    meta = ObjectMeta(key=key, url=key, size=size, sha256="0" * 64, md5="0" * 32, stored_at=now, response_time=now)
    writer._commit_sync(meta)

    proxy = await make_proxy(cache_dir)
    assert key in proxy.state.cache.index
    response, body = await proxy.get(key, headers={"Range": f"bytes={marker_at}-{marker_at + len(tail) - 1}"})
    assert response.status == 206 and body == tail
    assert response.headers["Content-Range"] == f"bytes {marker_at}-{marker_at + len(tail) - 1}/{size}"
    response, body = await proxy.get(key, headers={"Range": "bytes=-6"})
    assert body == b"THEEND"
    result = await curl(proxy, key, "-r", f"{size - 1000}-", "-o", str(tmp_path / "tail"))
    assert result.rc == 0 and (tmp_path / "tail").read_bytes().endswith(b"THEEND")
    response, _ = await proxy.request("HEAD", key)
    assert int(response.headers["Content-Length"]) == size

    result = await run("curl", "-sS", "-x", proxy.url, "-o", "/dev/null", "-w", "%{size_download}", key, timeout=120)
    assert result.rc == 0 and int(result.stdout) == size, "the whole body over 4 GiB in one response"
