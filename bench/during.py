"""Request latency while the housekeeping works on a large store: an eviction pass, the index
snapshot, and the OBS listing refresh.

    python bench/during.py [--objects 300000] [--keys 100000] [--seconds 30] [--connections 64]

Hits on 100 objects (wrk, ``--connections`` keep-alive connections, 64 by default) run through
each phase, and wrk's p99 and maximum latency are reported beside the same run on an idle proxy:

- idle: a store of ``--objects`` small objects (bench/scale.py's generator), nothing to do;
- snapshot: the same store, ``cleanup_interval`` 5 s (each clean-up writes the index snapshot);
- eviction: the same store with ``max_size`` just under its size and ``low_watermark`` 0.5; a
  miss from a local nginx a few seconds into the run commits an object and sets off a pass that
  evicts half the store; the pass's duration comes from the log;
- OBS listing: SeaweedFS with ``--keys`` objects under the prefix (uploaded by 32 threads),
  ``index_refresh`` 5 s; the listing's duration comes from the log, and the RSS growth it left.

cacheproxy runs on the first core and wrk on the others (``--no-pin``: both anywhere); see
:func:`pinned` for why.

Results in DIR/during.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import run as bench  # noqa: E402
import scale  # noqa: E402
from obs import ObsClient  # noqa: E402
from obs_hits import bucket_client  # noqa: E402

from tests.seaweed import ACCESS_KEY, SECRET_KEY, start_seaweed  # noqa: E402

BUCKET = "cacheproxy-during"
HOT = 100  # objects the clients ask for


def start(root: Path, name: str, store: Path, extra: str) -> tuple[bench.Server, Path]:
    port = bench.free_port()
    config = root / f"{name}.yaml"
    log = root / f"{name}.log"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nworkers: 1\n"
        f"rules: {{allow_private_upstreams: true}}\n"
        "limits: {per_client_rps: 1000000000, per_client_burst: 1000000000, per_client_concurrency: 100000}\n"
        f"log: {{level: info, access_log: {root / (name + '-access.log')}}}\n" + extra.format(store=store)
    )
    with log.open("wb") as stderr:
        proc = bench.cacheproxy_process(config, stderr=stderr)
    bench.wait_for(lambda: bench.http_ok(f"http://127.0.0.1:{port}/_cacheproxy/readyz"), name, timeout=900)
    return bench.Server(name, port, proc), log


PIN = True  # --no-pin: cacheproxy and wrk share every core


def pinned(server: bench.Server) -> list[str]:
    """Put cacheproxy (every thread of it) on the first core, and return the prefix that runs
    wrk on the others. Sharing two cores, wrk's threads waited for the scheduler up to 400-700 ms
    whenever housekeeping kept the proxy's loop busy without a pause, while the loop itself never
    went more than 13 ms without polling its sockets (measured inside it): the figures were the
    load generator's, not the proxy's."""
    cores = os.cpu_count() or 1
    if not PIN or cores < 2:
        return []
    bench.subprocess.run(["taskset", "-a", "-cp", "0", str(server.proc.pid)], check=True, capture_output=True)
    return ["taskset", "-c", f"1-{cores - 1}"]


def latency(root: Path, server: bench.Server, seconds: float, connections: int) -> dict[str, float]:
    script = root / "wrk-hot.lua"
    script.write_text(scale.WRK_RANDOM.format(count=HOT).replace("latency:percentile(99)", "latency.max"))
    out = bench.subprocess.run(
        [*pinned(server), "wrk", "-t", "2", "-c", str(connections), "-d", f"{int(seconds)}s", "--latency",
         "--timeout", "10s", "-s", str(script), server.proxy + "/"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    requests, duration, top, p50, *errors = (int(x) for x in out.split("RESULT", 1)[1].split())
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None, out
    scale_ms = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {
        "rps": round(requests / (duration / 1e6)),
        "p50_ms": p50 / 1000,
        "p99_ms": float(p99.group(1)) * scale_ms,
        "max_ms": top / 1000,
        "errors": sum(errors),
    }


def logged(log: Path, pattern: str) -> list[str]:
    return re.findall(pattern, log.read_text(errors="replace"))


def fill_bucket(client: ObsClient, keys: int) -> float:
    started = time.monotonic()

    def put(i: int) -> None:
        response = client.putContent(BUCKET, f"{i:064x}/x.tar.gz", b"x")
        assert response.status < 300, response.errorMessage

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(keys)))
    return time.monotonic() - started


def obs_phase(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Hits while the OBS listing of ``args.keys`` objects refreshes every 5 s."""
    results: dict[str, Any] = {}
    weed = start_seaweed(root / "seaweed")
    try:
        client = bucket_client(weed, BUCKET)
        results["bucket_fill_s"] = round(fill_bucket(client, args.keys), 1)
        obs = (
            "cache: {{dir: {store}, max_size: 200GiB}}\n"
            "storage:\n  backend: obs\n  obs:\n"
            f"    endpoint: {weed.endpoint}\n    bucket: {BUCKET}\n    index_refresh: 5s\n"
            f"    access_key_id: {ACCESS_KEY}\n    secret_access_key: {SECRET_KEY}\n"
            "    signature: v4\n    path_style: true\n"
        )
        scale.make_store(root / "obs-store", HOT)  # the objects the clients ask for, stored locally
        server, log = start(root, "obs", root / "obs-store", obs)
        try:
            time.sleep(2)
            before = bench.tree_rss(server.proc.pid)
            results["obs_listing"] = latency(root, server, args.seconds, args.connections)
            results["obs_listing"]["rss_growth_bytes"] = bench.tree_rss(server.proc.pid) - before
        finally:
            server.stop()
        listings = logged(log, r"listed OBS bucket \S+: (\d+) objects in ([\d.]+)s")
        results["obs_listing"]["listings"] = [{"objects": int(n), "seconds": float(s)} for n, s in listings]
        print("obs", results["obs_listing"], flush=True)
    finally:
        weed.stop()
    return results


