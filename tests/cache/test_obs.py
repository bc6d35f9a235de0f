"""storage.backend: obs, against SeaweedFS: uploads, both hit modes, sharing, faults, clean-up."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from pathlib import Path

import aiohttp
import pytest

from cacheproxy.cache.shared import AGE_SLICES, Ages

from ..conftest import MakeProxy, Proxy, curl, obs_client, run
from ..origin import Origin
from ..seaweed import SECRET_KEY, Seaweed

BODY = os.urandom(300_000)


async def uploaded(proxy: Proxy, count: int = 1, timeout: float = 15.0) -> None:
    """Wait until ``count`` objects went up to OBS and nothing waits."""
    shared = proxy.state.shared
    assert shared is not None
    for _ in range(int(timeout / 0.05)):
        done = [m for m in await proxy.stored() if m.remote]
        if len(done) >= count and not shared.pending:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"uploads not done: pending {list(shared.pending)}, problem {shared.problem}")


async def evict_local(proxy: Proxy) -> None:
    """Drop the local copies (what eviction does once they are in OBS)."""
    for meta in await proxy.stored():
        assert meta.remote
        await proxy.state.cache.purge(meta)


async def readyz(proxy: Proxy) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/_cacheproxy/readyz") as response:
            return response.status, await response.json()


async def test_miss_upload_then_redirect_hit(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    origin.add("/pkg.tar.gz", body=BODY)
    proxy = await make_proxy(**seaweed.obs_config(bucket))
    miss = await curl(proxy, origin.url("/pkg.tar.gz"), "-D", "-")
    assert miss.stdout.endswith(BODY) and b"X-Cache: MISS" in miss.stdout
    await uploaded(proxy)
    meta = (await proxy.stored())[0]
    assert obs_client(seaweed).getObjectMetadata(bucket, meta.remote).status == 200  # private, with metadata
    await evict_local(proxy)
    redirect = await curl(proxy, origin.url("/pkg.tar.gz"), "-D", "-", "-o", "/dev/null")
    head = redirect.stdout.decode()
    assert head.startswith("HTTP/1.1 302 ") and "X-Cache: HIT" in head
    location = next(line.split(": ", 1)[1].strip() for line in head.splitlines() if line.startswith("Location:"))
    assert location.startswith(seaweed.endpoint) and "X-Amz-Signature=" in location
    # curl -x … -L follows the signed URL through the proxy too: passed on, never stored again
    followed = await curl(proxy, origin.url("/pkg.tar.gz"), "-L", "-o", str(tmp_path / "f"))
    assert followed.rc == 0 and (tmp_path / "f").read_bytes() == BODY
    await proxy.wait_idle()
    assert len(proxy.state.cache.index) == 0
    ranged = await run("curl", "-sS", "-r", "10-19", location)
    assert ranged.stdout == BODY[10:20]
    unsigned = await run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", location.split("?")[0])
    assert unsigned.stdout == b"403"  # objects are private
    assert origin.hits("/pkg.tar.gz") == 1


async def test_stream_mode_with_range(seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy) -> None:
    origin.add("/pkg.tar.gz", body=BODY)
    proxy = await make_proxy(**seaweed.obs_config(bucket, storage__obs__serve_hits="stream"))
    assert (await curl(proxy, origin.url("/pkg.tar.gz"))).stdout == BODY
    await uploaded(proxy)
    await evict_local(proxy)
    whole = await curl(proxy, origin.url("/pkg.tar.gz"), "-D", "-")
    head, _, body = whole.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"X-Cache: HIT" in head and body == BODY
    part = await curl(proxy, origin.url("/pkg.tar.gz"), "-r", "1000-1999", "-D", "-")
    head, _, body = part.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206 ") and body == BODY[1000:2000]
    assert origin.hits("/pkg.tar.gz") == 1


async def test_two_instances_share_one_bucket(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    origin.add("/shared.tar.xz", body=BODY)
    first = await make_proxy(tmp_path / "a", **seaweed.obs_config(bucket, storage__obs__serve_hits="stream"))
    second = await make_proxy(tmp_path / "b", **seaweed.obs_config(bucket, storage__obs__serve_hits="stream"))
    assert (await curl(first, origin.url("/shared.tar.xz"))).stdout == BODY
    await uploaded(first)
    got = await curl(second, origin.url("/shared.tar.xz"), "-D", "-")
    head, _, body = got.stdout.partition(b"\r\n\r\n")
    assert b"X-Cache: HIT" in head and body == BODY
    assert origin.hits("/shared.tar.xz") == 1  # one origin fetch for both instances
    assert first.state.metrics.obs_uploads.labels("ok")._value.get() == 1
    assert second.state.metrics.obs_lookups.labels("hit")._value.get() == 1
    # The second instance's listing sees it too.
    shared = second.state.shared
    assert shared is not None
    await shared.refresh()
    assert shared.objects == 1 and shared.ages.total == len(BODY)


async def test_listing_drops_what_a_head_showed_once_it_is_gone(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """An object seen by a HEAD is trusted for index_refresh; a listing that shows it unchanged
    keeps it, one that shows it gone (another instance purged it) drops it at once."""
    origin.add("/gone.tar.xz", body=BODY)
    config = seaweed.obs_config(bucket, storage__obs__index_refresh="1h")
    first = await make_proxy(tmp_path / "a", **config)
    second = await make_proxy(tmp_path / "b", **config)
    assert (await curl(first, origin.url("/gone.tar.xz"))).stdout == BODY
    await uploaded(first)
    (meta,) = await first.stored()
    shared = second.state.shared
    assert shared is not None
    looked = shared.metrics.obs_lookups.labels("hit")
    assert await shared.lookup(meta.key) is not None and looked._value.get() == 1
    await shared.refresh()  # unchanged: still trusted, no second HEAD
    assert await shared.lookup(meta.key) is not None and looked._value.get() == 1
    assert obs_client(seaweed).deleteObject(bucket, meta.remote).status < 300
    assert await shared.lookup(meta.key) is not None  # trusted until a listing says otherwise
    await shared.refresh()
    assert await shared.lookup(meta.key) is None
    assert shared.objects == 0


async def test_obs_down_serving_goes_on_and_uploads_wait(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy, unused_tcp_port: int
) -> None:
    origin.add("/a.tar.gz", body=BODY)
    origin.add("/b.tar.gz", body=BODY)
    origin.add("/c.tar.gz", body=BODY)
    proxy = await make_proxy(
        **seaweed.obs_config(bucket, storage__obs__endpoint=f"http://127.0.0.1:{unused_tcp_port}"),
        cache__max_size="700KB",  # two objects: eviction would want to drop one
    )
    for name in ("/a.tar.gz", "/b.tar.gz", "/c.tar.gz"):
        assert (await curl(proxy, origin.url(name))).stdout == BODY
    await proxy.wait_idle()
    status, body = await readyz(proxy)
    assert status == 503
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["obs"]["ok"] is False and "ConnectionRefused" in checks["obs"]["error"]
    assert checks["obs"]["pending_uploads"] == 3
    text, _ = proxy.state.metrics.render()
    assert b"cacheproxy_obs_pending_uploads 3.0" in text
    await proxy.state.cache.evict_if_needed()
    assert len(proxy.state.cache.index) == 3  # never evicted before its upload
    hit = await curl(proxy, origin.url("/a.tar.gz"), "-D", "-")
    assert b"X-Cache: HIT" in hit.stdout  # from the local tier


async def test_missing_bucket_then_created_uploads_retried(
    seaweed: Seaweed, origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    name = f"cp-later-{os.getpid()}"
    origin.add("/late.tar.gz", body=BODY)
    proxy = await make_proxy(**seaweed.obs_config(name, storage__obs__index_refresh="200ms"))
    for _ in range(100):
        status, body = await readyz(proxy)
        if "not checked yet" not in json.dumps(body):
            break
        await asyncio.sleep(0.05)
    assert status == 503 and "404" in json.dumps(body)  # the bucket is missing: named in readyz
    # A miss is still served (from the origin) and stored locally; its upload waits.
    assert (await curl(proxy, origin.url("/late.tar.gz"))).stdout == BODY
    created = obs_client(seaweed).createBucket(name)
    assert created.status < 300 or created.status == 409  # SeaweedFS may make it on the first PUT
    await uploaded(proxy, timeout=20)
    for _ in range(100):
        if (await readyz(proxy))[0] == 200:
            break
        await asyncio.sleep(0.1)
    assert (await readyz(proxy))[0] == 200
    assert SECRET_KEY not in caplog.text


async def test_wrong_credentials_are_named_and_secret_never_logged(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    origin.add("/x.tar.gz", body=BODY)
    proxy = await make_proxy(**seaweed.obs_config(bucket, storage__obs__secret_access_key="wrong-secret-value"))
    assert (await curl(proxy, origin.url("/x.tar.gz"))).stdout == BODY  # the origin still serves
    await asyncio.sleep(0.3)
    status, body = await readyz(proxy)
    assert status == 503 and "403" in json.dumps(body)
    assert "wrong-secret-value" not in caplog.text and "wrong-secret-value" not in json.dumps(body)


async def test_bucket_clean_up_oldest_first(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(**seaweed.obs_config(bucket, storage__obs__max_size="700KB"))
    for i, name in enumerate(("/1.tar.gz", "/2.tar.gz", "/3.tar.gz")):
        origin.add(name, body=BODY)
        assert (await curl(proxy, origin.url(name))).stdout == BODY
        await uploaded(proxy, i + 1)
        await asyncio.sleep(1.1)  # listings give times in seconds
    shared = proxy.state.shared
    assert shared is not None
    assert await shared.cleanup() == 1
    await shared.refresh()
    listed = [entry.object_key.rsplit("/", 1)[1] async for entry in shared.remote.entries()]
    assert sorted(listed) == ["2.tar.gz", "3.tar.gz"] and shared.objects == 2


async def test_bucket_clean_up_by_age(seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(**seaweed.obs_config(bucket, storage__obs__max_age="2s"))
    origin.add("/old.tar.gz", body=BODY)
    assert (await curl(proxy, origin.url("/old.tar.gz"))).stdout == BODY
    await uploaded(proxy)
    shared = proxy.state.shared
    assert shared is not None
    assert await shared.cleanup() == 0  # young enough
    await asyncio.sleep(3.1)
    assert await shared.cleanup() == 1
    await shared.refresh()
    assert shared.objects == 0


async def test_silent_obs_does_not_hold_up_misses(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint that accepts and never answers: after the first failed check, misses go
    straight to the origin instead of waiting for a HEAD to time out."""
    from cacheproxy.storage import obs

    monkeypatch.setattr(obs, "OBS_TIMEOUT", 1)
    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        origin.add("/quick.tar.gz", body=BODY)
        proxy = await make_proxy(**seaweed.obs_config(bucket, storage__obs__endpoint=f"http://127.0.0.1:{port}"))
        for _ in range(100):
            status, body = await readyz(proxy)
            if "not checked yet" not in json.dumps(body):
                break
            await asyncio.sleep(0.1)
        assert status == 503
        started = asyncio.get_running_loop().time()
        assert (await curl(proxy, origin.url("/quick.tar.gz"))).stdout == BODY
        assert asyncio.get_running_loop().time() - started < 0.9
    finally:
        for writer in silent:
            writer.close()
        server.close()


