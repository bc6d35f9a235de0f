"""proxy_protocol: the PROXY header (v1 text, v2 binary) names the client for rules, limits and
logs; a connection without one is closed. Headers written by hand here; real nginx in
tests/deploy/test_gateway.py."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct

import pytest

from cacheproxy.proxy.proxy_protocol import V2_SIGNATURE, ProxyHeaderError, parse_proxy_header

from ..conftest import MakeProxy, Proxy
from ..origin import Origin
from ..raw import Connection, get


def v1(source: str, family: str = "TCP4") -> bytes:
    dest = "127.0.0.1" if family == "TCP4" else "::1"
    return f"PROXY {family} {source} {dest} 51000 3128\r\n".encode()


def v2(source: str | None, command: int = 1) -> bytes:
    if source is None:
        return V2_SIGNATURE + bytes([0x20 | command, 0x00]) + struct.pack("!H", 0)
    ip = ipaddress.ip_address(source)
    if ip.version == 4:
        body = ip.packed + ipaddress.ip_address("127.0.0.1").packed + struct.pack("!HH", 51000, 3128)
        family = 0x11
    else:
        body = ip.packed + ipaddress.ip_address("::1").packed + struct.pack("!HH", 51000, 3128)
        family = 0x21
    body += b"\x04\x00\x01x"  # a TLV (PP2_TYPE_NOOP) after the addresses: skipped
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def test_parser() -> None:
    assert parse_proxy_header(v1("192.0.2.7") + b"GET") == (len(v1("192.0.2.7")), "192.0.2.7")
    assert parse_proxy_header(v1("2001:db8::1", "TCP6"))[1] == "2001:db8::1"  # type: ignore[index]
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == (15, None)
    assert parse_proxy_header(v2("198.51.100.4"))[1] == "198.51.100.4"  # type: ignore[index]
    assert parse_proxy_header(v2("2001:db8::2"))[1] == "2001:db8::2"  # type: ignore[index]
    assert parse_proxy_header(v2(None, command=0)) == (16, None)  # LOCAL
    for whole in (v1("192.0.2.7"), v2("198.51.100.4")):
        for cut in (1, 5, 12, 15, len(whole) - 1):
            assert parse_proxy_header(whole[:cut]) is None, cut  # incomplete: wait for more
    for garbage in (
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 127.0.0.1 051000 3128\r\n",
        b"PROXY TCP6 192.0.2.7 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 " + b"9" * 120,
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
        V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # too short for AF_INET
    ):
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(garbage)


async def stored(proxy: Proxy, origin: Origin, path: str) -> str:
    origin.add(path, body=b"p" * 500)
    conn = await Connection.open(proxy.port)
    conn.send(v1("192.0.2.1"), get(origin.url(path)))
    assert (await conn.response())[0] == 200
    conn.close()
    await proxy.wait_idle()
    return origin.url(path)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cacheproxy.access"]


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (v1("192.0.2.7"), "192.0.2.7"),
        (v1("2001:db8::7", "TCP6"), "2001:db8::7"),
        (v2("192.0.2.8"), "192.0.2.8"),
        (v2("2001:db8::8"), "2001:db8::8"),
        (v2(None, command=0), "127.0.0.1"),  # LOCAL (a gateway's own health check): the peer
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
    ],
)
async def test_client_address_comes_from_the_header(
    make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture, header: bytes, client: str
) -> None:
    caplog.set_level(logging.INFO, "cacheproxy.access")
    allowed = ["127.0.0.1/32", "192.0.2.0/24", "2001:db8::/32"]
    proxy = await make_proxy(proxy_protocol=True, rules__allow_clients=allowed)
    url = await stored(proxy, origin, "/pp.tar.gz")
    conn = await Connection.open(proxy.port)
    conn.send(header[:7])  # the header may come in pieces
    await asyncio.sleep(0.05)
    conn.send(header[7:], get(url), get(url))  # and with requests behind it
    for _ in range(2):
        status, headers, _ = await conn.response()
        assert status == 200 and headers["x-cache"] == "HIT"
    conn.close()
    assert access_lines(caplog)[-1].startswith(f'{client} "GET {url}" 200 500 HIT')


async def test_rules_and_limits_use_the_header_address(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(
        proxy_protocol=True,
        rules__allow_clients=["127.0.0.1/32", "192.0.2.0/24"],
        limits__per_client_rps=0.01,
        limits__per_client_burst=1,
    )
    origin.add("/l.tar.gz", body=b"l" * 10)
    url = origin.url("/l.tar.gz")
    outsider = await Connection.open(proxy.port)  # connects from 127.0.0.1, speaks for 198.51.100.9
    outsider.send(v1("198.51.100.9"), get(url))
    status, headers, _ = await outsider.response()
    assert status == 403 and headers["x-cacheproxy-error"] == "client_denied"
    statuses = {}
    for source in ("192.0.2.10", "192.0.2.11"):  # one token each: separate buckets
        conn = await Connection.open(proxy.port)
        conn.send(v1(source), get(url), get(url))
        statuses[source] = [(await conn.response())[0] for _ in range(2)]
        conn.close()
    assert statuses == {"192.0.2.10": [200, 429], "192.0.2.11": [200, 429]}


@pytest.mark.parametrize(
    "start",
    [b"GET http://127.0.0.1:1/x HTTP/1.1\r\nHost: x\r\n\r\n", b"PROXY TCP4 nonsense\r\n", V2_SIGNATURE + b"\x99"],
)
async def test_connection_without_a_valid_header_is_closed(
    make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture, start: bytes
) -> None:
    proxy = await make_proxy(proxy_protocol=True)
    conn = await Connection.open(proxy.port)
    conn.send(start, get(origin.url("/never.tar.gz")))
    answer = await conn.rest()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"X-Cacheproxy-Error: bad_proxy_header" in answer
    assert answer.count(b"HTTP/1.1") == 1
    assert origin.log == []
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    warnings = [r for r in caplog.records if "PROXY protocol header" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1
