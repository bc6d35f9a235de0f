"""Hits from the shared OBS tier beside local hits, against SeaweedFS on this machine.

    python bench/obs_hits.py [--quick] [--workers N] [--out DIR]

On loopback: nginx serves the files (the origin), SeaweedFS is the S3-compatible store (it checks
signatures), and three cacheproxy instances share one bucket: A fetches each object once from the
origin (it keeps a local copy and uploads it), B (``serve_hits: stream``) and C
(``serve_hits: redirect``) have empty local stores, so their hits come from OBS. Measured with
curl: A's local hit, B's stream hit, C's redirect hit (curl -L follows the signed URL straight to
SeaweedFS, as a client with the OBS endpoint in no_proxy does), the signed URL fetched directly,
and nginx direct. 4 KiB objects: curl --parallel with
keep-alive. Writes DIR/obs.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from obs import ObsClient  # noqa: E402
from run import (  # noqa: E402
    Server,
    cacheproxy_process,
    free_port,
    http_ok,
    make_files,
    side_bench_args,
    start_nginx,
    wait_for,
)
from tls import curl_many, curl_speed, median_speed  # noqa: E402

from tests.seaweed import ACCESS_KEY, SECRET_KEY, Seaweed, start_seaweed  # noqa: E402

BUCKET = "cacheproxy-bench"


def bucket_client(weed: Seaweed, bucket: str) -> ObsClient:
    """An SDK client of ``weed`` with ``bucket`` created (SeaweedFS takes a moment to accept it)."""
    client = ObsClient(
        access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, server=weed.endpoint, signature="v4",
        path_style=True, is_secure=False, is_signature_negotiation=False, region="us-east-1",
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while client.createBucket(bucket).status >= 300:
        if time.monotonic() > deadline:
            raise SystemExit("cannot create the bucket")
        time.sleep(0.5)
    return client


def start_instance(root: Path, name: str, workers: int, endpoint: str, serve_hits: str) -> Server:
    port = free_port()
    config = root / f"{name}.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nworkers: {workers}\n"
        f"cache: {{dir: {root / name}, max_size: 50GiB}}\n"
        "rules: {allow_private_upstreams: true}\n"
        "storage:\n  backend: obs\n  obs:\n"
        f"    endpoint: {endpoint}\n    bucket: {BUCKET}\n"
        f"    access_key_id: {ACCESS_KEY}\n    secret_access_key: {SECRET_KEY}\n"
        f"    signature: v4\n    path_style: true\n    serve_hits: {serve_hits}\n"
        "limits: {per_client_rps: 1000000000, per_client_burst: 1000000000, per_client_concurrency: 100000}\n"
        f"log: {{level: warning, access_log: {root / (name + '-access.log')}}}\n"
    )
    proc = cacheproxy_process(config)
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/_cacheproxy/healthz"), name, timeout=120)
    return Server(name, port, proc)


def main() -> None:
    args, large_name, large_size = side_bench_args(__doc__ or "", HERE / "results")
    requests = 1000 if args.quick else 3000
    results: dict[str, object] = {"machine": f"{platform.node()} {os.cpu_count()} cores", "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="cacheproxy-obs-bench-") as tmp:
        root = Path(tmp)
        files = make_files(root, large_name, large_size)
        nginx, _ = start_nginx(root, files)
        weed = start_seaweed(root / "seaweed")
        servers: list[Server] = [nginx]
        try:
            client = bucket_client(weed, BUCKET)
            # Named "localhost" so that redirected clients can reach it directly (--noproxy localhost),
            # as build machines would with the OBS endpoint in no_proxy.
            endpoint = weed.endpoint.replace("127.0.0.1", "localhost")
            a = start_instance(root, "a", args.workers, endpoint, "stream")
            b = start_instance(root, "b", args.workers, endpoint, "stream")
            c = start_instance(root, "c", args.workers, endpoint, "redirect")
            servers += [a, b, c]
            origin = f"http://127.0.0.1:{nginx.port}"
            for name in (large_name, "4k.tar"):
                curl_speed(f"{origin}/{name}", "-x", a.proxy)  # A fetches, stores and uploads
            deadline = time.monotonic() + 120
            while len(client.listObjects(BUCKET).body.contents or []) < 2:  # B and C must not fetch
                if time.monotonic() > deadline:
                    raise SystemExit("the objects did not reach OBS")
                time.sleep(0.5)
            for name in (large_name, "4k.tar"):
                if curl_speed(f"{origin}/{name}", "-x", b.proxy)[1] != "HIT":
                    raise SystemExit(f"{name} is not a hit from OBS on B")
            if len(list((root / "b").glob("objects/*/*.json"))) or len(list((root / "c").glob("objects/*/*.json"))):
                raise SystemExit("B or C stored a local copy: its hits would not come from OBS")
            big = f"{origin}/{large_name}"
            location = subprocess.run(
                ["curl", "-sS", "-x", c.proxy, "-o", "/dev/null", "-w", "%{redirect_url}", big],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            large = {
                "nginx_direct": median_speed(big),
                "local_hit": median_speed(big, "-x", a.proxy),
                "obs_stream_hit": median_speed(big, "-x", b.proxy),
                "obs_redirect_hit": median_speed(big, "-x", c.proxy, "--noproxy", "localhost", "-L"),
                "obs_signed_url_direct": median_speed(location),
            }
            small_url = f"{origin}/4k.tar"
            small = {
                "local_hit": curl_many(small_url, requests, 16, "-x", a.proxy),
                "obs_stream_hit": curl_many(small_url, requests, 16, "-x", b.proxy),
                "obs_redirect_hit": curl_many(small_url, requests, 16, "-x", c.proxy, "--noproxy", "localhost", "-L"),
            }
        finally:
            for server in reversed(servers):
                server.stop()
            weed.stop()
    results["large_MiBps"] = {"object": large_name, **{k: round(v, 1) for k, v in large.items()}}
    results["small_4k_rps"] = {k: round(v) for k, v in small.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "obs.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(
        f"stream / local hit: large {large['obs_stream_hit'] / large['local_hit']:.2f}x, "
        f"small {small['obs_stream_hit'] / small['local_hit']:.2f}x"
    )


if __name__ == "__main__":
    main()
