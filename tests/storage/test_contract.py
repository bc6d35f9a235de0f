"""One contract, two backends: the local directory and OBS (against SeaweedFS, which checks
signatures)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cacheproxy.config import load_config
from cacheproxy.storage.base import Digests, ObjectMeta, Storage
from cacheproxy.storage.local import LocalStore
from cacheproxy.storage.obs import LIST_PAGE, ObsStore, ObsUnavailable

from ..conftest import config_values, obs_client
from ..seaweed import Seaweed


def obs_store(seaweed: Seaweed, bucket: str, tmp_path: Path, **more: object) -> ObsStore:
    config = load_config(None, config_values(tmp_path / "cache", **seaweed.obs_config(bucket, **more)))
    return ObsStore(config.storage.obs, tmp_path / "spool")


@pytest.fixture(params=["local", "obs"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    seaweed = request.getfixturevalue("seaweed")
    backend = obs_store(seaweed, request.getfixturevalue("bucket"), tmp_path)
    yield backend
    await backend.close()


def meta_for(url: str, body: bytes) -> ObjectMeta:
    now = time.time()
    return ObjectMeta(
        key=url,
        url=url,
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        md5=hashlib.md5(body, usedforsecurity=False).hexdigest(),
        stored_at=now,
        response_time=now,
        content_type="application/gzip",
        etag='"e1"',
    )


async def put(store: Storage, url: str, body: bytes) -> ObjectMeta:
    writer = await store.begin_write(url)
    await writer.write([body[: len(body) // 2], body[len(body) // 2 :]])
    assert writer.written == len(body)
    assert await writer.digests() == Digests(
        hashlib.sha256(body).hexdigest(), hashlib.sha512(body).hexdigest(), hashlib.md5(body).hexdigest()
    )
    return await writer.commit(meta_for(url, body))


async def read_all(store: Storage, meta: ObjectMeta, start: int = 0, stop: int | None = None) -> bytes:
    return b"".join([piece async for piece in store.read(meta, start, stop)])


async def test_write_commit_stat_read(store: Storage) -> None:
    body = os.urandom(3_000_000)
    url = "https://example.org/pub/pkg-1.0.tar.gz"
    assert await store.stat(url) is None
    stored = await put(store, url, body)
    found = await store.stat(url)
    assert found is not None
    assert (found.url, found.size, found.sha256, found.content_type) == (
        url,
        len(body),
        stored.sha256,
        "application/gzip",
    )
    assert await read_all(store, found) == body
    assert await read_all(store, found, 1000, 2000) == body[1000:2000]  # a range
    assert await store.check_writable() is None


async def test_abort_leaves_nothing(store: Storage) -> None:
    url = "https://example.org/pub/broken.tar.gz"
    writer = await store.begin_write(url)
    await writer.write(b"half a body")
    await writer.abort()
    assert await store.stat(url) is None
    assert [m async for m in store.scan()] == []


async def test_update_meta_delete_and_scan(store: Storage) -> None:
    a = await put(store, "https://example.org/a.tar.gz", b"a" * 1000)
    b = await put(store, "https://example.org/b.tar.gz", b"b" * 2000)
    found = await store.stat(a.key)
    assert found is not None
    found.etag = '"e2"'
    await store.update_meta(found)
    again = await store.stat(a.key)
    assert again is not None and again.etag == '"e2"'
    assert await read_all(store, again) == b"a" * 1000  # the body is untouched
    assert sorted(m.url for m in [m async for m in store.scan()]) == [a.url, b.url]
    await store.delete(again)
    assert await store.stat(a.key) is None
    assert [m.url async for m in store.scan()] == [b.url]


async def test_listing_pages_past_a_thousand(seaweed: Seaweed, bucket: str, tmp_path: Path) -> None:
    client = obs_client(seaweed)
    count = LIST_PAGE + 150
    for i in range(count):
        response = client.putContent(bucket, f"pfx/{i:05d}/f", b"x")
        assert response.status < 300
    store = obs_store(seaweed, bucket, tmp_path, storage__obs__prefix="pfx/")
    try:
        keys = [entry.object_key async for entry in store.entries()]
    finally:
        await store.close()
    assert len(keys) == count == len(set(keys))


async def test_wrong_credentials_and_stopped_server(seaweed: Seaweed, bucket: str, tmp_path: Path) -> None:
    wrong = obs_store(seaweed, bucket, tmp_path, storage__obs__secret_access_key="not-the-secret")
    try:
        problem = await wrong.check_writable()
        assert problem is not None and "403" in problem
        assert "not-the-secret" not in problem
        with pytest.raises(ObsUnavailable):
            await wrong.stat("https://example.org/x.tar.gz")
    finally:
        await wrong.close()
    dead = obs_store(seaweed, bucket, tmp_path, storage__obs__endpoint="http://127.0.0.1:9")
    try:
        problem = await dead.check_writable()
        assert problem is not None and "ConnectionRefused" in problem
    finally:
        await dead.close()


async def test_large_bodies_go_up_in_parts(
    seaweed: Seaweed, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cacheproxy.storage import obs

    monkeypatch.setattr(obs, "MULTIPART_ABOVE", 6 << 20)
    monkeypatch.setattr(obs, "PART_SIZE", 5 << 20)  # the smallest part S3 takes
    store = obs_store(seaweed, bucket, tmp_path)
    try:
        body = os.urandom(13 << 20)
        stored = await put(store, "https://example.org/big.tar.xz", body)
        response = obs_client(seaweed).getObjectMetadata(bucket, stored.remote)
        etag = dict(response.header)["etag"]
        assert etag.strip('"').endswith("-3")  # a multipart upload of three parts
        found = await store.stat(stored.key)
        assert found is not None and found.sha256 == hashlib.sha256(body).hexdigest()
        assert await read_all(store, found, (13 << 20) - 10) == body[-10:]
    finally:
        await store.close()
