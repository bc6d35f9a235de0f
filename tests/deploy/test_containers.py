"""The Dockerfile and docker-compose.yml, built and run with podman: the image serves a miss and a
hit, keeps its cache on a mounted host directory across a restart, stops gracefully, reports
healthy; the compose stack (gateway + two instances on one volume) serves through the gateway."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ..origin import Origin
from .containers import IMAGE, Podman, start
from .test_gateway import free_port
from .test_readme import fresh_copy

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    folder = tmp_path_factory.mktemp("podman")
    yield start(folder, fresh_copy(folder / "checkout"))


async def get(url: str, tries: int = 1) -> tuple[int, str, bytes]:
    """(status, X-Cache, body); connection errors retried ``tries`` times, 0.25 s apart."""
    async with aiohttp.ClientSession() as session:
        for attempt in range(tries):
            try:
                async with session.get(url) as response:
                    return response.status, response.headers.get("X-Cache", ""), await response.read()
            except aiohttp.ClientError:
                if attempt + 1 == tries:
                    raise
                await asyncio.sleep(0.25)
    raise AssertionError("unreachable")


async def wait_ready(port: int, seconds: float = 60) -> None:
    status, _, body = await get(f"http://127.0.0.1:{port}/_cacheproxy/readyz", tries=int(seconds * 4))
    assert status == 200, body


async def test_image_serves_keeps_its_cache_across_a_restart_and_stops_gracefully(
    podman: Podman, origin: Origin, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o1777)  # writable for the image's user (uid 10001)
    config = tmp_path / "cacheproxy.yaml"
    config.write_text(  # the mounted file, with a variable from the container's environment
        "listen: ${CACHEPROXY_LISTEN:-0.0.0.0:3128}\ncache: {dir: /var/cache/cacheproxy}\n"
        "rules: {allow_private_upstreams: true}\n"
    )
    port = free_port()
    name = f"cacheproxy-test-{port}"
    body = os.urandom(200_000)
    origin.add("/app-2.0.tar.gz", body=body)
    url = f"http://127.0.0.1:{port}/{origin.url('/app-2.0.tar.gz')}"
    await asyncio.to_thread(
        podman, "run", "-d", "--name", name, "--network", "host", "-e", f"CACHEPROXY_LISTEN=127.0.0.1:{port}",
        "-v", f"{cache}:/var/cache/cacheproxy", "-v", f"{config}:/etc/cacheproxy/cacheproxy.yaml:ro", IMAGE,
    )  # fmt: skip
    try:
        await wait_ready(port)
        assert await get(url) == (200, "MISS", body)
        assert await get(url) == (200, "HIT", body)
        health = await asyncio.to_thread(podman, "healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        user = await asyncio.to_thread(podman, "exec", name, "id", "-u")
        assert user.stdout.strip() == "10001"  # not root
        assert any((cache / "objects").iterdir())  # the object is on the host

        stop = await asyncio.to_thread(podman, "stop", "-t", "30", name)
        assert stop.returncode == 0
        state = json.loads((await asyncio.to_thread(podman, "inspect", name)).stdout)[0]["State"]
        assert state["ExitCode"] == 0  # SIGTERM: a graceful stop
        await asyncio.to_thread(podman, "start", name)
        await wait_ready(port)
        assert await get(url) == (200, "HIT", body)  # the mounted cache survived
        assert origin.hits("/app-2.0.tar.gz") == 1
    finally:
        await asyncio.to_thread(podman, "rm", "-f", name, check=False)


async def test_compose_stack_serves_through_the_gateway(podman: Podman, tmp_path: Path) -> None:
    project = tmp_path / "stack"
    shutil.copytree(podman.checkout, project)
    shutil.copy(project / "deploy/compose/cacheproxy.env.example", project / "deploy/compose/cacheproxy.env")
    with open(project / "deploy/compose/cacheproxy.yaml", "a") as f:
        f.write("rules: {allow_private_upstreams: true}  # the test's origin is a container beside them\n")
    (project / "srv").mkdir()
    body = os.urandom(300_000)
    (project / "srv" / "hello-1.0.tar.gz").write_bytes(body)
    (project / "override.yml").write_text(
        "services:\n  origin:\n    image: localhost/cacheproxy:latest\n"
        '    entrypoint: ["python", "-m", "http.server", "8000", "--directory", "/srv"]\n'
        "    volumes: ['./srv:/srv:ro']\n    healthcheck: {disable: true}\n"
    )
    port = free_port()
    name = f"cptest{port}"
    env = {**podman.env, "CACHEPROXY_BIND": "127.0.0.1", "CACHEPROXY_PORT": str(port)}
    compose = ["podman-compose", "-p", name, "-f", "docker-compose.yml", "-f", "override.yml"]

    def run_compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, *args], cwd=project, env=env, capture_output=True, text=True, timeout=600, check=False
        )

    try:
        up = await asyncio.to_thread(run_compose, "up", "-d")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        url = f"http://127.0.0.1:{port}/http://origin:8000/hello-1.0.tar.gz"
        for _ in range(240):  # the gateway waits for the instances' names, then nginx starts
            try:
                first = await get(url)
                if first[0] == 200:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
        else:
            logs = await asyncio.to_thread(podman, "logs", f"{name}_gateway_1", check=False)
            raise AssertionError(f"no answer through the gateway: {logs.stdout[-2000:]}{logs.stderr[-2000:]}")
        assert first == (200, "MISS", body)
        # Once committed (hashed, synced, renamed), a hit from the shared volume whichever instance
        # answers; until then the other instance follows the first one's fill.
        for _ in range(40):
            again = await get(url)
            assert again[0] == 200 and again[2] == body
            if again[1] == "HIT":
                break
            await asyncio.sleep(0.25)
        assert again[1] == "HIT"
        origin_log = await asyncio.to_thread(podman, "logs", f"{name}_origin_1")
        fetches = (origin_log.stdout + origin_log.stderr).count("GET /hello-1.0.tar.gz")
        assert fetches == 1, origin_log.stderr[-2000:]  # one origin fetch for the two instances
        for container in (f"{name}_cacheproxy1_1", f"{name}_cacheproxy2_1", f"{name}_gateway_1"):
            health = await asyncio.to_thread(podman, "healthcheck", "run", container, check=False)
            assert health.returncode == 0, f"{container}: {health.stdout}{health.stderr}"
        upstreams = await asyncio.to_thread(
            podman, "exec", f"{name}_gateway_1", "cat", "/run/cacheproxy-gateway/upstreams.conf"
        )
        assert "server cacheproxy1:3128" in upstreams.stdout and "down" not in upstreams.stdout
    finally:
        await asyncio.to_thread(run_compose, "down")
        await asyncio.to_thread(podman, "network", "rm", f"{name}_default", check=False)
        await asyncio.to_thread(podman, "volume", "rm", f"{name}_cache", check=False)
