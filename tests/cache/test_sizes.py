"""Cold misses of every size arrive whole and are stored, on each path a body can take.

Body sizes are swept across the buffer boundaries of the origin's writes (64 KiB), aiohttp's read
buffer (256 KiB and its high-water mark), and the proxy's write batches (1 MiB), in uneven steps.
"""

from __future__ import annotations

import hashlib

import pytest

from cacheproxy.cache.pump import Pump

from ..conftest import MakeProxy, curl
from ..origin import Origin

KIB = 1024
SIZES = [
    1 * KIB,
    64 * KIB - 1,
    64 * KIB + 1,
    256 * KIB - 3,
    256 * KIB + 5,
    512 * KIB,
    513 * KIB,
    600 * KIB,
    650 * KIB + 7,
    700 * KIB,
    1024 * KIB - 1,
    1024 * KIB + 1,
    2 * 1024 * KIB + 3,
    4 * 1024 * KIB - 5,
]


def body_of(size: int) -> bytes:
    return (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]


@pytest.mark.parametrize("path", ["splice", "event-loop", "chunked"])
async def test_cold_misses_of_every_size(make_proxy: MakeProxy, origin: Origin, path: str) -> None:
    proxy = await make_proxy()
    if path == "event-loop":  # no splicer thread free: the body goes through the event loop
        pump: Pump = proxy.state.cache.fetcher.pump
        pump.splicers = 0
    for size in SIZES:
        body = body_of(size)
        origin.add(f"/s{size}.tar.gz", body=body, chunked=path == "chunked")
        url = origin.url(f"/s{size}.tar.gz")
        response, got = await proxy.get(url)
        assert (response.status, len(got)) == (200, size) and got == body, f"{path} {size}"
        assert response.headers["X-Cache"] == "MISS"
        await proxy.wait_idle()
        response, got = await proxy.get(url)
        assert response.headers["X-Cache"] == "HIT" and got == body, f"{path} {size} not stored"


async def test_curl_gets_a_600_kib_archive(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy()
    body = body_of(600 * KIB)
    for attempt in range(6):
        origin.add(f"/c{attempt}.tar.gz", body=body)
        done = await curl(proxy, origin.url(f"/c{attempt}.tar.gz"))
        assert done.rc == 0 and done.stdout == body, done.stderr
