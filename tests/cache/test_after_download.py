"""What a user sees after a download (issue 11): the commit window, private answers, bodies past
``max_object_size``, a store that cannot take a body, bounded error answers."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from cacheproxy.cache import housekeeping
from cacheproxy.cache.fetch import Fetcher
from cacheproxy.storage.local import LocalWriter

from ..conftest import MakeProxy, Proxy, curl
from ..ftp_origin import PASSWORD, FtpOrigin
from ..origin import Origin

MIB = 1 << 20


async def test_a_request_in_the_commit_window_is_a_hit_with_checksums(
    proxy: Proxy, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = hashlib.sha256(b"w").digest() * (8 * MIB // 32)
    origin.add("/big.tar.gz", body=body)
    url = origin.url("/big.tar.gz")
    commit = Fetcher._commit

    async def slow_commit(self: Fetcher, *args: Any) -> None:  # hashing and fdatasync of a big file
        await asyncio.sleep(0.5)
        await commit(self, *args)

    monkeypatch.setattr(Fetcher, "_commit", slow_commit)
    response, got = await proxy.get(url)
    assert response.headers["X-Cache"] == "MISS" and got == body
    head = await curl(proxy, url, "-sI")  # README's recipe, at once
    assert b"X-Cache: HIT" in head.stdout and hashlib.sha256(body).hexdigest().encode() in head.stdout
    response, got = await proxy.get(url, headers={"If-None-Match": '"v1"'})
    assert response.status == 304 and response.headers["X-Cache"] == "HIT"
    assert origin.hits("/big.tar.gz") == 1 and origin.hits("/big.tar.gz", "HEAD") == 0


async def test_a_head_during_a_fill_is_answered_from_the_fill(proxy: Proxy, origin: Origin) -> None:
    origin.add("/slow.tar.gz", body=b"s" * MIB, rate=2 * MIB)
    url = origin.url("/slow.tar.gz")
    download = asyncio.create_task(proxy.get(url))
    await asyncio.sleep(0.2)
    head = await curl(proxy, url, "-sI")
    assert head.stdout.startswith(b"HTTP/1.1 200") and b"Content-Length: 1048576" in head.stdout
    _, got = await download
    assert got == b"s" * MIB
    assert origin.hits("/slow.tar.gz", "HEAD") == 0 and origin.hits("/slow.tar.gz") == 1


async def test_credentials_keep_answers_private(proxy: Proxy, origin: Origin) -> None:
    """RFC 9111 3.5: an answer to a request with Authorization is stored only when the origin
    allows it, and then answers only the same credentials."""
    origin.add("/private.txt", body=b"secret", headers={"Cache-Control": "max-age=3600"})
    url = origin.url("/private.txt", host="user:pw@127.0.0.1")
    done = await curl(proxy, url, "-D", "-")  # curl turns the user info into Authorization: Basic
    assert done.stdout.endswith(b"secret") and b"X-Cache: MISS" in done.stdout
    await proxy.wait_idle()
    response, _ = await proxy.get(origin.url("/private.txt"))
    assert response.headers["X-Cache"] == "MISS"  # not stored: the origin did not say public
    assert origin.hits("/private.txt") == 2
    assert origin.log[0].headers["Authorization"].startswith("Basic ")  # forwarded to the origin

    origin.add("/shared.txt", body=b"team", headers={"Cache-Control": "public, max-age=3600"})
    url = origin.url("/shared.txt", host="user:pw@127.0.0.1")
    await curl(proxy, url)
    await proxy.wait_idle()
    again = await curl(proxy, url, "-D", "-")
    assert b"X-Cache: HIT" in again.stdout and again.stdout.endswith(b"team")
    other = await curl(proxy, origin.url("/shared.txt", host="user:other@127.0.0.1"), "-D", "-")
    anonymous, _ = await proxy.get(origin.url("/shared.txt"))
    assert b"X-Cache: MISS" in other.stdout and anonymous.headers["X-Cache"] == "MISS"
    keys = proxy.state.cache.index.keys()
    assert all("pw" not in k and "user" not in k for k in keys), keys  # a keyed hash, not the secret


async def test_ftp_logins_are_part_of_the_key(proxy: Proxy, tmp_path: Path) -> None:
    ftp = FtpOrigin(tmp_path / "root")
    ftp.root.mkdir()
    ftp.start()
    try:
        ftp.add("/private/p.tar.gz", b"p" * 5000)
        first = await curl(proxy, ftp.url("/private/p.tar.gz", credentials=True), "-o", str(tmp_path / "a"))
        assert first.rc == 0, first.stderr
        await proxy.wait_idle()
        again = await curl(proxy, ftp.url("/private/p.tar.gz", credentials=True), "-D", "-")
        assert b"X-Cache: HIT" in again.stdout
        wrong = await curl(proxy, ftp.url("/private/p.tar.gz", credentials=True).replace(PASSWORD, "nope"), "-D", "-")
        assert b"X-Cache: HIT" not in wrong.stdout and wrong.stdout.startswith(b"HTTP/1.1 502")
        stored = [m.url for m in await proxy.stored()]
        assert stored == [ftp.url("/private/p.tar.gz")]  # the store names it without the login
        assert not any(PASSWORD in p.read_text(errors="ignore") for p in proxy.cache_dir.rglob("*.json"))
    finally:
        ftp.stop()


async def test_an_unknown_length_body_past_max_object_size_streams_and_stops_writing(
    make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(cache__max_object_size="1MiB")
    piece = hashlib.sha256(b"c").digest() * 2048  # 64 KiB
    origin.add("/stream.tar.gz", body=piece, chunked=True, repeat=160)  # 10 MiB, no Content-Length
    url = origin.url("/stream.tar.gz")
    caplog.set_level(logging.INFO)
    done = await curl(proxy, url, "-D", "-")
    assert done.rc == 0 and done.stdout.endswith(piece * 160)
    await proxy.wait_idle()
    assert len(proxy.state.cache.index) == 0 and not list((proxy.cache_dir / "tmp").glob("*.part"))
    assert "passed cache.max_object_size" in caplog.text

    # A client that goes away: the fill stops fetching for no one.
    origin.add("/endless.tar.gz", body=piece, chunked=True, repeat=100_000)  # 6.4 GB
    async with aiohttp.ClientSession() as session:
        async with session.get(origin.url("/endless.tar.gz"), proxy=proxy.url) as response:
            await response.content.readexactly(3 * MIB)
    await proxy.wait_idle(timeout=10)
    assert "stopped fetching" in caplog.text


async def test_a_store_that_cannot_take_a_body_passes_it_on(
    proxy: Proxy, origin: Origin, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    body = b"f" * (8 * MIB)
    origin.add("/big.tar.gz", body=body)
    monkeypatch.setattr(type(proxy.state.cache.store), "disk_usage", lambda self: (6 * MIB, 5 * MIB))
    response, got = await proxy.get(origin.url("/big.tar.gz"))
    assert response.headers["X-Cache"] == "BYPASS" and got == body
    monkeypatch.undo()

    # The disk fills up while a body of unknown length is written: the client still gets it all.
    write = LocalWriter.write

    async def full(self: LocalWriter, data: bytes | list[bytes]) -> None:
        if self.written > MIB:
            raise OSError(errno.ENOSPC, "No space left on device")
        await write(self, data)

    monkeypatch.setattr(LocalWriter, "write", full)
    origin.add("/chunked.tar.gz", body=b"c" * (64 << 10), chunked=True, repeat=64)
    done = await curl(proxy, origin.url("/chunked.tar.gz"))
    assert done.rc == 0 and done.stdout == b"c" * (4 * MIB)
    await proxy.wait_idle()
    assert proxy.state.cache.index.get(proxy.state.cache.key_for(URL(origin.url("/chunked.tar.gz")))) is None
    assert "No space left on device" in caplog.text
    monkeypatch.undo()

    # A broken store (its spool is a file, as a read-only one refuses): served, readyz says so.
    tmp = proxy.cache_dir / "tmp"
    for leftover in tmp.iterdir():
        leftover.unlink()
    tmp.rmdir()
    tmp.write_text("not a folder")
    origin.add("/other.tar.gz", body=b"o" * 1000)
    response, got = await proxy.get(origin.url("/other.tar.gz"))
    assert response.status == 200 and response.headers["X-Cache"] == "BYPASS" and got == b"o" * 1000
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/_cacheproxy/readyz") as ready:
            checks = await ready.json()
    assert ready.status == 503 and checks["checks"]["store_writable"]["ok"] is False, checks

    # Removed while running: made again on the next miss.
    tmp.unlink()
    origin.add("/again.tar.gz", body=b"a" * 1000)
    response, got = await proxy.get(origin.url("/again.tar.gz"))
    await proxy.wait_idle()
    response, got = await proxy.get(origin.url("/again.tar.gz"))
    assert response.headers["X-Cache"] == "HIT" and got == b"a" * 1000


async def test_error_answers_are_bounded(proxy: Proxy, origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(housekeeping, "ERROR_ANSWERS", 3)
    for i in range(6):
        response, _ = await proxy.get(origin.url(f"/missing-{i}.tar.gz"))
        assert response.status == 404
        await proxy.wait_idle()
    errors = [m for m in await proxy.stored() if m.status == 404]
    assert len(errors) == 3 and {m.url.rsplit("/", 1)[1] for m in errors} == {f"missing-{i}.tar.gz" for i in (3, 4, 5)}
    response, _ = await proxy.get(origin.url("/missing-5.tar.gz"))
    assert response.headers["X-Cache"] == "HIT"  # remembered for rules.negative_ttl
    assert origin.hits("/missing-5.tar.gz") == 1
