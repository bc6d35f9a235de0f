"""What a running process holds: the parts the pipeline reaches (built by :mod:`.app`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .cache.manager import Cache
from .cache.shared import SharedTier
from .certs import Authority
from .config import Config
from .guard.access import AccessRules
from .ops.metrics import Metrics
from .storage.base import Spool
from .upstream.http import HttpUpstream


@dataclass
class AppState:
    config: Config
    metrics: Metrics
    access: AccessRules
    store: Spool
    upstream: HttpUpstream
    cache: Cache
    executor: ThreadPoolExecutor
    authority: Authority | None = None  # TLS interception on
    shared: SharedTier | None = None  # storage.backend: obs
