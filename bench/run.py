"""cacheproxy beside direct download (nginx), and Squid: one run, one table, ratios.

    python bench/run.py [--quick] [--workers N] [--out DIR]

Everything runs on loopback ports of this machine: nginx serves generated files with sendfile (the
origin, and the physical limit), Squid is a caching forward proxy with collapsed forwarding, and
cacheproxy runs with ``workers`` = cores. Each cache is warmed and its warm answers are checked to
be hits before anything is measured. Clients: curl (throughput), wrk (request rates).

Writes ``DIR/bench.json`` and ``DIR/bench.png`` (default DIR: bench/results). See bench/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
SIZES = {"4k.tar": 4 << 10, "1m.tar": MiB, "100m.tar": 100 * MiB, "1g.tar": 1024 * MiB}  # archives: immutable
THROTTLE = "25m"  # nginx limit_rate of /slow/: 100 MiB in about 4 s


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if check():
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return bool(r.status == 200)


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def _tree_sum(pid: int, source: str, field_: str) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/{source}").read_text().splitlines():
                if line.startswith(field_):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of a process tree; pages shared by forked workers count once per process."""
    return _tree_sum(pid, "status", "VmRSS:")


def tree_pss(pid: int) -> int:
    """Proportional set size of a process tree: shared pages split between their sharers."""
    return _tree_sum(pid, "smaps_rollup", "Pss:")


class PeakRss:
    """Samples the resident memory of a process tree in the background; ``peak`` in bytes."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.peak_pss = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.peak_pss = max(self.peak_pss, tree_pss(self.pid))
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    rss: PeakRss | None = None
    stop_cmd: list[str] = field(default_factory=list)

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.stop_cmd:
            subprocess.run(self.stop_cmd, capture_output=True, check=False)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_nginx(root: Path, files: Path) -> tuple[Server, Path]:
    port = free_port()
    conf = root / "nginx.conf"
    log = root / "nginx-access.log"
    conf.write_text(f"""
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {log};
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {root}/nginx-tmp;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {files};
        location /slow/ {{ alias {files}/; limit_rate {THROTTLE}; }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(root), "-c", str(conf), "-g", "daemon off;"])
    wait_for(lambda: port_open(port), "nginx")
    return Server("nginx", port, proc), log


def start_squid(root: Path) -> Server:
    port = free_port()
    base = root / "squid"
    (base / "cache").mkdir(parents=True)
    conf = base / "squid.conf"
    conf.write_text(f"""
http_port 127.0.0.1:{port}
cache_effective_user proxy
pid_filename {base}/squid.pid
cache_dir ufs {base}/cache 8192 16 256
cache_mem 256 MB
maximum_object_size 2 GB
maximum_object_size_in_memory 1 MB
collapsed_forwarding on
access_log stdio:{base}/access.log
cache_log {base}/cache.log
coredump_dir {base}
http_access allow all
refresh_pattern . 1440 100% 10080
shutdown_lifetime 1 seconds
max_filedescriptors 16384
""")
    shutil.chown(base, "proxy", "proxy")
    for path in base.rglob("*"):
        shutil.chown(path, "proxy", "proxy")
    name = f"bench{os.getpid()}"
    subprocess.run(["squid", "-n", name, "-z", "-N", "-f", str(conf)], check=True, capture_output=True)
    proc = subprocess.Popen(["squid", "-n", name, "-N", "-f", str(conf)])
    wait_for(lambda: port_open(port), "squid")
    return Server("squid", port, proc)


