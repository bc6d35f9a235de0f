"""Throughput of a 1 GiB hit and miss against a direct download, and RSS under 50 downloads.

    python bench/basic.py [--size-mib 1024] [--concurrent 50]

Everything runs on loopback: an aiohttp origin serving files with sendfile (a separate process),
cacheproxy (a separate process, default config but for the cache directory), curl as the client.
Figures are printed as ratios against the direct download measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ORIGIN = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str) -> None:
    for _ in range(200):
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"not ready: {url}")


def make_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for i in range(size >> 20):
            f.write(block[i % 997 :] + block[: i % 997])  # no two MiB alike


def curl_speed(url: str, proxy: str | None = None) -> float:
    """Bytes per second of one download to /dev/null."""
    args = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}"]
    if proxy:
        args += ["-x", proxy]
    out = subprocess.run([*args, url], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0])


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def concurrent(url: str, proxy: str, n: int) -> float:
    started = time.monotonic()
    procs = [subprocess.Popen(["curl", "-sS", "--fail", "-o", "/dev/null", "-x", proxy, url]) for _ in range(n)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a concurrent download failed")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--concurrent-mib", type=int, default=100)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    mib = 1 << 20
    with tempfile.TemporaryDirectory(prefix="cacheproxy-bench-") as tmp:
        root = Path(tmp)
        files = root / "files"
        files.mkdir()
        make_file(files / "big.tar", args.size_mib * mib)
        make_file(files / "mid.tar", args.concurrent_mib * mib)
        origin_port, proxy_port = free_port(), free_port()
        config = root / "cacheproxy.yaml"
        config.write_text(
            f"listen: 127.0.0.1:{proxy_port}\ncache: {{dir: {root / 'cache'}}}\n"
            "rules: {allow_private_upstreams: true}\nlog: {level: warning, access_log: /dev/null}\n"
        )
        origin = subprocess.Popen([sys.executable, "-c", ORIGIN, str(files), str(origin_port)])
        proxy = subprocess.Popen([sys.executable, "-m", "cacheproxy", "-c", str(config)])
        try:
            base = f"http://127.0.0.1:{origin_port}"
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            wait_ready(f"{base}/mid.tar")
            wait_ready(f"{proxy_url}/_cacheproxy/readyz")
            runs = range(args.runs)
            direct = statistics.median(curl_speed(f"{base}/big.tar?direct={i}") for i in runs)
            miss = statistics.median(curl_speed(f"{base}/big.tar?miss={i}", proxy_url) for i in runs)
            time.sleep(1)  # let the last fill commit
            hit = statistics.median(curl_speed(f"{base}/big.tar?miss=0", proxy_url) for _ in runs)
            with PeakRss(proxy.pid) as rss_miss:
                t_miss = concurrent(f"{base}/mid.tar", proxy_url, args.concurrent)
            time.sleep(1)
            with PeakRss(proxy.pid) as rss_hit:
                t_hit = concurrent(f"{base}/mid.tar", proxy_url, args.concurrent)
            idle_rss = tree_rss(proxy.pid)
        finally:
            for p in (proxy, origin):
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=60)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}, {os.uname().release}",
        "size_mib": args.size_mib,
        "direct_mib_s": direct / mib,
        "miss_mib_s": miss / mib,
        "hit_mib_s": hit / mib,
        "miss_ratio": miss / direct,
        "hit_ratio": hit / direct,
        "concurrent": args.concurrent,
        "concurrent_mib": args.concurrent_mib,
        "concurrent_cold_s": t_miss,
        "concurrent_hit_s": t_hit,
        "rss_peak_cold_mb": rss_miss.peak / 1e6,
        "rss_peak_hit_mb": rss_hit.peak / 1e6,
        "rss_idle_mb": idle_rss / 1e6,
    }
    print(f"{'scenario':<34}{'MiB/s':>10}{'vs direct':>11}")
    print(f"{'direct ' + str(args.size_mib) + ' MiB':<34}{direct / mib:>10.0f}{1:>11.2f}")
    print(f"{'miss through cacheproxy':<34}{miss / mib:>10.0f}{miss / direct:>11.2f}")
    print(f"{'hit through cacheproxy':<34}{hit / mib:>10.0f}{hit / direct:>11.2f}")
    print(
        f"{args.concurrent} concurrent x {args.concurrent_mib} MiB: cold {t_miss:.1f}s peak RSS "
        f"{rss_miss.peak / 1e6:.0f} MB; hits {t_hit:.1f}s peak RSS {rss_hit.peak / 1e6:.0f} MB; "
        f"idle {idle_rss / 1e6:.0f} MB"
    )
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    (out / "basic.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
