"""Stored objects by digest, over plain HTTP, in the layouts build tools already speak.

- ``/_cacheproxy/sha256/<hex>`` and ``/_cacheproxy/sha512/<hex>``;
- under ``checksums.mirror_prefix``: ``<prefix>/sha256/<hex>`` (and ``sha512``), a hashed mirror
  as Nix (``hashed-mirrors``) and Spack read one; ``<prefix>/_source-cache/archive/<xx>/<sha256>.<ext>``,
  a Spack source mirror; and ``<prefix>/<name>/<file>/<sha512|sha256>/<hash>/<file>``, Fedora's
  lookaside cache (``fedpkg``/``rpkg`` with ``lookasidehash = sha512``).

Each answers like a hit (Range, HEAD, 304 on the stored validators), with the URL the object was
stored under in ``X-Cacheproxy-Source``; 404 when no stored object (here or in the shared OBS
bucket) has the digest. md5 is never looked up: it does not name a body safely.
"""

from __future__ import annotations

import re

from aiohttp import web

from ..cache.checksums import HEX_LENGTH
from ..errors import BadRequest, MethodNotAllowed, NotFound
from ..proxy.respond import Responder
from ..state import AppState

DIGEST_PREFIX = "/_cacheproxy"  # /_cacheproxy/sha256/<hex>
_DIRECT = re.compile(r"^/(sha256|sha512)/([^/]+)$")
_SPACK = re.compile(r"^/_source-cache/archive/[0-9a-fA-F]{2}/([0-9a-fA-F]{64})(?:\.[^/]*)?$")
_LOOKASIDE = re.compile(r"^/([^/]+)/([^/]+)/(sha512|sha256|md5)/([^/]+)/([^/]+)$")


def digest_in(path: str) -> tuple[str, str] | None:
    """(algorithm, lower-case hex) named by a path below a prefix, or None for any other path."""
    if m := _DIRECT.match(path):
        algorithm, hexdigest = m.groups()
    elif m := _SPACK.match(path):
        algorithm, hexdigest = "sha256", m.group(1)
    elif m := _LOOKASIDE.match(path):
        _, name, algorithm, hexdigest, again = m.groups()
        if name != again:
            return None
        if algorithm == "md5":
            raise NotFound("md5 lookaside paths are not served (md5 does not name a body safely): use sha512")
    else:
        return None
    if len(hexdigest) != HEX_LENGTH[algorithm] or not re.fullmatch(r"[0-9a-fA-F]+", hexdigest):
        raise BadRequest(f"a {algorithm} digest is {HEX_LENGTH[algorithm]} hex digits", code="bad_checksum")
    return algorithm, hexdigest.lower()


class DigestMirror:
    """The handler of one prefix (``/_cacheproxy`` or the mirror prefix)."""

    def __init__(self, state: AppState, responder: Responder, prefix: str) -> None:
        self.state = state
        self.responder = responder
        self.prefix = prefix

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{request.method} is not allowed here", headers={"Allow": "GET, HEAD"})
        named = digest_in(request.path[len(self.prefix) :])
        if named is None:
            raise NotFound(f"no such endpoint: {request.path[:200]}")
        algorithm, hexdigest = named
        cache = self.state.cache
        meta = await cache.by_digest(algorithm, hexdigest)
        hit = cache.hit_for(meta) if meta is not None else None
        if meta is None or hit is None:
            raise NotFound(f"no stored object has {algorithm} {hexdigest}")
        hit.source = meta.url
        return await self.responder.send_hit(request, hit)
