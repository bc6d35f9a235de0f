"""Clear errors (issue 11, point 7): refused at once with the reason, never retried or a 500."""

from __future__ import annotations

import time

from ..conftest import MakeProxy, curl
from ..origin import Origin
from ..raw import Connection


async def test_numeric_host_forms_are_refused_at_once(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(rules__allow_private_upstreams=False, upstream__retry_backoff="1s")
    origin.add("/x", body=b"x")
    for host in ("2130706433", "127.1", "0177.0.0.1"):
        started = time.monotonic()
        # curl writes the address out itself: the guard sees 127.0.0.1
        done = await curl(proxy, f"http://{host}:{origin.port}/x", "-D", "-")
        assert done.stdout.startswith(b"HTTP/1.1 403") and b"private_upstream" in done.stdout, done.stdout[:300]
        # sent as written (a client that does not): refused as it is, with what it means
        conn = await Connection.open(proxy.port)
        conn.send(f"GET http://{host}:{origin.port}/x HTTP/1.1\r\nHost: {host}\r\n\r\n")
        status, headers, body = await conn.response()
        conn.close()
        assert (status, headers.get("x-cacheproxy-error")) == (400, "bad_url") and b"127.0.0.1" in body, body
        assert time.monotonic() - started < 1.0  # no retries with their 1 s backoff
    assert origin.hits("/x") == 0


async def test_private_upstream_text_hides_the_address(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy(rules__allow_private_upstreams=False)
    done = await curl(proxy, f"http://localhost:{origin.port}/x", "-D", "-")
    assert done.stdout.startswith(b"HTTP/1.1 403") and b"private_upstream" in done.stdout
    body = done.stdout.split(b"\r\n\r\n", 1)[1]
    assert b"127.0.0.1" not in body and b"::1" not in body and b"rules.allow_private_upstreams" in body


async def test_bad_urls_are_400_bad_url_with_the_reason(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    out_of_range = await curl(proxy, f"{proxy.url}/http://127.0.0.1:99999/x", "-D", "-", "--noproxy", "*")
    assert out_of_range.stdout.startswith(b"HTTP/1.1 400") and b"bad_url" in out_of_range.stdout
    assert b"Port out of range" in out_of_range.stdout
    conn = await Connection.open(proxy.port)
    conn.send("GET http:///path HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await conn.response()
    conn.close()
    assert (status, headers.get("x-cacheproxy-error")) == (400, "bad_url") and b"needs a host" in body, body


async def test_the_usage_text_names_all_three_ways_in(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    usage = await curl(proxy, f"{proxy.url}/some/path", "-D", "-", "--noproxy", "*")
    assert usage.stdout.startswith(b"HTTP/1.1 400")
    assert b"CONNECT" in usage.stdout and b"http_proxy" in usage.stdout and b"/https://origin/path" in usage.stdout


async def test_a_request_that_comes_back_is_refused(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy()
    origin.add("/l.txt", body=b"l")
    looped = await curl(proxy, origin.url("/l.txt"), "-D", "-", "-H", "Via: 1.1 cacheproxy, 1.1 cacheproxy")
    assert looped.stdout.startswith(b"HTTP/1.1 508") and b"loop_detected" in looped.stdout
    once = await curl(proxy, origin.url("/l.txt"), "-H", "Via: 1.1 cacheproxy")  # a chain of two is fine
    assert once.stdout == b"l"
    # The proxy as its own origin, nested in the path: refused after two rounds, not forever.
    own = f"{proxy.url}/{proxy.url}/{proxy.url}/{origin.url('/l.txt')}"
    nested = await curl(proxy, own, "-D", "-", "--noproxy", "*")
    assert b"loop_detected" in nested.stdout