def local_phases(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Idle, snapshot and eviction on a store of ``args.objects`` objects."""
    results: dict[str, Any] = {}
    size = args.objects * len(scale.BODY)
    store = root / "store"
    scale.make_store(store, args.objects)
    server, log = start(root, "idle", store, "cache: {{dir: {store}, max_size: 200GiB}}\n")
    server.stop()  # the first start read every metadata file: this stop writes the snapshot
    server, log = start(root, "idle", store, "cache: {{dir: {store}, max_size: 200GiB}}\n")
    try:
        time.sleep(5)  # the digest map is built after readiness
        results["idle"] = latency(root, server, args.seconds, args.connections)
    finally:
        server.stop()
    print("idle", results["idle"], flush=True)
    # The snapshot alone: nothing to evict, a clean-up (which writes it) every 5 s.
    server, log = start(root, "snapshot", store, "cache: {{dir: {store}, max_size: 200GiB, cleanup_interval: 5s}}\n")
    try:
        time.sleep(5)
        results["snapshot"] = latency(root, server, args.seconds, args.connections)
    finally:
        server.stop()
    print("snapshot", results["snapshot"], flush=True)
    # An eviction pass alone: the store just over the high watermark, and a miss (from a local
    # origin) a few seconds into the run sets it off when its object is committed.
    evicting = f"cache: {{{{dir: {{store}}, max_size: {int(size / 0.95)}, high_watermark: 0.9, low_watermark: 0.5}}}}\n"
    files = root / "files"
    files.mkdir(exist_ok=True)
    (files / "trigger.tar").write_bytes(b"t" * 1000)
    root.chmod(0o755)
    origin, _ = bench.start_nginx(root, files)
    server, log = start(root, "eviction", store, evicting)
    try:
        time.sleep(5)
        trigger = threading.Timer(3.0, bench.curl, (f"http://127.0.0.1:{origin.port}/trigger.tar", server.proxy))
        trigger.start()
        results["eviction"] = latency(root, server, args.seconds, args.connections)
        trigger.join()
        deadline = time.monotonic() + 600
        while not logged(log, r"evicted \d+") and time.monotonic() < deadline:
            time.sleep(1)  # the pass outlived wrk's run: its duration is still wanted
    finally:
        server.stop()
        origin.stop()
    passes = logged(log, r"evicted (\d+) objects in ([\d.]+)s")
    results["eviction"]["passes"] = [{"evicted": int(n), "seconds": float(s)} for n, s in passes]
    print("eviction", results["eviction"], flush=True)

    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=300_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64 saturates 2 cores)")
    parser.add_argument("--skip-obs", action="store_true", help="only the local phases")
    parser.add_argument("--only-obs", action="store_true", help="only the OBS listing phase")
    parser.add_argument("--no-pin", action="store_true", help="let cacheproxy and wrk share every core")
    args = parser.parse_args()
    global PIN
    PIN = not args.no_pin
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "objects": args.objects, "keys": args.keys, "pinned": PIN,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cacheproxy-during-") as tmp:
        root = Path(tmp)
        if not args.only_obs:
            results.update(local_phases(root, args))
        if not args.skip_obs:
            results.update(obs_phase(root, args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "during.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
