"""Hits whose body the cache keeps ready (in memory, or as an open file): the same answers as
any hit, on keep-alive connections, across workers, counted and logged like every request."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from yarl import URL

from cacheproxy.cache.hot import RECHECK, SMALL_BODY

from ..conftest import MakeProxy, Proxy
from ..origin import Origin
from ..raw import Connection, get


async def stored(proxy: Proxy, origin: Origin, path: str, size: int) -> tuple[str, bytes]:
    body = os.urandom(size)
    origin.add(path, body=body)
    await proxy.get(origin.url(path))
    await proxy.wait_idle()
    return origin.url(path), body


async def ready(proxy: Proxy, url: str) -> None:
    """Ask until the cache holds the object's body ready."""
    key = proxy.state.cache.key_for(URL(url))
    for _ in range(100):
        await proxy.get(url)
        if key in proxy.state.cache.hot._ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the body was never made ready")


@pytest.mark.parametrize("size", [3000, SMALL_BODY * 3])  # in memory; an open file
async def test_ready_hits_answer_like_any_hit(proxy: Proxy, origin: Origin, size: int) -> None:
    url, body = await stored(proxy, origin, "/same.tar.gz", size)
    conn = await Connection.open(proxy.port)
    conn.send(get(url, "Cache-Control: max-age=3600"))  # not ready yet: the store answers
    _, cold, _ = await conn.response()
    await ready(proxy, url)
    conn.send(get(url))
    status, warm, got = await conn.response()
    assert status == 200 and got == body
    for volatile in ("date", "age"):
        cold.pop(volatile)
        warm.pop(volatile)
    assert cold == warm
    conn.send(get(url, method="HEAD"), get(url, 'If-None-Match: "v1"'), get(url, "Range: bytes=-10"))
    status, head, _ = await conn.response(head_only=True)
    assert status == 200 and head["content-length"] == str(size)
    assert (await conn.response())[0] == 304
    status, _, tail = await conn.response()
    assert status == 206 and tail == body[-10:]
    conn.close()


async def test_http10_and_connection_close(proxy: Proxy, origin: Origin) -> None:
    url, body = await stored(proxy, origin, "/ten.tar.gz", 100)
    await ready(proxy, url)
    conn = await Connection.open(proxy.port)
    conn.send(get(url, version="1.0"))
    status, _, got = await conn.response()
    assert status == 200 and got == body
    assert await conn.closed()
    conn = await Connection.open(proxy.port)
    conn.send(get(url, "Connection: keep-alive", version="1.0"), get(url, "Connection: close"))
    _, headers, _ = await conn.response()
    assert headers["connection"] == "keep-alive"
    _, headers, got = await conn.response()
    assert headers["connection"] == "close" and got == body
    assert await conn.closed()


