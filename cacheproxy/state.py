"""What a running app holds, reachable from every request as ``request.app[STATE]``."""

from __future__ import annotations

import asyncio
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

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
    # Decrypted connections of intercepted CONNECTs -> the https origin their requests are for.
    intercepted: weakref.WeakKeyDictionary[asyncio.BaseTransport, str] = field(
        default_factory=weakref.WeakKeyDictionary
    )


STATE: web.AppKey[AppState] = web.AppKey("state", AppState)
