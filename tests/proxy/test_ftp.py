"""ftp:// origins through the proxy: a real pyftpdlib server, real wget and curl."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest

from ..conftest import MakeProxy, Proxy, Run, curl, run
from ..ftp_origin import PASSWORD, FtpOrigin

BODY = os.urandom(700_000)


@pytest.fixture
def ftp(tmp_path: Path) -> Iterator[FtpOrigin]:
    server = FtpOrigin(tmp_path / "ftp-root")
    server.root.mkdir()
    server.start()
    yield server
    server.stop()


def ftp_wget(proxy: Proxy, url: str, output: Path) -> Awaitable[Run]:
    return run(
        "wget", "-q", "-S", "--tries=1", "-e", "use_proxy=yes", "-e", f"ftp_proxy=127.0.0.1:{proxy.port}",
        "-O", str(output), url,
    )  # fmt: skip


async def test_wget_and_curl_miss_then_hit(ftp: FtpOrigin, proxy: Proxy, tmp_path: Path) -> None:
    ftp.add("/pub/pkg-1.0.tar.gz", BODY)
    url = ftp.url("/pub/pkg-1.0.tar.gz")
    got = await ftp_wget(proxy, url, tmp_path / "w")
    assert got.rc == 0, got.stderr
    assert (tmp_path / "w").read_bytes() == BODY
    assert "X-Cache: MISS" in got.stderr
    assert f"Content-Length: {len(BODY)}" in got.stderr
    await proxy.wait_idle()
    hit = await curl(proxy, url, "-D", "-")
    assert hit.rc == 0, hit.stderr
    head, _, body = hit.stdout.partition(b"\r\n\r\n")
    assert body == BODY
    assert b"X-Cache: HIT" in head
    assert f"X-Checksum-Sha256: {hashlib.sha256(BODY).hexdigest()}".encode() in head
    assert b"Content-Type: application/gzip" in head
    # The URL-in-path form of the same URL is the same object.
    in_path = await run("curl", "-sS", "-D", "-", "-o", str(tmp_path / "p"), f"{proxy.url}/{url}")
    assert b"X-Cache: HIT" in in_path.stdout
    assert (tmp_path / "p").read_bytes() == BODY
    assert ftp.transfers("/pub/pkg-1.0.tar.gz") == 1


async def test_head_gives_the_size(ftp: FtpOrigin, proxy: Proxy) -> None:
    ftp.add("/pub/a.tar.xz", BODY[:12345])
    got = await curl(proxy, ftp.url("/pub/a.tar.xz"), "-I")
    assert got.rc == 0, got.stderr
    assert b"Content-Length: 12345" in got.stdout
    assert ftp.transfers("/pub/a.tar.xz") == 0  # SIZE, no RETR


async def test_resume_after_a_drop(ftp: FtpOrigin, proxy: Proxy, tmp_path: Path) -> None:
    ftp.add("/pub/big.tar.gz", BODY)
    ftp.cut["/pub/big.tar.gz"] = [300_000, 1]  # the first RETR ends after 300 000 bytes
    got = await ftp_wget(proxy, ftp.url("/pub/big.tar.gz"), tmp_path / "w")
    assert got.rc == 0, got.stderr
    assert (tmp_path / "w").read_bytes() == BODY
    assert [r.rest for r in ftp.retrs] == [0, 300_000]  # REST from where it broke
    await proxy.wait_idle()
    hit = await curl(proxy, ftp.url("/pub/big.tar.gz"), "-D", "-")
    assert b"X-Cache: HIT" in hit.stdout and hit.stdout.endswith(BODY)


async def test_drop_without_retries_left_aborts_the_client(
    ftp: FtpOrigin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = await make_proxy(upstream__retries=0)
    ftp.add("/pub/big.tar.gz", BODY)
    ftp.cut["/pub/big.tar.gz"] = [300_000, 5]
    got = await curl(proxy, ftp.url("/pub/big.tar.gz"), "-o", str(tmp_path / "c"))
    assert got.rc != 0  # never a clean end on a short body
    await proxy.wait_idle()
    assert len(proxy.state.cache.index) == 0


async def test_busy_server_is_retried_and_a_dead_one_is_502(
    ftp: FtpOrigin, proxy: Proxy, unused_tcp_port: int, tmp_path: Path
) -> None:
    ftp.add("/pub/r.tar.gz", BODY[:2000])
    ftp.refuse = 2  # retries: 3
    got = await curl(proxy, ftp.url("/pub/r.tar.gz"), "-o", str(tmp_path / "c"))
    assert got.rc == 0 and (tmp_path / "c").read_bytes() == BODY[:2000]
    assert proxy.state.metrics.upstream_retries._value.get() == 2
    dead = await curl(proxy, f"ftp://127.0.0.1:{unused_tcp_port}/pub/r.tar.gz", "-D", "-")
    assert dead.stdout.startswith(b"HTTP/1.1 502 ") and b"upstream_failed" in dead.stdout


async def test_missing_file_and_directory(ftp: FtpOrigin, proxy: Proxy) -> None:
    ftp.add("/pub/dir/file.tar.gz", b"x")
    missing = await curl(proxy, ftp.url("/pub/nothing.tar.gz"), "-D", "-")
    assert missing.stdout.startswith(b"HTTP/1.1 404 ")
    directory = await curl(proxy, ftp.url("/pub/dir/"), "-D", "-")
    assert directory.stdout.startswith(b"HTTP/1.1 400 ")
    assert b"X-Cacheproxy-Error: bad_url" in directory.stdout
    assert b"is a directory" in directory.stdout


async def test_login_with_user_and_password(
    ftp: FtpOrigin, proxy: Proxy, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ftp.add("/private/p.tar.gz", BODY[:5000])
    caplog.set_level(logging.DEBUG)
    ok = await curl(proxy, ftp.url("/private/p.tar.gz", credentials=True), "-o", str(tmp_path / "c"))
    assert ok.rc == 0, ok.stderr
    assert (tmp_path / "c").read_bytes() == BODY[:5000]
    wrong = await curl(proxy, ftp.url("/x.tar.gz", credentials=True).replace(PASSWORD, "nope"), "-D", "-")
    assert wrong.stdout.startswith(b"HTTP/1.1 502 ")
    assert b"login" in wrong.stdout
    await proxy.wait_idle()
    assert "builder:***@" in caplog.text  # the URLs were logged, without their passwords
    assert PASSWORD not in caplog.text and ":nope@" not in caplog.text
    stored = [m.url for m in await proxy.stored()]
    assert stored == [ftp.url("/private/p.tar.gz")]  # no credentials in the store either


async def test_fifty_clients_one_transfer(make_proxy: MakeProxy, tmp_path: Path) -> None:
    ftp = FtpOrigin(tmp_path / "slow-root", rate=400_000)  # about 2 s for the whole file
    ftp.root.mkdir()
    ftp.start()
    try:
        proxy = await make_proxy()
        ftp.add("/pub/hot.tar.gz", BODY)
        url = ftp.url("/pub/hot.tar.gz")
        outputs = [tmp_path / f"o{i}" for i in range(50)]
        results = await asyncio.gather(*(curl(proxy, url, "-o", str(out)) for out in outputs))
        assert all(r.rc == 0 for r in results), [r.stderr for r in results if r.rc]
        assert all(out.read_bytes() == BODY for out in outputs)
        assert ftp.transfers("/pub/hot.tar.gz") == 1
    finally:
        ftp.stop()
