"""Who may use the proxy, and for which origins and files (``rules.*``)."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from aiohttp import web
from yarl import URL

from ..config import Config, IPNetwork
from ..errors import Denied
from .ssrf import parse_ip

KNOWN_CLIENTS = 10_000


def _in(address: str | None, networks: Sequence[IPNetwork]) -> bool:
    ip = parse_ip(address) if address else None
    return ip is not None and any(ip in net for net in networks)


class AccessRules:
    def __init__(self, config: Config) -> None:
        rules = config.rules
        self._clients = rules.allow_clients
        self._known_clients: dict[str, bool] = {}  # address -> allowed, for the addresses seen last
        self._known_hosts: dict[str, bool] = {}  # upstream host -> allowed, likewise
        self._trusted = config.trusted_proxies
        self._allow_hosts = [p.lower() for p in rules.allow_upstream_hosts]
        self._deny_hosts = [p.lower() for p in rules.deny_upstream_hosts]
        self._allow_suffixes = tuple(s.lower() for s in rules.allow_suffixes)
        self._deny_suffixes = tuple(s.lower() for s in rules.deny_suffixes)

    def client_address(self, request: web.BaseRequest) -> str:
        return self.client_from(request.remote or "", request.headers.get("X-Forwarded-For", ""))

    def client_from(self, remote: str, forwarded_for: str) -> str:
        """The client's address; X-Forwarded-For is believed only from ``trusted_proxies``."""
        if self._trusted and _in(remote, self._trusted):
            hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
            for hop in reversed(hops):
                if not _in(hop, self._trusted):
                    return hop
        return remote

    def check_client(self, address: str) -> None:
        allowed = self._known_clients.get(address)
        if allowed is None:
            allowed = _in(address, self._clients)
            if len(self._known_clients) >= KNOWN_CLIENTS:
                self._known_clients.clear()
            self._known_clients[address] = allowed
        if not allowed:
            raise Denied(f"client {address} is not in rules.allow_clients", code="client_denied")

    def check_url(self, url: URL) -> None:
        self.check_host(url.host or "")
        path = url.path.lower()
        if self._allow_suffixes and not path.endswith(self._allow_suffixes):
            raise Denied(f"only URLs ending in {', '.join(self._allow_suffixes)} are served", code="suffix_denied")
        if path.endswith(self._deny_suffixes):
            raise Denied(f"URLs ending in {path.rsplit('.', 1)[-1]!r} are not served", code="suffix_denied")

    def check_host(self, host: str) -> None:
        allowed = self._known_hosts.get(host)
        if allowed is None:
            name = host.lower()
            allowed = not any(fnmatchcase(name, p) for p in self._deny_hosts) and any(
                fnmatchcase(name, p) for p in self._allow_hosts
            )
            if len(self._known_hosts) >= KNOWN_CLIENTS:
                self._known_hosts.clear()
            self._known_hosts[host] = allowed
        if not allowed:
            raise Denied(f"upstream host {host.lower()} is not allowed", code="host_denied")
