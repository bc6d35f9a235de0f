"""FTP origins (SPEC section 5) with aioftp, dressed as HTTP responses for the cache.

A download logs in (anonymous, or ``user:pass@`` from the URL), asks ``SIZE`` (binary mode) and
``MDTM``, and streams ``RETR`` over a passive data connection. The answer looks like an HTTP one:
``200`` with ``Content-Length``, a content type from the file name, ``Last-Modified`` and an
``ETag`` made of size and time; a ``Range: bytes=N-`` request (how the cache resumes, with
``If-Range``) becomes ``REST N`` and a ``206``. So retries, resume, single-flight and storage are
the same code as for HTTP. A missing file (550) is a 404; a directory is refused with a 400.
"""

from __future__ import annotations

import calendar
import mimetypes
import time
from collections.abc import Mapping
from email.utils import formatdate

import aioftp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..config import UpstreamConfig
from ..errors import BadUrl, UpstreamFailed
from ..guard.ssrf import SsrfGuard

READ_SIZE = 256 << 10
ANONYMOUS = ("anonymous", "cacheproxy@")
COMPRESSED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}


class FtpResponse:
    """An FTP download (or a HEAD of one) with the face of an upstream HTTP response."""

    def __init__(
        self,
        url: URL,
        status: int,
        headers: CIMultiDict[str],
        client: aioftp.Client | None = None,
        stream: aioftp.DataConnectionThrottleStreamIO | None = None,
        body: bytes = b"",
    ) -> None:
        self.url = url
        self.status = status
        self.headers = CIMultiDictProxy(headers)
        self.request_headers: Mapping[str, str] = {}
        self.request_time = time.time()
        self._client = client
        self._stream = stream
        self._body = body
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
        self._left = self.content_length if stream is not None else None

    async def read_chunk(self) -> bytes:
        """The next bytes (b"" at the end); ConnectionError when the data connection ended early."""
        if self._stream is None:
            body, self._body = self._body, b""
            return body
        data = await self._stream.read(READ_SIZE)
        if data:
            if self._left is not None:
                self._left -= len(data)
            return data
        if self._left:
            raise ConnectionResetError(f"FTP data connection closed {self._left} bytes before the end")
        stream, self._stream = self._stream, None
        try:
            await stream.finish()
        except aioftp.StatusCodeError as exc:
            raise ConnectionResetError(f"FTP transfer failed: {_reply(exc)}") from None
        return b""

    async def read_body(self, limit: int) -> bytes:
        chunks, size = [], 0
        while size <= limit and (chunk := await self.read_chunk()):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    def detach_socket(self) -> None:
        return None  # aioftp reads the data connection itself

    def release(self) -> None:
        self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._client is not None:
            self._client.close()
            self._client = None


def _reply(exc: aioftp.StatusCodeError) -> str:
    codes = ",".join(str(c) for c in exc.received_codes)
    text = " ".join(str(line) for line in exc.info).strip()
    return f"{codes} {text}".strip()[:200]


def _received(exc: aioftp.StatusCodeError) -> str:
    return str(exc.received_codes[-1]) if exc.received_codes else ""


def _content_type(path: str) -> str:
    kind, encoding = mimetypes.guess_type(path, strict=False)
    if encoding is not None:  # .tar.gz is a gzip file to HTTP clients, never Content-Encoding
        return COMPRESSED_TYPES.get(encoding, "application/octet-stream")
    return kind or "application/octet-stream"


def _mdtm(text: str) -> float | None:
    try:
        return calendar.timegm(time.strptime(text.strip()[:14], "%Y%m%d%H%M%S"))
    except ValueError:
        return None


def _start_of(headers: Mapping[str, str], etag: str) -> int:
    """Where a ``Range: bytes=N-`` request starts (0 without one, or when If-Range differs)."""
    wanted = headers.get("Range", "")
    if not wanted.startswith("bytes=") or not wanted.endswith("-"):
        return 0
    if_range = headers.get("If-Range")
    if if_range is not None and if_range != etag:
        return 0
    start = wanted[len("bytes=") : -1]
    return int(start) if start.isdigit() else 0


class FtpUpstream:
    def __init__(self, config: UpstreamConfig, guard: SsrfGuard) -> None:
        self.config = config
        self._guard = guard

    async def open(self, method: str, url: URL, headers: Mapping[str, str], resolver: AbstractResolver) -> FtpResponse:
        """A response for ``url``; OSError/TimeoutError/UpstreamFailed for the retry loop."""
        host = url.raw_host or ""
        port = url.port or aioftp.DEFAULT_PORT
        self._guard.check_literal(host)
        results = await resolver.resolve(host.strip("[]"), port)  # the guarded resolver checks them
        client = aioftp.Client(
            socket_timeout=self.config.read_timeout,
            connection_timeout=self.config.connect_timeout,
            path_timeout=self.config.read_timeout,
        )
        try:
            return await self._open(client, method, url, headers, results[0]["host"], port)
        except BaseException:
            client.close()
            raise

    async def _open(
        self, client: aioftp.Client, method: str, url: URL, headers: Mapping[str, str], address: str, port: int
    ) -> FtpResponse:
        path = url.path or "/"
        try:
            await client.connect(address, port)
            user, password = (url.user, url.password or "") if url.user else ANONYMOUS
            try:
                await client.login(user, password)
            except aioftp.StatusCodeError as exc:
                raise UpstreamFailed(f"FTP login as {user!r} refused: {_reply(exc)}") from None
            await client.command("TYPE I", "200")
            try:
                _, info = await client.command(f"SIZE {path}", "213")
                size = int(info[-1].strip().split()[-1])
            except aioftp.StatusCodeError as exc:
                if not _received(exc).startswith("55"):
                    raise
                return await self._not_a_file(client, url, path)
            modified = None
            try:
                _, info = await client.command(f"MDTM {path}", "213")
                modified = _mdtm(info[-1].strip().split()[-1])
            except aioftp.StatusCodeError:
                pass  # optional (RFC 3659)
            etag = f'"ftp-{size}-{int(modified or 0)}"'
            start = min(_start_of(headers, etag), size)
            response = CIMultiDict(
                {
                    "Content-Type": _content_type(path),
                    "Content-Length": str(size - start),
                    "ETag": etag,
                    "Accept-Ranges": "bytes",
                }
            )
            if modified is not None:
                response["Last-Modified"] = formatdate(modified, usegmt=True)
            status = 200
            if start:
                status = 206
                response["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
            if method == "HEAD":
                client.close()
                return FtpResponse(url, status, response)
            stream = await client.download_stream(path, offset=start)
            return FtpResponse(url, status, response, client, stream)
        except aioftp.StatusCodeError as exc:
            raise UpstreamFailed(f"FTP server answered {_reply(exc)}") from None

    async def _not_a_file(self, client: aioftp.Client, url: URL, path: str) -> FtpResponse:
        try:
            is_dir = await client.is_dir(path)
        except aioftp.StatusCodeError:
            is_dir = False
        client.close()
        if is_dir:
            raise BadUrl(f"{url.with_user(None)} is a directory on the FTP server: ask for a file")
        body = f"not found on the FTP server: {path}\n".encode()
        headers = CIMultiDict({"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body))})
        return FtpResponse(url, 404, headers, body=body)
