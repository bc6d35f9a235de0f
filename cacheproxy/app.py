"""A running cacheproxy: its parts built from a config, its one front door, start and stop.

:class:`App` wires the layers together (store, upstream, cache, rules, the pipeline) and serves
every listening socket through :class:`~.proxy.door.DoorServer`; :func:`serve` runs it until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .admin.api import PREFIX, AdminApi
from .admin.jobs import Jobs
from .admin.mirror import DIGEST_PREFIX, DigestMirror
from .admin.page import status_page
from .admin.stats import Stats
from .cache.manager import Cache
from .cache.shared import SharedTier
from .certs import Authority
from .config import Config
from .guard.access import AccessRules
from .guard.ssrf import SsrfGuard
from .ops.health import endpoints
from .ops.logging import flush_access_log
from .ops.metrics import Metrics
from .ops.observe import Observer
from .proxy.door import Door, DoorServer
from .proxy.pipeline import Pipeline, Service
from .proxy.respond import Responder
from .state import AppState
from .storage.local import LocalStore
from .storage.obs import ObsStore
from .upstream.http import HttpUpstream

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096
IO_THREADS = 16
DEFAULT_GRACE = 30.0
WATCH_INTERVAL = 30.0  # seconds between looks at the store and OBS for alerts (at most)


def build_state(config: Config) -> AppState:
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
    return AppState(config, metrics, access, store, upstream, cache, executor, authority, shared)


class App:
    """The parts of one process, and the server every connection of it goes through."""

    def __init__(self, config: Config, grace: float = DEFAULT_GRACE) -> None:
        self.config = config
        self.grace = grace
        self.state = build_state(config)
        self.observe = Observer(self.state.metrics)
        self.stats = Stats(self.state)
        self.jobs = Jobs(self.state.cache, config.cache.dir / "jobs")
        services = endpoints(self.state.metrics, self.state.cache.readiness)
        services["/_cacheproxy/"] = services["/_cacheproxy"] = status_page(self.stats)
        api = AdminApi(self.state, self.stats, self.jobs)
        responder = Responder(self.state.store, self.state.metrics)
        mirror_prefix = config.checksums.mirror_prefix + "/"
        routes: list[tuple[str, Service]] = [
            (PREFIX, api),
            (mirror_prefix, DigestMirror(self.state, responder, mirror_prefix[:-1])),
            (f"{DIGEST_PREFIX}/sha", DigestMirror(self.state, responder, DIGEST_PREFIX)),
        ]
        self.pipeline = Pipeline(self.state, services, self.observe, routes)
        self._runner: web.ServerRunner | None = None
        self._background: list[asyncio.Task[None]] = []
        self._closed = False

    async def start(self) -> None:
        """Load the index and get ready to serve (nothing listens yet: see :meth:`listen`)."""
        state = self.state
        asyncio.get_running_loop().set_default_executor(state.executor)
        await state.upstream.start()
        await state.cache.load()
        self._background.append(asyncio.create_task(_every(self.config.cache.cleanup_interval, state.cache.cleanup)))
        self._background.append(
            asyncio.create_task(_every(min(WATCH_INTERVAL, self.config.alerts.window / 4), state.cache.watch))
        )
        server = DoorServer(self.pipeline, Door(self.config, self.observe))
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=self.grace)
        await self._runner.setup()

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Accept connections on ``host:port``; return the port (useful with 0)."""
        assert self._runner is not None, "start() first"
        before = set(map(str, self._runner.addresses))
        site = web.TCPSite(self._runner, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port or None)
        await site.start()
        added = [a for a in self._runner.addresses if str(a) not in before]
        return int(added[0][1]) if added else port

    async def close(self) -> None:
        """Stop accepting; running transfers get the grace period; then everything stops."""
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        state = self.state
        flush_access_log()
        await self.jobs.close()
        await state.cache.close(self.grace)
        await state.cache.alerts.close()
        await state.upstream.close()
        state.executor.shutdown(wait=True)
        if state.authority is not None:
            state.authority.close()

    async def _sample(self) -> None:
        self.stats.sample()
        await asyncio.to_thread(self.jobs.prune)


async def _every(interval: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await job()
        except Exception:
            log.exception("periodic %s failed", getattr(job, "__name__", job))


async def serve(config: Config, grace: float = DEFAULT_GRACE, worker: int | None = None) -> None:
    """Run until SIGTERM/SIGINT; then stop accepting and let transfers finish for ``grace`` seconds.

    ``worker`` is set in a process of a ``workers`` > 1 group: each worker listens on its own
    socket bound with SO_REUSEPORT, and the kernel spreads new connections over them.
    """
    app = App(config, grace)
    await app.start()
    for address in config.listen:
        await app.listen(address.host, address.port, reuse_port=worker is not None)
        if worker is None:
            log.info("listening on %s (cache %s)", address, config.cache.dir)
    # What the start built (modules, the app, the loaded index) stays for the process's life: out
    # of the garbage collector's sight, a full collection no longer walks it each time (~50 000
    # objects: 20-30 ms that requests waited for, several times a minute under load).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping: no new connections; up to %.0fs for running transfers", grace)
    await app.close()
    log.info("stopped")
