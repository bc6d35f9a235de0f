"""A real FTP origin for tests: pyftpdlib in a thread, with a RETR log and a switch that makes a
file's first downloads end early (the server sends fewer bytes and says the transfer completed)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler
from pyftpdlib.servers import FTPServer

USER, PASSWORD = "builder", "s3cret-pw"


@dataclass
class Retr:
    path: str
    rest: int  # the REST offset the client asked for


class _Truncated:
    """A file that ends after ``limit`` bytes."""

    def __init__(self, file: Any, limit: int) -> None:
        self._file = file
        self._left = limit

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        data: bytes = self._file.read(min(n if n >= 0 else self._left, self._left))
        self._left -= len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class FtpOrigin:
    def __init__(self, root: Path, rate: int | None = None) -> None:
        self.root = root
        self.retrs: list[Retr] = []
        self.cut: dict[str, list[int]] = {}  # path -> [bytes to send, times left]
        self.refuse = 0  # answer this many next connections with 421 (busy)
        self.port = 0
        self._rate = rate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: FTPServer | None = None

    def add(self, path: str, body: bytes) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)

    def url(self, path: str, credentials: bool = False) -> str:
        userinfo = f"{USER}:{PASSWORD}@" if credentials else ""
        return f"ftp://{userinfo}127.0.0.1:{self.port}{path}"

    def transfers(self, path: str) -> int:
        return sum(1 for r in self.retrs if r.path == path)

    def start(self) -> None:
        origin = self
        authorizer = DummyAuthorizer()
        authorizer.add_anonymous(str(self.root), perm="elr")
        authorizer.add_user(USER, PASSWORD, str(self.root), perm="elr")

        class Files(AbstractedFS):
            def open(self, filename: str, mode: str) -> Any:
                file = super().open(filename, mode)
                cut = origin.cut.get("/" + os.path.relpath(filename, origin.root))
                if cut is not None and cut[1] > 0:
                    cut[1] -= 1
                    return _Truncated(file, cut[0])
                return file

        class Handler(FTPHandler):
            def handle(self) -> None:
                if origin.refuse > 0:
                    origin.refuse -= 1
                    self.respond("421 Too many users, try later.")
                    self.close_when_done()
                    return
                super().handle()

            def ftp_RETR(self, file: str) -> Any:
                origin.retrs.append(Retr("/" + os.path.relpath(file, origin.root), self._restart_position))
                return super().ftp_RETR(file)

        Handler.authorizer = authorizer
        Handler.abstracted_fs = Files
        Handler.use_sendfile = False
        Handler.auth_failed_timeout = 0.05  # pyftpdlib delays a 530 by 3 s by default
        if self._rate is not None:

            class Slow(ThrottledDTPHandler):
                read_limit = self._rate

            Handler.dtp_handler = Slow
        server = self._server = FTPServer(("127.0.0.1", 0), Handler)
        server.max_cons = 256
        self.port = server.socket.getsockname()[1]

        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)

        def serve() -> None:
            while not self._stop.is_set():
                server.ioloop.loop(timeout=0.05, blocking=False)
            server.close_all()

        self._thread = threading.Thread(target=serve, name="ftp-origin", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
