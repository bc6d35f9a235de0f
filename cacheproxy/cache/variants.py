"""Vary (RFC 9111 4.1): a stored response answers only requests that match the one it was made for
in every header its ``Vary`` nominates. The nominated headers' values are kept with the object.

``Accept-Encoding`` is left out: fills always ask for the identity encoding, which suits every
client. A header that is absent is told apart from one that is present but empty.
"""

from __future__ import annotations

from collections.abc import Mapping

from .freshness import Headers


def _value(headers: Mapping[str, str], name: str) -> str | None:
    getall = getattr(headers, "getall", None)
    values = getall(name, []) if getall is not None else ([headers[name]] if name in headers else [])
    if not values:
        return None
    return ", ".join(" ".join(v.split()) for v in values)


def nominated(response_headers: Headers, request_headers: Mapping[str, str]) -> dict[str, str | None]:
    """The request headers the response's ``Vary`` names, with the values this request had."""
    names: list[str] = []
    for value in response_headers.getall("Vary", []):
        for name in value.split(","):
            name = name.strip().lower()
            if name and name != "accept-encoding" and name not in names:
                names.append(name)
    return {name: _value(request_headers, name) for name in names}


def vary_matches(vary: Mapping[str, str | None], request_headers: Mapping[str, str]) -> bool:
    return all(_value(request_headers, name) == value for name, value in vary.items())
