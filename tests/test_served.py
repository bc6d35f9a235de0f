"""The real daemon, as `cacheproxy serve` runs it: on uvloop, with two workers.

The other tests drive the app in-process on asyncio's own loop; these run a real process, so the
paths that differ under uvloop are proven too: bodies sent with cacheproxy's own sendfile (uvloop
has no ``loop.sendfile``), also to a slow reader (the socket fills and pieces are queued), through
an intercepted TLS connection (pieces, never raw sendfile), and the door's hit answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from cacheproxy.certs import create_ca

from .conftest import curl, origin_ca_file, run
from .origin import Origin
from .raw import Connection, get
from .test_cli import cacheproxy_process, free_port, write_config


class Served:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


async def fetch(served: Served, url: str, *extra: str) -> tuple[bytes, str]:
    """(body, response head) of curl through the served proxy."""
    result = await run("curl", "-sS", "--noproxy", "", "-x", served.url, "-D", "/dev/stderr", *extra, url)
    assert result.rc == 0, result.stderr
    return result.stdout, result.stderr


async def test_bodies_through_the_served_daemon(origin: Origin, tmp_path: Path) -> None:
    big = os.urandom(24 << 20)
    origin.add("/big.tar.gz", body=big)
    origin.add("/chunked.tar.gz", body=big[: 3 << 20], chunked=True)
    origin.add("/small.tar.gz", body=big[:4096])
    port = free_port()
    config = write_config(tmp_path, port, workers=2)
    async with cacheproxy_process(config, port):
        served = Served(port)
        body, head = await fetch(served, origin.url("/big.tar.gz"))  # a miss, streamed as it arrives
        assert body == big and "X-Cache: MISS" in head
        for _ in range(100):  # committed a moment after its last byte
            body, head = await fetch(served, origin.url("/big.tar.gz"))
            if "X-Cache: HIT" in head:
                break
            await asyncio.sleep(0.05)
        assert body == big and "X-Cache: HIT" in head
        body, head = await fetch(served, origin.url("/big.tar.gz"), "-r", "1000000-2999999")
        assert body == big[1_000_000:3_000_000] and "206" in head.splitlines()[0]
        slow, _ = await fetch(served, origin.url("/big.tar.gz"), "--limit-rate", "40M")  # the socket fills
        assert hashlib.sha256(slow).digest() == hashlib.sha256(big).digest()
        body, head = await fetch(served, origin.url("/chunked.tar.gz"))
        assert body == big[: 3 << 20]
        await fetch(served, origin.url("/small.tar.gz"))
        await asyncio.sleep(0.5)
        conn = await Connection.open(port)  # plain hits answered by the door, in order
        conn.send(*[get(origin.url("/small.tar.gz"))] * 20, get(origin.url("/big.tar.gz"), "Range: bytes=0-9"))
        for _ in range(20):
            status, _, got = await conn.response()
            assert (status, got) == (200, big[:4096])
        status, _, got = await conn.response()
        assert (status, got) == (206, big[:10])
        conn.close()
    assert origin.hits("/big.tar.gz") == 1


async def test_intercepted_tls_through_the_served_daemon(tls_origin: Origin, tmp_path: Path) -> None:
    body = os.urandom(6 << 20)
    tls_origin.add("/tls.tar.gz", body=body)
    cert, key = create_ca(tmp_path / "proxy-ca")
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        tls_intercept={"enabled": True, "ca_cert": str(cert), "ca_key": str(key), "bypass_hosts": ["127.0.0.1"]},
        upstream={"retry_backoff": "10ms", "ca_bundle": str(origin_ca_file(tmp_path))},
        rules={"allow_private_upstreams": True, "connect_ports": [tls_origin.port]},
    )
    url = tls_origin.url("/tls.tar.gz", host="localhost")
    async with cacheproxy_process(config, port):
        served = Served(port)
        for _ in range(3):  # a miss, then hits: every body through TLS, never raw sendfile
            got, head = await fetch(served, url, "--cacert", str(tmp_path / "proxy-ca" / "ca.pem"))
            assert got == body, head
            await asyncio.sleep(0.3)
        assert "X-Cache: HIT" in head
        slow = await curl(served, url, "--cacert", str(tmp_path / "proxy-ca" / "ca.pem"), "--limit-rate", "20M")
        assert slow.rc == 0 and slow.stdout == body
        direct = tls_origin.url("/tls.tar.gz")  # 127.0.0.1 is in bypass_hosts: a plain tunnel
        tunnel = await curl(served, direct, "--cacert", str(origin_ca_file(tmp_path)))
        assert tunnel.rc == 0 and tunnel.stdout == body
    assert tls_origin.hits("/tls.tar.gz") == 2  # one fill, one tunnelled fetch
