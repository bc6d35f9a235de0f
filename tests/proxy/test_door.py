"""The front door, with raw sockets: strict parsing, head limits and timeouts, connection and
per-client limits. Every refusal is a 4xx/5xx answer or a close, never a 200 for smuggled bytes,
and never a traceback in the log."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

from ..conftest import MakeProxy, Proxy
from ..origin import Origin
from ..raw import Connection, get


async def stored(proxy: Proxy, origin: Origin, path: str, size: int = 1000) -> tuple[str, bytes]:
    body = os.urandom(size)
    origin.add(path, body=body)
    await proxy.get(origin.url(path))
    await proxy.wait_idle()
    return origin.url(path), body


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


async def test_smuggled_request_behind_bare_lf_is_refused(
    proxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's reproduction: a bare LF hides a Content-Length; two cached objects."""
    url1, _ = await stored(proxy, origin, "/small1.tar.gz")
    url2, _ = await stored(proxy, origin, "/small2.tar.gz")
    conn = await Connection.open(proxy.port)
    conn.send(
        f"GET {url1} HTTP/1.1\r\nHost: x\nContent-Length: 62\r\n\r\n",
        f"GET {url2} HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    answer = await conn.rest()
    assert answer.count(b"HTTP/1.") == 1, answer
    assert answer.split(b" ")[1] == b"400" and b"X-Cacheproxy-Error: bad_request" in answer
    assert origin.hits("/small1.tar.gz") == 1 and origin.hits("/small2.tar.gz") == 1
    no_errors_logged(caplog)


@pytest.mark.parametrize(
    ("name", "head", "status"),
    [
        ("bare LF ending the head", "GET {url} HTTP/1.1\nHost: x\n\n", 400),
        ("bare CR", "GET {url} HTTP/1.1\r\nHost: x\rY: z\r\n\r\n", 400),
        ("NUL in a value", "GET {url} HTTP/1.1\r\nHost: x\x00y\r\n\r\n", 400),
        ("repeated Host", "GET {url} HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        ("obsolete line folding", "GET {url} HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
        ("100 KB header field", "GET {url} HTTP/1.1\r\nHost: x\r\nX-Big: " + "a" * 100_000 + "\r\n\r\n", 431),
        ("150 header fields", "GET {url} HTTP/1.1\r\nHost: x\r\n" + "X-n: y\r\n" * 150 + "\r\n", 431),
        ("9 KB request line", "GET {url}?" + "q" * 9000 + " HTTP/1.1\r\nHost: x\r\n\r\n", 431),
    ],
)
async def test_malformed_or_oversized_heads_are_refused_at_once(
    proxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture, name: str, head: str, status: int
) -> None:
    url, _ = await stored(proxy, origin, "/cached.tar.gz")  # a hit, if anything answered it
    conn = await Connection.open(proxy.port)
    started = time.monotonic()
    conn.send(head.format(url=url))
    answer = await conn.rest(timeout=5)
    assert time.monotonic() - started < 3, f"{name}: answered only after {time.monotonic() - started:.1f}s"
    assert answer.split(b" ")[1] == str(status).encode(), (name, answer[:200])
    assert b"X-Cacheproxy-Error: bad_request" in answer and b"X-Cache: HIT" not in answer
    no_errors_logged(caplog)


async def test_refused_heads_leave_one_access_line_without_secrets(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    conn = await Connection.open(proxy.port)
    conn.send("GET http://user:hunter2@127.0.0.1:1/x HTTP/1.1\nHost: x\n\n")
    await conn.rest()
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheproxy.access"]
    assert len(lines) == 1 and " 400 " in lines[0] and lines[0].endswith(" bad_request"), lines
    assert "hunter2" not in caplog.text
    no_errors_logged(caplog)


async def test_slow_head_is_408_and_closed(make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    proxy = await make_proxy(limits__head_timeout="600ms")
    conn = await Connection.open(proxy.port)
    started = time.monotonic()
    conn.send("GET http://127.0.0.1:1/x.tar.gz HTTP/1.1\r\nHost: x\r\nX-Slow: ")

    async def drip() -> None:
        for _ in range(40):  # one byte every 100 ms, for at most 4 s
            await asyncio.sleep(0.1)
            if conn.writer.is_closing():
                return
            conn.send("a")

    dripping = asyncio.create_task(drip())
    answer = await conn.rest(timeout=5)
    elapsed = time.monotonic() - started
    dripping.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"X-Cacheproxy-Error: head_timeout" in answer
    assert 0.5 < elapsed < 2.5, elapsed
    # A connection that sends nothing at all is closed the same way.
    idle = await Connection.open(proxy.port)
    assert (await idle.rest(timeout=5)).startswith(b"HTTP/1.1 408 ")
    no_errors_logged(caplog)


async def test_head_timer_spares_keep_alive_requests_and_request_bodies(make_proxy: MakeProxy, origin: Origin) -> None:
    """The timer covers heads only: a slow answer or a pause between requests is not a slow head."""
    proxy = await make_proxy(limits__head_timeout="500ms")
    origin.add("/slow.tar.gz", body=b"x" * 1000, delay=1.0)
    conn = await Connection.open(proxy.port)
    conn.send(get(origin.url("/slow.tar.gz")))
    status, _, body = await conn.response()
    assert status == 200 and body == b"x" * 1000
    await asyncio.sleep(0.3)  # idle between requests: keep-alive, not a head
    conn.send(get(origin.url("/slow.tar.gz")))
    status, headers, _ = await conn.response()
    assert status == 200 and headers["x-cache"] == "HIT"
    conn.close()


async def test_max_connections(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(limits__max_connections=2)
    url, body = await stored(proxy, origin, "/c.tar.gz")
    first, second = await Connection.open(proxy.port), await Connection.open(proxy.port)
    third = await Connection.open(proxy.port)
    answer = await third.rest()
    assert answer.startswith(b"HTTP/1.1 503 ") and b"X-Cacheproxy-Error: too_many_connections" in answer
    assert b"Retry-After: 1" in answer
    first.send(get(url))  # the two admitted ones are served
    assert (await first.response())[2] == body
    second.close()
    await asyncio.sleep(0.1)
    fourth = await Connection.open(proxy.port)  # a slot is free again
    fourth.send(get(url))
    assert (await fourth.response())[2] == body
    first.close()
    fourth.close()


async def test_rate_limit_per_client(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(limits__per_client_rps=1, limits__per_client_burst=3)
    url, _ = await stored(proxy, origin, "/r.tar.gz")  # spends one token
    conn = await Connection.open(proxy.port)
    conn.send(get(url), get(url), get(url))
    statuses = [(await conn.response())[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    conn.send(get(url))
    status, headers, body = await conn.response()
    assert status == 429 and headers["x-cacheproxy-error"] == "rate_limited"
    assert int(headers["retry-after"]) >= 1 and b"per_client_rps" in body
    metrics = proxy.state.metrics.render()[0].decode()
    assert "cacheproxy_ratelimited_total 2.0" in metrics
    assert 'cacheproxy_requests_total{result="hit"} 2.0' in metrics
    await asyncio.sleep(1.1)  # one token back
    conn.send(get(url))
    assert (await conn.response())[0] == 200
    health = await Connection.open(proxy.port)  # the proxy's own endpoints are not limited
    health.send("GET /_cacheproxy/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await health.response())[0] == 200
    conn.close()
    health.close()


async def test_concurrency_limit_per_client(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(limits__per_client_concurrency=1)
    origin.add("/slow.tar.gz", body=b"s" * 100, delay=1.0)
    url, _ = await stored(proxy, origin, "/quick.tar.gz")
    slow = asyncio.create_task(proxy.get(origin.url("/slow.tar.gz")))
    await asyncio.sleep(0.3)
    response, body = await proxy.get(url)
    assert response.status == 429 and response.headers["X-Cacheproxy-Error"] == "rate_limited"
    assert b"per_client_concurrency" in body
    assert (await slow)[0].status == 200
    response, _ = await proxy.get(url)
    assert response.status == 200


async def test_pipelined_hits_are_answered_in_order(proxy: Proxy, origin: Origin) -> None:
    small_url, small = await stored(proxy, origin, "/p1.tar.gz", 5000)
    large_url, large = await stored(proxy, origin, "/p2.tar.gz", 300_000)
    conn = await Connection.open(proxy.port)
    for _ in range(2):  # the first round makes the bodies ready, the second uses them
        conn.send(get(small_url), get(large_url), get(small_url, method="HEAD"), get(small_url, "Range: bytes=10-19"))
        for expected, head_only in ((small, False), (large, False), (b"", True)):
            status, headers, body = await conn.response(head_only)
            assert status == 200 and headers["x-cache"] == "HIT" and body == expected
            assert headers["via"] == "1.1 cacheproxy" and headers["accept-ranges"] == "bytes"
            assert headers["x-checksum-sha256"] and headers["etag"] == '"v1"' and "age" in headers
        status, headers, body = await conn.response()
        assert status == 206 and body == small[10:20] and headers["content-range"] == "bytes 10-19/5000"
        await asyncio.sleep(0.2)
    conn.close()
    assert origin.hits("/p1.tar.gz") == 1 and origin.hits("/p2.tar.gz") == 1
