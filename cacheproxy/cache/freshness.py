"""HTTP caching as a shared cache applies it (RFC 9111): what may be stored, for how long it is
fresh, how old it is, and whether a stored response may answer a given request.

``rules.refresh``: the first rule whose pattern matches the URL path decides. An ``override`` rule
makes the object fresh for ``ttl`` whatever the origin says (archives are immutable); otherwise the
origin's ``s-maxage``/``max-age``/``Expires`` decide, and the heuristic from ``Last-Modified``
(only for statuses that allow one) is capped by the rule's ``ttl``. A 404/410 without explicit
freshness is kept for ``rules.negative_ttl``.

Parsing is strict where the RFCs say so: an ``Expires`` that is not an HTTP date means "already
expired", a ``max-age`` that is not digits is ignored, quoted strings are never split.
"""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from multidict import MultiMapping

from ..config import RefreshRule

HEURISTIC_FRACTION = 0.1  # RFC 9111 4.2.2: a typical setting is 10% of the time since Last-Modified
# RFC 9110 15.1: statuses whose responses may be reused with heuristic freshness
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
NEGATIVE_STATUSES = frozenset({404, 410})
# Statuses whose semantics a cache must understand before it stores them (206 and 304 are never
# stored whole; interim answers never reach us).
NEVER_STORED = frozenset({206, 304})
AGE_MAX = 2**31  # RFC 9111 1.2.2: larger delta-seconds are taken as this


Headers = MultiMapping[str]  # a message's fields, repeated names kept


# -- field parsing -------------------------------------------------------------------------------

