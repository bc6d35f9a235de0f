"""Hits through an intercepted TLS connection beside plain http hits of the same object.

    python bench/tls.py [--quick] [--workers N] [--out DIR]

On loopback: nginx serves generated files over https (certificate from trustme) and is the
baseline "nginx https direct"; cacheproxy runs with ``workers`` = cores and TLS interception on
(a CA from ``cacheproxy ca init``). Each object is fetched once through an intercepted CONNECT,
then measured three ways with curl, a C client: intercepted https hit (``curl -x --cacert``),
plain http hit of the same cached object (URL-in-path ``http://proxy/https://origin/...``), and
nginx https direct. Small objects: curl --parallel with keep-alive, and once with a new
connection (a new CONNECT and TLS handshake) for every request. Misses from the https origin
(a 100 MiB object under names never asked for before, written to a file): URL-in-path and
intercepted, against curl downloading it from nginx into a file. Writes DIR/tls.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    HERE,
    MiB,
    Server,
    cacheproxy_process,
    free_port,
    http_ok,
    make_file,
    make_files,
    port_open,
    side_bench_args,
    wait_for,
)


def start_https_nginx(root: Path, files: Path, cert: Path, key: Path) -> Server:
    port = free_port()
    conf = root / "nginx-tls.conf"
    conf.write_text(f"""
worker_processes 1;
pid {root}/nginx-tls.pid;
error_log {root}/nginx-tls-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path {root}/nginx-tmp;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {files};
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(root), "-c", str(conf), "-g", "daemon off;"])
    wait_for(lambda: port_open(port), "nginx")
    return Server("nginx", port, proc)


def start_intercepting_cacheproxy(root: Path, workers: int, origin_port: int, origin_ca: Path) -> tuple[Server, Path]:
    ca_dir = root / "proxy-ca"
    subprocess.run(
        [sys.executable, "-m", "cacheproxy", "ca", "init", "--out", str(ca_dir)], check=True, capture_output=True
    )
    port = free_port()
    config = root / "cacheproxy-tls.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nworkers: {workers}\n"
        f"cache: {{dir: {root / 'store'}, max_size: 50GiB}}\n"
        f"rules: {{allow_private_upstreams: true, connect_ports: [{origin_port}]}}\n"
        f"upstream: {{ca_bundle: {origin_ca}}}\n"
        f"tls_intercept: {{enabled: true, ca_cert: {ca_dir / 'ca.pem'}, ca_key: {ca_dir / 'ca.key'}}}\n"
        "limits: {per_client_rps: 1000000000, per_client_burst: 1000000000, per_client_concurrency: 100000}\n"
        f"log: {{level: warning, access_log: {root / 'access.log'}}}\n"
    )
    proc = cacheproxy_process(config)
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/_cacheproxy/readyz"), "cacheproxy", timeout=120)
    return Server("cacheproxy", port, proc), ca_dir / "ca.pem"


