"""What a running process holds: the parts the pipeline and its answers reach."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .cache.manager import Cache
from .cache.shared import SharedTier
from .config import Config
from .guard.access import AccessRules
from .ops.metrics import Metrics
from .proxy.certs import Authority
from .proxy.respond import Responder
from .storage.local import LocalStore
from .upstream.http import HttpUpstream


@dataclass
class AppState:
    config: Config
    metrics: Metrics
    access: AccessRules
    store: LocalStore
    upstream: HttpUpstream
    cache: Cache
    responder: Responder
    executor: ThreadPoolExecutor
    authority: Authority | None = None  # TLS interception on
    shared: SharedTier | None = None  # storage.backend: obs
