"""Which header fields a proxy passes on, in each direction (RFC 9110 7.6, RFC 9111 3.1).

Hop-by-hop fields, and those a message names in its ``Connection``, belong to one connection and
are never forwarded; everything else is end-to-end and goes on unchanged, plus our ``Via``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

from .errors import VIA

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by each side's own framing, or by the proxy itself.
FRAMING = frozenset({"content-length", "host"})
# A fill fetches the whole representation: the client's own conditions and ranges are answered
# by the cache from what it gets (and a fill is shared by clients with different ones).
CLIENT_CONDITIONS = frozenset(
    {"range", "if-range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since"}
)
# Not replayed from a stored response: the cache computes its own Age. (Set-Cookie is kept, as RFC
# 9111 3.1 says: an origin that sets a cookie on a shareable answer marks it private itself.)
NOT_STORED = frozenset({"age"})


def _connection_named(headers: Mapping[str, str]) -> set[str]:
    getall = getattr(headers, "getall", None)
    values = getall("Connection", []) if getall is not None else [headers.get("Connection", "")]
    return {name.strip().lower() for value in values if value for name in value.split(",")}


def _without(headers: Mapping[str, str], drop: Iterable[frozenset[str]]) -> CIMultiDict[str]:
    dropped = set().union(*drop) | _connection_named(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)


def with_via(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Append our ``Via`` to what the message says it went through."""
    earlier = headers.getall("Via", [])
    if earlier:
        del headers["Via"]
        headers["Via"] = ", ".join([*earlier, VIA])
    else:
        headers["Via"] = VIA
    return headers


def request_to_origin(headers: Mapping[str, str], *, fill: bool = False) -> CIMultiDict[str]:
    """The client's end-to-end request headers for the origin; a fill's without its conditions."""
    drop = (HOP_BY_HOP, FRAMING, CLIENT_CONDITIONS) if fill else (HOP_BY_HOP, FRAMING)
    return with_via(_without(headers, drop))


def end_to_end(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """An origin's response headers for the client, minus hop-by-hop and framing ones."""
    return _without(headers, (HOP_BY_HOP, FRAMING))


def for_storage(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The response headers kept with a stored object and replayed on its hits."""
    return tuple(_without(headers, (HOP_BY_HOP, FRAMING, NOT_STORED)).items())


def updated(stored: tuple[tuple[str, str], ...], fresh: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """RFC 9111 3.2: the stored headers with each field of a 304 (or HEAD) replacing its namesakes."""
    incoming = for_storage(fresh)
    names = {k.lower() for k, _ in incoming} - {"content-length"}
    kept = tuple((k, v) for k, v in stored if k.lower() not in names)
    return kept + tuple((k, v) for k, v in incoming if k.lower() != "content-length")
