#!/usr/bin/env python3
"""Active readiness for nginx open source: mark cacheproxy instances that are not ready ``down``.

nginx open source checks its upstreams only passively (a refused connection counts against
``max_fails``); an instance that still accepts connections but reports itself unready (its store
not writable, OBS unreachable) would keep getting clients. This loop asks every instance's
``/_cacheproxy/readyz`` (with a PROXY protocol ``UNKNOWN`` header first, as the instances behind
the gateway expect one), writes the ``server`` lines of nginx.conf's upstream file, marking the
unready ones ``down``, and reloads nginx (SIGHUP to the master) when the file changed. When no
instance is ready, every one stays listed: a degraded answer beats none. Python's standard library
only, so it runs beside nginx anywhere.

    readiness.py --out /run/cacheproxy-gateway/upstreams.conf --pid-file /run/nginx.pid \
        cacheproxy1:3128 cacheproxy2:3128
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

REQUEST = b"PROXY UNKNOWN\r\nGET /_cacheproxy/readyz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"


def is_ready(instance: str, timeout: float) -> bool:
    host, _, port = instance.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(REQUEST)
            head = sock.recv(64)
    except (OSError, ValueError):
        return False
    return head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 "))


def render(instances: list[str], ready: dict[str, bool], options: str) -> str:
    some_ready = any(ready.values())
    lines = ["# written by deploy/gateway/readiness.py from the instances' /_cacheproxy/readyz"]
    for instance in instances:
        down = " down" if some_ready and not ready[instance] else ""
        lines.append(f"server {instance} {options}{down};")
    return "\n".join(lines) + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upstreams.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def reload_nginx(pid_file: Path) -> None:
    try:
        os.kill(int(pid_file.read_text().strip()), signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"readiness: cannot reload nginx through {pid_file}: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("instances", nargs="+", metavar="HOST:PORT")
    parser.add_argument("--out", type=Path, required=True, help="the upstream file nginx.conf includes")
    parser.add_argument("--pid-file", type=Path, help="nginx's pid file: SIGHUP when the file changes")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between rounds (5)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds an instance may take to answer (3)")
    parser.add_argument("--options", default="max_fails=2 fail_timeout=10s", help="added to every server line")
    parser.add_argument("--once", action="store_true", help="one round, then exit")
    args = parser.parse_args(argv)
    while True:
        ready = {instance: is_ready(instance, args.timeout) for instance in args.instances}
        if write_if_changed(args.out, render(args.instances, ready, args.options)):
            states = ", ".join(f"{i} {'ready' if ok else 'NOT READY'}" for i, ok in ready.items())
            print(f"readiness: {states}", file=sys.stderr, flush=True)
            if args.pid_file is not None and args.pid_file.exists():
                reload_nginx(args.pid_file)
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
