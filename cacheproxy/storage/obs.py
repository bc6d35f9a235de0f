"""Huawei OBS (or any S3-compatible store) through esdk-obs-python: the shared tier.

Every SDK call blocks, so each runs in a bounded thread pool of its own (``OBS_THREADS``); bodies
go up from files, never as whole ``bytes``, and come down as aiohttp streams of a signed URL. An object's key is
``<prefix><sha256 of the cache key>/<file name>`` (the name from the URL, so one HEAD finds a key's
object), and its metadata (url, sha256, md5, validators, freshness) travels with it as
``x-amz-meta-cacheproxy-*``. Objects are private: hits are served by the proxy or through a
signed URL that expires.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, NamedTuple, cast
from urllib.parse import unquote, urlsplit
from xml.etree import ElementTree

import aiohttp
from obs import CopyObjectHeader, ObsClient, PutObjectHeader
from yarl import URL

from ..config import ObsConfig
from ..units import format_size
from .base import Digests, ObjectMeta, Storage, StorageUnavailable, Writer

log = logging.getLogger(__name__)

OBS_THREADS = 8
OBS_TIMEOUT = 15  # seconds per SDK request (the SDK's default is 60)
READ_SIZE = 1 << 20
SIGNED_READ_TTL = 300  # seconds a signed URL used by the proxy itself stays valid
MULTIPART_ABOVE = 64 << 20  # larger bodies go up in parts ...
PART_SIZE = 16 << 20  # ... of this size,
PART_TASKS = 4  # this many at once
LIST_PAGE = 1000
LIST_URL_TTL = 60  # seconds a listing page's signed URL stays valid
LIST_PARSE_PIECE = 32 << 10  # bytes of a listing parsed between two turns of the event loop
META = "cacheproxy-meta"  # one metadata entry: the ObjectMeta as JSON
KEY_META = "cacheproxy-key"  # a digest marker's metadata: the cache key whose body has that digest
DIGESTS_DIR = "_digests/"  # <prefix>_digests/<sha256|sha512>/<hex>: empty markers, listed apart
LEASES_DIR = "_leases/"  # <prefix>_leases/<sha256 of the key>: the instance fetching that key now
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class ObsUnavailable(StorageUnavailable):
    """OBS could not be reached, refused the credentials, or answered an error."""


class RemoteEntry(NamedTuple):
    """One object of a listing, as ``ObsStore.entries`` yields it (to be kept, not held: the garbage
    collector never stops tracking a NamedTuple, as it does a plain tuple of numbers)."""

    object_key: str
    size: int
    modified: float  # when the object was written (the listing's LastModified)


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def file_name(url: str) -> str:
    """A safe last segment for the object key, from the (normalized) URL's path."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    name = _UNSAFE.sub("_", name).strip("._")[:128]
    return name or "object"


class _ListingPage:
    """A ListBucketResult (S3's and OBS's alike: namespaces are ignored), parsed as it arrives.
    What was read is dropped from the tree at once: left in it, a page's elements lived on until
    full collections of the garbage collector, which grew to 88 ms during a listing of 100 000
    keys (30-54 ms this way; request maximum 94-119 ms before, 62 ms after, 8 connections)."""

    def __init__(self) -> None:
        self._parser: ElementTree.XMLPullParser = ElementTree.XMLPullParser(events=("start", "end"))
        self._root: ElementTree.Element | None = None
        self.truncated = False
        self.next_marker = ""
        self.last_key = ""

    def feed(self, data: bytes) -> list[RemoteEntry]:
        """The objects whose entries ``data`` completed."""
        self._parser.feed(data)
        entries = []
        for event, element in cast(Iterator[tuple[str, ElementTree.Element]], self._parser.read_events()):
            if event == "start":
                if self._root is None:
                    self._root = element
                continue
            tag = element.tag.rpartition("}")[2]
            if tag == "Contents":
                fields = {c.tag.rpartition("}")[2]: c.text or "" for c in element}
                key = fields.get("Key", "")
                entries.append(
                    RemoteEntry(key, int(fields.get("Size") or 0), _parse_time(fields.get("LastModified", "")))
                )
                self.last_key = key
            elif tag == "IsTruncated":
                self.truncated = (element.text or "").strip().lower() == "true"
            elif tag == "NextMarker":
                self.next_marker = element.text or ""
        if self._root is not None:
            self._root.clear()
        return entries


def _error_code(body: bytes) -> str:
    try:
        return ElementTree.fromstring(body).findtext("Code") or ""
    except ElementTree.ParseError:
        return ""


