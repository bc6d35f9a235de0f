"""The status page in a real headless browser (Debian's chromium): it loads without console
errors, shows the figures the stats call reports, and its screenshot is kept as an artifact."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from ..conftest import MakeProxy, curl, run
from ..origin import Origin

pytestmark = pytest.mark.timeout(120)
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(profile: Path, *args: str) -> list[str]:
    assert CHROMIUM is not None, "chromium is needed: run the README's test command, which installs it"
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-proxy-server",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]


async def test_status_page_in_chromium(make_proxy: MakeProxy, origin: Origin, tmp_path: Path) -> None:
    proxy = await make_proxy(upstream__retries=0)
    origin.add("/big-1.0.tar.gz", body=b"b" * 300_000)
    origin.add("/small-1.0.tar.gz", body=b"s" * 1000)
    origin.add("/broken-1.0.tar.gz", fail_first=100)
    for path in (
        "/big-1.0.tar.gz",
        "/small-1.0.tar.gz",
        "/small-1.0.tar.gz",
        "/small-1.0.tar.gz",
        "/broken-1.0.tar.gz",
    ):
        await curl(proxy, origin.url(path))
    await proxy.wait_idle()
    page = f"{proxy.url}/_cacheproxy/"
    dom = await run(*chromium(tmp_path / "p1", "--dump-dom", page), timeout=60)
    assert dom.rc == 0, dom.stderr[-2000:]
    html = dom.stdout.decode()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/_cacheproxy/api/stats") as response:
            stats = json.loads(await response.text())
    ratio = re.search(r'id="hit-ratio">([^<]*)<', html)
    assert ratio is not None and ratio.group(1) == f"{stats['hit_ratio'] * 100:.1f} %"
    objects = re.search(r'id="store-objects">(\d+)<', html)
    assert objects is not None and int(objects.group(1)) == stats["store"]["objects"] == 2
    assert origin.url("/broken-1.0.tar.gz") in html  # recent failures
    assert origin.url("/big-1.0.tar.gz") in html  # largest objects
    assert "<svg" in html
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    result = await run(
        *chromium(tmp_path / "p2", "--window-size=412,1600", "--hide-scrollbars", f"--screenshot={shot}", page),
        timeout=60,
    )
    assert result.rc == 0 and shot.stat().st_size > 10_000
    for stderr in (dom.stderr, result.stderr):
        console = [line for line in stderr.splitlines() if "CONSOLE" in line or "Failed to load resource" in line]
        assert console == [], console
