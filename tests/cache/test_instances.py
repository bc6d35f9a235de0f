"""Several instances, one cold object, 20 clients spread over them: one origin fetch, whether the
instances share a local volume (the fill lock files) or only an OBS bucket (a lease object created
with If-None-Match: *, which SeaweedFS honours like S3)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from ..conftest import MakeProxy, Proxy
from ..origin import Origin
from ..seaweed import Seaweed

pytestmark = pytest.mark.timeout(90)
BODY = os.urandom(2 << 20)


async def twenty_clients(origin_url: str, *proxies: Proxy) -> list[bytes]:
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> bytes:
            proxy = proxies[i % len(proxies)]
            async with session.get(f"{proxy.url}/{origin_url}") as response:
                assert response.status == 200
                return await response.read()

        return await asyncio.gather(*(one(i) for i in range(20)))


async def test_instances_on_one_local_volume_fetch_once(make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> None:
    origin.add("/one-volume-1.0.tar.gz", body=BODY, rate=8 << 20)
    a = await make_proxy(tmp_path / "shared")
    b = await make_proxy(tmp_path / "shared")
    bodies = await twenty_clients(origin.url("/one-volume-1.0.tar.gz"), a, b)
    assert all(body == BODY for body in bodies)
    assert origin.hits("/one-volume-1.0.tar.gz") == 1


async def test_instances_sharing_a_bucket_fetch_once(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    origin.add("/one-bucket-1.0.tar.gz", body=BODY, rate=8 << 20)
    config = seaweed.obs_config(bucket, storage__obs__serve_hits="stream")
    a = await make_proxy(tmp_path / "a", **config)
    b = await make_proxy(tmp_path / "b", **config)
    for proxy in (a, b):  # the endpoint was probed: it refuses a second If-None-Match: * PUT
        shared = proxy.state.shared
        assert shared is not None
        for _ in range(200):
            if shared.leases_work is not None:
                break
            await asyncio.sleep(0.05)
        assert shared.leases_work is True
    bodies = await twenty_clients(origin.url("/one-bucket-1.0.tar.gz"), a, b)
    assert all(body == BODY for body in bodies)
    assert origin.hits("/one-bucket-1.0.tar.gz") == 1
    for proxy in (a, b):  # no lease left behind
        assert proxy.state.shared is not None and not proxy.state.shared._leases


async def test_a_lease_whose_fetch_died_is_taken_over(
    seaweed: Seaweed,
    bucket: str,
    origin: Origin,
    make_proxy: MakeProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance that took the lease and vanished: after LEASE_STALE without a renewal, another
    instance fetches the object itself."""
    from cacheproxy.cache import shared as shared_module

    monkeypatch.setattr(shared_module, "LEASE_STALE", 1.0)
    origin.add("/orphan-1.0.tar.gz", body=b"orphan" * 1000)
    a = await make_proxy(tmp_path / "a", **seaweed.obs_config(bucket))
    assert a.state.shared is not None
    for _ in range(200):
        if a.state.shared.leases_work is not None:
            break
        await asyncio.sleep(0.05)
    key = a.state.cache.key_for(URL(origin.url("/orphan-1.0.tar.gz")))
    assert await a.state.shared.remote.take_lease(key, "an instance that died")
    response, body = await a.get(origin.url("/orphan-1.0.tar.gz"))
    assert response.status == 200 and body == b"orphan" * 1000
    assert origin.hits("/orphan-1.0.tar.gz") == 1
