"""The PROXY protocol header (HAProxy's spec, versions 1 and 2) a gateway sends first.

With ``proxy_protocol: true`` every connection must start with one, and the client address in it
is the one rules, limits and logs use (nginx ``stream { proxy_protocol on; }`` in front). A
``LOCAL`` (v2) or ``UNKNOWN`` (v1) header, as a gateway's own health check sends, carries no
client: the connection's peer address stands.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_FIXED = 16  # signature, version/command, family/protocol, length
_V2_ADDRESS_LENGTHS = {0x1: 12, 0x2: 36}  # AF_INET: 2 x 4 + 2 x 2; AF_INET6: 2 x 16 + 2 x 2


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header."""


def parse_proxy_header(data: bytes) -> tuple[int, str | None] | None:
    """``(length, client address)`` of the header at the start of ``data``; None: incomplete.

    The address is None for ``LOCAL``/``UNKNOWN`` headers and non-IP families (the peer stands).
    Raise :class:`ProxyHeaderError` when ``data`` cannot start a header.
    """
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < len(V2_SIGNATURE):
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX[: len(data)]) and len(data) < len(V1_PREFIX):
        return None
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    raise ProxyHeaderError("the connection did not start with a PROXY protocol header (proxy_protocol is on)")


def _parse_v1(data: bytes) -> tuple[int, str | None] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        return None
    parts = data[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return end + 2, None
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 header: {data[:end][:V1_MAX]!r}")
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
        ipaddress.ip_address(parts[3].decode("ascii"))
        ports = [int(p) for p in parts[4:6]]
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"malformed PROXY v1 header: {data[:end]!r}") from None
    if (source.version == 4) != (parts[1] == b"TCP4") or not all(0 <= p < 65536 for p in ports):
        raise ProxyHeaderError(f"malformed PROXY v1 header: {data[:end]!r}")
    if any(p != p.lstrip(b"0") and p != b"0" for p in parts[4:6]):
        raise ProxyHeaderError(f"malformed PROXY v1 header (leading zeros): {data[:end]!r}")
    return end + 2, str(source)


def _parse_v2(data: bytes) -> tuple[int, str | None] | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family_protocol, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2 or version_command & 0xF not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2 header with version/command byte {version_command:#04x}")
    total = V2_FIXED + length
    if len(data) < total:
        return None
    if version_command & 0xF == 0:  # LOCAL: the gateway speaking for itself
        return total, None
    family = family_protocol >> 4
    needed = _V2_ADDRESS_LENGTHS.get(family)
    if needed is None:  # AF_UNSPEC or AF_UNIX: no IP address to take
        return total, None
    if length < needed:
        raise ProxyHeaderError(f"PROXY v2 header too short for its address family ({length} bytes)")
    size = 4 if family == 0x1 else 16
    source = ipaddress.ip_address(data[V2_FIXED : V2_FIXED + size])
    return total, str(source)