def cacheproxy_process(config: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """``python -m cacheproxy -c config``, of the checkout this bench is in, or of the one
    PYTHONPATH names (how an A/B run chooses the code). It runs in the config's folder: with
    ``-m`` the working directory comes first on the path, so a run started from another checkout
    measured that checkout's code, whatever PYTHONPATH said."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(HERE.parent)}
    return subprocess.Popen(
        [sys.executable, "-m", "cacheproxy", "-c", str(config)], cwd=config.parent, env=env, **popen
    )


def start_cacheproxy(
    root: Path,
    workers: int,
    store: Path | None = None,
    access_log: str = "-",
    name: str = "cacheproxy",
    ready_timeout: float = 120.0,
) -> tuple[Server, float]:
    """cacheproxy with its default log settings (access lines on standard error, kept in a file as
    systemd or docker would keep them), or ``access_log`` a file. The per-client limits are raised:
    every request of the bench comes from one client address."""
    port = free_port()
    config = root / f"cacheproxy-{port}.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nworkers: {workers}\n"
        f"cache: {{dir: {store or root / 'cacheproxy-store'}, max_size: 200GiB}}\n"
        "rules: {allow_private_upstreams: true}\n"
        "limits: {per_client_rps: 1000000000, per_client_burst: 1000000000, per_client_concurrency: 100000}\n"
        f"log: {{level: warning, access_log: '{access_log}'}}\n"
    )
    started = time.monotonic()
    stderr = open(root / f"{name}-{port}.stderr", "wb")  # the child keeps its own descriptor
    proc = cacheproxy_process(config, stderr=stderr)
    stderr.close()
    ready = f"http://127.0.0.1:{port}/_cacheproxy/readyz"
    wait_for(lambda: http_ok(ready), "cacheproxy", timeout=ready_timeout)
    return Server(name, port, proc), time.monotonic() - started


# -- clients ----------------------------------------------------------------------------------


def curl(url: str, proxy: str | None = None, out: str = "/dev/null") -> dict[str, str]:
    args = ["curl", "-sS", "--fail", "-o", out, "-D", "-", "-w", "\n%{speed_download} %{time_total}"]
    if proxy:
        args += ["-x", proxy]
    text = subprocess.run([*args, url], check=True, capture_output=True, text=True).stdout
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()[1:-1])}
    speed, seconds = text.splitlines()[-1].split()
    headers["_speed"], headers["_seconds"] = speed, seconds
    return headers


def assert_hit(server: Server, url: str, timeout: float = 60.0) -> None:
    """The warm answer is a hit (a large object is committed a moment after its last byte went out)."""
    deadline = time.monotonic() + timeout
    while True:
        headers = curl(url, server.proxy)
        if headers.get("x-cache", "").upper().startswith("HIT"):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name}: warm request for {url} is not a hit: X-Cache {headers.get('x-cache')!r}")
        time.sleep(1)


WRK_SCRIPT = """
{setup}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(99), latency:percentile(50), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk(root: Path, target: str, proxy: Server | None, connections: int, seconds: float) -> dict[str, float]:
    """Requests/s, p99 (ms) and errors of ``connections`` keep-alive connections for ``seconds``."""
    script = root / f"wrk-{connections}.lua"
    if proxy is None:
        setup = ""
        url = target
    else:
        host = target.split("/")[2]
        setup = f'wrk.path = "{target}"\nwrk.headers["Host"] = "{host}"'
        url = proxy.proxy + "/"
    script.write_text(WRK_SCRIPT.format(setup=setup))
    threads = min(connections, 2)
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    match = re.search(r"^RESULT (.*)$", out, re.M)
    if match is None:
        raise SystemExit(f"wrk printed no result:\n{out}")
    requests, duration, p99, p50, *errors = (int(v) for v in match.group(1).split())
    return {
        "rps": requests / (duration / 1e6),
        "p99_ms": p99 / 1000,
        "p50_ms": p50 / 1000,
        "errors": sum(errors),
        "requests": requests,
    }


def sha256_of(url: str, proxy: str | None) -> tuple[str, float]:
    started = time.monotonic()
    args = ["curl", "-sS", "--fail", "-o", "-"] + (["-x", proxy] if proxy else []) + [url]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    digest = hashlib.sha256()
    while chunk := proc.stdout.read(MiB):
        digest.update(chunk)
    if proc.wait() != 0:
        return "failed", time.monotonic() - started
    return digest.hexdigest(), time.monotonic() - started


def timed_download(url: str, proxy: str | None) -> tuple[str, float]:
    """(bytes received, seconds) of one download to /dev/null."""
    started = time.monotonic()
    args = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}"] + (["-x", proxy] if proxy else [])
    done = subprocess.run([*args, url], capture_output=True, text=True, check=False)
    return (done.stdout if done.returncode == 0 else "failed"), time.monotonic() - started


