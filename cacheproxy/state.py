"""What a running app holds, reachable from every request as ``request.app[STATE]``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from .cache.manager import Cache
from .config import Config
from .guard.access import AccessRules
from .ops.metrics import Metrics
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


STATE: web.AppKey[AppState] = web.AppKey("state", AppState)
