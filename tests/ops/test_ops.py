"""Health, readiness, metrics and the access log."""

from __future__ import annotations

import logging
import os

import aiohttp
import pytest

from ..conftest import MakeProxy, Proxy
from ..origin import Origin


async def fetch(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            return response.status, await response.text()


async def test_healthz_and_readyz(proxy: Proxy) -> None:
    assert (await fetch(proxy.url + "/_cacheproxy/healthz"))[0] == 200
    status, text = await fetch(proxy.url + "/_cacheproxy/readyz")
    assert status == 200 and '"store_writable": {"ok": true}' in text


async def test_readyz_503_when_store_not_writable(proxy: Proxy) -> None:
    """Works as root too: the store's tmp directory replaced by a file cannot take writes."""
    tmp = proxy.cache_dir / "tmp"
    os.rmdir(tmp)
    tmp.write_text("not a directory")
    try:
        status, text = await fetch(proxy.url + "/_cacheproxy/readyz")
    finally:
        tmp.unlink()
        tmp.mkdir()
    assert status == 503 and "not writable" in text


async def test_metrics(proxy: Proxy, origin: Origin) -> None:
    origin.add("/m.tar.gz", body=b"m" * 1000)
    await proxy.get(origin.url("/m.tar.gz"))
    await proxy.wait_idle()
    await proxy.get(origin.url("/m.tar.gz"))
    status, text = await fetch(proxy.url + "/_cacheproxy/metrics")
    assert status == 200
    for line in (
        'cacheproxy_requests_total{result="miss"} 1.0',
        'cacheproxy_requests_total{result="hit"} 1.0',
        'cacheproxy_response_bytes_total{source="cache"} 1000.0',
        'cacheproxy_response_bytes_total{source="upstream"} 1000.0',
        'cacheproxy_upstream_requests_total{outcome="ok",scheme="http"} 1.0',
        "cacheproxy_cache_objects 1.0",
        "cacheproxy_cache_size_bytes 1000.0",
        "cacheproxy_fills_in_progress 0.0",
        "cacheproxy_upstream_fetch_seconds_count 1.0",
    ):
        assert line in text, line
    assert (await fetch(proxy.url + "/metrics"))[1].count("cacheproxy_requests_total") >= 2


async def test_one_access_log_line_per_request(proxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    origin.add("/log.tar.gz", body=b"l" * 10)
    with caplog.at_level(logging.INFO, logger="cacheproxy.access"):
        await proxy.get(origin.url("/log.tar.gz"))
        await proxy.get("http://127.0.0.1:9/x.mp4")
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheproxy.access"]
    assert len(lines) == 2
    assert f'"GET {origin.url("/log.tar.gz")}" 200 10 MISS' in lines[0]
    assert '" 403 ' in lines[1] and lines[1].endswith("suffix_denied")


async def test_retries_counted(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(upstream__retries=2)
    origin.add("/r.tar.gz", body=b"r", fail_first=2)
    await proxy.get(origin.url("/r.tar.gz"))
    assert "cacheproxy_upstream_retries_total 2.0" in proxy.state.metrics.render()[0].decode()


def test_passwords_in_urls_are_masked_in_every_logger(caplog: pytest.LogCaptureFixture) -> None:
    """Redaction is installed for all loggers (aiohttp's too) and every URL form, folded ones included."""
    caplog.set_level(logging.DEBUG)
    for name in ("aiohttp.server", "aiohttp.access", "cacheproxy.proxy", "some.library"):
        logging.getLogger(name).warning("GET %s", "http://user:pw1@host/x ftp://u:pw2@h/y /https:/u:pw3@h/z")
        logging.getLogger(name).warning("plain http://user:pw4@host/x")
    assert "user:***@host" in caplog.text and "/https:/u:***@h/z" in caplog.text
    for secret in ("pw1", "pw2", "pw3", "pw4"):
        assert secret not in caplog.text
