"""Digests of a body, and what a client expects them to be.

Every body is hashed on its way into the store (sha256, sha512 and md5 in one pass). A client may
pin what it wants with ``X-Checksum-Sha256`` / ``X-Checksum-Sha512`` / ``X-Checksum-Md5`` (hex) or
an SRI ``Integrity: sha256-<base64> sha512-<base64>`` header: a stored body that differs is never
served as that file, and a fetched one is verified before its last bytes go out. Only sha256 and
sha512 name a body strongly enough to answer one URL with another URL's bytes; md5 verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import BadRequest, PreconditionFailed
from ..storage.base import Digests

STRONG = ("sha256", "sha512")  # a match by one of these is the same file, whatever its URL
HEX_LENGTH = {"sha256": 64, "sha512": 128, "md5": 32}
HEADERS = {"sha256": "X-Checksum-Sha256", "sha512": "X-Checksum-Sha512", "md5": "X-Checksum-Md5"}
_HEX = re.compile(r"[0-9a-fA-F]+")
_SRI_ALGORITHMS = {"sha256", "sha384", "sha512"}


@dataclass(frozen=True)
class Expected:
    """The digests a client pinned, as (algorithm, lower-case hex) pairs."""

    wanted: tuple[tuple[str, str], ...]

    def strong(self) -> list[tuple[str, str]]:
        return [(a, h) for a, h in self.wanted if a in STRONG]

    def unknown_in(self, digests: Digests) -> list[str]:
        """Algorithms pinned here that ``digests`` lacks (an object stored before they were kept)."""
        return [a for a, _ in self.wanted if not digests.get(a)]

    def check(self, digests: Digests, what: str) -> None:
        """Raise :class:`~cacheproxy.errors.PreconditionFailed` naming both digests on a mismatch."""
        for algorithm, hexdigest in self.wanted:
            actual = digests.get(algorithm)
            if actual and actual != hexdigest:
                raise PreconditionFailed(
                    f"{what} has {algorithm} {actual}, the request expects {hexdigest}",
                    headers={f"{HEADERS[algorithm]}-Expected": hexdigest, f"{HEADERS[algorithm]}-Actual": actual},
                )

    def matches(self, digests: Digests) -> bool:
        return all(digests.get(a) == h for a, h in self.wanted)


def expected_from(headers: Mapping[str, str]) -> Expected | None:
    """What the request pins, or None. A malformed value is a 400 (``bad_checksum``), never ignored:
    a client that asks for verification must not silently get none."""
    wanted: dict[str, str] = {}
    for algorithm, name in HEADERS.items():
        value = headers.get(name)
        if value is None:
            continue
        value = value.strip()
        if len(value) != HEX_LENGTH[algorithm] or not _HEX.fullmatch(value):
            raise BadRequest(
                f"{name} must be {HEX_LENGTH[algorithm]} hex digits, not {value[:200]!r}", code="bad_checksum"
            )
        wanted[algorithm] = value.lower()
    integrity = headers.get("Integrity")
    if integrity is not None:
        for algorithm, hexdigest in _parse_integrity(integrity):
            if wanted.setdefault(algorithm, hexdigest) != hexdigest:
                raise BadRequest(f"Integrity and {HEADERS[algorithm]} disagree", code="bad_checksum")
    return Expected(tuple(sorted(wanted.items()))) if wanted else None


def _parse_integrity(value: str) -> list[tuple[str, str]]:
    """SRI metadata (``sha256-<base64>``, space-separated, ``?options`` ignored)."""
    found: list[tuple[str, str]] = []
    unsupported: list[str] = []
    for item in value.split():
        algorithm, _, encoded = item.partition("-")
        algorithm = algorithm.lower()
        encoded = encoded.split("?", 1)[0]
        if algorithm not in _SRI_ALGORITHMS or not encoded:
            raise BadRequest(f"Integrity: {item[:100]!r} is not <sha256|sha384|sha512>-<base64>", code="bad_checksum")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"Integrity: {item[:100]!r} is not valid base64", code="bad_checksum") from None
        if algorithm == "sha384":
            unsupported.append(item)
            continue
        if len(raw) * 2 != HEX_LENGTH[algorithm]:
            raise BadRequest(f"Integrity: {algorithm} digest of {len(raw)} bytes", code="bad_checksum")
        found.append((algorithm, raw.hex()))
    if unsupported and not found:
        raise BadRequest("Integrity: sha384 is not computed here; give sha256 or sha512", code="bad_checksum")
    return found


def hash_file(path: str, chunk: int = 1 << 20) -> Digests:
    """The digests of a stored body (blocking): for objects stored before all three were kept."""
    hashes = [hashlib.sha256(), hashlib.sha512(), hashlib.md5(usedforsecurity=False)]
    with open(path, "rb") as f:
        while data := f.read(chunk):
            for h in hashes:
                h.update(data)
    return Digests(*(h.hexdigest() for h in hashes))