_DIRECTIVE = re.compile(
    r"""\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)   # the name, a token
        (?:=(?:([!#$%&'*+.^_`|~0-9A-Za-z-]+)|"((?:[^"\\]|\\.)*)"))?  # =token or ="quoted"
        \s*(?:,|$)""",
    re.VERBOSE,
)
_TO_NEXT = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*"?)*(?:,|$)')


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Directives (names lower-cased) with their argument, the first of each name winning.

    A quoted argument is unquoted (it may hold commas); a malformed item is skipped to the next
    comma outside quotes.
    """
    directives: dict[str, str | None] = {}
    if not value:
        return directives
    pos, end = 0, len(value)
    while pos < end:
        match = _DIRECTIVE.match(value, pos)
        if match is None or match.end() == pos:
            skip = _TO_NEXT.match(value, pos)
            pos = skip.end() if skip is not None and skip.end() > pos else end
            continue
        name = match.group(1).lower()
        if match.group(2) is not None:
            arg: str | None = match.group(2)
        elif match.group(3) is not None:
            arg = re.sub(r"\\(.)", r"\1", match.group(3))
        else:
            arg = None
        directives.setdefault(name, arg)
        pos = match.end()
    return directives


def cache_control(headers: Headers) -> dict[str, str | None]:
    """Every ``Cache-Control`` line of ``headers``, parsed as one list."""
    values = headers.getall("Cache-Control", [])
    if not values:
        return {}
    return parse_cache_control(values[0] if len(values) == 1 else ", ".join(values))


def delta_seconds(value: str | None) -> int | None:
    """RFC 9111 1.2.2: digits only; None when it is anything else."""
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return min(int(value), AGE_MAX)


_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_DAYS = r"(?:mon|tue|wed|thu|fri|sat|sun)"
_IMF = re.compile(_DAYS + r", (\d\d) ([a-z]{3}) (\d{4}) (\d\d):(\d\d):(\d\d) gmt", re.IGNORECASE)
_RFC850 = re.compile(
    r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday), (\d\d)-([a-z]{3})-(\d\d) (\d\d):(\d\d):(\d\d) gmt",
    re.IGNORECASE,
)
_ASCTIME = re.compile(_DAYS + r" ([a-z]{3}) ([ \d]\d) (\d\d):(\d\d):(\d\d) (\d{4})", re.IGNORECASE)


def http_date(value: str | None) -> float | None:
    """An HTTP-date (RFC 9110 5.6.7: IMF-fixdate, RFC 850 or asctime) as a timestamp, else None."""
    if not value:
        return None
    value = value.strip()
    if m := _IMF.fullmatch(value):
        day, month, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(value):
        day, month, yy, hh, mm, ss = m.groups()
        year = str(2000 + int(yy) if int(yy) < 70 else 1900 + int(yy))  # RFC 9110: 50 years ahead at most
    elif m := _ASCTIME.fullmatch(value):
        month, day, hh, mm, ss, year = m.groups()
    else:
        return None
    month_number = _MONTHS.get(month.lower())
    if month_number is None:
        return None
    try:
        return float(calendar.timegm((int(year), month_number, int(day), int(hh), int(mm), int(ss), 0, 0, 0)))
    except (ValueError, OverflowError):
        return None


def age_value(headers: Headers) -> int:
    """The origin's (or an upstream cache's) ``Age``: its first value when valid, else 0."""
    values = headers.getall("Age", [])
    if not values:
        return 0
    return delta_seconds(values[0].split(",")[0].strip()) or 0


def match_rule(path: str, rules: Sequence[RefreshRule]) -> RefreshRule | None:
    for rule in rules:
        if rule.match.search(path):
            return rule
    return None


# -- storing -------------------------------------------------------------------------------------


def has_explicit_freshness(cc: Mapping[str, str | None], headers: Headers) -> bool:
    return "s-maxage" in cc or "max-age" in cc or "public" in cc or "Expires" in headers


def unstorable_reason(status: int, headers: Headers, request_headers: Mapping[str, str]) -> str | None:
    """Why a response to a GET must not be stored by a shared cache (RFC 9111 3), or None."""
    if status in NEVER_STORED:
        return f"status {status}"
    cc = cache_control(headers)
    if "no-store" in cc:
        return "Cache-Control: no-store"
    if "private" in cc:
        return "Cache-Control: private"
    if "no-store" in parse_cache_control(request_headers.get("Cache-Control")):
        return "the request said Cache-Control: no-store"
    if "Authorization" in request_headers and not ("public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
        return "a response to a request with Authorization (the origin did not allow sharing it)"
    if any(v.strip() == "*" for value in headers.getall("Vary", []) for v in value.split(",")):
        return "Vary: *"
    if status not in HEURISTIC_STATUSES and not has_explicit_freshness(cc, headers):
        return f"status {status} without explicit freshness"
    return None


@dataclass(frozen=True)
class Freshness:
    lifetime: float  # seconds of freshness from the response's age 0; math.inf = never stale
    must_revalidate: bool  # stale copies may not be served (not even when the origin is unreachable)


def freshness(
    path: str,
    status: int,
    headers: Headers,
    response_time: float,
    rules: Sequence[RefreshRule],
    negative_ttl: float = 0.0,
) -> Freshness:
    rule = match_rule(path, rules)
    cc = cache_control(headers)
    must_revalidate = "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
    if rule is not None and rule.override and status == 200:
        return Freshness(rule.ttl, False)
    if "no-cache" in cc:  # never used without a successful validation, not even when unreachable
        return Freshness(0.0, True)
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            seconds = delta_seconds(cc[directive])
            return Freshness(float(seconds) if seconds is not None else 0.0, must_revalidate)
    date = http_date(headers.get("Date")) or response_time
    if "Expires" in headers:
        expires = http_date(headers.getall("Expires", [])[0]) if len(headers.getall("Expires", [])) == 1 else None
        return Freshness(max(0.0, expires - date) if expires is not None else 0.0, must_revalidate)
    if status in NEGATIVE_STATUSES and negative_ttl > 0:
        return Freshness(negative_ttl, must_revalidate)
    cap = rule.ttl if rule is not None else 0.0
    last_modified = http_date(headers.get("Last-Modified"))
    if last_modified is not None and status in HEURISTIC_STATUSES:
        return Freshness(min(cap, max(0.0, date - last_modified) * HEURISTIC_FRACTION), must_revalidate)
    return Freshness(0.0, must_revalidate)


def initial_age(headers: Headers, request_time: float, response_time: float) -> float:
    """RFC 9111 4.2.3: the corrected initial age of a response received at ``response_time``."""
    date = http_date(headers.get("Date"))
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    corrected = age_value(headers) + max(0.0, response_time - request_time)
    return max(apparent, corrected)


# -- reusing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestDirectives:
    """What a request's ``Cache-Control`` (or ``Pragma: no-cache``) asks of the cache."""

    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False
    max_age: int | None = None
    max_stale: float | None = None  # math.inf: any staleness
    min_fresh: int = 0