def make_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as f:
        if size < MiB:
            f.write(block[:size])
            return
        for i in range(size // MiB):
            f.write(block[i % 997 :] + block[: i % 997])  # no two MiB alike


def side_bench_args(doc: str, out: Path) -> tuple[argparse.Namespace, str, int]:
    """The options of the side benches (tls.py, obs_hits.py), and their large object."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 100 MiB object and fewer requests")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args()
    large_name, large_size = ("100m.tar", 100 * MiB) if args.quick else ("1g.tar", 1024 * MiB)
    return args, large_name, large_size


def make_files(root: Path, large_name: str, large_size: int) -> Path:
    """``root/files`` with the large object and ``4k.tar``; ``root`` readable by nginx's workers."""
    root.chmod(0o755)  # nginx workers run as another user
    files = root / "files"
    files.mkdir()
    make_file(files / large_name, large_size)
    make_file(files / "4k.tar", 4 << 10)
    return files


def make_store(store: Path, count: int) -> None:
    """``count`` small committed objects in the local store layout, as cacheproxy writes them."""
    sys.path.insert(0, str(HERE.parent))
    from cacheproxy.storage.base import ObjectMeta, key_digest

    body = b"x" * 100
    now = time.time()
    for i in range(count):
        key = f"http://bench.invalid/startup/{i}.tar.gz"
        digest = key_digest(key)
        folder = store / "objects" / digest[:2]
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{digest}.{i:016x}"
        (folder / name).write_bytes(body)
        sha256, sha512 = hashlib.sha256(key.encode()).hexdigest(), hashlib.sha512(key.encode()).hexdigest()
        meta = ObjectMeta(key, key, len(body), sha256, "0" * 32, now, now, sha512=sha512, file=name, last_access=now)
        (folder / f"{digest}.json").write_text(meta.to_json())


# -- the run ----------------------------------------------------------------------------------


def median_speed(url: Callable[[int], str], proxy: Server | None, runs: int) -> float:
    return statistics.median(float(curl(url(i), proxy.proxy if proxy else None)["_speed"]) for i in range(runs))


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    runs = 3 if quick else 5
    load_seconds = 4 if quick else 10
    large = "100m.tar" if quick else "1g.tar"
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}, "
        f"{platform.python_implementation()} {platform.python_version()}",
        "quick": quick,
        "workers": args.workers,
        "scenarios": {},
    }
    scenarios: dict[str, dict[str, Any]] = results["scenarios"]

    def record(name: str, **values: Any) -> None:
        scenarios[name] = values
        print(f"  {name}: {json.dumps(values)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="cacheproxy-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        files = root / "files"
        files.mkdir(mode=0o755)
        for name, size in SIZES.items():
            if name != "1g.tar" or not quick:
                make_file(files / name, size)
        truth = {name: hashlib.sha256((files / name).read_bytes()).hexdigest() for name in ("100m.tar",)}
        nginx, origin_log = start_nginx(root, files)
        squid = start_squid(root)
        cacheproxy, _ = start_cacheproxy(root, args.workers)
        # The same store behind a second instance that writes its access log to a file, for hit_small.
        filelog, _ = start_cacheproxy(
            root, args.workers, access_log=str(root / "access.log"), name="cacheproxy_filelog"
        )
        proxies = [squid, cacheproxy]
        for p in proxies:
            p.rss = PeakRss(p.proc.pid)
        origin = f"http://127.0.0.1:{nginx.port}"
        try:
            print(f"origin nginx :{nginx.port}, squid :{squid.port}, cacheproxy :{cacheproxy.port}", flush=True)
            for p in proxies:  # warm, then prove the warm answers are hits
                for name in ("4k.tar", "1m.tar", large):
                    curl(f"{origin}/{name}", p.proxy)
                time.sleep(1)
                for name in ("4k.tar", "1m.tar", large):
                    assert_hit(p, f"{origin}/{name}")

            print("hit_large", flush=True)
            direct = median_speed(lambda i: f"{origin}/{large}", None, runs)
            row = {"object": large, "direct_mib_s": direct / MiB}
            for p in proxies:
                row[f"{p.name}_mib_s"] = median_speed(lambda i: f"{origin}/{large}", p, runs) / MiB
            record("hit_large", **row)

            for name, obj, connections in (("hit_small", "4k.tar", 64), ("hit_600", "1m.tar", 600)):
                print(name, flush=True)
                row = {"connections": connections}
                runs_of: list[tuple[str, Server | None]] = [
                    ("direct", None),
                    ("squid", squid),
                    ("cacheproxy", cacheproxy),
                ]
                if name == "hit_small":
                    assert_hit(filelog, f"{origin}/{obj}")
                    runs_of.append(("cacheproxy_filelog", filelog))
                for label, p in runs_of:
                    r = wrk(root, f"{origin}/{obj}", p, connections, load_seconds)
                    row |= {f"{label}_rps": r["rps"], f"{label}_p99_ms": r["p99_ms"], f"{label}_errors": r["errors"]}
                record(name, **row)

            print("miss_large", flush=True)
            # A miss has to land in the page cache of the store; on a VM, fresh page cache can be
            # written far slower than a cached file is sent, and how much slower drifts as memory
            # fills. A client that keeps what it downloads (curl -o on the same file system) shows
            # that limit; it runs interleaved with the proxies so that all see the same conditions.
            kept = root / "kept"
            kept.mkdir()
            speeds: dict[str, list[float]] = {"direct_to_disk": [], "squid": [], "cacheproxy": []}
            for i in range(runs):
                speeds["direct_to_disk"].append(
                    float(curl(f"{origin}/100m.tar?k={i}", out=str(kept / f"{i}"))["_speed"])
                )
                for p in proxies:
                    speeds[p.name].append(float(curl(f"{origin}/100m.tar?miss={i}", p.proxy)["_speed"]))
            shutil.rmtree(kept)
            row = {
                "object": "100m.tar",
                "direct_mib_s": median_speed(lambda i: f"{origin}/100m.tar?d={i}", None, runs) / MiB,
                **{f"{name}_mib_s": statistics.median(v) / MiB for name, v in speeds.items()},
                "runs_mib_s": {name: [round(x / MiB) for x in v] for name, v in speeds.items()},
            }
            record("miss_large", **row)

            print("collapsed", flush=True)
            # Timed: 50 clients to /dev/null. Checked: another 50 that hash what they get (on two
            # cores, hashing 5 GB in the clients competes with everything else, so it is timed apart).
            single = curl(f"{origin}/slow/100m.tar")
            row = {"clients": 50, "throttle": THROTTLE, "direct_s": float(single["_seconds"])}
            for p in proxies:
                for mode in ("timed", "checked"):
                    url = f"{origin}/slow/100m.tar?collapsed={p.name}-{mode}"
                    fetch = sha256_of if mode == "checked" else timed_download
                    with concurrent.futures.ThreadPoolExecutor(50) as pool:
                        outcomes = list(pool.map(fetch, [url] * 50, [p.proxy] * 50))
                    time.sleep(0.5)
                    tag = f"collapsed={p.name}-{mode}"
                    fetches = sum(1 for line in origin_log.read_text().splitlines() if tag in line)
                    row[f"{p.name}_{mode}_origin_fetches"] = fetches
                    row[f"{p.name}_{mode}_slowest_s"] = max(s for _, s in outcomes)
                    if mode == "checked":
                        row[f"{p.name}_all_sha256_ok"] = all(d == truth["100m.tar"] for d, _ in outcomes)
                    else:
                        row[f"{p.name}_all_complete"] = all(d == str(SIZES["100m.tar"]) for d, _ in outcomes)
            record("collapsed", **row)
            rss: dict[str, float] = {}
            for p in proxies:
                assert p.rss is not None
                rss[f"{p.name}_mb"] = p.rss.stop() / 1e6
                rss[f"{p.name}_pss_mb"] = p.rss.peak_pss / 1e6
            record("rss", **rss)
        finally:
            for server in (cacheproxy, filelog, squid, nginx):
                server.stop()

        print("startup", flush=True)
        count = 20_000 if quick else 100_000
        store = root / "startup-store"
        make_store(store, count)
        server, cold = start_cacheproxy(root, args.workers, store)  # no snapshot yet: every entry read
        server.stop()  # writes the index snapshot, as any clean stop does
        server, warm = start_cacheproxy(root, args.workers, store)
        server.stop()
        record("startup", objects=count, seconds=warm, without_snapshot_seconds=cold)
    return results


# -- report -----------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(scenario, direct, squid, cacheproxy, ratio, target) rows."""
    s = results["scenarios"]
    rows = []
    if "hit_large" in s:
        h = s["hit_large"]
        rows.append(
            (
                f"hit_large {h['object']} MiB/s",
                f"{h['direct_mib_s']:.0f}",
                f"{h['squid_mib_s']:.0f}",
                f"{h['cacheproxy_mib_s']:.0f}",
                f"{h['cacheproxy_mib_s'] / h['direct_mib_s']:.2f}x nginx, "
                f"{h['cacheproxy_mib_s'] / h['squid_mib_s']:.2f}x squid",
                ">= 0.9x nginx, >= squid",
            )
        )
    for name, target in (("hit_small", ">= 1.0x squid rps"), ("hit_600", "0 errors, >= 0.5x direct, p99 <= squid")):
        if name in s:
            h = s[name]

            def cell(who: str, h: dict[str, Any] = h) -> str:
                return f"{h[who + '_rps']:.0f}/s p99 {h[who + '_p99_ms']:.1f}ms err {h[who + '_errors']}"

            ours = cell("cacheproxy")
            if "cacheproxy_filelog_rps" in h:
                ours += f" (access log to a file: {h['cacheproxy_filelog_rps']:.0f}/s)"
            rows.append(
                (
                    f"{name} ({h['connections']} conn)",
                    cell("direct"),
                    cell("squid"),
                    ours,
                    f"{h['cacheproxy_rps'] / h['squid_rps']:.2f}x squid, "
                    f"{h['cacheproxy_rps'] / h['direct_rps']:.2f}x direct",
                    target,
                )
            )
    if "miss_large" in s:
        m = s["miss_large"]
        rows.append(
            (
                "miss_large 100m MiB/s",
                f"{m['direct_mib_s']:.0f} (to disk {m['direct_to_disk_mib_s']:.0f})",
                f"{m['squid_mib_s']:.0f}",
                f"{m['cacheproxy_mib_s']:.0f}",
                f"{m['cacheproxy_mib_s'] / m['direct_mib_s']:.2f}x direct, "
                f"{m['cacheproxy_mib_s'] / m['direct_to_disk_mib_s']:.2f}x to disk",
                ">= 0.8x direct",
            )
        )
    if "collapsed" in s:
        c = s["collapsed"]

        def outcome(who: str) -> str:
            ok = c[who + "_all_sha256_ok"] and c[who + "_all_complete"]
            fetches = f"{c[who + '_timed_origin_fetches']}+{c[who + '_checked_origin_fetches']}"
            return (
                f"{c[who + '_timed_slowest_s']:.1f}s (hashing: {c[who + '_checked_slowest_s']:.1f}s), "
                f"{fetches} fetches, sha256 {'ok' if ok else 'BAD'}"
            )

        rows.append(
            (
                "collapsed 50x100m slowest",
                f"{c['direct_s']:.1f}s",
                outcome("squid"),
                outcome("cacheproxy"),
                f"{c['cacheproxy_timed_slowest_s'] / c['direct_s']:.2f}x direct",
                "1 fetch, <= 1.2x direct",
            )
        )
    if "rss" in s:
        r = s["rss"]
        rows.append(
            (
                "rss peak MB (whole tree; PSS)",
                "-",
                f"{r['squid_mb']:.0f} ({r['squid_pss_mb']:.0f})",
                f"{r['cacheproxy_mb']:.0f} ({r['cacheproxy_pss_mb']:.0f})",
                "-",
                "<= 200 MB",
            )
        )
    if "startup" in s:
        st = s["startup"]
        rows.append(
            (
                f"startup {st['objects']} objects",
                "-",
                "-",
                f"{st['seconds']:.2f}s ({st['without_snapshot_seconds']:.2f}s without snapshot)",
                "-",
                "<= 3 s (100k)",
            )
        )
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Run {results['date']} on {results['machine']}; cacheproxy workers={results['workers']}"
        + (" (--quick)" if results["quick"] else ""),
        "",
        "| scenario | direct (nginx) | Squid | cacheproxy | cacheproxy ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table(results)]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["scenarios"]
    names, squid, ours = [], [], []
    for name, base_key, field_ in (
        ("hit_large", "direct_mib_s", "_mib_s"),
        ("hit_small", "direct_rps", "_rps"),
        ("hit_600", "direct_rps", "_rps"),
        ("miss_large", "direct_mib_s", "_mib_s"),
    ):
        if name in s:
            names.append(name)
            squid.append(s[name]["squid" + field_] / s[name][base_key])
            ours.append(s[name]["cacheproxy" + field_] / s[name][base_key])
    if "collapsed" in s:  # speed relative to one direct throttled download
        names.append("collapsed")
        squid.append(s["collapsed"]["direct_s"] / s["collapsed"]["squid_timed_slowest_s"])
        ours.append(s["collapsed"]["direct_s"] / s["collapsed"]["cacheproxy_timed_slowest_s"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], squid, width=0.4, label="Squid")
    ax.bar([x + 0.2 for x in xs], ours, width=0.4, label=f"cacheproxy (workers={results['workers']})")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("throughput relative to direct (nginx) = 1.0")
    ax.set_title(f"cacheproxy vs Squid, {results['date']}, {results['machine']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller objects, shorter runs (about two minutes)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cacheproxy workers (cores)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    for tool in ("nginx", "squid", "wrk", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install nginx squid wrk curl")
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (args.out / "bench.md").write_text(text)
    print()
    print(text)
    try:
        chart(results, args.out / "bench.png")
        print(f"chart: {args.out / 'bench.png'}")
    except ImportError:
        print("no chart: pip install matplotlib")


if __name__ == "__main__":
    main()