def _parse_time(text: str) -> float:
    """A listing's LastModified (ISO 8601) or an HTTP date, as a timestamp (0 when unreadable)."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        try:
            return parsedate_to_datetime(text).timestamp()
        except (TypeError, ValueError):
            return 0.0


def _as_stored(meta: ObjectMeta, object_key: str) -> ObjectMeta:
    """A copy of ``meta`` as OBS keeps it: no local file, its object key."""
    stored = ObjectMeta.from_dict(dict(meta.__dict__))
    stored.file, stored.remote = "", object_key
    return stored


class ObsStore(Storage):
    def __init__(self, config: ObsConfig, spool: Path) -> None:
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self._spool = spool  # where bodies written straight to OBS wait for their upload
        secure = (config.endpoint or "").startswith("https://")
        self._client = ObsClient(
            access_key_id=config.access_key_id or "",
            secret_access_key=config.secret_access_key or "",
            server=config.endpoint,
            signature=config.signature,
            path_style=config.path_style,
            is_secure=secure,
            ssl_verify=secure,
            is_signature_negotiation=False,
            region="us-east-1" if config.signature == "v4" else "region",
            max_retry_count=1,
            timeout=OBS_TIMEOUT,
        )
        self._pool = ThreadPoolExecutor(max_workers=OBS_THREADS, thread_name_prefix="cacheproxy-obs")
        self._session: aiohttp.ClientSession | None = None  # for reads (stream hits)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- calls --------------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, ok_missing: bool = False, **kw: Any) -> Any:
        """Run one SDK call in the pool; ObsUnavailable on a failure (None for a 404 if allowed)."""
        loop = asyncio.get_running_loop()
        try:
            resp = await loop.run_in_executor(self._pool, lambda: fn(*args, **kw))
        except Exception as exc:  # the SDK raises what its HTTP client raises
            raise ObsUnavailable(f"OBS {what}: {type(exc).__name__}: {exc}") from None
        status = getattr(resp, "status", 0)
        if ok_missing and status == 404:
            return None
        if status >= 300 or status == 0:
            code = getattr(resp, "errorCode", None) or ""
            reason = getattr(resp, "errorMessage", None) or getattr(resp, "reason", None) or ""
            if status == 403 and not code:
                code = "AccessDenied (wrong credentials?)"
            raise ObsUnavailable(f"OBS {what}: {status} {code} {reason}".strip())
        return resp

    def object_key(self, key: str) -> str:
        """Where a cache key's object lives: found with one HEAD, no listing needed."""
        return f"{self.prefix}{digest_of(key)}/{file_name(key)}"

    # -- the storage interface ----------------------------------------------------------------

    async def check_writable(self) -> str | None:
        try:
            await self._call(f"bucket {self.bucket}", self._client.headBucket, self.bucket)
        except ObsUnavailable as exc:
            return str(exc)
        return None

    async def entries(self) -> AsyncIterator[RemoteEntry]:
        """Every object under the prefix, a listing page at a time. A page is fetched through a
        signed URL with aiohttp and parsed as it arrives, 32 KiB between two turns of the event
        loop: the SDK's own parser took 0.2 s of Python a page in a thread (and Python work in a
        thread makes each system call of the event loop wait for the GIL), and a whole page
        parsed at once held the loop for tens of ms."""
        marker = ""
        while True:
            query = {"max-keys": str(LIST_PAGE)}
            if self.prefix:
                query["prefix"] = self.prefix
            if marker:
                query["marker"] = marker
            signed = self._client.createSignedUrl("GET", self.bucket, None, expires=LIST_URL_TTL, queryParams=query)
            page = _ListingPage()
            skip = (self.prefix + DIGESTS_DIR, self.prefix + LEASES_DIR)
            try:
                async with self._reads().get(URL(str(signed.signedUrl), encoded=True)) as response:
                    if response.status != 200:
                        raise ObsUnavailable(
                            f"OBS list: {response.status} {_error_code(await response.read())}".strip()
                        )
                    async for chunk in response.content.iter_chunked(LIST_PARSE_PIECE):
                        for entry in page.feed(chunk):
                            if not entry.object_key.startswith(skip):
                                yield entry
                        await asyncio.sleep(0)  # a page is parsed a piece at a time between requests
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ObsUnavailable(f"OBS list: {type(exc).__name__}: {exc}") from None
            except ElementTree.ParseError as exc:
                raise ObsUnavailable(f"OBS list: unreadable answer: {exc}") from None
            if not page.truncated or not page.last_key:
                return
            marker = page.next_marker or page.last_key

    async def scan(self) -> AsyncIterator[ObjectMeta]:
        async for entry in self.entries():
            meta = await self.head(entry.object_key)
            if meta is not None:
                yield meta

    async def head(self, object_key: str) -> ObjectMeta | None:
        resp = await self._call("head", self._client.getObjectMetadata, self.bucket, object_key, ok_missing=True)
        if resp is None:
            return None
        headers = {k.lower(): v for k, v in resp.header}
        try:
            meta = ObjectMeta.from_json(headers[META])
        except (KeyError, ValueError, TypeError):
            log.warning("OBS object %s has no cacheproxy metadata: ignored", object_key)
            return None
        meta.file, meta.remote = "", object_key
        return meta

    async def stat(self, key: str) -> ObjectMeta | None:
        return await self.head(self.object_key(key))

    async def read(self, meta: ObjectMeta, start: int = 0, stop: int | None = None) -> AsyncGenerator[bytes, None]:
        """The bytes through a signed URL with aiohttp: no thread per piece, connections reused."""
        stop = meta.size if stop is None else stop
        if stop <= start:
            return
        url = self.signed_url(meta, SIGNED_READ_TTL)
        ranged = start > 0 or stop < meta.size
        headers = {"Range": f"bytes={start}-{stop - 1}"} if ranged else {}
        try:
            async with self._reads().get(URL(url, encoded=True), headers=headers) as response:
                if response.status != (206 if ranged else 200):
                    raise ObsUnavailable(f"OBS get {meta.remote}: {response.status} {response.reason}")
                left = stop - start
                async for piece in response.content.iter_chunked(READ_SIZE):
                    left -= len(piece)
                    yield piece
                if left:
                    raise ObsUnavailable(f"OBS get {meta.remote}: body ended {left} bytes early")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ObsUnavailable(f"OBS get {meta.remote}: {type(exc).__name__}: {exc}") from None

    def _reads(self) -> aiohttp.ClientSession:
        """The session for signed URLs (reads and listings)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60), auto_decompress=False
            )
        return self._session

    def signed_url(self, meta: ObjectMeta, ttl: float) -> str:
        """A URL that fetches the object without credentials for ``ttl`` seconds (no network)."""
        signed = self._client.createSignedUrl("GET", self.bucket, meta.remote, expires=int(ttl))
        return str(signed.signedUrl)

    async def upload(self, path: Path, meta: ObjectMeta) -> ObjectMeta:
        """Put the body file with its metadata; multipart when large. Return the meta as stored."""
        stored = _as_stored(meta, self.object_key(meta.key))
        metadata = {META: stored.to_json()}
        if meta.size > MULTIPART_ABOVE:
            await self._call(
                "multipart upload",
                self._client.uploadFile,
                self.bucket,
                stored.remote,
                str(path),
                partSize=PART_SIZE,
                taskNum=PART_TASKS,
                metadata=metadata,
                headers=self._put_header(meta),
            )
        else:
            await self._call(
                "put",
                self._client.putFile,
                self.bucket,
                stored.remote,
                str(path),
                metadata=metadata,
                headers=self._put_header(meta),
            )
        for algorithm, hexdigest in (("sha256", meta.sha256), ("sha512", meta.sha512)):
            if hexdigest:  # other instances find the object by its digest through these
                await self._call(
                    "put digest marker",
                    self._client.putContent,
                    self.bucket,
                    self.digest_key(algorithm, hexdigest),
                    content="",
                    metadata={KEY_META: meta.key},
                )
        log.info("uploaded %s to OBS as %s (%s)", meta.url, stored.remote, format_size(meta.size))
        return stored

    # -- leases: one instance fetches a cold key ------------------------------------------------

    def lease_key(self, key: str) -> str:
        return f"{self.prefix}{LEASES_DIR}{digest_of(key)}"

    async def take_lease(self, key: str, owner: str) -> bool:
        """Create the key's lease object unless it exists (``If-None-Match: *``): whether we got it."""
        loop = asyncio.get_running_loop()
        call = self._client.putContent
        try:
            resp = await loop.run_in_executor(
                self._pool,
                lambda: call(self.bucket, self.lease_key(key), content=owner, extensionHeaders={"If-None-Match": "*"}),
            )
        except Exception as exc:
            raise ObsUnavailable(f"OBS take lease: {type(exc).__name__}: {exc}") from None
        if resp.status in (409, 412):
            return False
        if resp.status >= 300:
            raise ObsUnavailable(f"OBS take lease: {resp.status} {resp.errorCode or ''} {resp.errorMessage or ''}")
        return True

    async def renew_lease(self, key: str, owner: str) -> None:
        """Rewrite the lease (its time is how the others know the fetch is alive)."""
        await self._call("renew lease", self._client.putContent, self.bucket, self.lease_key(key), content=owner)

    async def lease_stamp(self, key: str) -> str | None:
        """What identifies the lease's last write (ETag, Last-Modified), or None when there is
        none: a stamp that stops changing tells a dead fetch, whatever the clocks say."""
        resp = await self._call(
            "head lease", self._client.getObjectMetadata, self.bucket, self.lease_key(key), ok_missing=True
        )
        if resp is None:
            return None
        headers = {k.lower(): v for k, v in resp.header}
        return f"{headers.get('etag', '')} {headers.get('last-modified', '')}"

    async def drop_lease(self, key: str) -> None:
        await self.delete_key(self.lease_key(key))

    async def conditional_puts_work(self) -> bool:
        """Whether the endpoint refuses a second ``If-None-Match: *`` PUT (S3 does since 2024,
        SeaweedFS does; a store that ignores it cannot keep one fetch per key across instances)."""
        probe = f"probe-{os.getpid()}-{time.monotonic_ns()}"
        try:
            first = await self.take_lease(probe, "probe")
            second = await self.take_lease(probe, "probe")
            await self.drop_lease(probe)
        except ObsUnavailable:
            return False
        return first and not second

    def digest_key(self, algorithm: str, hexdigest: str) -> str:
        return f"{self.prefix}{DIGESTS_DIR}{algorithm}/{hexdigest}"

    async def key_by_digest(self, algorithm: str, hexdigest: str) -> str | None:
        """The cache key of an object some instance uploaded with this digest (one HEAD)."""
        resp = await self._call(
            "head digest marker", self._client.getObjectMetadata, self.bucket,
            self.digest_key(algorithm, hexdigest), ok_missing=True,
        )  # fmt: skip
        if resp is None:
            return None
        return {k.lower(): v for k, v in resp.header}.get(KEY_META)

    async def delete_digest_markers(self, meta: ObjectMeta) -> None:
        for algorithm, hexdigest in (("sha256", meta.sha256), ("sha512", meta.sha512)):
            if hexdigest and await self.key_by_digest(algorithm, hexdigest) == meta.key:
                await self.delete_key(self.digest_key(algorithm, hexdigest))

    def _put_header(self, meta: ObjectMeta) -> PutObjectHeader:
        header = PutObjectHeader()
        header.contentType = meta.content_type or "application/octet-stream"
        return header

    async def begin_write(self, key: str) -> ObsWriter:
        self._spool.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="obs-", suffix=".part", dir=self._spool)
        return ObsWriter(self, key, Path(path), fd)

    async def update_meta(self, meta: ObjectMeta) -> None:
        """New metadata on a stored object (after revalidation): copied onto itself."""
        stored = _as_stored(meta, meta.remote)
        header = CopyObjectHeader()
        header.directive = "REPLACE"
        header.contentType = meta.content_type or "application/octet-stream"
        await self._call(
            "update metadata",
            self._client.copyObject,
            self.bucket,
            meta.remote,
            self.bucket,
            meta.remote,
            metadata={META: stored.to_json()},
            headers=header,
        )

    async def delete(self, meta: ObjectMeta) -> None:
        await self.delete_key(meta.remote)

    async def delete_key(self, object_key: str) -> None:
        await self._call("delete", self._client.deleteObject, self.bucket, object_key, ok_missing=True)


