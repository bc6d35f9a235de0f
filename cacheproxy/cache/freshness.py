"""Freshness (RFC 9111 as a shared cache applies it) and whether a response may be stored.

``rules.refresh``: the first rule whose pattern matches the URL path decides. An ``override`` rule
makes the object fresh for ``ttl`` whatever the origin says (archives are immutable); otherwise the
origin's ``s-maxage``/``max-age``/``Expires`` decide, and the heuristic from ``Last-Modified`` is
capped by the rule's ``ttl``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from ..config import RefreshRule

HEURISTIC_FRACTION = 0.1  # RFC 9111 4.2.2: a typical setting is 10% of the time since Last-Modified


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    directives: dict[str, str | None] = {}
    for part in (value or "").split(","):
        name, _, arg = part.strip().partition("=")
        if name:
            directives[name.strip().lower()] = arg.strip().strip('"') if arg else None
    return directives


def http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(int(value or "")))
    except ValueError:
        return None


def match_rule(path: str, rules: Sequence[RefreshRule]) -> RefreshRule | None:
    for rule in rules:
        if rule.match.search(path):
            return rule
    return None


def unstorable_reason(headers: Mapping[str, str]) -> str | None:
    """Why a 200 response must not be stored, or None."""
    cc = parse_cache_control(headers.get("Cache-Control"))
    if "no-store" in cc:
        return "Cache-Control: no-store"
    if "private" in cc:
        return "Cache-Control: private"
    if headers.get("Vary", "").strip() == "*":
        return "Vary: *"
    return None


@dataclass(frozen=True)
class Freshness:
    lifetime: float  # seconds from response_time; math.inf = never stale
    must_revalidate: bool  # stale copies may not be served when the origin is unreachable


def freshness(path: str, headers: Mapping[str, str], response_time: float, rules: Sequence[RefreshRule]) -> Freshness:
    rule = match_rule(path, rules)
    cc = parse_cache_control(headers.get("Cache-Control"))
    must_revalidate = "must-revalidate" in cc or "proxy-revalidate" in cc
    if rule is not None and rule.override:
        return Freshness(rule.ttl, False)
    cap = rule.ttl if rule is not None else 0.0
    if "no-cache" in cc:
        return Freshness(0.0, must_revalidate)
    for directive in ("s-maxage", "max-age"):
        if directive in cc and (seconds := _seconds(cc[directive])) is not None:
            return Freshness(seconds, must_revalidate or directive == "s-maxage")
    date = http_date(headers.get("Date")) or response_time
    if "Expires" in headers:
        expires = http_date(headers.get("Expires"))
        return Freshness(max(0.0, expires - date) if expires is not None else 0.0, must_revalidate)
    last_modified = http_date(headers.get("Last-Modified"))
    if last_modified is not None:
        return Freshness(min(cap, max(0.0, date - last_modified) * HEURISTIC_FRACTION), must_revalidate)
    return Freshness(cap, must_revalidate)


def is_fresh(lifetime: float, response_time: float, now: float) -> bool:
    """An age is never negative (RFC 9111 section 4.2.3): a wall clock stepped back (it happens on
    VMs) must not make a stale object, or one with no freshness at all, fresh."""
    return math.isinf(lifetime) or max(0.0, now - response_time) < lifetime


def client_wants_revalidation(headers: Mapping[str, str]) -> bool:
    value = headers.get("Cache-Control")
    if value is None and "Pragma" not in headers:
        return False  # the common case, on every hit
    cc = parse_cache_control(value)
    return (
        "no-cache" in cc
        or ("max-age" in cc and cc["max-age"] == "0")
        or "no-cache" in headers.get("Pragma", "").lower()
    )