def curl_speed(url: str, *args: str) -> tuple[float, str]:
    """(MiB/s, X-Cache) of one download (to /dev/null unless ``args`` say ``-o``)."""
    out = subprocess.run(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-D", "-", "-w", "\n%{speed_download}", *args, url],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    x_cache = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.lower().startswith("x-cache:")), "")
    return float(out.splitlines()[-1]) / MiB, x_cache


def median_speed(url: str, *args: str, runs: int = 3) -> float:
    return statistics.median(curl_speed(url, *args)[0] for _ in range(runs))


MISS_RUNS = 3
MISS_SIZE = 100 * MiB


def miss_speeds(files: Path, https: str, proxy: str, root: Path, *intercepted: str) -> dict[str, float]:
    """Median MiB/s of 100 MiB misses (each a name not asked for before), written to a file."""
    make_file(files / "miss.tar", MISS_SIZE)
    for i in range(MISS_RUNS):
        for form in ("direct", "path", "intercepted"):
            (files / f"miss-{form}-{i}.tar").symlink_to(files / "miss.tar")
    out = ("-o", str(root / "miss.out"))
    speeds: dict[str, list[float]] = {"https_direct_to_file": [], "url_in_path_miss": [], "intercepted_miss": []}
    for i in range(MISS_RUNS):
        direct = curl_speed(f"{https}/miss-direct-{i}.tar", "--cacert", str(files.parent / "origin-ca.pem"), *out)
        path = curl_speed(f"{proxy}/{https}/miss-path-{i}.tar", *out)
        inter = curl_speed(f"{https}/miss-intercepted-{i}.tar", *intercepted, *out)
        if path[1] != "MISS" or inter[1] != "MISS":
            raise SystemExit(f"expected misses, got {path[1]} and {inter[1]}")
        speeds["https_direct_to_file"].append(direct[0])
        speeds["url_in_path_miss"].append(path[0])
        speeds["intercepted_miss"].append(inter[0])
    return {k: statistics.median(v) for k, v in speeds.items()}


def curl_many(url: str, count: int, parallel: int, *args: str) -> float:
    """Requests per second for ``count`` GETs of ``url`` with ``parallel`` connections."""
    config = Path(tempfile.mkstemp(suffix=".curl")[1])
    config.write_text("".join(f'url = "{url}"\noutput = "/dev/null"\n' for _ in range(count)))
    started = time.monotonic()
    done = subprocess.run(
        ["curl", "-sS", "--fail", "--parallel", "--parallel-max", str(parallel), *args, "-K", str(config)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    config.unlink()
    if done.returncode != 0:
        raise SystemExit(f"curl failed: {done.stderr[-500:]}")
    return count / elapsed


def main() -> None:
    args, large_name, large_size = side_bench_args(__doc__ or "", HERE / "results")
    requests = 2000 if args.quick else 6000
    results: dict[str, object] = {"machine": f"{platform.node()} {os.cpu_count()} cores", "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="cacheproxy-tls-bench-") as tmp:
        root = Path(tmp)
        files = make_files(root, large_name, large_size)
        ca = trustme.CA()
        server_cert = ca.issue_cert("localhost")
        cert, key, origin_ca = root / "origin.pem", root / "origin.key", root / "origin-ca.pem"
        server_cert.cert_chain_pems[0].write_to_path(str(cert))
        server_cert.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(origin_ca))
        nginx = start_https_nginx(root, files, cert, key)
        proxy, proxy_ca = start_intercepting_cacheproxy(root, args.workers, nginx.port, origin_ca)
        try:
            https = f"https://localhost:{nginx.port}"
            intercepted = ("-x", proxy.proxy, "--cacert", str(proxy_ca))
            direct = ("--cacert", str(origin_ca))
            misses = miss_speeds(files, https, proxy.proxy, root, *intercepted)
            for name in (large_name, "4k.tar"):
                curl_speed(f"{https}/{name}", *intercepted)  # the miss that fills the cache
                deadline = time.monotonic() + 60
                while curl_speed(f"{https}/{name}", *intercepted)[1] != "HIT":
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{name} is not a hit through the intercepted connection")
                    time.sleep(1)
                if not curl_speed(f"{proxy.proxy}/{https}/{name}")[1].startswith("HIT"):
                    raise SystemExit(f"{name} is not a hit in the URL-in-path form")
            big = f"{https}/{large_name}"
            large = {
                "nginx_https_direct": median_speed(big, *direct),
                "intercepted_hit": median_speed(big, *intercepted),
                "plain_http_hit": median_speed(f"{proxy.proxy}/{big}"),
            }
            small_url = f"{https}/4k.tar"
            small = {
                "nginx_https_direct": curl_many(small_url, requests, 16, *direct),
                "intercepted_hit": curl_many(small_url, requests, 16, *intercepted),
                "plain_http_hit": curl_many(f"{proxy.proxy}/{small_url}", requests, 16),
                "intercepted_new_connection_each": curl_many(
                    small_url, requests // 4, 16, *intercepted, "-H", "Connection: close"
                ),
                "plain_http_new_connection_each": curl_many(
                    f"{proxy.proxy}/{small_url}", requests // 4, 16, "-H", "Connection: close"
                ),
            }
        finally:
            proxy.stop()
            nginx.stop()
    results["miss_100MiB_MiBps"] = {k: round(v, 1) for k, v in misses.items()}
    results["large_MiBps"] = {"object": large_name, **{k: round(v, 1) for k, v in large.items()}}
    results["small_4k_rps"] = {k: round(v) for k, v in small.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tls.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    ratio_large = large["intercepted_hit"] / large["plain_http_hit"]
    ratio_small = small["intercepted_hit"] / small["plain_http_hit"]
    print(f"intercepted / plain http hit: large {ratio_large:.2f}x, small {ratio_small:.2f}x")
    baseline = misses["https_direct_to_file"]
    print(
        f"https-origin misses / curl to file: URL-in-path {misses['url_in_path_miss'] / baseline:.2f}x, "
        f"intercepted {misses['intercepted_miss'] / baseline:.2f}x"
    )


if __name__ == "__main__":
    main()