class ObsWriter(Writer):
    """A body written straight to OBS: spooled to a local file, uploaded at commit."""

    def __init__(self, store: ObsStore, key: str, path: Path, fd: int) -> None:
        self._store = store
        self.key = key
        self.path = path
        self._file = os.fdopen(fd, "wb")
        self._written = 0
        self._sha256 = hashlib.sha256()
        self._sha512 = hashlib.sha512()
        self._md5 = hashlib.md5(usedforsecurity=False)

    @property
    def written(self) -> int:
        return self._written

    def _write_sync(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._file.write(chunk)
            self._sha256.update(chunk)
            self._sha512.update(chunk)
            self._md5.update(chunk)
            self._written += len(chunk)

    async def write(self, data: bytes | list[bytes]) -> None:
        chunks = [data] if isinstance(data, bytes) else data
        await asyncio.get_running_loop().run_in_executor(None, self._write_sync, chunks)

    async def digests(self) -> Digests:
        return Digests(self._sha256.hexdigest(), self._sha512.hexdigest(), self._md5.hexdigest())

    async def commit(self, meta: ObjectMeta) -> ObjectMeta:
        try:
            self._file.close()
            return await self._store.upload(self.path, meta)
        finally:
            self.path.unlink(missing_ok=True)

    async def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
