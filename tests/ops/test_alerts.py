"""Alerts (SPEC section 8) against a real webhook receiver and a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from yarl import URL

from ..conftest import MakeProxy, Proxy
from ..origin import Origin

pytestmark = pytest.mark.timeout(60)


@dataclass
class Receiver:
    """A webhook endpoint: records every POST; ``status`` and ``delay`` make it fail or hang."""

    calls: list[dict[str, object]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=s3cret"

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        self.calls.append(await request.json())
        await asyncio.sleep(self.delay)
        return web.Response(status=self.status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook.port = runner.addresses[0][1]
    yield hook
    await runner.cleanup()


async def wait_for(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def sent(proxy: Proxy, channel: str, metric: str = "alerts_sent") -> float:
    return getattr(proxy.state.metrics, metric).labels(channel)._value.get()


async def failing(origin: Origin, path: str = "/gone-1.0.tar.gz") -> str:
    origin.add(path, body=b"x", fail_first=1000)  # 503 every time
    return origin.url(path)


async def test_webhook_after_threshold_once_per_interval(
    make_proxy: MakeProxy, origin: Origin, receiver: Receiver
) -> None:
    proxy = await make_proxy(
        upstream__retries=1,
        alerts__failure_threshold=3,
        alerts__webhook__url=receiver.url,
        alerts__webhook__headers={"X-Team": "build"},
        alerts__instance="cp-test",
    )
    url = await failing(origin)
    for _ in range(2):
        response, _ = await proxy.get(url)
        assert response.status == 503
    await asyncio.sleep(0.3)
    assert receiver.calls == []  # two failures: below the threshold
    response, _ = await proxy.get(url)
    await wait_for(lambda: receiver.calls)
    call = receiver.calls[0]
    assert call["event"] == "fetch_failed"
    assert call["subject"] == url and call["url"] == url
    assert call["failures"] == 3
    assert "503" in str(call["last_error"])
    assert call["instance"] == "cp-test"
    assert set(call) == {"event", "subject", "url", "failures", "last_error", "instance", "time"}
    assert receiver.headers[0]["X-Team"] == "build"
    await wait_for(lambda: sent(proxy, "webhook") == 1)  # counted once the receiver has answered
    for _ in range(4):  # more failures inside min_interval: no second alert
        await proxy.get(url)
    await asyncio.sleep(0.3)
    assert len(receiver.calls) == 1
    assert proxy.state.cache.recent_failures[-1].url == url
    assert [a.event for a in proxy.state.cache.alerts.recent_alerts] == ["fetch_failed"]


async def test_html_page_for_an_archive_counts(make_proxy: MakeProxy, origin: Origin, receiver: Receiver) -> None:
    proxy = await make_proxy(alerts__failure_threshold=2, alerts__webhook__url=receiver.url)
    origin.add("/pkg-2.0.tar.xz", body=b"<html>sorry</html>", content_type="text/html")
    for _ in range(2):
        response, body = await proxy.get(origin.url("/pkg-2.0.tar.xz"))
        assert response.status == 200 and body == b"<html>sorry</html>"
    await wait_for(lambda: receiver.calls)
    assert "HTML" in str(receiver.calls[0]["last_error"])


async def test_failures_spread_over_workers_alert_once(
    make_proxy: MakeProxy, origin: Origin, receiver: Receiver, tmp_path: Path
) -> None:
    """Two processes of one instance (one store) count together and send one alert."""
    shared = tmp_path / "shared"
    options = {"upstream__retries": 0, "alerts__failure_threshold": 3, "alerts__webhook__url": receiver.url}
    first = await make_proxy(shared, **options)
    second = await make_proxy(shared, **options)
    url = await failing(origin)
    for proxy in (first, second, first):
        await proxy.get(url)
    await wait_for(lambda: receiver.calls)
    for proxy in (second, first, second, second):
        await proxy.get(url)
    await asyncio.sleep(0.5)
    assert len(receiver.calls) == 1
    assert sent(first, "webhook") + sent(second, "webhook") == 1


async def test_slow_or_failing_webhook_never_holds_serving(
    make_proxy: MakeProxy, origin: Origin, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.delay = 30.0  # hangs
    proxy = await make_proxy(
        upstream__retries=0,
        alerts__failure_threshold=1,
        alerts__webhook__url=receiver.url,
        alerts__webhook__timeout="300ms",
        alerts__webhook__retries=1,
    )
    origin.add("/ok.tar.gz", body=b"fine")
    url = await failing(origin)
    started = time.monotonic()
    await proxy.get(url)
    _, body = await proxy.get(origin.url("/ok.tar.gz"))
    assert body == b"fine" and time.monotonic() - started < 1.0
    await wait_for(lambda: sent(proxy, "webhook", "alerts_failed") == 1)
    assert len(receiver.calls) == 2  # the first attempt and one retry
    assert sent(proxy, "webhook") == 0
    assert "s3cret" not in caplog.text  # the webhook URL's token is not logged
    assert "webhook channel failed" in caplog.text


class Inbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages.append(envelope.content)  # type: ignore[attr-defined]
        return "250 OK"

    def authenticate(
        self, server: object, session: object, envelope: object, mechanism: str, data: object
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"mail-pass")


async def test_email_through_starttls_and_login(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture, unused_tcp_port: int
) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "smtp-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    inbox = Inbox()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=unused_tcp_port,
        tls_context=context,
        require_starttls=True,
        authenticator=inbox.authenticate,
        auth_required=True,
    )
    controller.start()
    try:
        proxy = await make_proxy(
            upstream__retries=0,
            alerts__failure_threshold=2,
            alerts__email={
                "host": "127.0.0.1",
                "port": unused_tcp_port,
                "starttls": True,
                "username": "ops",
                "password": "mail-pass",
                "from": "cacheproxy@example.test",
                "to": ["ops@example.test"],
                "ca_bundle": str(ca_file),
            },
        )
        url = await failing(origin)
        caplog.set_level(logging.DEBUG)
        await proxy.get(url)
        await proxy.get(url)
        await wait_for(lambda: inbox.messages)
        await wait_for(lambda: sent(proxy, "email") == 1)
    finally:
        controller.stop()
    message = inbox.messages[0].decode()
    assert "Subject: [cacheproxy" in message and "fetch_failed" in message
    assert f"url: {url}" in message and "failures: 2" in message
    assert inbox.logins == [(b"ops", b"mail-pass")]
    assert "mail-pass" not in caplog.text


async def test_unwritable_store_alerts(make_proxy: MakeProxy, origin: Origin, receiver: Receiver) -> None:
    proxy = await make_proxy(alerts__webhook__url=receiver.url)
    origin.add("/a.tar.gz", body=b"a" * 1000)
    tmp = proxy.cache_dir / "tmp"
    for child in tmp.iterdir():
        child.unlink()
    tmp.rmdir()
    tmp.write_bytes(b"not a folder")  # the store cannot take anything now
    response, body = await proxy.get(origin.url("/a.tar.gz"))
    assert response.headers["X-Cache"] == "BYPASS" and len(body) == 1000
    await wait_for(lambda: receiver.calls)
    assert receiver.calls[0]["event"] == "store_unwritable"
    assert receiver.calls[0]["subject"] == str(proxy.cache_dir)


async def test_obs_unreachable_and_store_over_watermark(
    make_proxy: MakeProxy, origin: Origin, receiver: Receiver, unused_tcp_port: int
) -> None:
    """OBS does not answer: nothing can be uploaded, so nothing can be evicted (the local copy is
    the only one): the store stays above its high watermark, and OBS stays unreachable."""
    body = b"o" * 300_000
    for name in ("a", "b", "c"):
        origin.add(f"/{name}.tar.gz", body=body)
    proxy = await make_proxy(
        storage__backend="obs",
        storage__obs__endpoint=f"http://127.0.0.1:{unused_tcp_port}",
        storage__obs__bucket="nowhere",
        storage__obs__access_key_id="ak",
        storage__obs__secret_access_key="sk",
        storage__obs__signature="v4",
        storage__obs__path_style=True,
        cache__max_size="700KB",
        alerts__window="1s",
        alerts__webhook__url=receiver.url,
    )
    for name in ("a", "b", "c"):
        response, _ = await proxy.get(origin.url(f"/{name}.tar.gz"))
        assert response.status == 200
    await proxy.wait_idle()
    assert await proxy.state.cache.evict_if_needed() == 0
    await wait_for(lambda: any(c["event"] == "store_over_watermark" for c in receiver.calls))
    await wait_for(lambda: any(c["event"] == "obs_unreachable" for c in receiver.calls), timeout=5)
    events = [c["event"] for c in receiver.calls]
    assert sorted(events) == ["obs_unreachable", "store_over_watermark"]
    obs = next(c for c in receiver.calls if c["event"] == "obs_unreachable")
    assert obs["subject"] == "OBS bucket nowhere" and "ConnectionRefused" in str(obs["last_error"])


async def test_an_immutable_url_whose_body_changes_is_reported(
    make_proxy: MakeProxy, origin: Origin, receiver: Receiver, tmp_path: Path
) -> None:
    """Upstream re-tags a release under the same URL: the first digest is kept through a purge and
    an eviction, another worker of the store sees it, and the change is logged, counted and alerted."""
    from ..ops.test_admin import AUTH, TOKEN, call

    proxy = await make_proxy(alerts__webhook__url=receiver.url, admin__tokens=[TOKEN])
    first = origin.add("/pkg-1.0.tar.gz", body=b"release one" * 1000)
    url = origin.url("/pkg-1.0.tar.gz")
    origin.add("/notes.txt", body=b"notes one")  # not immutable: may change freely
    notes = origin.url("/notes.txt")
    for target in (url, notes):
        response, _ = await proxy.get(target)
        assert response.headers["X-Cache"] == "MISS"
    await proxy.wait_idle()

    # Purged and fetched again, same body: nothing to tell.
    assert (await call(proxy, "DELETE", "objects", params={"url": url}, headers=AUTH))[0] == 204
    response, body = await proxy.get(url)
    assert body == first.body and response.headers["X-Cache"] == "MISS"
    await proxy.wait_idle()
    assert proxy.state.metrics.content_changed._value.get() == 0

    # Re-tagged upstream; the object is evicted; another worker of the same store refetches it.
    second = origin.add("/pkg-1.0.tar.gz", body=b"release one, re-tagged" * 1000)
    origin.add("/notes.txt", body=b"notes two")
    other = await make_proxy(cache_dir=proxy.cache_dir, alerts__webhook__url=receiver.url, admin__tokens=[TOKEN])
    for target in (url, notes):
        meta = await other.state.cache.lookup(URL(target))
        assert meta is not None
        await other.state.cache.purge(meta)  # what an eviction pass does to an object
    response, body = await other.get(url)
    assert body == second.body and response.headers["X-Cache"] == "MISS"
    _, _ = await other.get(notes)
    await other.wait_idle()
    await wait_for(lambda: receiver.calls)
    assert other.state.metrics.content_changed._value.get() == 1
    call_ = receiver.calls[0]
    assert call_["event"] == "content_changed" and call_["url"] == url and call_["subject"] == url
    assert first.sha256 in str(call_["last_error"]) and second.sha256 in str(call_["last_error"])

    status, _, info = await call(other, "GET", "objects", params={"url": url})
    assert status == 200 and info["sha256"] == second.sha256  # the new body is what is served …
    assert info["first_seen"]["sha256"] == first.sha256  # … and the first record stays
    assert info["first_seen"]["last_sha256"] == second.sha256 and info["first_seen"]["changes"] == 1
    status, _, info = await call(other, "GET", "objects", params={"url": notes})
    assert status == 200 and "first_seen" not in info
    await asyncio.sleep(0.2)
    assert len(receiver.calls) == 1  # the notes changing is no news

    # A client's no-cache makes the proxy revalidate: a third body is counted too (one alert per min_interval).
    third = origin.add("/pkg-1.0.tar.gz", body=b"release one, third" * 1000, etag='"v3"')
    response, body = await other.get(url, headers={"Cache-Control": "no-cache"})
    assert body == third.body
    await other.wait_idle()
    assert other.state.metrics.content_changed._value.get() == 2
    status, _, info = await call(other, "GET", "objects", params={"url": url})
    assert info["first_seen"]["sha256"] == first.sha256 and info["first_seen"]["last_sha256"] == third.sha256
    assert info["first_seen"]["changes"] == 2
    await asyncio.sleep(0.2)
    assert len(receiver.calls) == 1
