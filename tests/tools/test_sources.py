"""Pinned prefetches: 'sha256:<hex> URL' entries, Fedora and older sources files mapped to URLs by
a spec (rpmspec) or a lookaside cache, through a real proxy."""

from __future__ import annotations

import base64
import hashlib
import sys
from collections.abc import Awaitable
from pathlib import Path

import pytest
from yarl import URL

from cacheproxy.tools.sources import SourceFile, SourcesError, Wanted, entry, is_sources_file, read_sources

from ..conftest import Proxy, Run, run
from ..origin import Origin


def prefetch(proxy: Proxy, *args: str) -> Awaitable[Run]:
    return run(sys.executable, "-m", "cacheproxy", "prefetch", "--proxy", proxy.url, *args, timeout=60)


def test_entries_and_sources_lines() -> None:
    sha = "ab" * 32
    assert entry("https://o/a.tgz") == Wanted("https://o/a.tgz")
    assert entry(f"SHA256:{sha.upper()} https://o/a.tgz") == Wanted("https://o/a.tgz", "sha256", sha)
    assert entry(f"sha256:{sha}:https://o/a.tgz") == Wanted("https://o/a.tgz", "sha256", sha)
    raw = bytes(range(64))
    assert entry(f"sha512-{base64.b64encode(raw).decode()} ftp://o/b") == Wanted("ftp://o/b", "sha512", raw.hex())
    for bad in ("sha256:abcd https://o/a", "not a url", "sha512-AAAA https://o/a"):
        with pytest.raises(SourcesError):
            entry(bad)
    lines = [f"SHA512 (git-2.39.1.tar.xz) = {'c' * 128}", f"{'d' * 32}  old.tar.gz"]
    assert is_sources_file(lines) and not is_sources_file(["https://o/a.tgz"])
    assert read_sources(lines) == [
        SourceFile("git-2.39.1.tar.xz", "sha512", "c" * 128),
        SourceFile("old.tar.gz", "md5", "d" * 32),
    ]


async def test_pinned_entries_are_verified_by_the_proxy(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    good = origin.add("/good-1.0.tar.gz", body=b"good" * 5000)
    origin.add("/bad-1.0.tar.gz", body=b"re-tagged" * 5000)
    listing = tmp_path / "urls.txt"
    listing.write_text(
        f"sha256:{good.sha256} {origin.url('/good-1.0.tar.gz')}\nsha256:{'0' * 64}:{origin.url('/bad-1.0.tar.gz')}\n"
    )
    result = await prefetch(proxy, "-f", str(listing))
    out = result.stdout.decode()
    assert result.rc == 1, result.stderr
    assert f"cached          {origin.url('/good-1.0.tar.gz')} (19.5 KiB in" in out and "sha256 verified)" in out
    assert f"failed          {origin.url('/bad-1.0.tar.gz')}: the body is not the one its sha256 names" in out
    await proxy.wait_idle()
    assert await proxy.state.cache.lookup(URL(origin.url("/bad-1.0.tar.gz"))) is None
    again = await prefetch(proxy, f"sha256:{'1' * 64} {origin.url('/good-1.0.tar.gz')}")  # stored, but not that
    assert again.rc == 1 and "HTTP 412 Precondition Failed (checksum_mismatch)" in again.stdout.decode()


async def test_a_fedora_sources_file_with_a_spec(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    tarball = origin.add("/releases/hello-2.12.tar.gz", body=b"hello tarball" * 1000)
    spec = tmp_path / "hello.spec"
    spec.write_text(
        "Name: hello\nVersion: 2.12\nRelease: 1\nSummary: s\nLicense: MIT\n"
        f"Source0: {origin.url('/releases')}/%{{name}}-%{{version}}.tar.gz\n%description\nd\n"
    )
    sources = tmp_path / "sources"
    sources.write_text(f"SHA512 (hello-2.12.tar.gz) = {hashlib.sha512(tarball.body).hexdigest()}\n")
    result = await prefetch(proxy, "-f", str(sources), "--spec", str(spec))
    assert result.rc == 0, result.stdout.decode() + result.stderr
    assert f"cached          {origin.url('/releases/hello-2.12.tar.gz')}" in result.stdout.decode()
    assert "sha512 verified" in result.stdout.decode()
    missing = await prefetch(proxy, "-f", str(sources))
    assert missing.rc == 2 and "--spec SPEC, or --lookaside URL --package NAME" in missing.stderr


async def test_a_sources_file_from_a_lookaside_cache(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    body = b"lookaside body" * 1000
    sha512, md5 = hashlib.sha512(body).hexdigest(), hashlib.md5(body).hexdigest()
    origin.add(f"/repo/pkgs/hello/hello-2.12.tar.gz/sha512/{sha512}/hello-2.12.tar.gz", body=body)
    origin.add(f"/repo/pkgs/hello/old-1.0.tar.gz/{md5}/old-1.0.tar.gz", body=body)
    sources = tmp_path / "sources"
    sources.write_text(f"SHA512 (hello-2.12.tar.gz) = {sha512}\n{md5}  old-1.0.tar.gz\n")
    result = await prefetch(proxy, "-f", str(sources), "--lookaside", origin.url("/repo/pkgs"), "--package", "hello")
    assert result.rc == 0, result.stdout.decode()
    assert result.stdout.decode().splitlines()[-1] == "2 cached, 0 already cached, 0 failed"
