"""Cache keys: the normalized origin URL, with mirror prefixes folded onto their group's first."""

from __future__ import annotations

import re
from collections.abc import Sequence

from yarl import URL

_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normalize_percent(text: str) -> str:
    """RFC 3986 6.2.2: decode percent-encoded unreserved characters, upper-case the others' hex."""

    def fix(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return _PERCENT.sub(fix, text)


def normalize(url: URL) -> str:
    """Scheme and host lower-cased, default port and fragment dropped, percent-encoding normalized.

    The query is kept. User info is dropped from the key (it is a credential, not a name).
    """
    scheme = url.scheme.lower()
    host = (url.raw_host or "").lower()
    port = url.explicit_port
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    path = _normalize_percent(url.raw_path or "/")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    query = f"?{_normalize_percent(url.raw_query_string)}" if url.raw_query_string else ""
    return f"{scheme}://{netloc}{path}{query}"


class MirrorMap:
    """Groups of equivalent URL prefixes; the first of a group names the cache key."""

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        self._groups = [tuple(normalize(URL(p, encoded=True)) for p in group) for group in groups]

    def _find(self, normalized: str) -> tuple[tuple[str, ...], str] | None:
        for group in self._groups:
            for prefix in group:
                if normalized.startswith(prefix):
                    return group, normalized[len(prefix) :]
        return None

    def key(self, url: URL) -> str:
        normalized = normalize(url)
        found = self._find(normalized)
        return found[0][0] + found[1] if found else normalized

    def candidates(self, url: URL) -> list[URL]:
        """The URL to fetch first (as asked), then the other mirrors of its group in order."""
        found = self._find(normalize(url))
        if not found:
            return [url]
        group, rest = found
        others = [URL(prefix + rest, encoded=True) for prefix in group]
        return [url, *(u for u in others if normalize(u) != normalize(url))]
