"""The systemd unit as systemd reads it: `systemd-analyze verify` (syntax, directives, the binary),
the hardening score, and the settings README promises."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from ..conftest import run

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "cacheproxy.service"
INSTALLED = "/opt/cacheproxy/bin/cacheproxy"


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if (m := re.match(r"^([A-Za-z]+)=(.*)$", line)) is not None:
            found.setdefault(m.group(1), []).append(m.group(2))
    return found


async def test_unit_verifies_and_keeps_its_promises(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        raise RuntimeError("systemd-analyze is needed: run the README's test command")
    text = UNIT.read_text()
    unit = directives(text)
    assert unit["ExecStart"] == [f"{INSTALLED} serve --cache-dir /var/cache/cacheproxy --grace 60s"]
    assert unit["ExecStartPre"] == [f"{INSTALLED} check-config"]
    assert f"python3 -m venv /opt/cacheproxy && {INSTALLED.rsplit('/', 1)[0]}/pip install ." in text
    assert unit["CacheDirectory"] == ["cacheproxy"] and unit["LimitNOFILE"] == ["65536"]
    assert int(unit["TimeoutStopSec"][0]) > 60  # longer than --grace: transfers finish before a kill
    assert unit["ProtectSystem"] == ["strict"] and unit["NoNewPrivileges"] == ["true"]

    # Verified with the binary where this checkout has it (verify checks that it is executable).
    here = tmp_path / "cacheproxy.service"
    here.write_text(text.replace(INSTALLED, str(Path(sys.executable).parent / "cacheproxy")))
    verify = await run("systemd-analyze", "verify", str(here))
    assert verify.rc == 0 and verify.stderr == "", verify.stderr
    security = await run("systemd-analyze", "security", "--offline=true", str(here))
    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout.decode())
    assert exposure is not None, security.stdout.decode()[-2000:]
    assert float(exposure.group(1)) <= 4.0  # "OK" on systemd's scale (10 is fully exposed)
