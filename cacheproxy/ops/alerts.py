"""Alerts (SPEC section 8): what operators are told, when, and through which channel.

Events: ``fetch_failed`` (``failure_threshold`` failed fetches of one URL inside ``window``, each
after all retries), ``store_unwritable``, ``store_over_watermark`` (still above the high watermark
after an eviction pass), ``obs_unreachable`` (OBS failing for longer than ``window``) and
``content_changed`` (an immutable URL answered a different body). An alert goes out at most once
per subject per ``min_interval``.

The counts and the times alerts went out are kept in a :class:`Ledger` of small files under the
store's folder, each read and written under ``flock``, so the workers of one instance count
together and an alert goes out once per instance, not once per worker. Sending runs in tasks of
its own with a timeout and bounded retries: a slow or failing channel is logged and counted,
never waited for by a request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import smtplib
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp

from ..config import AlertsConfig, EmailConfig, WebhookConfig
from .logging import redact
from .metrics import Metrics

log = logging.getLogger(__name__)

RECENT = 100  # failures and alerts kept for the status page and the API
MAX_SENDING = 64  # alerts on their way at once; more are dropped (and logged)
SEND_BACKOFF = 1.0  # seconds before a channel's first retry, doubled each time

FETCH_FAILED = "fetch_failed"
STORE_UNWRITABLE = "store_unwritable"
STORE_OVER_WATERMARK = "store_over_watermark"
OBS_UNREACHABLE = "obs_unreachable"
CONTENT_CHANGED = "content_changed"


@dataclass
class Failure:
    url: str
    error: str
    time: float


@dataclass
class Alert:
    """The JSON body of a webhook call (SPEC section 8)."""

    event: str
    subject: str
    url: str | None
    failures: int
    last_error: str
    instance: str
    time: str  # ISO 8601, UTC
    channels: list[str] = field(default_factory=list)  # where it went (not sent to a channel)

    def payload(self) -> dict[str, object]:
        data = asdict(self)
        del data["channels"]
        return data


class Ledger:
    """Failure times and last alert times per subject, shared by the workers of one instance.

    One file per subject (named by a hash of it) in ``folder``; every change is a read and a write
    under an exclusive ``flock``. Files nobody touched for a day are removed by :meth:`prune`.
    When the folder cannot be used, the ledger is kept in this process's memory instead.
    """

    KEEP = 86400.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._memory: dict[str, dict[str, object]] | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("alerts: %s cannot be used (%s); workers count failures apart", folder, exc)
            self._memory = {}

    def failure(self, subject: str, now: float, window: float) -> int:
        """Record a failure of ``subject``; return how many fell inside the last ``window``."""
        with self._entry(subject) as entry:
            times = [t for t in entry.get("failures", []) if now - t < window]  # type: ignore[attr-defined]
            times.append(now)
            entry["failures"] = times[-1000:]
            return len(times)

    def claim(self, subject: str, now: float, min_interval: float) -> bool:
        """True, and the alert of ``subject`` counts as sent now, unless one went out less than
        ``min_interval`` ago (by any worker of this instance)."""
        with self._entry(subject) as entry:
            last = entry.get("sent")
            if isinstance(last, (int, float)) and now - last < min_interval:
                return False
            entry["sent"] = now
            entry["failures"] = []  # a new alert needs new failures
            return True

    def prune(self, now: float) -> None:
        if self._memory is not None:
            return
        for path in self.folder.glob("*.json"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > self.KEEP:
                    path.unlink()

    @contextlib.contextmanager
    def _entry(self, subject: str) -> Iterator[dict[str, object]]:
        if self._memory is not None:
            if len(self._memory) > 10_000:
                self._memory.clear()
            yield self._memory.setdefault(subject, {})
            return
        name = hashlib.sha256(subject.encode()).hexdigest()[:32] + ".json"
        fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = b""
            while chunk := os.read(fd, 65536):
                raw += chunk
            try:
                entry = json.loads(raw) if raw else {}
            except ValueError:
                entry = {}
            yield entry
            data = json.dumps(entry).encode()
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, data)
        finally:
            os.close(fd)  # releases the lock


Channel = Callable[[Alert], Awaitable[None]]


class Alerts:
    """Counts failures, decides when an alert is due, and sends it on every configured channel."""

    def __init__(self, config: AlertsConfig, metrics: Metrics, folder: Path, instance: str | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.instance = instance or config.instance or socket.gethostname()
        self.ledger = Ledger(folder)
        self.recent_failures: collections.deque[Failure] = collections.deque(maxlen=RECENT)
        self.recent_alerts: collections.deque[Alert] = collections.deque(maxlen=RECENT)
        self.channels: dict[str, Channel] = {}
        if config.webhook.url:
            self.channels["webhook"] = Webhook(config.webhook).send
        if config.email.host:
            self.channels["email"] = Email(config.email).send
        self._sending: set[asyncio.Task[None]] = set()
        self._active: dict[str, float] = {}  # conditions (store, OBS): since when they hold

    # -- what happened ------------------------------------------------------------------------

    def failed(self, url: str, error: str) -> None:
        """A fetch of ``url`` failed after all retries (or the origin answered an error, or an
        HTML page for an archive)."""
        url, error = redact(url), redact(error)
        now = time.time()
        self.recent_failures.append(Failure(url, error, now))
        self._later(self._count_failure, url, error, now)

    def condition(self, event: str, subject: str, holds: bool, detail: str = "", *, after: float = 0.0) -> None:
        """A condition of the instance (``store_unwritable``, ``obs_unreachable``…) holds or not;
        an alert goes out once it has held for ``after`` seconds."""
        if not holds:
            self._active.pop(event, None)
            return
        since = self._active.setdefault(event, time.monotonic())
        if time.monotonic() - since >= after:
            self.raise_alert(event, subject, None, 0, detail)

    def raise_alert(self, event: str, subject: str, url: str | None, failures: int, error: str) -> None:
        alert = Alert(
            event, redact(subject), url and redact(url), failures, redact(error), self.instance, _iso(time.time())
        )
        self._later(self._claim_and_send, alert)

    # -- background work ----------------------------------------------------------------------

    def _later(self, job: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None:
        if len(self._sending) >= MAX_SENDING:
            log.warning("alerts: %d alerts on their way already; dropping one about %s", MAX_SENDING, args[0])
            return
        task = asyncio.get_running_loop().create_task(job(*args))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _count_failure(self, url: str, error: str, now: float) -> None:
        config = self.config
        try:
            count = await asyncio.to_thread(self.ledger.failure, url, now, config.window)
        except OSError as exc:
            log.warning("alerts: cannot count a failure of %s: %s", url, exc)
            return
        if count >= config.failure_threshold:
            await self._claim_and_send(Alert(FETCH_FAILED, url, url, count, error, self.instance, _iso(now)))

    async def _claim_and_send(self, alert: Alert) -> None:
        try:
            due = await asyncio.to_thread(
                self.ledger.claim, alert.event + " " + alert.subject, time.time(), self.config.min_interval
            )
        except OSError as exc:
            log.warning("alerts: cannot record an alert: %s", exc)
            due = True
        if not due:
            return
        log.warning("alert %s: %s (%s)", alert.event, alert.subject, alert.last_error)
        self.recent_alerts.append(alert)
        results = await asyncio.gather(*(self._send(name, send, alert) for name, send in self.channels.items()))
        alert.channels = [name for name, ok in zip(self.channels, results, strict=True) if ok]

    async def _send(self, name: str, send: Channel, alert: Alert) -> bool:
        try:
            await send(alert)
        except Exception as exc:  # a channel never takes serving down
            log.warning(
                "alerts: %s channel failed for %s %s: %s",
                name,
                alert.event,
                alert.subject,
                redact(str(exc)) or type(exc).__name__,
            )
            self.metrics.alerts_failed.labels(name).inc()
            return False
        self.metrics.alerts_sent.labels(name).inc()
        return True

    async def close(self, wait: float = 5.0) -> None:
        """Let alerts on their way finish (bounded), then stop."""
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=wait)
        for task in list(self._sending):
            task.cancel()

    def prune(self) -> None:
        self.ledger.prune(time.time())


class Webhook:
    """POST the alert as JSON, with the configured headers; retried with backoff."""

    def __init__(self, config: WebhookConfig) -> None:
        self.config = config

    async def send(self, alert: Alert) -> None:
        config = self.config
        assert config.url is not None
        timeout = aiohttp.ClientTimeout(total=config.timeout)
        headers = {"Content-Type": "application/json", "User-Agent": "cacheproxy-alerts", **config.headers}
        for attempt in range(config.retries + 1):
            try:
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    async with session.post(config.url, json=alert.payload(), headers=headers) as response:
                        if response.status < 300:
                            return
                        error: str = f"the webhook answered {response.status}"
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if attempt == config.retries:
                raise RuntimeError(error)
            await asyncio.sleep(SEND_BACKOFF * 2**attempt * random.uniform(0.5, 1.0))


class Email:
    """One mail per alert through SMTP (STARTTLS and login when configured), in a thread."""

    def __init__(self, config: EmailConfig) -> None:
        self.config = config

    async def send(self, alert: Alert) -> None:
        await asyncio.wait_for(asyncio.to_thread(self._send, alert), self.config.timeout + 1)

    def _send(self, alert: Alert) -> None:
        config = self.config
        assert config.host is not None and config.from_ is not None
        message = EmailMessage()
        message["Subject"] = f"[cacheproxy {alert.instance}] {alert.event}: {alert.subject}"[:900]
        message["From"] = config.from_
        message["To"] = ", ".join(config.to)
        message.set_content("\n".join(f"{k}: {v}" for k, v in alert.payload().items()) + "\n")
        with smtplib.SMTP(config.host, config.port, timeout=config.timeout) as smtp:
            if config.starttls:
                context = ssl.create_default_context()
                if config.ca_bundle is not None:  # a private CA of the relay, besides the system's
                    context.load_verify_locations(cafile=str(config.ca_bundle))
                smtp.starttls(context=context)
            if config.username:
                smtp.login(config.username, config.password or "")
            smtp.send_message(message)


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
