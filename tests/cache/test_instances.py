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

from cacheproxy.cache.fill import Hit
from cacheproxy.storage.flight import FillLock, HeadFile

from ..conftest import MakeProxy, Proxy
from ..origin import Origin
from ..seaweed import Seaweed
from .test_obs import uploaded

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


async def leases_probed(proxy: Proxy) -> bool | None:
    """Whether the endpoint refuses a second If-None-Match: * PUT, once the instance has probed it."""
    shared = proxy.state.shared
    assert shared is not None
    for _ in range(200):
        if shared.leases_work is not None:
            break
        await asyncio.sleep(0.05)
    return shared.leases_work


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
        assert await leases_probed(proxy) is True
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
    await leases_probed(a)
    assert a.state.shared is not None
    key = a.state.cache.key_for(URL(origin.url("/orphan-1.0.tar.gz")))
    assert await a.state.shared.remote.take_lease(key, "an instance that died")
    response, body = await a.get(origin.url("/orphan-1.0.tar.gz"))
    assert response.status == 200 and body == b"orphan" * 1000
    assert origin.hits("/orphan-1.0.tar.gz") == 1


@pytest.mark.parametrize(
    ("served", "asked", "answer"),
    [
        ({"Cache-Control": "no-cache"}, {}, "REVALIDATED"),  # the answer says: validate it every time
        ({"Cache-Control": "max-age=3600"}, {"Cache-Control": "no-cache"}, "REVALIDATED"),  # the request says so
        ({"Cache-Control": "max-age=3600"}, {}, "HIT"),  # fresh, and nothing asks for more
    ],
)
@pytest.mark.parametrize("other", ["done", "committing", "last byte in"])
async def test_what_another_instance_stored_after_the_look_is_used_by_the_same_rules(
    make_proxy: MakeProxy,
    origin: Origin,
    tmp_path: Path,
    served: dict[str, str],
    asked: dict[str, str],
    answer: str,
    other: str,
) -> None:
    """B found nothing for the URL and starts a fill; A commits the object just then (with
    several workers: a client's second request reaching the other worker while the first one
    still commits). B's fill then finds the object (A is ``done``; or still holds the lock,
    ``committing`` before or after it published the head of a body whose ``last byte`` is in),
    and answers with it only as any stored object may be answered with: a no-cache answer or a
    no-cache request is validated with the origin first, as within one process."""
    path = f"/late-{len(asked)}-{served['Cache-Control']}.txt"
    origin.add(path, body=b"late" * 100, headers=served)
    a = await make_proxy(tmp_path / "shared")
    b = await make_proxy(tmp_path / "shared")
    response, body = await a.get(origin.url(path))
    assert response.status == 200 and body == b"late" * 100
    await a.wait_idle()
    assert origin.hits(path) == 1

    url = URL(origin.url(path))
    cache = b.state.cache
    key = cache.key_for(url)
    assert key not in cache.index  # B's look found nothing: the state just before A committed
    lock = FillLock.for_key(cache.store.tmp_dir, key)
    if other != "done":  # A's commit is still going on: B follows it to its end
        assert lock.try_acquire()
    if other == "last byte in":
        part = cache.store.tmp_dir / "late.part"
        part.write_bytes(b"late" * 100)
        lock.publish(HeadFile(part, [("Content-Length", "400"), *served.items()], 400))
    fill = cache.fetcher.start(key, url, None, asked)
    if other != "done":
        await asyncio.sleep(0.2)
        assert not fill.head.done()  # waiting for A's commit, not streaming its part file
        lock.release()
    outcome = await asyncio.wait_for(asyncio.shield(fill.head), 10)
    await asyncio.wait_for(asyncio.shield(fill.done), 10)
    assert isinstance(outcome, Hit) and outcome.x_cache == answer
    if answer == "REVALIDATED":
        assert origin.hits(path) == 2
        assert origin.log[-1].headers.get("If-None-Match") == '"v1"'  # a validation, not a new download
    else:
        assert origin.hits(path) == 1


async def test_what_another_instance_uploaded_after_the_look_is_validated_when_it_says_no_cache(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """The same through the bucket: B's fill finds, when it goes for the lease, that A uploaded a
    no-cache answer meanwhile; B validates it with the origin before answering with it."""
    origin.add("/late-bucket.txt", body=b"late" * 100, headers={"Cache-Control": "no-cache"})
    config = seaweed.obs_config(bucket)
    a = await make_proxy(tmp_path / "a", **config)
    b = await make_proxy(tmp_path / "b", **config)
    response, _ = await a.get(origin.url("/late-bucket.txt"))
    assert response.status == 200
    await uploaded(a)
    assert await leases_probed(b) is True
    url = URL(origin.url("/late-bucket.txt"))
    fill = b.state.cache.fetcher.start(b.state.cache.key_for(url), url, None, {})
    outcome = await asyncio.wait_for(asyncio.shield(fill.head), 10)
    await asyncio.wait_for(asyncio.shield(fill.done), 10)
    assert isinstance(outcome, Hit) and outcome.x_cache == "REVALIDATED"
    assert origin.hits("/late-bucket.txt") == 2
    assert origin.log[-1].headers.get("If-None-Match") == '"v1"'
