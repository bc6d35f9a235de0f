"""An operator's upload: a body stored as a URL's object without asking its origin (SPEC 7 PUT).

The body goes through the same writer as a fill (hashed on the way, nothing visible before the
commit), under the key's fill lock so that it never races a fill of the same URL; expected
checksums are compared before the commit, and a mismatch leaves nothing behind.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from yarl import URL

from ..config import Config
from ..storage.base import ObjectMeta, Spool
from ..storage.flight import FillLock
from .freshness import match_rule


@dataclass
class Upload:
    """A body an operator sends, with what they say about it."""

    body: AsyncIterator[bytes]
    length: int | None  # Content-Length, when sent
    content_type: str
    expected: dict[str, str]  # "sha256"/"sha512"/"md5" -> the hex digest the body should have


class UploadRefused(Exception):
    """The upload was not stored; ``code`` says why (``too_large``, ``checksum_mismatch``,
    ``busy``, ``truncated``)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def store_upload(config: Config, store: Spool, key: str, url: URL, upload: Upload) -> ObjectMeta:
    """Write the uploaded body as ``url``'s object and commit it; raise :class:`UploadRefused`.

    The object is fresh for the ``ttl`` of the first ``rules.refresh`` rule its path matches
    (an upload stands in for an origin that lost the file: it has no freshness of its own).
    """
    limit = config.cache.max_object_size
    length, expected, content_type = upload.length, upload.expected, upload.content_type
    if length is not None and length > limit:
        raise UploadRefused("too_large", f"the body ({length} bytes) is over cache.max_object_size ({limit})")
    lock = FillLock.for_key(store.tmp_dir, key)
    if not await store.run(lock.try_acquire):
        raise UploadRefused("busy", "the URL is being fetched right now; try again when the fill is over")
    try:
        writer = await store.begin_write(key)
        try:
            async for chunk in upload.body:
                if writer.written + len(chunk) > limit:
                    raise UploadRefused("too_large", f"the body is over cache.max_object_size ({limit} bytes)")
                await writer.write(chunk)
            if length is not None and writer.written != length:
                raise UploadRefused("truncated", f"got {writer.written} of {length} bytes")
            digests = await writer.digests()
            for name, want in expected.items():
                actual = digests.get(name)
                if want.lower() != actual:
                    raise UploadRefused(
                        "checksum_mismatch", f"X-Checksum-{name.capitalize()} says {want}, the body has {actual}"
                    )
            now = time.time()
            meta = ObjectMeta(
                key=key,
                url=str(url.with_user(None)),
                size=writer.written,
                **digests.fields(),
                stored_at=now,
                response_time=now,
                lifetime=_ttl(config, url.path),
                must_revalidate=False,
                content_type=content_type,
                last_access=now,
                headers=(("Content-Type", content_type),),
            )
            return await writer.commit(meta)
        except BaseException:
            await writer.abort()
            raise
    finally:
        await store.run(lock.release)


def _ttl(config: Config, path: str) -> float:
    rule = match_rule(path, config.refresh_rules)
    return rule.ttl if rule is not None else math.inf
