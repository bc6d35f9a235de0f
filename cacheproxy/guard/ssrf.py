"""The SSRF guard: origins on loopback, private, link-local or other non-global addresses are
refused unless ``rules.allow_private_upstreams`` is true.

The check sits in the resolver of the upstream connector, so it applies to the address actually
connected to (redirect hops included, and no window for DNS rebinding). aiohttp does not ask the
resolver for IP literals: :meth:`SsrfGuard.check_literal` covers those.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


class PrivateUpstreamError(OSError):
    """The origin resolves to an address the guard refuses."""


def parse_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as the guard compares it: zone index dropped, IPv4-mapped IPv6 as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public(address: str) -> bool:
    ip = parse_ip(address)
    return ip is not None and ip.is_global and not ip.is_multicast


class SsrfGuard:
    def __init__(self, allow_private: bool, exempt_hosts: Iterable[str] = ()) -> None:
        self.allow_private = allow_private
        self.exempt_hosts = {h.lower() for h in exempt_hosts}

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        if self.allow_private or host.lower() in self.exempt_hosts:
            return
        for address in addresses:
            if not is_public(address):
                # The address itself is not told: a client must not learn the internal network.
                raise PrivateUpstreamError(
                    f"{host} is on a private, loopback or link-local address "
                    "(allowed only with rules.allow_private_upstreams: true, "
                    "or cacheproxy serve --allow-private-upstreams)"
                )

    def check_literal(self, host: str) -> None:
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return  # a name: the resolver checks it
        self.check_addresses(host, [host.strip("[]")])

    async def check_name(self, resolver: AbstractResolver, host: str, port: int) -> None:
        """Resolve and check a name that the connector will not resolve itself (parent proxy)."""
        self.check_literal(host)
        if not self.allow_private:
            await resolver.resolve(host, port)


class GuardedResolver(AbstractResolver):
    def __init__(self, guard: SsrfGuard, inner: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        self._guard.check_addresses(host, [r["host"] for r in results])
        return results

    async def close(self) -> None:
        await self._inner.close()