class Relay:
    """A TCP relay to SeaweedFS on a fixed port that can be switched off and on (OBS going away)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        await self.server.wait_closed()


async def test_obs_going_away_and_coming_back(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    relay = Relay(seaweed.port)
    await relay.start()
    try:
        proxy = await make_proxy(
            **seaweed.obs_config(
                bucket, storage__obs__endpoint=f"http://127.0.0.1:{relay.port}", storage__obs__index_refresh="300ms"
            )
        )
        origin.add("/one.tar.gz", body=BODY)
        origin.add("/two.tar.gz", body=BODY)
        assert (await curl(proxy, origin.url("/one.tar.gz"))).stdout == BODY
        await uploaded(proxy)
        assert (await readyz(proxy))[0] == 200
        await relay.stop()  # OBS goes away while serving
        assert (await curl(proxy, origin.url("/two.tar.gz"))).stdout == BODY  # still served
        await proxy.wait_idle()  # committed locally (the commit follows the last byte)
        for _ in range(100):
            if (await readyz(proxy))[0] == 503:
                break
            await asyncio.sleep(0.1)
        status, body = await readyz(proxy)
        assert status == 503 and body["checks"]["obs"]["pending_uploads"] == 1  # type: ignore[index]
        hit = await curl(proxy, origin.url("/one.tar.gz"), "-D", "-")
        assert b"X-Cache: HIT" in hit.stdout  # the local tier
        await relay.start()  # back, on the same port
        await uploaded(proxy, 2, timeout=20)
        for _ in range(100):
            if (await readyz(proxy))[0] == 200:
                break
            await asyncio.sleep(0.1)
        assert (await readyz(proxy))[0] == 200
        assert origin.hits("/one.tar.gz") == 1 and origin.hits("/two.tar.gz") == 1
    finally:
        if relay.server is not None and relay.server.is_serving():
            await relay.stop()


async def test_stale_shared_object_is_revalidated_in_place(
    seaweed: Seaweed, bucket: str, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.add("/notes.txt", body=b"release notes\n" * 100, headers={"Cache-Control": "max-age=1"})
    proxy = await make_proxy(**seaweed.obs_config(bucket, storage__obs__serve_hits="stream"))
    assert (await curl(proxy, origin.url("/notes.txt"))).rc == 0
    await uploaded(proxy)
    meta = (await proxy.stored())[0]
    before = meta.response_time
    await evict_local(proxy)
    await asyncio.sleep(1.2)  # stale now
    again = await curl(proxy, origin.url("/notes.txt"), "-D", "-")
    assert b"X-Cache: REVALIDATED" in again.stdout and again.stdout.endswith(b"release notes\n" * 100)
    assert origin.log[-1].headers.get("If-None-Match") == '"v1"'  # a conditional request, answered 304
    shared = proxy.state.shared
    assert shared is not None
    stored = await shared.remote.stat(meta.key)
    assert stored is not None and stored.response_time > before  # the new freshness went up to OBS
    assert len(proxy.state.cache.index) == 0  # and no local copy was made of a body we do not hold


def test_ages_stay_small_and_find_the_oldest_bytes() -> None:
    """A budget needs the bucket's bytes by age, not its listing: slices double in length past
    AGE_SLICES, so 1 000 000 objects cost no more than 4 096 numbers."""
    ages = Ages()
    for second in range(10_000):
        ages.add(1_000_000 + second + 0.5, 100)
    assert len(ages.slices) <= AGE_SLICES and ages.width == 4 and ages.total == 1_000_000
    assert ages.cutoff(2_000_000) == 1_000_000  # under the budget: nothing written before the first
    assert ages.cutoff(500_000) == 1_005_000  # the older half goes
    assert ages.cutoff(499_999) == 1_005_004  # to a slice: one more slice goes
    assert ages.cutoff(0) == math.inf and Ages().cutoff(0) == -math.inf
