"""The request forms of SPEC section 1 with real wget and curl, and the errors of section 6."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import aiohttp
import pytest

from cacheproxy.errors import BadRequest, BadUrl, UnsupportedScheme
from cacheproxy.proxy.target import classify

from ..conftest import MakeProxy, Proxy, curl, run, wget
from ..origin import Origin


@pytest.mark.parametrize(
    ("target", "kind", "url"),
    [
        ("http://Example.org/a/b.tar.gz?x=1", "absolute", "http://Example.org/a/b.tar.gz?x=1"),
        ("/https://example.org/a/b.tar.gz", "in_path", "https://example.org/a/b.tar.gz"),
        ("/download/https://example.org/a/b", "in_path", "https://example.org/a/b"),
        ("/https:/example.org/a/b", "in_path", "https://example.org/a/b"),
        ("/download/http:/example.org/a", "in_path", "http://example.org/a"),
        ("/_cacheproxy/healthz", "service", None),
        ("/metrics", "service", None),
    ],
)
def test_classify(target: str, kind: str, url: str | None) -> None:
    result = classify(target)
    assert result.kind == kind
    assert (str(result.url) if result.url else None) == url


@pytest.mark.parametrize(
    ("target", "error"),
    [("/", BadRequest), ("/foo/bar", BadRequest), ("/gopher://x/y", UnsupportedScheme), ("/https://", BadUrl)],
)
def test_classify_errors(target: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        classify(target)


async def test_wget_and_curl_absolute_form(proxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    route = origin.add("/pub/git-2.39.1.tar.xz", body=os.urandom(200_000))
    url = origin.url("/pub/git-2.39.1.tar.xz")
    result = await wget(proxy, url, tmp_path / "w")
    assert result.rc == 0, result.stderr
    assert hashlib.sha256((tmp_path / "w").read_bytes()).hexdigest() == route.sha256
    await proxy.wait_idle()
    result = await curl(proxy, url, "-D", str(tmp_path / "h"), "-o", str(tmp_path / "c"))
    assert result.rc == 0 and (tmp_path / "c").read_bytes() == route.body
    assert "X-Cache: HIT" in (tmp_path / "h").read_text()
    env = {**os.environ, "http_proxy": proxy.url}
    result = await run("wget", "-q", "--tries=1", "-O", str(tmp_path / "e"), url, env=env)
    assert result.rc == 0 and (tmp_path / "e").read_bytes() == route.body
    assert origin.hits("/pub/git-2.39.1.tar.xz") == 1


@pytest.mark.parametrize("form", ["/{url}", "/download/{url}", "/{folded}"])
async def test_url_in_path_forms(proxy: Proxy, origin: Origin, tmp_path: Path, form: str) -> None:
    route = origin.add("/src/pkg.tar.gz", body=os.urandom(50_000))
    url = origin.url("/src/pkg.tar.gz")
    target = proxy.url + form.format(url=url, folded=url.replace("http://", "http:/"))
    result = await run("curl", "-sS", "--path-as-is", "-f", "-o", str(tmp_path / "c"), target)
    assert result.rc == 0, result.stderr
    assert (tmp_path / "c").read_bytes() == route.body
    result = await run("wget", "-q", "--tries=1", "-O", str(tmp_path / "w"), target)
    assert result.rc == 0 and (tmp_path / "w").read_bytes() == route.body
    assert origin.hits("/src/pkg.tar.gz") == 1


async def test_usage_400_and_json_errors(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/nothing-here") as response:
            text = await response.text()
            assert response.status == 400 and response.headers["X-Cacheproxy-Error"] == "bad_request"
            assert "curl -x" in text and "/download/" in text and text.count("\n") == 1
        async with session.get(proxy.url + "/gopher://x/y", headers={"Accept": "application/json"}) as response:
            assert response.status == 400
            assert json.loads(await response.text())["error"] == "unsupported_scheme"


async def test_other_methods_405_unless_allowed(make_proxy: MakeProxy, origin: Origin) -> None:
    origin.add("/upload", body=b"posted")
    proxy = await make_proxy()
    response, _ = await proxy.request("POST", origin.url("/upload"), data=b"hello")
    assert response.status == 405 and response.headers["X-Cacheproxy-Error"] == "method_not_allowed"
    assert origin.hits("/upload", "POST") == 0
    open_proxy = await make_proxy(rules__allow_other_methods=True)
    response, body = await open_proxy.request("POST", origin.url("/upload"), data=b"hello")
    assert response.status == 200 and body == b"posted" and response.headers["X-Cache"] == "BYPASS"
    assert origin.hits("/upload", "POST") == 1


async def test_a_request_body_never_goes_out_on_a_pooled_connection(make_proxy: MakeProxy, origin: Origin) -> None:
    """A forwarded PUT is sent once and never retried: it gets a connection of its own, never an
    idle keep-alive one the origin may be closing ("Can not write request body"); GETs share."""
    origin.add("/bucket/a.txt", body=b"stored")
    origin.add("/plain.txt", body=b"plain", headers={"Cache-Control": "no-store"})
    proxy = await make_proxy(rules__allow_other_methods=True)
    for _ in range(2):
        response, _ = await proxy.get(origin.url("/plain.txt"))
        assert response.status == 200
    for _ in range(2):
        response, _ = await proxy.request("PUT", origin.url("/bucket/a.txt"), data=b"new content")
        assert response.status == 200
    gets = [s.peer for s in origin.log if s.method == "GET"]
    puts = [s.peer for s in origin.log if s.method == "PUT"]
    assert gets[0] == gets[1]  # kept alive and reused
    assert len({*puts, gets[0]}) == 3  # each PUT on a new connection


async def test_oversized_request_line_is_431(proxy: Proxy) -> None:
    result = await run("curl", "-sS", "-D", "-", "-o", "/dev/null", proxy.url + "/http://x/" + "a" * 20000)
    assert result.stdout.startswith(b"HTTP/1.0 431 ") and b"X-Cacheproxy-Error: bad_request" in result.stdout
