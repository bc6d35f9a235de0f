"""The admin API (SPEC section 7) with real clients: tokens, objects, uploads, purge, prefetch, stats."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from typing import Any

import aiohttp
import pytest

from ..conftest import MakeProxy, Proxy, curl
from ..origin import Origin

pytestmark = pytest.mark.timeout(60)
TOKEN = "admin-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def call(
    proxy: Proxy, method: str, path: str, *, params: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{proxy.url}/_cacheproxy/api/{path}", params=params, **kwargs) as r:
            text = await r.text()
            return r.status, dict(r.headers), json.loads(text) if text else None


async def test_tokens(make_proxy: MakeProxy, origin: Origin) -> None:
    url = origin.url("/t.tar.gz")
    closed = await make_proxy()
    status, headers, body = await call(closed, "DELETE", "objects", params={"url": url}, headers=AUTH)
    assert status == 403 and headers["X-Cacheproxy-Error"] == "forbidden" and "admin.tokens" in body["reason"]
    proxy = await make_proxy(admin__tokens=[TOKEN, "second-token"])
    status, headers, body = await call(proxy, "DELETE", "objects", params={"url": url})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer") and body["error"] == "unauthorized"
    status, _, body = await call(
        proxy, "DELETE", "objects", params={"url": url}, headers={"Authorization": "Bearer no"}
    )
    assert status == 403 and body["error"] == "forbidden"
    status, _, _ = await call(proxy, "DELETE", "objects", params={"url": url}, headers=AUTH)
    assert status == 404  # allowed, and nothing was cached
    status, _, _ = await call(proxy, "GET", "objects", params={"url": url})  # reading needs no token
    assert status == 404


async def test_object_info_purge_and_bad_input(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(admin__tokens=[TOKEN], rules__deny_upstream_hosts=["denied.example"])
    route = origin.add("/pkg-1.0.tar.gz", body=b"p" * 5000)
    assert (await curl(proxy, origin.url("/pkg-1.0.tar.gz"))).rc == 0
    await proxy.wait_idle()
    status, _, info = await call(proxy, "GET", "objects", params={"url": origin.url("/pkg-1.0.tar.gz")})
    assert status == 200
    assert info["sha256"] == route.sha256 and info["size"] == 5000 and info["url"] == origin.url("/pkg-1.0.tar.gz")
    assert {"key", "md5", "content_type", "stored_at", "last_access", "etag", "last_modified"} <= set(info)
    status, _, _ = await call(proxy, "DELETE", "objects", params={"url": origin.url("/pkg-1.0.tar.gz")}, headers=AUTH)
    assert status == 204
    status, _, _ = await call(proxy, "GET", "objects", params={"url": origin.url("/pkg-1.0.tar.gz")})
    assert status == 404
    again = await curl(proxy, origin.url("/pkg-1.0.tar.gz"), "-D", "-")
    assert b"X-Cache: MISS" in again.stdout
    bad: list[tuple[str, str, dict[str, str] | None, Any, int, str]] = [
        ("GET", "objects", None, None, 400, "bad_url"),
        ("GET", "objects", {"url": "gopher://x/y"}, None, 400, "unsupported_scheme"),
        ("GET", "objects", {"url": "http://denied.example/a.tar.gz"}, None, 403, "host_denied"),
        ("POST", "prefetch", None, b"{not json", 400, "bad_json"),
        ("POST", "prefetch", None, b'{"urls": []}', 400, "bad_request"),
        ("POST", "prefetch", None, b'{"urls": ["http://denied.example/x"]}', 403, "host_denied"),
        ("PATCH", "objects", {"url": origin.url("/a")}, None, 405, "method_not_allowed"),
        ("GET", "nothing-here", None, None, 404, "not_found"),
        ("GET", "prefetch/0123456789abcdef", None, None, 404, "not_found"),
    ]
    for method, path, params, data, want, code in bad:
        status, headers, body = await call(proxy, method, path, params=params, data=data, headers=AUTH)
        assert (status, headers.get("X-Cacheproxy-Error")) == (want, code), (method, path, body)
        assert body["error"] == code and body["reason"]


async def test_upload_checks_checksums_and_size(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(admin__tokens=[TOKEN], cache__max_object_size="1MiB")
    url = origin.url("/lost-2.1.tar.xz")  # the origin does not have it
    body = b"the lost file" * 1000
    sha256 = hashlib.sha256(body).hexdigest()
    wrong = {**AUTH, "X-Checksum-Sha256": "0" * 64}
    status, headers, answer = await call(proxy, "PUT", "objects", params={"url": url}, data=body, headers=wrong)
    assert status == 400 and headers["X-Cacheproxy-Error"] == "checksum_mismatch" and sha256 in answer["reason"]
    assert (await call(proxy, "GET", "objects", params={"url": url}))[0] == 404  # nothing stored
    assert not list((proxy.cache_dir / "tmp").glob("*.part"))
    too_big = b"x" * (2 << 20)
    status, headers, _ = await call(
        proxy, "PUT", "objects", params={"url": url}, data=io.BytesIO(too_big), headers=AUTH
    )
    assert status == 413 and headers["X-Cacheproxy-Error"] == "too_large"
    right = {**AUTH, "X-Checksum-Sha256": sha256, "X-Checksum-Md5": hashlib.md5(body).hexdigest()}
    status, _, answer = await call(proxy, "PUT", "objects", params={"url": url}, data=body, headers=right)
    assert status == 201 and answer["sha256"] == sha256
    got = await curl(proxy, url, "-D", "-")
    assert b"X-Cache: HIT" in got.stdout and got.stdout.endswith(body)
    assert f"X-Checksum-Sha256: {sha256}".encode() in got.stdout
    assert not [s for s in origin.log if s.path == "/lost-2.1.tar.xz"]


async def test_prefetch_job_shares_the_fill_with_a_client(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(admin__tokens=[TOKEN])
    body = b"s" * (1 << 20)
    origin.add("/slow-1.0.tar.gz", body=body, rate=2 << 20)  # half a second
    origin.add("/here-1.0.tar.gz", body=b"h" * 100)
    assert (await curl(proxy, origin.url("/here-1.0.tar.gz"))).rc == 0
    await proxy.wait_idle()
    urls = [origin.url("/slow-1.0.tar.gz"), origin.url("/here-1.0.tar.gz"), origin.url("/missing-1.0.tar.gz")]
    status, headers, job = await call(proxy, "POST", "prefetch", json={"urls": urls}, headers=AUTH)
    assert status == 202 and headers["Location"].endswith(job["id"])
    assert job["state"] in ("queued", "running") and [u["url"] for u in job["urls"]] == urls
    await asyncio.sleep(0.1)
    client = await curl(proxy, origin.url("/slow-1.0.tar.gz"))  # asks while the prefetch fetches it
    assert client.stdout == body
    deadline = time.monotonic() + 20
    while job["state"] != "done" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        status, _, job = await call(proxy, "GET", f"prefetch/{job['id']}")
        assert status == 200
    assert job["state"] == "done"
    states = {u["url"]: (u["state"], u["error"]) for u in job["urls"]}
    assert states[urls[0]] == ("cached", None)
    assert states[urls[1]] == ("already_cached", None)
    assert states[urls[2]][0] == "failed" and "404" in states[urls[2]][1]
    assert len([s for s in origin.log if s.path == "/slow-1.0.tar.gz"]) == 1  # one origin fetch


async def test_stats(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy()
    origin.add("/s.tar.gz", body=b"z" * 1000)
    for _ in range(3):
        await curl(proxy, origin.url("/s.tar.gz"))
    await proxy.wait_idle()
    status, _, stats = await call(proxy, "GET", "stats")
    assert status == 200
    assert stats["requests"]["miss"] == 1 and stats["requests"]["hit"] == 2
    assert stats["hit_ratio"] == round(2 / 3, 4)
    assert stats["bytes"] == {"cache": 2000, "upstream": 1000}
    assert stats["store"]["objects"] == 1 and stats["store"]["bytes"] == 1000
    assert stats["largest"][0]["url"] == origin.url("/s.tar.gz")
    assert stats["most_requested"][0]["hits"] == 2
    origin.add("/filling-1.0.tar.gz", body=b"f" * (4 << 20), rate=2 << 20)  # two seconds
    client = asyncio.create_task(curl(proxy, origin.url("/filling-1.0.tar.gz")))
    await asyncio.sleep(0.7)
    _, _, stats = await call(proxy, "GET", "stats")
    (fill,) = stats["fills"]
    assert fill["url"] == origin.url("/filling-1.0.tar.gz") and fill["size"] == 4 << 20
    assert 0 < fill["written"] < 4 << 20
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/_cacheproxy/") as page:
        assert origin.url("/filling-1.0.tar.gz") in await page.text()
    assert (await client).rc == 0
