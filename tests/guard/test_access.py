"""Who may use the proxy and for what: clients, hosts, suffixes, the SSRF guard."""

from __future__ import annotations

import pytest

from cacheproxy.guard.ssrf import GuardedResolver, PrivateUpstreamError, SsrfGuard, is_public

from ..conftest import MakeProxy
from ..origin import Origin


async def denied(make_proxy: MakeProxy, url: str, code: str, **overrides: object) -> bytes:
    proxy = await make_proxy(**overrides)
    response, body = await proxy.get(url)
    assert response.status == 403, body
    assert response.headers["X-Cacheproxy-Error"] == code
    text = proxy.state.metrics.render()[0].decode()
    assert f'cacheproxy_denied_total{{reason="{code}"}} 1.0' in text
    return body


async def test_client_not_allowed(make_proxy: MakeProxy, origin: Origin) -> None:
    origin.add("/a.tar.gz", body=b"a")
    await denied(make_proxy, origin.url("/a.tar.gz"), "client_denied", rules__allow_clients=["10.0.0.0/8"])
    assert origin.hits("/a.tar.gz") == 0


async def test_private_upstream_refused_by_default(make_proxy: MakeProxy, origin: Origin) -> None:
    origin.add("/a.tar.gz", body=b"a")
    body = await denied(make_proxy, origin.url("/a.tar.gz"), "private_upstream", rules__allow_private_upstreams=False)
    assert origin.hits("/a.tar.gz") == 0
    # The refusal names the setting and the command-line flag that change it.
    assert b"rules.allow_private_upstreams: true" in body and b"serve --allow-private-upstreams" in body


async def test_private_upstream_refused_by_name(make_proxy: MakeProxy, origin: Origin) -> None:
    url = f"http://localhost:{origin.port}/a.tar.gz"  # a name that resolves to loopback
    origin.add("/a.tar.gz", body=b"a")
    await denied(make_proxy, url, "private_upstream", rules__allow_private_upstreams=False)
    assert origin.hits("/a.tar.gz") == 0


async def test_guarded_resolver_checks_every_resolution() -> None:
    """Every connection (redirect hops included) resolves through this resolver."""
    guard = SsrfGuard(allow_private=False)
    resolver = GuardedResolver(guard)
    with pytest.raises(PrivateUpstreamError):
        await resolver.resolve("localhost", 80)
    with pytest.raises(PrivateUpstreamError):
        guard.check_literal("[::1]")
    guard.check_literal("93.184.216.34")  # a public literal passes
    assert not is_public("169.254.169.254") and not is_public("::ffff:10.0.0.1") and is_public("8.8.8.8")
    await resolver.close()


@pytest.mark.parametrize(
    ("overrides", "path", "code"),
    [
        ({"rules__deny_upstream_hosts": ["127.0.0.*"]}, "/a.tar.gz", "host_denied"),
        ({"rules__allow_upstream_hosts": ["*.example.org"]}, "/a.tar.gz", "host_denied"),
        ({}, "/movie.MP4", "suffix_denied"),
        ({"rules__allow_suffixes": [".tar.gz"]}, "/a.zip", "suffix_denied"),
    ],
)
async def test_host_and_suffix_rules(
    make_proxy: MakeProxy, origin: Origin, overrides: dict, path: str, code: str
) -> None:
    origin.add(path, body=b"x")
    await denied(make_proxy, origin.url(path), code, **overrides)
    assert origin.hits(path) == 0


async def test_allowed_suffix_passes(make_proxy: MakeProxy, origin: Origin) -> None:
    origin.add("/a.tar.gz", body=b"x")
    proxy = await make_proxy(rules__allow_suffixes=[".tar.gz"])
    response, _ = await proxy.get(origin.url("/a.tar.gz"))
    assert response.status == 200
