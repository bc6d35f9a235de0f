"""Logging set-up and the access log (one line per request)."""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass

from ..config import LogConfig

ACCESS = "cacheproxy.access"
# scheme:/user:password@ with one or more slashes: a client (or a path) may fold "//" into "/".
_PASSWORD_IN_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*:/+[^/\s:@]*):[^/\s@]*@")


def redact(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@host`` in it masked (also the
    folded ``scheme:/user:password@host`` of URL-in-path requests)."""
    return _PASSWORD_IN_URL.sub(r"\1:***@", text) if "@" in text else text


def _install_redaction() -> None:
    """Every log record, of cacheproxy and of the libraries it uses (aiohttp's among them), is
    created with URL passwords masked, whichever handler (ours, a test's) ends up writing it."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if record.args:
            message = record.getMessage()
            if "@" in message:
                record.msg, record.args = redact(message), None
        elif isinstance(record.msg, str) and "@" in record.msg:
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
    """The access log (a file, or standard error for "-"), written by a thread of its own in batches.

    Requests only append their line to a list; the writer thread writes what gathered every
    FLUSH_EVERY seconds (sooner past FLUSH_LINES) with one ``write`` on an O_APPEND descriptor, so
    the workers of one group can share the file, and a slow disk (writeback of large downloads can
    stall writes for a long moment) or a slow reader of standard error (journald, docker) never
    holds up the event loop. Standard error and a file cost a request the same. The thread is
    started in the process that logs first, so forked workers each get their own.
    """

    def __init__(self, filename: str) -> None:
        super().__init__()
        self.path = filename
        if filename == "-":
            self._fd = os.dup(sys.stderr.fileno())
        else:
            self._fd = os.open(filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._started = False  # the writer thread runs in this process (reset in a forked child)
        forked = weakref.WeakMethod(self._forked)
        os.register_at_fork(after_in_child=lambda: (method := forked()) and method())
        self._wake = threading.Event()
        self._lines: collections.deque[str] = collections.deque()  # appends and pops need no lock
        self._closed = False

    def write_line(self, line: str) -> None:
        """The line as the text format would write it, without building a LogRecord (hot path)."""
        if not self._started:
            self._start()
        lines = self._lines
        lines.append(line)
        if len(lines) >= FLUSH_LINES:
            self._wake.set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:
            self.handleError(record)

    def _forked(self) -> None:
        self._started = False

    def _start(self) -> None:
        self._started = True
        self._wake = threading.Event()  # a lock held across fork would never be released
        threading.Thread(target=self._run, name="cacheproxy-access-log", daemon=True).start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_EVERY)
            self._wake.clear()
            self.flush_now()

    def flush_now(self) -> None:
        """Write what gathered (blocking)."""
        queue, lines = self._lines, []
        while queue:
            lines.append(queue.popleft())
        if lines and self._fd >= 0:
            data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
            while data:
                data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush_now()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


FLUSH_EVERY = 0.5  # seconds
FLUSH_LINES = 2000  # lines gathered that wake the writer before FLUSH_EVERY


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
    setup_access_log(config)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def setup_access_log(config: LogConfig) -> None:
    """Access lines go to their own writer (standard error for "-", else the file), not through
    the logging machinery: one line per request is the hot path."""
    access = logging.getLogger(ACCESS)
    access.propagate = False
    for handler in list(access.handlers):
        access.removeHandler(handler)
        handler.close()
    global _direct, _json
    writer = _AccessFile(config.access_log)
    writer.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(writer)  # for anything logged to the access logger by name
    access.setLevel(logging.INFO)
    _direct, _json = writer, config.format == "json"


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
_direct: _AccessFile | None = None  # set up by setup_logging; until then lines go to the access logger
_json = False


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
        _direct.write_line(_json_line(TEXT_LINE % args, record) if _json else TEXT_LINE % args)
        return
    logger = logging.getLogger(ACCESS)
    if logger.isEnabledFor(logging.INFO):
        logger.info(TEXT_LINE, *args, extra={"fields": record.__dict__})


def _json_line(message: str, record: AccessRecord) -> str:
    now = time.time()
    data = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + "Z",
        "level": "info",
        "logger": ACCESS,
        "message": message,
        **{k: v for k, v in record.__dict__.items() if k != "reported"},
    }
    return json.dumps(data)
