"""Real nginx in front (the stream module, proxy_protocol on), as the openEuler plan deploys it:
cacheproxy sees each client's own address through the PROXY header, and applies its per-client
limits and its logs to it, not to the gateway's."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from ..conftest import MakeProxy
from ..origin import Origin

STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def gateway(tmp_path: Path) -> tuple[int, Path]:
    """A port for nginx stream, and its prefix directory."""
    if shutil.which("nginx") is None or not STREAM_MODULE.exists():
        raise RuntimeError("nginx with the stream module is needed: run the README's test command")
    return free_port(), tmp_path


def start_nginx(root: Path, listen: int, upstream: int) -> subprocess.Popen[bytes]:
    conf = root / "nginx.conf"
    conf.write_text(f"""
load_module {STREAM_MODULE};
pid {root}/nginx.pid;
error_log {root}/error.log info;
worker_processes 1;
events {{ worker_connections 1024; }}
stream {{
    upstream cacheproxy {{ server 127.0.0.1:{upstream} max_fails=3 fail_timeout=10s; }}
    server {{
        listen 127.0.0.1:{listen};
        proxy_pass cacheproxy;
        proxy_protocol on;
    }}
}}
""")
    return subprocess.Popen(["nginx", "-p", str(root), "-c", str(conf), "-g", "daemon off;"])


async def wait_port(port: int) -> None:
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


async def test_limits_apply_to_the_real_clients_behind_nginx(
    make_proxy: MakeProxy, origin: Origin, gateway: tuple[int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "cacheproxy.access")
    port, root = gateway
    burst = 10
    proxy = await make_proxy(proxy_protocol=True, limits__per_client_rps=0.001, limits__per_client_burst=burst)
    nginx = await asyncio.to_thread(start_nginx, root, port, proxy.port)
    try:
        await wait_port(port)
        origin.add("/gw.tar.gz", body=b"g" * 2000)
        statuses: dict[str, Counter[int]] = {}

        async def client(address: str) -> None:
            connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=5)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def one() -> int:
                    async with session.get(origin.url("/gw.tar.gz"), proxy=f"http://127.0.0.1:{port}") as response:
                        await response.read()
                        return response.status

                statuses[address] = Counter(await asyncio.gather(*(one() for _ in range(25))))

        await asyncio.gather(client("127.0.0.2"), client("127.0.0.3"))
    finally:
        nginx.terminate()
        await asyncio.to_thread(nginx.wait, 10)
    # Each client has its own bucket: `burst` answers, then 429; the gateway's address has none.
    expected = Counter({200: burst, 429: 25 - burst})
    assert statuses == {"127.0.0.2": expected, "127.0.0.3": expected}
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheproxy.access"]
    clients = Counter(line.split(" ", 1)[0] for line in lines)
    assert clients == {"127.0.0.2": 25, "127.0.0.3": 25}
    assert origin.hits("/gw.tar.gz") == 1
