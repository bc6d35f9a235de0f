"""``cacheproxy prefetch`` as a real process against a real proxy and origin."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import struct
import sys
import termios
from collections.abc import Awaitable
from pathlib import Path

from ..conftest import Proxy, Run, run
from ..origin import Origin


def prefetch(proxy_url: str, *args: str) -> Awaitable[Run]:
    return run(sys.executable, "-m", "cacheproxy", "prefetch", "--proxy", proxy_url, *args, timeout=60)


async def test_prefetch_caches_reports_and_fails_with_status_1(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    big = origin.add("/big-1.0.tar.gz", body=os.urandom(3 << 20))
    origin.add("/small.txt", body=b"small\n")
    missing = origin.url("/missing-1.0.tar.gz")
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# sources of the build\n\n{origin.url('/small.txt')}\n  {missing}\n")

    first = await prefetch(proxy.url, origin.url("/big-1.0.tar.gz"), "-f", str(listing))
    out = first.stdout.decode()
    assert first.rc == 1, first.stderr
    assert out.splitlines()[-1] == "2 cached, 0 already cached, 1 failed"
    assert f"cached          {origin.url('/big-1.0.tar.gz')} (3.0 MiB in" in out
    assert f"failed          {missing}: HTTP 404" in out
    assert origin.hits("/big-1.0.tar.gz") == 1 and origin.hits("/small.txt") == 1

    # The proxy answers both from its store now; the bodies are not even read again.
    _, body = await proxy.get(origin.url("/big-1.0.tar.gz"))
    assert body == big.body
    again = await prefetch(proxy.url, origin.url("/big-1.0.tar.gz"), origin.url("/small.txt"))
    assert again.rc == 0, again.stderr
    assert again.stdout.decode().splitlines()[-1] == "0 cached, 2 already cached, 0 failed"
    assert origin.hits("/big-1.0.tar.gz") == 1 and origin.hits("/small.txt") == 1


async def test_a_response_the_proxy_does_not_store_is_a_failure(proxy: Proxy, origin: Origin) -> None:
    origin.add("/private.tar.gz", body=b"p" * 1000, headers={"Cache-Control": "no-store"})
    result = await prefetch(proxy.url, origin.url("/private.tar.gz"))
    assert result.rc == 1
    assert "did not store it" in result.stdout.decode()
    assert result.stdout.decode().splitlines()[-1] == "0 cached, 0 already cached, 1 failed"


async def test_an_unreachable_proxy_is_named(origin: Origin) -> None:
    result = await prefetch("http://127.0.0.1:9", origin.url("/a.tar.gz"))
    assert result.rc == 1
    assert "cannot reach the proxy at http://127.0.0.1:9" in result.stdout.decode()


async def test_no_urls_is_a_usage_error(proxy: Proxy, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    result = await prefetch(proxy.url, "-f", str(empty))
    assert result.rc == 2 and "no URLs" in result.stderr


async def test_progress_bars_on_a_terminal(proxy: Proxy, origin: Origin) -> None:
    """With stderr on a terminal: a bar per download and one overall (bytes, rate, ETA)."""
    origin.add("/slow-2.0.tar.gz", body=b"s" * (256 << 10), rate=512 << 10)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cacheproxy",
        "prefetch",
        "--proxy",
        proxy.url,
        origin.url("/slow-2.0.tar.gz"),
        stdout=asyncio.subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    stdout, _ = await asyncio.wait_for(process.communicate(), 30)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert process.returncode == 0
    text = screen.decode(errors="replace")
    assert "1/1 done" in text and "256k/256k" in text.lower() and "B/s" in text, text
    assert "slow-2.0.tar.gz" in text  # the file's own bar
    assert stdout.decode().splitlines()[-1] == "1 cached, 0 already cached, 0 failed"