PLAIN = RequestDirectives()


def request_directives(headers: Mapping[str, str]) -> RequestDirectives:
    value = headers.get("Cache-Control")
    if value is None:
        pragma = headers.get("Pragma")
        return PLAIN if pragma is None or "no-cache" not in pragma.lower() else RequestDirectives(no_cache=True)
    cc = parse_cache_control(value)
    if not cc.keys() & {"no-cache", "no-store", "only-if-cached", "max-age", "max-stale", "min-fresh"}:
        return PLAIN  # nothing a cache acts on (an extension, or nothing at all)
    max_stale: float | None = None
    if "max-stale" in cc:
        arg = cc["max-stale"]
        max_stale = math.inf if arg is None else delta_seconds(arg)
    return RequestDirectives(
        no_cache="no-cache" in cc,
        no_store="no-store" in cc,
        only_if_cached="only-if-cached" in cc,
        max_age=delta_seconds(cc["max-age"]) if "max-age" in cc else None,
        max_stale=max_stale,
        min_fresh=delta_seconds(cc.get("min-fresh")) or 0,
    )


def current_age(initial: float, response_time: float, now: float) -> float:
    """An age is never negative (RFC 9111 section 4.2.3): a wall clock stepped back (it happens on
    VMs) must not make a stale object, or one with no freshness at all, fresher."""
    return initial + max(0.0, now - response_time)


def is_fresh(lifetime: float, response_time: float, now: float, initial: float = 0.0) -> bool:
    return math.isinf(lifetime) or current_age(initial, response_time, now) < lifetime


FRESH, STALE_OK, VALIDATE, REVALIDATE_LATER = "fresh", "stale-ok", "validate", "revalidate-later"


def stale_while_revalidate(headers: tuple[tuple[str, str], ...]) -> int:
    """RFC 5861: how long past its lifetime a stored response may answer while it is revalidated."""
    for name, value in headers:
        if name.lower() == "cache-control" and "stale-while-revalidate" in value.lower():
            return delta_seconds(parse_cache_control(value).get("stale-while-revalidate")) or 0
    return 0


def reuse(
    lifetime: float,
    must_revalidate: bool,
    initial: float,
    response_time: float,
    now: float,
    req: RequestDirectives,
    revalidate_later: int = 0,
) -> str:
    """Whether a stored response may answer a request as it is (FRESH), may answer it although
    stale because the request allows it (STALE_OK), may answer it stale while it is revalidated
    in the background (REVALIDATE_LATER: within ``stale-while-revalidate``), or must be validated
    first (VALIDATE)."""
    if req.no_cache:
        return VALIDATE
    if math.isinf(lifetime) and req == PLAIN:
        return FRESH
    age = current_age(initial, response_time, now)
    if req.max_age is not None and age > req.max_age:
        return VALIDATE
    if age + req.min_fresh < lifetime:
        return FRESH
    if req.max_stale is not None and not must_revalidate and age - lifetime <= req.max_stale:
        return STALE_OK
    if revalidate_later and req == PLAIN and not must_revalidate and age - lifetime <= revalidate_later:
        return REVALIDATE_LATER
    return VALIDATE
