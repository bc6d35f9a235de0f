"""Expected checksums on proxied requests (X-Checksum-*, SRI Integrity) with real curl and wget:
verified hits, misses whose last bytes wait for the digest, mirror-independent hits."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest
from yarl import URL

from cacheproxy.cache.checksums import expected_from
from cacheproxy.errors import BadRequest
from cacheproxy.proxy.respond import HOLD_BACK

from ..conftest import Proxy, curl, wget
from ..origin import Origin


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
