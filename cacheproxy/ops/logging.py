"""Logging set-up and the access log (one line per request)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass

from ..config import LogConfig

ACCESS = "cacheproxy.access"
_PASSWORD_IN_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^/\s@]*@")


def redact(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@host`` in it masked."""
    return _PASSWORD_IN_URL.sub(r"\1:***@", text) if "@" in text else text


def _install_redaction() -> None:
    """Every log record of cacheproxy is created with URL passwords masked (ftp://user:pass@),
    whichever handler (ours, a test's) ends up writing it."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if record.name.startswith("cacheproxy") and record.args:
            message = record.getMessage()
            if "@" in message:
                record.msg, record.args = redact(message), None
        elif record.name.startswith("cacheproxy") and isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


_install_redaction()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "fields", {}))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


class _AccessFile(logging.Handler):
    """The access log file, written by a thread of its own in batches.

    Requests only append their line to a list; the writer thread writes what gathered every
    FLUSH_EVERY seconds (sooner past FLUSH_BYTES) with one ``write`` on an O_APPEND descriptor, so
    the workers of one group can share the file and a slow disk (writeback of large downloads can
    stall writes for a long moment) never holds up the event loop. The thread is started in the
    process that logs first, so forked workers each get their own.
    """

    def __init__(self, filename: str) -> None:
        super().__init__()
        self.path = filename
        self._fd = os.open(filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._pid = 0
        self._wake = threading.Condition()
        self._lines: list[str] = []
        self._size = 0
        self._closed = False

    def write_line(self, line: str) -> None:
        """The line as the text format would write it, without building a LogRecord (hot path)."""
        if self._pid != os.getpid():
            self._start()
        with self._wake:
            self._lines.append(line)
            self._size += len(line)
            if self._size >= FLUSH_BYTES:
                self._wake.notify()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:
            self.handleError(record)

    def _start(self) -> None:
        self._pid = os.getpid()
        self._wake = threading.Condition()  # a lock held across fork would never be released
        threading.Thread(target=self._run, name="cacheproxy-access-log", daemon=True).start()

    def _run(self) -> None:
        while not self._closed:
            with self._wake:
                self._wake.wait_for(lambda: self._size >= FLUSH_BYTES or self._closed, timeout=FLUSH_EVERY)
            self.flush_now()

    def flush_now(self) -> None:
        """Write what gathered (blocking)."""
        with self._wake:
            lines, self._lines, self._size = self._lines, [], 0
        if lines and self._fd >= 0:
            data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
            while data:
                data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        self._closed = True
        with self._wake:
            self._wake.notify()
        self.flush_now()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


FLUSH_EVERY = 0.5  # seconds
FLUSH_BYTES = 256 << 10


def flush_access_log() -> None:
    """Write the gathered access lines now (blocking: for shutdown and tests)."""
    for handler in logging.getLogger(ACCESS).handlers:
        if isinstance(handler, _AccessFile):
            handler.flush_now()


def setup_logging(config: LogConfig) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter: logging.Formatter
    if config.format == "json":
        formatter = _JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    root.addHandler(stderr)
    root.setLevel(config.level.upper())
    setup_access_log(config, formatter)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def setup_access_log(config: LogConfig, formatter: logging.Formatter | None = None) -> None:
    """Where access lines go: the root logger's stderr for "-", else a file of their own."""
    if formatter is None:
        formatter = _JsonFormatter() if config.format == "json" else logging.Formatter("%(message)s")
    access = logging.getLogger(ACCESS)
    access.propagate = config.access_log == "-"
    for handler in list(access.handlers):
        access.removeHandler(handler)
        handler.close()
    global _direct
    _direct = None
    if config.access_log != "-":
        file_handler = _AccessFile(config.access_log)
        file_handler.setFormatter(formatter if config.format == "json" else logging.Formatter("%(message)s"))
        access.addHandler(file_handler)
        if config.format == "text":
            _direct = file_handler
    access.setLevel(logging.INFO)


@dataclass
class AccessRecord:
    client: str
    method: str
    target: str
    status: int
    bytes: int
    x_cache: str
    seconds: float
    error: str = ""


TEXT_LINE = '%s "%s %s" %d %d %s %.3fs%s'
_direct: _AccessFile | None = None  # a plain text access log file: lines skip the logging machinery


def log_access(record: AccessRecord) -> None:
    if "@" in record.target:
        record.target = redact(record.target)
    args = (
        record.client,
        record.method,
        record.target,
        record.status,
        record.bytes,
        record.x_cache or "-",
        record.seconds,
        f" {record.error}" if record.error else "",
    )
    if _direct is not None:
        _direct.write_line(TEXT_LINE % args)
        return
    logger = logging.getLogger(ACCESS)
    if logger.isEnabledFor(logging.INFO):
        logger.info(TEXT_LINE, *args, extra={"fields": record.__dict__})
