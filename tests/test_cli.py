"""The cacheproxy command as a real process: config errors, crash safety, graceful stop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import yaml

from .conftest import run
from .origin import Origin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, port: int, **extra: object) -> Path:
    config = {
        "listen": f"127.0.0.1:{port}",
        "cache": {"dir": str(tmp_path / "cache")},
        "rules": {"allow_private_upstreams": True},
        "upstream": {"retry_backoff": "10ms"},
        **extra,
    }
    path = tmp_path / "cacheproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@asynccontextmanager
async def cacheproxy_process(config: Path, port: int, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cacheproxy",
        "serve",
        "-c",
        str(config),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/_cacheproxy/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("cacheproxy did not become ready")
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache:\n  max_size: lots\n  colour: red\nupstream:\n  retries: -1\n")
    result = await run(sys.executable, "-m", "cacheproxy", "check-config", "-c", str(bad))
    assert result.rc == 2
    assert f"{bad}:cache.max_size: not a size" in result.stderr
    assert f"{bad}:cache.colour: unknown key" in result.stderr
    assert f"{bad}:upstream.retries:" in result.stderr
    assert "Traceback" not in result.stderr
    result = await run(sys.executable, "-m", "cacheproxy", "serve", "-c", str(bad))
    assert result.rc == 2 and "cache.max_size" in result.stderr
    result = await run(sys.executable, "-m", "cacheproxy", "check-config", "-c", str(tmp_path / "missing.yaml"))
    assert result.rc == 2 and "cannot read config file" in result.stderr


async def test_check_config_prints_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "storage:\n  backend: obs\n  obs:\n    endpoint: http://127.0.0.1:1\n"
        "    access_key_id: AKID\n    secret_access_key: ${TEST_SECRET_SK}\n"
        "upstream:\n  parent_proxy: http://squid:parentpw1@127.0.0.1:3\n"
        "  mirrors: [[https://m1.example/gnu/, 'https://mirror:mirrorpw2@m2.example/gnu/?token=tokpw3&x=1']]\n"
    )
    env = {**os.environ, "TEST_SECRET_SK": "very-secret-value"}
    result = await run(sys.executable, "-m", "cacheproxy", "check-config", "-c", str(good), env=env)
    assert result.rc == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["storage"]["obs"]["endpoint"] == "http://127.0.0.1:1"
    assert effective["listen"] == ["127.0.0.1:3128"] and effective["cache"]["dir"] == "cache"
    assert b"very-secret-value" not in result.stdout and b"AKID" not in result.stdout
    for secret in (b"parentpw1", b"mirrorpw2", b"tokpw3"):
        assert secret not in result.stdout
    assert effective["upstream"]["mirrors"][0][1].startswith("https://mirror:")  # the rest of the URL stays
    assert "x=1" in effective["upstream"]["mirrors"][0][1]


async def test_alert_settings_are_taken_and_their_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "alerts:\n  failure_threshold: 5\n  webhook: {url: 'http://hook.example/x?token=hooksecret1'}\n"
        "  email: {host: mail.example, password: mailsecret2, from: a@example.test, to: [b@example.test]}\n"
    )
    result = await run(sys.executable, "-m", "cacheproxy", "check-config", "-c", str(config))
    assert result.rc == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["alerts"]["failure_threshold"] == 5
    assert effective["alerts"]["webhook"]["url"].startswith("http://hook.example/x?token=")
    assert b"hooksecret1" not in result.stdout and b"mailsecret2" not in result.stdout
    config.write_text("alerts: {email: {host: mail.example}}\n")
    result = await run(sys.executable, "-m", "cacheproxy", "check-config", "-c", str(config))
    assert result.rc == 2 and f"{config}:alerts.email: from and to are required" in result.stderr


async def test_admin_tokens_are_taken_and_masked(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("admin: {tokens: [tokensecret9]}\n")
    result = await run(sys.executable, "-m", "cacheproxy", "check-config", "-c", str(config))
    assert result.rc == 0, result.stderr
    assert b"tokensecret9" not in result.stdout and yaml.safe_load(result.stdout)["admin"]["tokens"]
    sample = Path(__file__).parent.parent / "conf" / "cacheproxy.yaml"
    result = await run(sys.executable, "-m", "cacheproxy", "check-config", "-c", str(sample))
    assert result.rc == 0, result.stderr


async def test_kill_9_during_fill_leaves_no_partial_object(origin: Origin, tmp_path: Path) -> None:
    route = origin.add("/crash.tar.gz", body=os.urandom(2 << 20), rate=1 << 20)
    port = free_port()
    config = write_config(tmp_path, port)
    proxy_url = f"http://127.0.0.1:{port}"
    async with cacheproxy_process(config, port) as process:
        async with aiohttp.ClientSession() as session:
            async with session.get(origin.url("/crash.tar.gz"), proxy=proxy_url) as response:
                await response.content.readexactly(300_000)
                process.send_signal(signal.SIGKILL)
                await process.wait()
    objects = tmp_path / "cache" / "objects"
    assert not list(objects.rglob("*.json")), "no object may be visible after a crash mid-fill"
    assert list((tmp_path / "cache" / "tmp").glob("*.part")), "the crash left its temp file (removed at start)"
    async with cacheproxy_process(config, port):
        assert not list((tmp_path / "cache" / "tmp").glob("*.part"))
        async with aiohttp.ClientSession() as session:
            async with session.get(origin.url("/crash.tar.gz"), proxy=proxy_url) as response:
                body = await response.read()
                assert response.headers["X-Cache"] == "MISS"
    assert hashlib.sha256(body).hexdigest() == route.sha256
    assert origin.hits("/crash.tar.gz") == 2


async def test_sigterm_lets_running_transfers_finish(origin: Origin, tmp_path: Path) -> None:
    route = origin.add("/drain.tar.gz", body=os.urandom(1 << 20), rate=1 << 20)  # about 1 s
    port = free_port()
    config = write_config(tmp_path, port)
    async with cacheproxy_process(config, port, "--grace", "20s") as process:
        async with aiohttp.ClientSession() as session:
            async with session.get(origin.url("/drain.tar.gz"), proxy=f"http://127.0.0.1:{port}") as response:
                first = await response.content.readexactly(100_000)
                process.send_signal(signal.SIGTERM)
                rest = await response.read()
        assert first + rest == route.body
        assert await asyncio.wait_for(process.wait(), 20) == 0
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "no longer accepting"


def children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_workers_share_the_port_and_fetch_once(origin: Origin, tmp_path: Path) -> None:
    route = origin.add("/w.tar.gz", body=os.urandom(2 << 20), rate=4 << 20)  # about 0.5 s
    port = free_port()
    config = write_config(tmp_path, port, workers=2)
    proxy_url = f"http://127.0.0.1:{port}"
    url = origin.url("/w.tar.gz")
    async with cacheproxy_process(config, port) as process:
        workers = children_of(process.pid)
        assert len(workers) == 2
        # Each client on its own connection: the kernel spreads them over both workers.
        results = await asyncio.gather(*(run("curl", "-sS", "-x", proxy_url, url) for _ in range(20)))
        assert all(hashlib.sha256(r.stdout).hexdigest() == route.sha256 for r in results)
        assert origin.hits("/w.tar.gz") == 1
        await asyncio.sleep(0.2)  # the commit follows the last byte
        headers = await asyncio.gather(
            *(run("curl", "-sS", "-o", "/dev/null", "-D", "-", "-x", proxy_url, url) for _ in range(20))
        )
        assert all(b"X-Cache: HIT" in h.stdout for h in headers), "every worker answers from the shared store"
        # A worker that dies is replaced; the port keeps serving meanwhile.
        os.kill(workers[0], signal.SIGKILL)
        for _ in range(100):
            now = children_of(process.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the dead worker was not replaced")
        again = await run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy_url, url)
        assert again.stdout == b"200"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert origin.hits("/w.tar.gz") == 1


async def test_workers_end_with_their_supervisor(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port, workers=2)
    async with cacheproxy_process(config, port) as process:
        workers = children_of(process.pid)
        process.send_signal(signal.SIGKILL)  # no chance to stop them itself
        await process.wait()
        for _ in range(100):
            if not any(_alive(pid) for pid in workers):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("workers outlived their supervisor")
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "nobody serves the port any more"


def _alive(pid: int) -> bool:
    """Running (a zombie waits only for its parent to collect it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


async def test_ca_init_and_a_config_that_uses_it(tmp_path: Path) -> None:
    out = tmp_path / "ca"
    made = await run(sys.executable, "-m", "cacheproxy", "ca", "init", "--out", str(out))
    assert made.rc == 0, made.stderr
    assert (out / "ca.key").stat().st_mode & 0o777 == 0o600
    assert b"BEGIN CERTIFICATE" in (out / "ca.pem").read_bytes()
    again = await run(sys.executable, "-m", "cacheproxy", "ca", "init", "--out", str(out))
    assert again.rc == 1 and "exists" in again.stderr  # an existing CA is never replaced silently
    tls = {"enabled": True, "ca_cert": str(out / "ca.pem"), "ca_key": str(out / "ca.key")}
    config = write_config(tmp_path, free_port(), tls_intercept=tls)
    checked = await run(sys.executable, "-m", "cacheproxy", "check-config", "-c", str(config))
    assert checked.rc == 0, checked.stderr
    # A key that is not the certificate's: refused with the key's name, no traceback.
    other = tmp_path / "other"
    assert (await run(sys.executable, "-m", "cacheproxy", "ca", "init", "--out", str(other))).rc == 0
    config = write_config(tmp_path, free_port(), tls_intercept={**tls, "ca_key": str(other / "ca.key")})
    checked = await run(sys.executable, "-m", "cacheproxy", "check-config", "-c", str(config))
    assert checked.rc == 2
    assert "tls_intercept.ca_key" in checked.stderr and "Traceback" not in checked.stderr


async def test_default_log_settings_write_access_lines_to_stderr_with_secrets_masked(
    origin: Origin, tmp_path: Path
) -> None:
    """log.access_log "-": the access lines reach standard error (what systemd and docker keep),
    through the same writer thread as a file; a malformed request is one line, no traceback."""
    origin.add("/e.tar.gz", body=b"e" * 10)
    port = free_port()
    config = write_config(tmp_path, port)
    async with cacheproxy_process(config, port) as process:
        async with aiohttp.ClientSession() as session:
            async with session.get(origin.url("/e.tar.gz"), proxy=f"http://127.0.0.1:{port}") as response:
                assert response.status == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET http://user:hunter2@127.0.0.1:1/x HTTP/1.1\nHost: x\n\n")
        assert (await reader.read()).split(b" ")[1] == b"400"
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /http:/user:hunter3@127.0.0.1:{port + 1}/y.tar.gz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await asyncio.sleep(1.0)  # the writer thread flushes every 0.5 s
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    text = stderr.decode()
    assert f'"GET {origin.url("/e.tar.gz")}" 200 10 MISS' in text
    assert '"- -" 400 0 - ' in text and text.count(" bad_request") == 1
    assert "user:***@127.0.0.1" in text and "/http:/user:***@" in text
    assert "hunter2" not in text and "hunter3" not in text and "Traceback" not in text
