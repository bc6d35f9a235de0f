"""The repository's nginx.conf, run by real nginx on loopback ports in front of two cacheproxy
instances, with deploy/gateway/readiness.py as its readiness hook: wget and curl
through it, CONNECT through it, each client's own address seen by cacheproxy, an unready instance
and a dead one given no new requests."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ..conftest import MakeProxy, Proxy, run
from ..origin import Origin
from .test_gateway import STREAM_MODULE, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "deploy" / "gateway" / "readiness.py"

pytestmark = pytest.mark.timeout(120)


def gateway_conf(root: Path, port: int, upstreams: Path) -> Path:
    """nginx.conf as shipped, with its paths and port moved into the test's directory."""
    text = (ROOT / "nginx.conf").read_text()
    moves = {
        f"load_module {STREAM_MODULE};": f"load_module {STREAM_MODULE};",
        "pid /run/nginx.pid;": f"pid {root}/nginx.pid;",
        "access_log /dev/stdout gateway;": f"access_log {root}/access.log gateway;",
        "listen 3128 backlog=4096;": f"listen 127.0.0.1:{port} backlog=4096;",
        "listen [::]:3128 backlog=4096;": "",
        "include /run/cacheproxy-gateway/upstreams.conf;": f"include {upstreams};",
    }
    for shipped, here in moves.items():
        assert shipped in text, f"nginx.conf no longer has {shipped!r}"
        text = text.replace(shipped, here)
    path = root / "nginx.conf"
    path.write_text(text)
    return path


def served(proxy: Proxy) -> float:
    return sum(s.value for m in proxy.state.metrics.requests.collect() for s in m.samples if s.name.endswith("_total"))


async def hook(upstreams: Path, root: Path, *instances: Proxy) -> str:
    result = await run(
        sys.executable, str(HOOK), "--once", "--out", str(upstreams), "--pid-file", str(root / "nginx.pid"),
        *(f"127.0.0.1:{p.port}" for p in instances),
    )  # fmt: skip
    assert result.rc == 0, result.stderr
    return await asyncio.to_thread(upstreams.read_text)


async def test_shipped_nginx_conf_in_front_of_two_instances(
    make_proxy: MakeProxy, origin: Origin, tls_origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if shutil.which("nginx") is None or not STREAM_MODULE.exists():
        raise RuntimeError("nginx with the stream module is needed: run the README's test command")
    caplog.set_level(logging.INFO, "cacheproxy.access")
    options = {"proxy_protocol": True, "rules__connect_ports": [tls_origin.port]}
    a = await make_proxy(tmp_path / "cache-a", **options)  # a store each: b's can break alone
    b = await make_proxy(tmp_path / "cache-b", **options)
    upstreams = tmp_path / "upstreams.conf"
    assert "down" not in await hook(upstreams, tmp_path, a, b)
    port = free_port()
    conf = gateway_conf(tmp_path, port, upstreams)
    check = await run("nginx", "-t", "-p", str(tmp_path), "-c", str(conf))
    assert check.rc == 0, check.stderr
    nginx = await asyncio.to_thread(
        subprocess.Popen, ["nginx", "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"]
    )
    gateway = f"http://127.0.0.1:{port}"
    body = b"gateway" * 10_000
    origin.add("/gw-1.0.tar.gz", body=body)
    tls_origin.add("/tls-1.0.tar.gz", body=b"tls" * 1000)

    async def curl(source: str, url: str = origin.url("/gw-1.0.tar.gz"), *extra: str) -> bytes:
        result = await run("curl", "-sS", "--fail", "--noproxy", "", "--interface", source, "-x", gateway, *extra, url)
        assert result.rc == 0, result.stderr
        return result.stdout

    try:
        await wait_port(port)
        assert await curl("127.0.0.7") == body
        wget = await run(
            "wget", "-q", "--tries=1", "--bind-address=127.0.0.8", "-e", "use_proxy=yes",
            "-e", f"http_proxy=127.0.0.1:{port}", "-O", "-", origin.url("/gw-1.0.tar.gz"),
        )  # fmt: skip
        assert wget.rc == 0 and wget.stdout == body, wget.stderr
        tunnelled = await curl(
            "127.0.0.9", tls_origin.url("/tls-1.0.tar.gz"), "--cacert", str(tmp_path / "origin-ca.pem")
        )
        assert tunnelled == b"tls" * 1000  # CONNECT through the stream gateway
        assert origin.hits("/gw-1.0.tar.gz") <= 2
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "cacheproxy.access" and "/_cacheproxy/" not in r.getMessage()
        ]
        assert Counter(line.split(" ", 1)[0] for line in lines) == {"127.0.0.7": 1, "127.0.0.8": 1, "127.0.0.9": 1}

        # Both instances get streams while both are ready.
        before = served(a), served(b)
        for _ in range(12):
            await curl("127.0.0.10")
        assert served(a) > before[0] and served(b) > before[1]

        # b's store breaks: readyz 503, the hook marks it down and reloads nginx; b gets nothing new.
        tmp_dir = b.state.cache.store.tmp_dir
        shutil.move(tmp_dir, tmp_path / "tmp-aside")
        tmp_dir.write_text("not a directory")
        assert f"server 127.0.0.1:{b.port} max_fails=2 fail_timeout=10s down;" in await hook(upstreams, tmp_path, a, b)
        await asyncio.sleep(1.0)  # the new nginx workers take over
        before = served(a), served(b)
        for _ in range(12):
            await curl("127.0.0.11")
        assert served(b) == before[1] and served(a) == before[0] + 12

        # b recovers; a dies: every request still succeeds, on b.
        tmp_dir.unlink()
        shutil.move(tmp_path / "tmp-aside", tmp_dir)
        assert "down" not in await hook(upstreams, tmp_path, a, b)
        await asyncio.sleep(1.0)
        await a.app.close()
        before = served(a), served(b)
        for _ in range(12):
            assert await curl("127.0.0.12") == body
        assert served(a) == before[0] and served(b) == before[1] + 12
    finally:
        nginx.terminate()
        await asyncio.to_thread(nginx.wait, 10)
