"""Cache keys: the normalized origin URL, with mirror prefixes folded onto their group's first."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from yarl import URL

log = logging.getLogger(__name__)

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


class Credentials:
    """Keys of private answers: a credential (``Authorization``, or the user and password of an
    ``ftp://user:pass@`` URL) is part of the cache key as a keyed hash, never in clear. The key
    is made once per store (``credentials.key``, mode 0600) and shared by its workers."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._secret: bytes | None = None

    def _load(self) -> bytes:
        path = self._path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                for _ in range(20):  # another worker may still be writing it
                    secret = path.read_bytes()
                    if len(secret) >= 32:
                        return secret
                    time.sleep(0.01)
                raise OSError(f"{path} is shorter than 32 bytes") from None
            secret = secrets.token_bytes(32)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
            return secret
        except OSError as exc:  # a read-only store: private answers are keyed for this process only
            log.warning("cannot keep the credential key in %s (%s); using one for this process", path, exc)
            return secrets.token_bytes(32)

    def suffix(self, credential: str) -> str:
        if self._secret is None:
            self._secret = self._load()
        digest = hmac.new(self._secret, credential.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return "#cred=" + digest.hexdigest()[:32]
