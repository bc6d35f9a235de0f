"""Building the aiohttp application from a config, and running it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .cache.manager import Cache
from .cache.shared import SharedTier
from .config import Config
from .guard.access import AccessRules
from .guard.ssrf import SsrfGuard
from .ops import health
from .ops.logging import flush_access_log
from .ops.metrics import Metrics
from .proxy.certs import Authority
from .proxy.fastpath import ProxySite
from .proxy.handler import entry
from .proxy.respond import Responder
from .state import STATE, AppState
from .storage.local import LocalStore
from .storage.obs import ObsStore
from .upstream.http import HttpUpstream

log = logging.getLogger(__name__)

# Request line and header limits (aiohttp's parser answers 400 beyond them).
MAX_LINE_SIZE = 16 << 10
MAX_FIELD_SIZE = 16 << 10
MAX_HEADERS = 100
LISTEN_BACKLOG = 4096
IO_THREADS = 16
DEFAULT_GRACE = 30.0


def create_app(config: Config, grace: float = DEFAULT_GRACE) -> web.Application:
    app = web.Application(middlewares=[entry], client_max_size=1 << 30)
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="cacheproxy-io")
    access = AccessRules(config)
    guard = SsrfGuard(config.rules.allow_private_upstreams)
    store = LocalStore(config.cache.dir, executor)
    upstream = HttpUpstream(config.upstream, access, guard, metrics)
    shared = None
    if config.storage.backend == "obs":
        remote = ObsStore(config.storage.obs, config.cache.dir / "tmp")
        shared = SharedTier(config.storage.obs, remote, store, metrics)
    cache = Cache(config, store, upstream, metrics, shared)
    authority = None
    if config.tls_intercept.enabled:
        authority = Authority(config.tls_intercept.ca_cert, config.tls_intercept.ca_key)
    app[STATE] = AppState(
        config, metrics, access, store, upstream, cache, Responder(store, metrics, shared), executor, authority, shared
    )
    health.add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_default_executor(executor)
        await upstream.start()
        await cache.load()
        background = [asyncio.create_task(_housekeeping(cache, config.cache.cleanup_interval))]
        yield
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        flush_access_log()
        await cache.close(grace)
        await upstream.close()
        executor.shutdown(wait=True)
        if authority is not None:
            authority.close()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _housekeeping(cache: Cache, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await cache.cleanup()
        except Exception:
            log.exception("periodic clean-up failed")


def runner_for(app: web.Application, grace: float = DEFAULT_GRACE) -> web.AppRunner:
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=grace,
        max_line_size=MAX_LINE_SIZE,
        max_field_size=MAX_FIELD_SIZE,
        max_headers=MAX_HEADERS,
    )


async def serve(config: Config, grace: float = DEFAULT_GRACE, worker: int | None = None) -> None:
    """Run until SIGTERM/SIGINT; then stop accepting and let transfers finish for ``grace`` seconds.

    ``worker`` is set in a process of a ``workers`` > 1 group: each worker listens on its own
    socket bound with SO_REUSEPORT, and the kernel spreads new connections over them.
    """
    app = create_app(config, grace)
    runner = runner_for(app, grace)
    await runner.setup()
    for address in config.listen:
        site = ProxySite(
            runner, app[STATE], address.host, address.port, backlog=LISTEN_BACKLOG, reuse_port=worker is not None
        )
        await site.start()
        if worker is None:
            log.info("listening on %s (cache %s)", address, config.cache.dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping: no new connections; up to %.0fs for running transfers", grace)
    await runner.cleanup()
    log.info("stopped")
