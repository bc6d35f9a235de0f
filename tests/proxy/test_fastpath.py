"""The hit fast path: the same answers as the full path, on keep-alive and pipelined connections,
with the full path taking over a connection at the first request it cannot answer."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from cacheproxy.config import load_config
from cacheproxy.ops.logging import flush_access_log, setup_access_log
from cacheproxy.proxy.fastpath import SMALL_BODY

from ..conftest import MakeProxy, Proxy, config_values
from ..origin import Origin


class Connection:
    """One raw client connection, to see exactly what goes over it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, proxy: Proxy) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", proxy.port))

    def send(self, *requests: str) -> None:
        self.writer.write("".join(requests).encode())

    async def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        status_line = await asyncio.wait_for(self.reader.readline(), 5)
        assert status_line, "connection closed"
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), 5)
        return int(status_line.split()[1]), headers, body

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    def close(self) -> None:
        self.writer.close()


def get(url: str, *headers: str, method: str = "GET", version: str = "1.1") -> str:
    host = url.split("/")[2]
    return f"{method} {url} HTTP/{version}\r\nHost: {host}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"


async def stored(proxy: Proxy, origin: Origin, path: str, size: int) -> tuple[str, bytes]:
    body = os.urandom(size)
    origin.add(path, body=body)
    await proxy.get(origin.url(path))
    await proxy.wait_idle()
    return origin.url(path), body


async def test_keep_alive_hits_pipelined_and_handed_over(proxy: Proxy, origin: Origin) -> None:
    small_url, small = await stored(proxy, origin, "/small.tar.gz", 5000)
    large_url, large = await stored(proxy, origin, "/large.tar.gz", SMALL_BODY * 3)  # sent with sendfile
    conn = await Connection.open(proxy)
    # Three requests in one write: answered in order on the one connection.
    conn.send(get(small_url), get(large_url), get(small_url, method="HEAD"))
    for expected, head_only in ((small, False), (large, False), (b"", True)):
        status, headers, body = await conn.response(head_only)
        assert status == 200 and headers["x-cache"] == "HIT" and body == expected
        assert "server" not in headers, "the fast path answered (aiohttp adds a Server header)"
        assert headers["via"] == "1.1 cacheproxy" and headers["accept-ranges"] == "bytes"
        assert headers["x-checksum-sha256"] and headers["etag"] == '"v1"' and "date" in headers and "age" in headers
    # A Range request is beyond the fast path: the full path takes the connection and answers it...
    conn.send(get(small_url, "Range: bytes=10-19"))
    status, headers, body = await conn.response()
    assert status == 206 and body == small[10:20] and headers["content-range"] == "bytes 10-19/5000"
    assert "server" in headers, "aiohttp answered"
    # ... and the hits after it on the same connection.
    conn.send(get(large_url))
    status, headers, body = await conn.response()
    assert status == 200 and body == large
    conn.close()
    assert origin.hits("/small.tar.gz") == 1 and origin.hits("/large.tar.gz") == 1


async def test_same_headers_as_the_full_path(proxy: Proxy, origin: Origin) -> None:
    url, _ = await stored(proxy, origin, "/same.tar.gz", 3000)
    conn = await Connection.open(proxy)
    conn.send(get(url))
    _, fast, _ = await conn.response()
    conn.send(get(url, 'If-None-Match: "other"'))  # a conditional: the full path answers 200
    status, full, _ = await conn.response()
    assert status == 200
    for volatile in ("date", "age", "server"):
        fast.pop(volatile, None)
        full.pop(volatile, None)
    assert fast == full
    conn.close()


async def test_http10_and_connection_close(proxy: Proxy, origin: Origin) -> None:
    url, body = await stored(proxy, origin, "/ten.tar.gz", 100)
    conn = await Connection.open(proxy)
    conn.send(get(url, version="1.0"))
    status, headers, got = await conn.response()
    assert status == 200 and got == body and headers["connection"] == "close"
    assert await conn.closed()
    conn = await Connection.open(proxy)
    conn.send(get(url, "Connection: keep-alive", version="1.0"), get(url, "Connection: close"))
    _, headers, _ = await conn.response()
    assert headers["connection"] == "keep-alive"
    _, headers, got = await conn.response()
    assert headers["connection"] == "close" and got == body
    assert await conn.closed()


async def test_denied_client_and_host_never_take_the_fast_path(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    proxy = await make_proxy(tmp_path / "shared")
    url, _ = await stored(proxy, origin, "/deny.tar.gz", 100)
    closed = await make_proxy(tmp_path / "shared", rules__allow_clients=["10.0.0.0/8"])
    response, _ = await closed.get(url)
    assert response.status == 403 and response.headers["X-Cacheproxy-Error"] == "client_denied"
    hosts = await make_proxy(tmp_path / "shared", rules__deny_upstream_hosts=["127.0.0.*"])
    response, _ = await hosts.get(url)
    assert response.status == 403 and response.headers["X-Cacheproxy-Error"] == "host_denied"


async def test_fast_hits_are_counted_and_logged(make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(log__access_log=str(log_file))
    setup_access_log(load_config(None, config_values(tmp_path, log__access_log=str(log_file))).log)
    try:
        url, _ = await stored(proxy, origin, "/count.tar.gz", 700)
        conn = await Connection.open(proxy)
        conn.send(get(url), get(url), get(url))
        for _ in range(3):
            await conn.response()
        conn.close()
        flush_access_log()
        lines = log_file.read_text().splitlines()
        assert len(lines) == 4, lines  # the miss and three hits
        assert lines[0].startswith(f'127.0.0.1 "GET {url}" 200 700 MISS')
        assert all(line.startswith(f'127.0.0.1 "GET {url}" 200 700 HIT') for line in lines[1:])
        metrics = proxy.state.metrics.render()[0].decode()
        assert 'cacheproxy_requests_total{result="hit"} 3.0' in metrics
        assert 'cacheproxy_response_bytes_total{source="cache"} 2100.0' in metrics
    finally:
        setup_access_log(load_config(None, config_values(tmp_path)).log)  # back to the root logger


async def test_client_leaving_mid_answer_is_not_an_error(
    proxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = await stored(proxy, origin, "/leave.tar.gz", 32 << 20)
    for extra in ((), ("Range: bytes=0-",)):  # the fast path, then the full path
        conn = await Connection.open(proxy)
        conn.send(get(url, *extra))
        await conn.reader.readexactly(100_000)
        conn.writer.transport.abort()  # reset, mid-body
        await asyncio.sleep(0.3)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    response, body = await proxy.get(url)  # and the proxy serves on
    assert response.status == 200 and len(body) == 32 << 20


async def test_object_of_another_worker_takes_the_fast_path(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    a = await make_proxy(tmp_path / "shared")
    b = await make_proxy(tmp_path / "shared")
    url, body = await stored(a, origin, "/peer.tar.gz", 2000)
    conn = await Connection.open(b)  # b has never seen the object
    conn.send(get(url), get(url))
    for _ in range(2):
        status, headers, got = await conn.response()
        assert status == 200 and got == body and headers["x-cache"] == "HIT"
        assert "server" not in headers, "answered by the fast path (aiohttp adds a Server header)"
    conn.close()
    assert origin.hits("/peer.tar.gz") == 1
