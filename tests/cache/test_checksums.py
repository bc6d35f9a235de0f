"""Expected checksums on proxied requests (X-Checksum-*, SRI Integrity) with real curl and wget:
verified hits, misses whose last bytes wait for the digest, mirror-independent hits."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from cacheproxy.cache.checksums import expected_from
from cacheproxy.errors import BadRequest
from cacheproxy.proxy.respond import HOLD_BACK

from ..conftest import MakeProxy, Proxy, curl, run, wget
from ..origin import Origin
from ..seaweed import Seaweed
from .test_obs import uploaded


def sri(algorithm: str, body: bytes) -> str:
    return f"{algorithm}-" + base64.b64encode(hashlib.new(algorithm, body).digest()).decode()


def mismatches(proxy: Proxy, where: str) -> float:
    return proxy.state.metrics.checksum_mismatches.labels(where)._value.get()


def test_expectations_are_parsed_strictly() -> None:
    body = b"x"
    sha256 = hashlib.sha256(body).hexdigest()
    expected = expected_from({"X-Checksum-Sha256": sha256.upper(), "Integrity": sri("sha512", body)})
    assert expected is not None
    assert dict(expected.wanted) == {"sha256": sha256, "sha512": hashlib.sha512(body).hexdigest()}
    assert expected_from({"Integrity": f"{sri('sha384', body)} {sri('sha256', body)}?opt"}) is not None
    assert expected_from({}) is None
    for bad in (
        {"X-Checksum-Sha256": "abc"},
        {"X-Checksum-Md5": "z" * 32},
        {"Integrity": "sha256-not*base64"},
        {"Integrity": sri("sha384", body)},  # not computed here: said, not ignored
        {"Integrity": "md5-" + base64.b64encode(hashlib.md5(body).digest()).decode()},
        {"X-Checksum-Sha256": "0" * 64, "Integrity": sri("sha256", body)},
    ):
        with pytest.raises(BadRequest) as raised:
            expected_from(bad)
        assert raised.value.code == "bad_checksum"


async def test_a_matching_miss_is_stored_and_served(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    route = origin.add("/lib-1.0.tar.gz", body=os.urandom(300_000))
    out = tmp_path / "lib.tar.gz"
    result = await curl(
        proxy, origin.url("/lib-1.0.tar.gz"), "-f", "-o", str(out), "-H", f"Integrity: {sri('sha512', route.body)}"
    )
    assert result.rc == 0, result.stderr
    assert out.read_bytes() == route.body
    await proxy.wait_idle()
    meta = proxy.state.cache.index.get(proxy.state.cache.key_for(URL(origin.url("/lib-1.0.tar.gz"))))
    assert meta is not None and meta.sha512 == hashlib.sha512(route.body).hexdigest()  # kept in the same pass
    again = await curl(proxy, origin.url("/lib-1.0.tar.gz"), "-f", "-D", "-", "-o", "/dev/null",
                       "-H", f"X-Checksum-Sha256: {route.sha256}")  # fmt: skip
    assert (
        again.rc == 0
        and b"X-Cache: HIT" in again.stdout
        and f"X-Checksum-Sha512: {meta.sha512}".encode() in again.stdout
    )
    assert origin.hits("/lib-1.0.tar.gz") == 1


async def test_a_mismatching_miss_ends_in_an_error_and_stores_nothing(
    proxy: Proxy, origin: Origin, tmp_path: Path
) -> None:
    """The origin re-tagged the release: the body streams, but the client never gets the last
    bytes (the connection is reset), and nothing is stored."""
    expected = hashlib.sha256(b"the release as it was").hexdigest()
    route = origin.add("/rel-2.0.tar.gz", body=os.urandom(1 << 20), rate=2 << 20)
    out = tmp_path / "rel.tar.gz"
    result = await curl(proxy, origin.url("/rel-2.0.tar.gz"), "-o", str(out), "-H", f"X-Checksum-Sha256: {expected}")
    assert result.rc != 0  # curl: (18) or (56): never a complete file
    assert out.stat().st_size == len(route.body) - HOLD_BACK  # streamed up to the held-back tail
    await proxy.wait_idle()
    assert await proxy.state.cache.lookup(URL(origin.url("/rel-2.0.tar.gz"))) is None
    assert mismatches(proxy, "miss") == 1

    got = tmp_path / "wget.tar.gz"
    fetched = await wget(proxy, origin.url("/rel-2.0.tar.gz"), got, f"--header=X-Checksum-Sha256: {expected}")
    assert fetched.rc != 0
    assert origin.hits("/rel-2.0.tar.gz") == 2  # each try fetched again: nothing was stored


async def test_an_origin_that_truncates_is_never_a_verified_file(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    route = origin.add("/cut-1.0.tar.gz", body=os.urandom(400_000), drop_after=150_000, drops=100, ranges=False)
    out = tmp_path / "cut.tar.gz"
    result = await curl(
        proxy, origin.url("/cut-1.0.tar.gz"), "-o", str(out), "-H", f"X-Checksum-Sha256: {route.sha256}"
    )
    assert result.rc != 0
    assert out.stat().st_size < len(route.body)
    await proxy.wait_idle()
    assert await proxy.state.cache.lookup(URL(origin.url("/cut-1.0.tar.gz"))) is None


async def test_a_stored_body_that_differs_is_refused(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    route = origin.add("/app-3.0.tar.gz", body=b"app" * 1000)
    await proxy.get(origin.url("/app-3.0.tar.gz"))
    await proxy.wait_idle()
    wrong = "0" * 64
    result = await curl(proxy, origin.url("/app-3.0.tar.gz"), "-D", "-", "-H", f"X-Checksum-Sha256: {wrong}")
    head = result.stdout.decode(errors="replace")
    assert head.startswith("HTTP/1.1 412")
    assert "X-Cacheproxy-Error: checksum_mismatch" in head
    assert f"X-Checksum-Sha256-Expected: {wrong}" in head and f"X-Checksum-Sha256-Actual: {route.sha256}" in head
    assert f"has sha256 {route.sha256}, the request expects {wrong}" in head  # the body names both
    fetched = await wget(proxy, origin.url("/app-3.0.tar.gz"), tmp_path / "app", f"--header=X-Checksum-Sha256: {wrong}")
    assert fetched.rc == 8  # wget: the server answered an error
    assert mismatches(proxy, "hit") == 2
    assert origin.hits("/app-3.0.tar.gz") == 1


async def test_another_url_with_the_same_checksum_is_a_hit(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    """The same tarball on a second mirror: no origin request at all."""
    first = origin.add("/mirror-a/tool-4.2.tar.gz", body=os.urandom(200_000))
    origin.add("/mirror-b/tool-4.2.tar.gz", body=first.body)
    await proxy.get(origin.url("/mirror-a/tool-4.2.tar.gz"))
    await proxy.wait_idle()
    for header in (
        f"Integrity: {sri('sha256', first.body)}",
        f"X-Checksum-Sha512: {hashlib.sha512(first.body).hexdigest()}",
    ):
        out = tmp_path / "tool.tar.gz"
        result = await curl(
            proxy, origin.url("/mirror-b/tool-4.2.tar.gz"), "-f", "-D", "-", "-o", str(out), "-H", header
        )
        assert result.rc == 0, result.stderr
        assert b"X-Cache: HIT" in result.stdout
        assert f"X-Cacheproxy-Source: {origin.url('/mirror-a/tool-4.2.tar.gz')}".encode() in result.stdout
        assert out.read_bytes() == first.body
    assert origin.hits("/mirror-b/tool-4.2.tar.gz") == 0
    assert proxy.state.metrics.digest_hits._value.get() == 2
    # md5 alone only verifies: it does not name a body strongly enough to answer for another URL.
    md5 = hashlib.md5(first.body).hexdigest()
    result = await curl(
        proxy, origin.url("/mirror-b/tool-4.2.tar.gz"), "-f", "-o", "/dev/null", "-H", f"X-Checksum-Md5: {md5}"
    )
    assert result.rc == 0 and origin.hits("/mirror-b/tool-4.2.tar.gz") == 1


async def test_a_pinned_body_needs_no_revalidation(proxy: Proxy, origin: Origin) -> None:
    route = origin.add("/index.json", body=b'{"v": 1}', headers={"Cache-Control": "max-age=0"})
    await proxy.get(origin.url("/index.json"))
    await proxy.wait_idle()
    response, body = await proxy.get(origin.url("/index.json"), headers={"X-Checksum-Sha256": route.sha256})
    assert response.status == 200 and body == route.body and response.headers["X-Cache"] == "HIT"
    assert origin.hits("/index.json") == 1  # stale, but the checksum says it is the wanted body


async def test_a_passthrough_is_verified_too(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    route = origin.add("/private.tar.gz", body=os.urandom(200_000), headers={"Cache-Control": "no-store"})
    ok = await curl(
        proxy,
        origin.url("/private.tar.gz"),
        "-f",
        "-o",
        str(tmp_path / "a"),
        "-H",
        f"X-Checksum-Sha256: {route.sha256}",
    )
    assert ok.rc == 0 and (tmp_path / "a").read_bytes() == route.body
    bad = await curl(
        proxy, origin.url("/private.tar.gz"), "-o", str(tmp_path / "b"), "-H", f"X-Checksum-Sha256: {'1' * 64}"
    )
    assert bad.rc != 0  # and never the whole file
    assert not (tmp_path / "b").exists() or (tmp_path / "b").stat().st_size < len(route.body)


async def test_objects_by_digest_and_the_mirror_layouts(make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> None:
    proxy = await make_proxy(checksums__mirror_prefix="/repo/pkgs")  # where fedpkg's lookaside points
    route = origin.add("/pub/git-2.39.1.tar.xz", body=os.urandom(100_000))
    await proxy.get(origin.url("/pub/git-2.39.1.tar.xz"))
    await proxy.wait_idle()
    sha256, sha512 = route.sha256, hashlib.sha512(route.body).hexdigest()
    base = proxy.url
    paths = [
        f"/_cacheproxy/sha256/{sha256}",
        f"/_cacheproxy/sha512/{sha512.upper()}",
        f"/repo/pkgs/sha256/{sha256}",  # Nix hashed mirror
        f"/repo/pkgs/_source-cache/archive/{sha256[:2]}/{sha256}.tar.xz",  # Spack source mirror
        f"/repo/pkgs/git/git-2.39.1.tar.xz/sha512/{sha512}/git-2.39.1.tar.xz",  # Fedora lookaside
    ]
    for path in paths:
        out = tmp_path / "got"
        result = await run("curl", "-sS", "-f", "--noproxy", "*", "-D", "-", "-o", str(out), base + path)
        assert result.rc == 0, (path, result.stderr)
        assert out.read_bytes() == route.body, path
        assert b"X-Cache: HIT" in result.stdout
        assert f"X-Cacheproxy-Source: {origin.url('/pub/git-2.39.1.tar.xz')}".encode() in result.stdout
    fetched = await run("wget", "-q", "-O", str(tmp_path / "w"), "--no-proxy", base + paths[4])
    assert fetched.rc == 0 and (tmp_path / "w").read_bytes() == route.body
    # Like any hit: a range, HEAD, 304 on the stored validators.
    part = await run("curl", "-sS", "--noproxy", "*", "-r", "10-19", base + paths[0])
    assert part.stdout == route.body[10:20]
    head = await run("curl", "-sS", "--noproxy", "*", "-I", base + paths[0])
    assert head.stdout.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(route.body)}".encode() in head.stdout
    same = await run("curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}",
                     "-H", 'If-None-Match: "v1"', base + paths[0])  # fmt: skip
    assert same.stdout == b"304"
    for missing, status in (
        (f"/_cacheproxy/sha256/{'0' * 64}", b"404"),
        ("/_cacheproxy/sha256/abc", b"400"),
        (f"/repo/pkgs/git/other.tar.xz/sha512/{sha512}/git-2.39.1.tar.xz", b"404"),  # the file names differ
        (f"/repo/pkgs/git/git-2.39.1.tar.xz/md5/{hashlib.md5(route.body).hexdigest()}/git-2.39.1.tar.xz", b"404"),
    ):
        answer = await run("curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}", base + missing)
        assert answer.stdout == status, missing
    assert origin.hits("/pub/git-2.39.1.tar.xz") == 1


async def test_digests_are_shared_through_obs(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """An object another instance uploaded is found by its digest: by lookup, and for another URL."""
    first = await make_proxy(tmp_path / "a", **seaweed.obs_config(bucket, storage__obs__serve_hits="stream"))
    second = await make_proxy(tmp_path / "b", **seaweed.obs_config(bucket, storage__obs__serve_hits="stream"))
    route = origin.add("/a/zlib-1.3.tar.gz", body=os.urandom(150_000))
    origin.add("/b/zlib-1.3.tar.gz", body=route.body)
    await first.get(origin.url("/a/zlib-1.3.tar.gz"))
    await uploaded(first)
    status, body = await get_url(f"{second.url}/_cacheproxy/sha256/{route.sha256}")
    assert status == 200 and body == route.body
    response, body = await second.get(origin.url("/b/zlib-1.3.tar.gz"), headers={"X-Checksum-Sha256": route.sha256})
    assert response.status == 200 and body == route.body and response.headers["X-Cache"] == "HIT"
    assert response.headers["X-Cacheproxy-Source"] == origin.url("/a/zlib-1.3.tar.gz")
    assert origin.hits("/b/zlib-1.3.tar.gz") == 0 and origin.hits("/a/zlib-1.3.tar.gz") == 1
    # A purge takes the digest markers with it.
    assert await first.state.cache.purge_url(URL(origin.url("/a/zlib-1.3.tar.gz")))
    status, _ = await get_url(f"{first.url}/_cacheproxy/sha512/{hashlib.sha512(route.body).hexdigest()}")
    assert status == 404


async def get_url(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


async def test_the_digest_map_is_built_in_slices_and_kept_up_to_date() -> None:
    from cacheproxy.cache import index as index_module
    from cacheproxy.cache.index import Index
    from cacheproxy.storage.base import ObjectMeta

    def meta(key: str, body: bytes) -> ObjectMeta:
        return ObjectMeta(key, key, len(body), hashlib.sha256(body).hexdigest(), hashlib.md5(body).hexdigest(),
                          0.0, 0.0, sha512=hashlib.sha512(body).hexdigest())  # fmt: skip

    index = Index()
    for i in range(25):
        index.put(meta(f"http://o/{i}", b"%d" % i))
    for i in range(3):  # one body under three URLs
        index.put(meta(f"http://mirror{i}/empty", b""))
    sha = hashlib.sha256(b"").hexdigest()
    index_module.BUILD_SLICE = 10
    try:
        build = asyncio.create_task(index.build_digests())
        await asyncio.sleep(0)  # the first slice is in; change things while it builds
        index.remove("http://o/20")
        index.put(meta("http://o/21", b"replaced"))
        index.put(meta("http://o/new", b"new"))
        await build
    finally:
        index_module.BUILD_SLICE = 10_000
    assert index.by_digest(sha) == [f"http://mirror{i}/empty" for i in range(3)]
    assert index.by_digest(hashlib.sha256(b"20").hexdigest()) == []
    assert index.by_digest(hashlib.sha256(b"21").hexdigest()) == []
    assert index.by_digest(hashlib.sha512(b"replaced").hexdigest()) == ["http://o/21"]
    assert index.by_digest(hashlib.sha256(b"new").hexdigest()) == ["http://o/new"]
    index.remove("http://mirror0/empty")
    index.remove("http://mirror1/empty")
    assert index.by_digest(sha) == ["http://mirror2/empty"]
    lazy = Index()  # a lookup before the build builds it at once
    lazy.put(meta("http://o/x", b"x"))
    assert lazy.by_digest(hashlib.sha256(b"x").hexdigest()) == ["http://o/x"]
