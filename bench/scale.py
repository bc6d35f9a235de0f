"""A large store: start-up, memory per indexed object and hit latency at that size.

    python bench/scale.py [--objects 1000000] [--curve 100000,300000] [--out DIR]

For each size it generates a store of small committed objects in cacheproxy's local layout (as
the daemon writes them: body file and JSON metadata, distinct sha256/sha512), then starts one
cacheproxy worker on it twice: without the index snapshot (every metadata file read) and with
the snapshot the first clean stop wrote. It reports the time to ``readyz`` 200, the worker's
resident memory against an empty store's (per indexed object), and ``wrk`` hits on random
objects of the store (64 connections): rate, p50 and p99. Results in ``DIR/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import run as bench  # noqa: E402  (bench/run.py: servers, wrk)

BODY = b"x" * 100
WRK_RANDOM = """
math.randomseed(os.time())
request = function()
  local i = math.random(0, {count} - 1)
  return wrk.format("GET", "http://bench.invalid/scale/" .. i .. ".tar.gz")
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(99), latency:percentile(50), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _write_range(args: tuple[str, int, int]) -> None:
    import hashlib
    import os

    from cacheproxy.storage.base import ObjectMeta, key_digest

    store, start, stop = Path(args[0]), args[1], args[2]
    now = time.time()
    for i in range(start, stop):
        key = f"http://bench.invalid/scale/{i}.tar.gz"
        digest = key_digest(key)
        folder = store / "objects" / digest[:2]
        name = f"{digest}.{i:016x}"
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, BODY)
        os.close(fd)
        meta = ObjectMeta(
            key, key, len(BODY), hashlib.sha256(key.encode()).hexdigest(), hashlib.md5(key.encode()).hexdigest(),
            now, now, sha512=hashlib.sha512(key.encode()).hexdigest(), content_type="application/x-tar",
            headers=[["Content-Type", "application/x-tar"], ["ETag", f'"{i:x}"']], file=name, last_access=now,
        )  # fmt: skip
        fd = os.open(folder / f"{digest}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, meta.to_json().encode())
        os.close(fd)


def make_store(store: Path, count: int) -> float:
    started = time.monotonic()
    for i in range(256):
        (store / "objects" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
    step = 20_000
    ranges = [(str(store), s, min(s + step, count)) for s in range(0, count, step)]
    with multiprocessing.Pool() as pool:
        pool.map(_write_range, ranges)
    return time.monotonic() - started


def worker_rss(server: bench.Server) -> int:
    """The serving process's resident bytes (workers: 1, so the process itself)."""
    return bench.tree_rss(server.proc.pid)


def hits(root: Path, server: bench.Server, count: int, seconds: float) -> dict[str, float]:
    script = root / f"wrk-random-{count}.lua"
    script.write_text(WRK_RANDOM.format(count=count))
    out = bench.subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            "64",
            "-d",
            f"{int(seconds)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            server.proxy + "/",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fields = [int(x) for x in out.split("RESULT", 1)[1].split()]
    requests, duration, p99, p50, *errors = fields
    return {"rps": requests / (duration / 1e6), "p99_ms": p99 / 1000, "p50_ms": p50 / 1000, "errors": sum(errors)}


def measure(root: Path, count: int, seconds: float) -> dict[str, Any]:
    store = root / f"store-{count}"
    made = make_store(store, count)
    print(f"  {count} objects made in {made:.0f}s", flush=True)
    server, cold = bench.start_cacheproxy(root, 1, store, ready_timeout=900)
    server.stop()  # a clean stop writes the snapshot
    server, warm = bench.start_cacheproxy(root, 1, store, ready_timeout=900)
    try:
        time.sleep(2)  # the digest map is built after readiness, in slices
        rss = worker_rss(server)
        bench.assert_hit(server, "http://bench.invalid/scale/0.tar.gz")
        rate = hits(root, server, count, seconds)
    finally:
        server.stop()
    return {"objects": count, "ready_s": warm, "ready_without_snapshot_s": cold, "rss_bytes": rss, **rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--curve", default="100000,300000", help="smaller sizes measured first (comma-separated)")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk duration per size")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sizes = [int(x) for x in args.curve.split(",") if x] + [args.objects]
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "sizes": []}
    with tempfile.TemporaryDirectory(prefix="cacheproxy-scale-") as tmp:
        root = Path(tmp)
        empty, _ = bench.start_cacheproxy(root, 1, root / "empty-store")
        time.sleep(1)
        base = worker_rss(empty)
        empty.stop()
        results["empty_rss_bytes"] = base
        print(f"empty store: rss {base / 1e6:.1f} MB", flush=True)
        for count in sizes:
            row = measure(root, count, args.seconds)
            row["rss_per_object_bytes"] = (row["rss_bytes"] - base) / count
            results["sizes"].append(row)
            print(f"  {json.dumps(row)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(results, indent=2))
    print("\n| objects | ready (snapshot) | ready (no snapshot) | RSS per object | hits/s | p50 | p99 |")
    print("|---|---|---|---|---|---|---|")
    for r in results["sizes"]:
        print(
            f"| {r['objects']:,} | {r['ready_s']:.2f} s | {r['ready_without_snapshot_s']:.2f} s | "
            f"{r['rss_per_object_bytes']:.0f} B | {r['rps']:,.0f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms |"
        )


if __name__ == "__main__":
    main()
