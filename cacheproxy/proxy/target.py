"""The request forms of SPEC section 1: which origin URL a request asks for.

- absolute-form: ``GET http://origin/path HTTP/1.1`` (also ``https://`` and ``ftp://``);
- URL-in-path: ``GET /https://origin/path``, the legacy ``GET /download/https://origin/path``,
  and ``/https:/origin/path`` where a client folded ``//`` into ``/``;
- anything else is for the proxy itself (``/_cacheproxy/...``, ``/metrics``) or a usage error.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Literal

from yarl import URL

from ..errors import BadRequest, BadUrl, UnsupportedScheme

SCHEMES = ("http", "https", "ftp")
SERVICE_PREFIX = "/_cacheproxy/"
_IN_PATH = re.compile(r"^/(?:download/)?([A-Za-z][A-Za-z0-9+.-]*):/+(.*)$", re.S)

USAGE = (
    "cacheproxy is a caching forward proxy; there are three ways in: "
    "(1) as the HTTP proxy (curl -x http://HOST:PORT URL, wget -e use_proxy=yes -e http_proxy=HOST:PORT URL, "
    "or http_proxy=), which sends absolute-form requests; "
    "(2) https:// URLs through the same proxy setting, which sends CONNECT (https_proxy=; cached with "
    "tls_intercept); "
    "(3) the origin URL in the path: http://HOST:PORT/https://origin/path "
    "(legacy: http://HOST:PORT/download/https://origin/path). Status: /_cacheproxy/"
)


@dataclass(frozen=True)
class Target:
    kind: Literal["absolute", "in_path", "service"]
    url: URL | None = None  # the origin URL for proxied forms


def parse_origin_url(text: str) -> URL:
    """Parse and check an origin URL as written by a client."""
    try:
        url = URL(text, encoded=True)
        url.explicit_port  # noqa: B018 - a port out of range raises here, not later
    except ValueError as exc:
        raise BadUrl(f"not a valid URL: {text[:200]!r} ({exc})") from None
    scheme = url.scheme.lower()
    if scheme not in SCHEMES:
        raise UnsupportedScheme(f"scheme {scheme!r} is not supported (use {', '.join(SCHEMES)})")
    if not url.raw_host:
        raise BadUrl(f"the URL has no host: {text[:200]!r}")
    _check_numeric_host(url.raw_host)
    return url


def _check_numeric_host(host: str) -> None:
    """A host such as ``2130706433``, ``127.1`` or ``0177.0.0.1`` is an IPv4 address in a form
    that resolvers read differently (decimal, short, octal): refused, with the address it means."""
    if not host or not all(c in "0123456789abcdefxABCDEFX." for c in host) or not host[0].isdigit():
        return
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return
    canonical = str(ipaddress.IPv4Address(packed))
    if canonical != host:
        raise BadUrl(f"the host {host[:60]!r} is an IPv4 address in a non-standard form; write it as {canonical}")


def classify(raw_target: str, origin: str | None = None, service_prefixes: tuple[str, ...] = ()) -> Target:
    """What a request target asks for; raise BadRequest/BadUrl for nonsense.

    ``origin``: the request came inside an intercepted CONNECT to this ``https://host[:port]``,
    where an origin-form path is a path of that origin (never one of ours).
    """
    if origin is not None and raw_target.startswith("/"):
        return Target("absolute", parse_origin_url(origin + raw_target))
    if not raw_target.startswith("/"):
        return Target("absolute", parse_origin_url(raw_target))
    if raw_target.startswith((SERVICE_PREFIX, *service_prefixes)) or raw_target in ("/_cacheproxy", "/metrics"):
        return Target("service")
    match = _IN_PATH.match(raw_target)
    if match:
        scheme, rest = match.groups()
        if not rest:
            raise BadUrl(f"no host after {scheme}:// in {raw_target[:200]!r}")
        return Target("in_path", parse_origin_url(f"{scheme}://{rest}"))
    raise BadRequest(USAGE)


class TargetCache:
    """:func:`classify` remembered for the request targets seen last: a build farm asks for the
    same URLs again and again, and a hit should not parse its URL every time."""

    def __init__(self, service_prefixes: tuple[str, ...] = (), size: int = 10_000) -> None:
        self._service_prefixes = service_prefixes  # more paths that are the proxy's own
        self._size = size
        self._known: dict[tuple[str, str | None], Target] = {}

    def classify(self, raw_target: str, origin: str | None = None) -> Target:
        key = (raw_target, origin)
        found = self._known.get(key)
        if found is None:
            found = classify(raw_target, origin, self._service_prefixes)
            if len(self._known) >= self._size:
                self._known.clear()
            self._known[key] = found
        return found
