"""CONNECT: plain tunnels and TLS interception, with real curl, wget, urllib and raw sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from cacheproxy.certs import create_ca

from ..conftest import MakeProxy, Proxy, curl, origin_ca_file, run
from ..origin import Origin

BODY = os.urandom(300_000)


def tunnel_config(origin: Origin, **more: object) -> dict[str, object]:
    return {"rules__connect_ports": [origin.port], **more}


def intercept_config(origin: Origin, tmp_path: Path, **more: object) -> dict[str, object]:
    cert, key = create_ca(tmp_path / "proxy-ca")
    return {
        "rules__connect_ports": [origin.port],
        "upstream__ca_bundle": str(origin_ca_file(tmp_path)),
        "tls_intercept__enabled": True,
        "tls_intercept__ca_cert": str(cert),
        "tls_intercept__ca_key": str(key),
        **more,
    }


def proxy_ca(tmp_path: Path) -> str:
    return str(tmp_path / "proxy-ca" / "ca.pem")


def connect_head(port: int) -> bytes:
    return f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()


async def raw_connect(proxy: Proxy, head: bytes) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a CONNECT head as written; return the answer's head and the open stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return answer, reader, writer


async def https_get_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cafile: Path, path: str) -> bytes:
    """TLS over an established tunnel, then one GET; the whole answer."""
    context = ssl.create_default_context(cafile=str(cafile))
    await writer.start_tls(context, server_hostname="localhost")
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


# -- tunnels ----------------------------------------------------------------------------------


async def test_curl_and_wget_through_a_tunnel(
    tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "cacheproxy.access")
    tls_origin.add("/pkg.tar.gz", body=BODY)
    proxy = await make_proxy(**tunnel_config(tls_origin))
    url = tls_origin.url("/pkg.tar.gz", host="localhost")
    got = await curl(proxy, url, "--cacert", str(origin_ca_file(tmp_path)))
    assert got.rc == 0, got.stderr
    assert got.stdout == BODY
    out = tmp_path / "w.tar.gz"
    got = await run(
        "wget", "-q", "--tries=1", "-e", "use_proxy=yes", "-e", f"https_proxy=127.0.0.1:{proxy.port}",
        f"--ca-certificate={origin_ca_file(tmp_path)}", "-O", str(out), url,
    )  # fmt: skip
    assert got.rc == 0, got.stderr
    assert out.read_bytes() == BODY
    # A tunnel carries encrypted bytes: nothing is cached, each download reaches the origin.
    assert tls_origin.hits("/pkg.tar.gz") == 2
    assert len(proxy.state.cache.index) == 0
    assert proxy.state.metrics.requests.labels("tunnel")._value.get() == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheproxy.access"]
    assert len(lines) == 2 and all(f'"CONNECT localhost:{tls_origin.port}" 200 ' in line for line in lines)
    assert all(int(line.split()[4]) > len(BODY) and " TUNNEL " in line for line in lines)  # bytes to the client


async def test_urllib_http10_connect_without_host(tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    tls_origin.add("/a.bin", body=b"urllib body")
    proxy = await make_proxy(**tunnel_config(tls_origin))
    context = ssl.create_default_context(cafile=str(origin_ca_file(tmp_path)))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": proxy.url}), urllib.request.HTTPSHandler(context=context)
    )

    def fetch() -> bytes:
        with opener.open(tls_origin.url("/a.bin", host="localhost"), timeout=10) as response:
            return bytes(response.read())

    assert await asyncio.to_thread(fetch) == b"urllib body"


async def test_connect_without_any_header(tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """pip sends CONNECT with no headers at all."""
    tls_origin.add("/b.bin", body=b"pip body")
    proxy = await make_proxy(**tunnel_config(tls_origin))
    answer, reader, writer = await raw_connect(proxy, f"CONNECT localhost:{tls_origin.port} HTTP/1.0\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 ")
    data = await https_get_over(reader, writer, origin_ca_file(tmp_path), "/b.bin")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"pip body")


async def test_http11_connect_without_host_is_400(tls_origin: Origin, make_proxy: MakeProxy) -> None:
    """RFC 9112 section 3.2: an HTTP/1.1 request without Host is answered 400 (HTTP/1.0 may omit it)."""
    proxy = await make_proxy(**tunnel_config(tls_origin))
    answer, _, writer = await raw_connect(proxy, f"CONNECT localhost:{tls_origin.port} HTTP/1.1\r\n\r\n".encode())
    writer.close()
    assert answer.split(b" ")[1] == b"400" and b"X-Cacheproxy-Error: bad_request" in answer
    assert tls_origin.log == []


@pytest.mark.parametrize(
    ("overrides", "target", "status", "code"),
    [
        ({}, "localhost:{other}", 403, "port_denied"),
        ({"rules__deny_upstream_hosts": ["local*"]}, "localhost:{port}", 403, "host_denied"),
        ({"rules__allow_clients": ["10.0.0.0/8"]}, "localhost:{port}", 403, "client_denied"),
        ({"rules__allow_private_upstreams": False}, "localhost:{port}", 403, "private_upstream"),
        ({}, "localhost", 400, "bad_request"),
        ({}, "user@localhost:{port}", 400, "bad_request"),
    ],
)
async def test_refused_connect(
    tls_origin: Origin, make_proxy: MakeProxy, overrides: dict[str, object], target: str, status: int, code: str
) -> None:
    proxy = await make_proxy(**tunnel_config(tls_origin, **overrides))
    target = target.format(port=tls_origin.port, other=tls_origin.port + 1)
    answer, reader, writer = await raw_connect(proxy, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert f"X-Cacheproxy-Error: {code}".encode() in answer
    assert await asyncio.wait_for(reader.read(), 5)  # the reason, then the connection closes
    writer.close()
    assert tls_origin.log == []


async def test_curl_sees_a_denied_port(tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy()  # connect_ports: [443] only
    got = await curl(proxy, tls_origin.url("/x", host="localhost"), "--cacert", str(origin_ca_file(tmp_path)))
    assert got.rc != 0
    assert "403" in got.stderr


async def test_origin_down_is_502(make_proxy: MakeProxy, unused_tcp_port: int) -> None:
    proxy = await make_proxy(rules__connect_ports=[unused_tcp_port])
    answer, _, writer = await raw_connect(proxy, f"CONNECT 127.0.0.1:{unused_tcp_port} HTTP/1.0\r\n\r\n".encode())
    writer.close()
    assert answer.split(b" ")[1] == b"502" and b"upstream_failed" in answer


async def test_idle_tunnel_is_closed(tls_origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(**tunnel_config(tls_origin, upstream__tunnel_idle_timeout="300ms"))
    answer, reader, writer = await raw_connect(proxy, connect_head(tls_origin.port))
    assert answer.startswith(b"HTTP/1.1 200 ")
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy, not by us
    assert asyncio.get_running_loop().time() - started < 3
    writer.close()


# -- interception -----------------------------------------------------------------------------


async def test_intercepted_https_is_cached(
    tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "cacheproxy.access")
    tls_origin.add("/pkg.tar.gz", body=BODY)
    proxy = await make_proxy(**intercept_config(tls_origin, tmp_path))
    url = tls_origin.url("/pkg.tar.gz", host="localhost")
    first = await curl(proxy, url, "--cacert", proxy_ca(tmp_path), "-D", "-")
    assert first.rc == 0, first.stderr
    assert first.stdout.endswith(BODY)
    assert b"X-Cache: MISS" in first.stdout
    await proxy.wait_idle()
    out = tmp_path / "w.tar.gz"
    got = await run(
        "wget", "-q", "--tries=1", "-S", "-e", "use_proxy=yes", "-e", f"https_proxy=127.0.0.1:{proxy.port}",
        f"--ca-certificate={proxy_ca(tmp_path)}", "-O", str(out), url,
    )  # fmt: skip
    assert got.rc == 0, got.stderr
    assert out.read_bytes() == BODY
    assert "X-Cache: HIT" in got.stderr
    # The same key as the URL-in-path form of the https URL.
    # Now ready on the fast path (no Server header): a body larger than what it keeps in memory
    # goes through TLS from the file.
    fast = await curl(proxy, url, "--cacert", proxy_ca(tmp_path), "-D", "-", "-m", "10")
    assert fast.rc == 0, fast.stderr
    head, _, body = fast.stdout.rpartition(b"\r\n\r\n")
    assert b"X-Cache: HIT" in head
    assert body == BODY
    in_path = await run("curl", "-sS", "-D", "-", f"{proxy.url}/{url}")
    assert b"X-Cache: HIT" in in_path.stdout and in_path.stdout.endswith(BODY)
    assert tls_origin.hits("/pkg.tar.gz") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheproxy.access"]
    assert sum(f'"CONNECT localhost:{tls_origin.port}" 200 0 INTERCEPT' in line for line in lines) == 3
    assert sum(f'"GET {url}" 200 {len(BODY)} MISS' in line for line in lines) == 1  # the URL, not just the path
    assert sum(f'"GET {url}" 200 {len(BODY)} HIT' in line for line in lines) == 2  # aiohttp's path, then the fast one


async def test_intercepted_keepalive_range_and_ip_host(
    tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    tls_origin.add("/a.tar.gz", body=BODY)
    tls_origin.add("/b.tar.gz", body=BODY[:1000])
    proxy = await make_proxy(**intercept_config(tls_origin, tmp_path))
    a, b = tls_origin.url("/a.tar.gz"), tls_origin.url("/b.tar.gz")  # 127.0.0.1: an IP SAN
    got = await curl(proxy, a, "--cacert", proxy_ca(tmp_path), "-o", "/dev/null", b, "-w", "%{num_connects}\n")
    assert got.rc == 0, got.stderr
    # b (to /dev/null) then a (to stdout), the second on the same intercepted connection
    assert got.stdout == b"1\n" + BODY + b"0\n"
    await proxy.wait_idle()
    ranged = await curl(proxy, a, "--cacert", proxy_ca(tmp_path), "-r", "100-199", "-D", "-")
    assert ranged.rc == 0, ranged.stderr
    assert b"HTTP/1.1 206 " in ranged.stdout
    assert ranged.stdout.endswith(BODY[100:200])
    hit = await curl(proxy, b, "--cacert", proxy_ca(tmp_path), "-D", "-")
    assert b"X-Cache: HIT" in hit.stdout and hit.stdout.endswith(BODY[:1000])
    assert tls_origin.hits("/a.tar.gz") == 1 and tls_origin.hits("/b.tar.gz") == 1


async def test_client_not_trusting_the_ca_gets_nothing(
    tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    tls_origin.add("/pkg.tar.gz", body=BODY)
    proxy = await make_proxy(**intercept_config(tls_origin, tmp_path))
    got = await curl(proxy, tls_origin.url("/pkg.tar.gz", host="localhost"), "--cacert", str(origin_ca_file(tmp_path)))
    assert got.rc == 60, got.stderr  # curl: peer certificate cannot be authenticated
    assert tls_origin.log == []
    assert len(proxy.state.cache.index) == 0


async def test_bypass_host_is_tunnelled(tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    tls_origin.add("/pkg.tar.gz", body=BODY)
    proxy = await make_proxy(**intercept_config(tls_origin, tmp_path, tls_intercept__bypass_hosts=["local*"]))
    url = tls_origin.url("/pkg.tar.gz", host="localhost")
    for _ in range(2):  # the client sees the origin's own certificate, and nothing is cached
        got = await curl(proxy, url, "--cacert", str(origin_ca_file(tmp_path)))
        assert got.rc == 0, got.stderr
        assert got.stdout == BODY
    assert tls_origin.hits("/pkg.tar.gz") == 2


async def test_untrusted_origin_certificate_is_502(tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    tls_origin.add("/pkg.tar.gz", body=BODY)
    config = intercept_config(tls_origin, tmp_path)
    del config["upstream__ca_bundle"]  # the origin's test CA is not trusted upstream
    proxy = await make_proxy(**config)
    got = await curl(proxy, tls_origin.url("/pkg.tar.gz", host="localhost"), "--cacert", proxy_ca(tmp_path), "-D", "-")
    assert got.rc == 0, got.stderr
    assert b"HTTP/1.1 502 " in got.stdout
    assert b"X-Cacheproxy-Error: upstream_failed" in got.stdout
    assert len(proxy.state.cache.index) == 0


async def test_leaf_certificate_made_once_per_host(tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy(**intercept_config(tls_origin, tmp_path))
    authority = proxy.state.authority
    assert authority is not None
    assert authority.context_for("example.org") is authority.context_for("EXAMPLE.org")
    assert authority.context_for("example.org") is not authority.context_for("example.com")
    ca = x509.load_pem_x509_certificate(await asyncio.to_thread(Path(proxy_ca(tmp_path)).read_bytes))
    for host, kind in (("127.0.0.1", x509.IPAddress), ("pkg.example.org", x509.DNSName)):
        leaf = authority.leaf_for(host)
        leaf.verify_directly_issued_by(ca)
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(v) for v in names.get_values_for_type(kind)] == [host]


async def test_tunnel_and_interception_through_a_parent_proxy(
    tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """upstream.parent_proxy: tunnels are CONNECTed through it, intercepted fetches too."""
    tls_origin.add("/pkg.tar.gz", body=BODY)
    parent = await make_proxy(tmp_path / "parent-cache", **tunnel_config(tls_origin))
    child = await make_proxy(tmp_path / "child-cache", **tunnel_config(tls_origin, upstream__parent_proxy=parent.url))
    url = tls_origin.url("/pkg.tar.gz", host="localhost")
    got = await curl(child, url, "--cacert", str(origin_ca_file(tmp_path)))
    assert got.rc == 0, got.stderr
    assert got.stdout == BODY
    assert parent.state.metrics.requests.labels("tunnel")._value.get() == 1  # it went through the parent
    intercepting = await make_proxy(
        tmp_path / "intercepting-cache", **intercept_config(tls_origin, tmp_path, upstream__parent_proxy=parent.url)
    )
    got = await curl(intercepting, url, "--cacert", proxy_ca(tmp_path))
    assert got.rc == 0, got.stderr
    assert got.stdout == BODY
    await intercepting.app.close()  # a tunnel is counted when it closes
    tunnels = parent.state.metrics.requests.labels("tunnel")
    for _ in range(250):
        if tunnels._value.get() == 2:
            break
        await asyncio.sleep(0.02)
    assert tunnels._value.get() == 2
    strict_parent = await make_proxy(tmp_path / "strict-cache")  # its connect_ports: [443] only
    refused = await make_proxy(tmp_path / "c3", **tunnel_config(tls_origin, upstream__parent_proxy=strict_parent.url))
    answer, _, writer = await raw_connect(refused, connect_head(tls_origin.port))
    writer.close()
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"X-Cacheproxy-Error: upstream_failed" in answer


async def test_open_tunnel_is_closed_at_shutdown(tls_origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(**tunnel_config(tls_origin))
    answer, reader, writer = await raw_connect(proxy, connect_head(tls_origin.port))
    assert answer.startswith(b"HTTP/1.1 200 ")
    started = asyncio.get_running_loop().time()
    await proxy.app.close()  # grace 1 s for running transfers, then everything closes
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert asyncio.get_running_loop().time() - started < 4
    writer.close()


async def test_open_tunnel_holds_a_concurrency_slot(tls_origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(**tunnel_config(tls_origin, limits__per_client_concurrency=1))
    answer, _, first = await raw_connect(proxy, connect_head(tls_origin.port))
    assert answer.startswith(b"HTTP/1.1 200 ")
    answer, _, second = await raw_connect(proxy, connect_head(tls_origin.port))
    second.close()
    assert answer.startswith(b"HTTP/1.1 429 ") and b"X-Cacheproxy-Error: rate_limited" in answer
    first.close()  # the tunnel ends: its slot is free again
    for _ in range(100):
        answer, _, third = await raw_connect(proxy, connect_head(tls_origin.port))
        third.close()
        if answer.startswith(b"HTTP/1.1 200 "):
            break
        await asyncio.sleep(0.02)
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_requests_inside_an_intercepted_connect_carry_the_proxy_protocol_client(
    tls_origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "cacheproxy.access")
    tls_origin.add("/pp.tar.gz", body=BODY)
    proxy = await make_proxy(proxy_protocol=True, **intercept_config(tls_origin, tmp_path))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PROXY TCP4 192.168.7.9 127.0.0.1 40000 3128\r\n" + connect_head(tls_origin.port))
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200 ")
    data = await https_get_over(reader, writer, Path(proxy_ca(tmp_path)), "/pp.tar.gz")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(BODY)
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheproxy.access"]
    assert any(line.startswith(f'192.168.7.9 "CONNECT localhost:{tls_origin.port}" 200 0 INTERCEPT') for line in lines)
    url = tls_origin.url("/pp.tar.gz", host="localhost")
    assert any(line.startswith(f'192.168.7.9 "GET {url}" 200') for line in lines)
