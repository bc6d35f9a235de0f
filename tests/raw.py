"""A raw client connection, to see exactly what goes over the wire (and to send what no real
client would)."""

from __future__ import annotations

import asyncio


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", local: str | None = None) -> Connection:
        local_addr = (local, 0) if local else None
        return cls(*await asyncio.open_connection(host, port, local_addr=local_addr))

    def send(self, *requests: str | bytes) -> None:
        self.writer.write(b"".join(r.encode("latin-1") if isinstance(r, str) else r for r in requests))

    async def response(self, head_only: bool = False, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
        status_line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert status_line, "connection closed"
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return int(status_line.split()[1]), headers, body

    async def rest(self, timeout: float = 5) -> bytes:
        """Everything until the proxy closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def closed(self, timeout: float = 5) -> bool:
        return await asyncio.wait_for(self.reader.read(1), timeout) == b""

    def close(self) -> None:
        self.writer.close()


def get(url: str, *headers: str, method: str = "GET", version: str = "1.1") -> str:
    host = url.split("/")[2]
    return f"{method} {url} HTTP/{version}\r\nHost: {host}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
