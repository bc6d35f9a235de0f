"""Parsing of the human units used in the configuration: durations and sizes."""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``1.5``, ``"500ms"``, ``"10s"``, ``"5m"``, ``"1h"``, ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if match:
            number, unit = match.groups()
            factor = _DURATION_UNITS.get(unit.lower() or "s")
            if factor is not None:
                return float(number) * factor
    raise ValueError(f"not a duration (use ms, s, m, h or d): {value!r}")


def parse_ttl(value: object) -> float:
    """A duration, or ``forever`` (infinity)."""
    if isinstance(value, str) and value.strip().lower() in {"forever", "inf", "infinite"}:
        return math.inf
    return parse_duration(value)


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"512B"``, ``"50GiB"``, ``"1.5 TB"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value!r}")
        return value
    if isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if match:
            number, unit = match.groups()
            factor = _SIZE_UNITS.get(unit.lower())
            if factor is not None:
                return int(float(number) * factor)
    raise ValueError(f"not a size (use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB): {value!r}")


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
