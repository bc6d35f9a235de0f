"""Fixtures: a real origin and a real cacheproxy on ephemeral loopback ports, and real clients."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from obs import ObsClient
from yarl import URL

from cacheproxy.app import App
from cacheproxy.config import load_config
from cacheproxy.state import AppState
from cacheproxy.storage.base import ObjectMeta

from .origin import Origin
from .seaweed import ACCESS_KEY, SECRET_KEY, Seaweed, start_seaweed

for tool in ("wget", "curl"):
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is needed by the tests: run the README's test command, which installs it")


@dataclass
class Proxy:
    app: App
    port: int
    cache_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> AppState:
        return self.app.state

    def in_path(self, origin_url: str) -> URL:
        return URL(f"{self.url}/{origin_url}", encoded=True)

    async def get(self, origin_url: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, bytes]:
        """GET through the proxy in absolute-form, as curl -x and wget do."""
        return await self.request("GET", origin_url, **kwargs)

    async def request(self, method: str, origin_url: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, bytes]:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.request(method, origin_url, proxy=self.url, **kwargs) as response:
                return response, await response.read()

    async def stored(self) -> list[ObjectMeta]:
        """The stored objects, least recently used first (read from the store where need be)."""
        cache = self.state.cache
        found = [await cache.stored(key) for key in cache.index.by_access()]
        return [m for m in found if m is not None]

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no fill runs (a fill outlives the client that started it)."""
        for _ in range(int(timeout / 0.02)):
            if not self.state.cache.fills:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("fills still running")


MakeProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = Origin()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
def origin_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_origin(origin_ca: trustme.CA, tmp_path: Path) -> AsyncIterator[Origin]:
    """An https origin for ``localhost`` and ``127.0.0.1``; its CA's PEM is at ``ca_file(tls_origin)``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    origin_ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    server = Origin(context)
    origin_ca.cert_pem.write_to_path(str(tmp_path / "origin-ca.pem"))
    await server.start()
    yield server
    await server.stop()


def origin_ca_file(tmp_path: Path) -> Path:
    """The PEM of the CA that signed ``tls_origin``'s certificate (as the fixture wrote it)."""
    return tmp_path / "origin-ca.pem"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


def obs_client(seaweed: Seaweed, secret: str = SECRET_KEY) -> ObsClient:
    return ObsClient(
        access_key_id=ACCESS_KEY,
        secret_access_key=secret,
        server=seaweed.endpoint,
        signature="v4",
        path_style=True,
        is_secure=False,
        is_signature_negotiation=False,
        region="us-east-1",
    )


@pytest.fixture
def bucket(seaweed: Seaweed) -> str:
    """A new empty bucket on the session's SeaweedFS (the server may still be settling at first)."""
    name = f"cp-{uuid.uuid4().hex[:12]}"
    client = obs_client(seaweed)
    for _ in range(100):
        response = client.createBucket(name)
        if response.status < 300:
            return name
        time.sleep(0.2)
    raise RuntimeError(f"cannot create bucket {name}: {response.status} {response.errorCode}")


def config_values(cache_dir: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "cache.dir": str(cache_dir),
        "rules.allow_private_upstreams": True,
        "upstream.retry_backoff": "10ms",
        "upstream.connect_timeout": "2s",
        "upstream.read_timeout": "2s",
        "log.level": "debug",
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return values


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[MakeProxy]:
    apps: list[App] = []

    async def make(cache_dir: Path | None = None, **overrides: Any) -> Proxy:
        """A proxy; ``overrides`` are config keys with ``__`` for dots (``rules__negative_ttl=0``)."""
        cache_dir = cache_dir or tmp_path / "cache"
        config = load_config(None, config_values(cache_dir, **overrides))
        app = App(config, grace=1.0)
        await app.start()
        apps.append(app)
        port = await app.listen("127.0.0.1", 0)
        return Proxy(app, port, cache_dir)

    yield make
    for app in reversed(apps):
        await app.close()


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy()


@dataclass
class Run:
    rc: int
    stdout: bytes
    stderr: str


async def run(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> Run:
    """Run a real client without blocking the event loop the servers live in."""
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Run(process.returncode, stdout, stderr.decode(errors="replace"))


def curl(proxy: Proxy, url: str, *extra: str) -> Awaitable[Run]:
    return run("curl", "-sS", "--noproxy", "", "-x", proxy.url, *extra, url)


def wget(proxy: Proxy, url: str, output: Path, *extra: str) -> Awaitable[Run]:
    return run(
        "wget",
        "-q",
        "--tries=1",
        "-e",
        "use_proxy=yes",
        "-e",
        f"http_proxy=127.0.0.1:{proxy.port}",
        "-O",
        str(output),
        *extra,
        url,
    )
