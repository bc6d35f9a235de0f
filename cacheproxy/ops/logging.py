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
    access = logging.getLogger(ACCESS)
    access.propagate = config.access_log == "-"
    for handler in list(access.handlers):
        access.removeHandler(handler)
    if config.access_log != "-":
        file_handler = logging.FileHandler(config.access_log)
        file_handler.setFormatter(formatter if config.format == "json" else logging.Formatter("%(message)s"))
        access.addHandler(file_handler)
    access.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


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


def log_access(record: AccessRecord) -> None:
    logger = logging.getLogger(ACCESS)
    if not logger.isEnabledFor(logging.INFO):
        return
    logger.info(
        '%s "%s %s" %d %d %s %.3fs%s',
        record.client,
        record.method,
        record.target,
        record.status,
        record.bytes,
        record.x_cache or "-",
        record.seconds,
        f" {record.error}" if record.error else "",
        extra={"fields": record.__dict__},
    )
