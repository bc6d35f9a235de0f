"""``python -m cacheproxy.ops.readycheck [HOST:PORT]``: exit 0 when the proxy is ready, 1 when not.

The container image's ``HEALTHCHECK`` (no curl in the image). Without an address it asks the first
``listen`` address of the effective configuration (``$CACHEPROXY_CONFIG``; a wildcard address is
asked on loopback), with a PROXY protocol ``UNKNOWN`` header first when the configuration expects
one (``proxy_protocol: true``), as a gateway's own check does. Proxy variables of the environment
play no part: the question is for this proxy itself.
"""

from __future__ import annotations

import os
import socket
import sys

TIMEOUT = 4.0
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def probe(host: str, port: int, proxy_protocol: bool, timeout: float = TIMEOUT) -> tuple[int, str]:
    """GET /_cacheproxy/readyz: the status and the body."""
    request = b"GET /_cacheproxy/readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall((b"PROXY UNKNOWN\r\n" if proxy_protocol else b"") + request)
        answer = b""
        while len(answer) < 65536 and (chunk := sock.recv(65536)):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.") and head.count(b" ") >= 1 else b"0"
    return int(status) if status.isdigit() else 0, body.decode(errors="replace")


def main(argv: list[str]) -> int:
    from ..config import load_config

    config = load_config(os.environ.get("CACHEPROXY_CONFIG") or None)
    if argv:
        host, _, port = argv[0].rpartition(":")
        host, port_number = host.strip("[]"), int(port)
    else:
        host, port_number = config.listen[0].host, config.listen[0].port
    host = WILDCARDS.get(host, host)
    try:
        status, body = probe(host, port_number, config.proxy_protocol)
    except OSError as exc:
        print(f"not ready: {host}:{port_number}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"not ready: {host}:{port_number}: {status} {body[:2000]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
