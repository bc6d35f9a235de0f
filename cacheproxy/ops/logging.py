"""Logging set-up and the access log (one line per request)."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass

from ..config import LogConfig

ACCESS = "cacheproxy.access"


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


class _AccessFile(logging.FileHandler):
    """The access log file, written in batches: at most every FLUSH_EVERY seconds or FLUSH_BYTES.

    Each flush writes whole lines with O_APPEND, so the workers of one group can share the file.
    :func:`flush_access_log` runs every second, so a quiet proxy's last lines wait at most that.
    """

    def __init__(self, filename: str) -> None:
        self._pending = 0
        self._flushed = time.monotonic()
        super().__init__(filename, encoding="utf-8")

    def _open(self):  # type: ignore[no-untyped-def]
        return open(self.baseFilename, self.mode, encoding=self.encoding, buffering=BUFFER_BYTES)

    def emit(self, record: logging.LogRecord) -> None:
        self._pending += 200  # about a line; exactness does not matter below the buffer size
        super().emit(record)

    def write_line(self, line: str) -> None:
        """The line as the text format would write it, without building a LogRecord (hot path)."""
        with self.lock:  # type: ignore[union-attr]
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(line + "\n")
            self._pending += len(line)
            self.flush()

    def flush(self) -> None:
        now = time.monotonic()
        if self._pending >= FLUSH_BYTES or now - self._flushed >= FLUSH_EVERY:
            self.flush_now()

    def flush_now(self) -> None:
        super().flush()
        self._pending = 0
        self._flushed = time.monotonic()


FLUSH_EVERY = 0.5  # seconds
FLUSH_BYTES = 256 << 10
BUFFER_BYTES = 1 << 20  # larger than FLUSH_BYTES: the file object never flushes half a line itself


def flush_access_log() -> None:
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