async def test_denied_clients_and_hosts_are_refused_on_hits_too(
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


async def test_hits_are_counted_and_logged(proxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "cacheproxy.access")
    url, _ = await stored(proxy, origin, "/count.tar.gz", 700)
    await ready(proxy, url)
    caplog.clear()
    before = proxy.state.metrics.requests.labels("hit")._value.get()
    conn = await Connection.open(proxy.port)
    conn.send(get(url), get(url), get(url))
    for _ in range(3):
        await conn.response()
    conn.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheproxy.access"]
    assert len(lines) == 3 and all(line.startswith(f'127.0.0.1 "GET {url}" 200 700 HIT') for line in lines)
    assert proxy.state.metrics.requests.labels("hit")._value.get() == before + 3


async def test_client_leaving_mid_answer_is_not_an_error(
    proxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = await stored(proxy, origin, "/leave.tar.gz", 32 << 20)
    await ready(proxy, url)
    for extra in ((), ("Range: bytes=0-",)):
        conn = await Connection.open(proxy.port)
        conn.send(get(url, *extra))
        await conn.reader.readexactly(100_000)
        conn.writer.transport.abort()  # reset, mid-body
        await asyncio.sleep(0.3)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    response, body = await proxy.get(url)  # and the proxy serves on
    assert response.status == 200 and len(body) == 32 << 20


async def test_ready_object_removed_by_another_worker_is_not_served(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    a = await make_proxy(tmp_path / "shared")
    b = await make_proxy(tmp_path / "shared")
    url, body = await stored(a, origin, "/peer.tar.gz", SMALL_BODY * 2)
    await ready(b, url)  # b found a's object in the store and holds its file open
    meta = a.state.cache.index.get(a.state.cache.key_for(URL(url)))
    assert meta is not None
    await a.state.cache.purge(meta)
    await asyncio.sleep(RECHECK + 0.1)  # b looks at the file it holds once a second at most
    response, got = await b.get(url)
    assert response.status == 200 and got == body and response.headers["X-Cache"] == "MISS"
    assert origin.hits("/peer.tar.gz") == 2


async def test_plain_ready_hits_are_answered_by_the_door_in_order(
    proxy: Proxy, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain hit with its body in memory is answered as soon as the door has parsed it, but
    never ahead of an earlier request on the same connection that is still being answered."""
    url, body = await stored(proxy, origin, "/now.tar.gz", 2000)
    await ready(proxy, url)
    origin.add("/slow.tar.gz", body=b"s" * 100, delay=0.5)
    general: list[str] = []
    send = proxy.app.pipeline.responder.send

    async def counted(request, outcome, expected=None):  # type: ignore[no-untyped-def]
        general.append(request.raw_path)
        return await send(request, outcome, expected)

    monkeypatch.setattr(proxy.app.pipeline.responder, "send", counted)
    conn = await Connection.open(proxy.port)
    conn.send(get(url), get(url, method="HEAD"))
    assert (await conn.response())[2] == body
    assert (await conn.response(head_only=True))[0] == 200
    assert general == [], "plain ready hits take the door's branch"
    conn.send(get(origin.url("/slow.tar.gz")), get(url), get(url))  # a miss first, then hits
    assert (await conn.response())[2] == b"s" * 100
    for _ in range(2):
        status, headers, got = await conn.response()
        assert status == 200 and got == body and headers["x-cache"] == "HIT"
    assert general[0] == origin.url("/slow.tar.gz")
    conn.close()


async def test_hits_answered_by_the_door_count_against_the_limits(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(limits__per_client_rps=0.001, limits__per_client_burst=40)
    url, _ = await stored(proxy, origin, "/lim.tar.gz", 1000)
    await ready(proxy, url)
    requests = proxy.state.metrics.requests
    spent = sum(requests.labels(r)._value.get() for r in ("hit", "miss"))  # each of those took a token
    conn = await Connection.open(proxy.port)
    conn.send(*[get(url)] * 50)
    statuses = [(await conn.response())[0] for _ in range(50)]
    conn.close()
    assert statuses == [200] * int(40 - spent) + [429] * int(10 + spent)
    assert proxy.state.metrics.ratelimited._value.get() == 10 + spent


async def test_a_long_pipelined_burst_of_ready_hits(proxy: Proxy, origin: Origin) -> None:
    """More requests in one write than aiohttp's parser yields at once (32): every one is answered."""
    url, body = await stored(proxy, origin, "/burst.tar.gz", 500)
    await ready(proxy, url)
    conn = await Connection.open(proxy.port)
    conn.send(*[get(url)] * 100, get(url, "Range: bytes=0-9"), *[get(url)] * 40)
    for i in range(141):
        status, _, got = await conn.response()
        assert (status, got) == ((206, body[:10]) if i == 100 else (200, body)), i
    conn.close()


async def test_a_client_that_does_not_read_is_not_answered_into_memory(make_proxy: MakeProxy, origin: Origin) -> None:
    """Pipelined requests from a client that reads nothing: the answers waiting in the proxy stay
    bounded (the door stops answering ahead, aiohttp stops reading), and all come when it reads."""
    proxy = await make_proxy(limits__per_client_burst=10_000)
    url, body = await stored(proxy, origin, "/noread.tar.gz", 2000)
    await ready(proxy, url)
    conn = await Connection.open(proxy.port)
    conn.writer.transport.set_write_buffer_limits(high=64 << 20)
    conn.send(*[get(url)] * 5000)  # about 12 MB of answers
    await asyncio.sleep(1.0)
    server = proxy.app._runner.server  # type: ignore[union-attr]
    buffered = [door.transport.get_write_buffer_size() for door in server.connections if door.transport is not None]
    assert buffered and max(buffered) < 2 << 20, buffered
    for i in range(5000):
        status, _, got = await conn.response()
        assert status == 200 and got == body, i
    conn.close()
