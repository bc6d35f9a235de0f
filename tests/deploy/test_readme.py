"""README's two commands, as written, from a fresh copy of the checkout, with the PATH a Debian user
has (this machine has another Python first on its PATH): the run command installs into a virtual
environment and serves; the test command installs what the tests need and passes."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from ..conftest import run
from ..origin import Origin
from .test_gateway import free_port

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PATH = "/usr/local/bin:/usr/bin:/bin"

pytestmark = pytest.mark.timeout(600)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def fresh_copy(target: Path) -> Path:
    """What a clone of this checkout holds once committed: tracked and new, not ignored, files."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def debian_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYENV", "PYTHON"))}
    env["PATH"] = DEBIAN_PATH
    return env


async def test_readme_run_and_test_commands_from_a_fresh_copy(origin: Origin, tmp_path: Path) -> None:
    run_command, test_command = readme_commands()
    assert run_command == "scripts/run.sh" and test_command == "bash scripts/test.sh"
    checkout = fresh_copy(tmp_path / "checkout")
    origin.add("/hello-1.0.tar.gz", body=b"hello" * 1000)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", f"{run_command} --listen 127.0.0.1:{port} --allow-private-upstreams",
        cwd=checkout, env=debian_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(1800):  # the first run installs: up to three minutes
                try:
                    async with session.get(f"http://127.0.0.1:{port}/_cacheproxy/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    assert process.returncode is None, (await process.stderr.read()).decode()  # type: ignore[union-attr]
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the README's run command did not serve within three minutes")
            for expected in ("MISS", "HIT"):
                async with session.get(f"http://127.0.0.1:{port}/{origin.url('/hello-1.0.tar.gz')}") as response:
                    assert response.status == 200 and await response.read() == b"hello" * 1000
                    assert response.headers["X-Cache"] == expected
        assert (checkout / ".venv" / "bin" / "cacheproxy").exists()  # in the checkout's own environment
        assert (checkout / "cache").is_dir()  # the embedded default: ./cache

        # The same port again: one line and its own exit status, no traceback.
        again = await run("bash", "-c", f"{run_command} --listen 127.0.0.1:{port}", env=debian_env(), timeout=120)
        assert again.rc == 3, again.stderr
        assert f"cacheproxy: cannot listen on 127.0.0.1:{port}: Address already in use" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
    assert process.returncode == 0

    tests = await run(
        "bash", "-c", f"cd {checkout} && {test_command} -q tests/test_config.py", env=debian_env(), timeout=540
    )
    assert tests.rc == 0, tests.stdout.decode()[-3000:] + tests.stderr[-3000:]
    assert b" passed" in tests.stdout
