"""Byte sizes and durations as users type them (``24GiB``, ``2GB``, ``512MiB``) and as tables show them."""

from __future__ import annotations

import math
import re

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str, *, what: str = "size") -> int:
    """``"24GiB"`` -> 25769803776 bytes.

    Units: B; SI kB/MB/GB/TB (powers of 1000); binary KiB/MiB/GiB/TiB and the shorthands K/M/G/T (powers
    of 1024). A GPU sold as "24 GB" has 24 GiB. A bare number is rejected (the unit is not obvious).
    Raises ``ValueError`` with a one-line message naming ``what``.
    """
    m = _RE.match(str(text))
    if not m:
        raise ValueError(f"malformed {what} {text!r}: use a number with a unit, e.g. 24GiB, 512MiB, 2GB")
    num, unit = float(m.group(1)), m.group(2).lower()
    if not unit:
        raise ValueError(f"{what} {text!r} needs a unit, e.g. {text}GiB (units: B, MB, GB, MiB, GiB, ...)")
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {m.group(2)!r} in {what} {text!r}; units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB")
    value = int(num * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{what} {text!r} must be positive")
    return value


def format_bytes(n: float | int | None, *, digits: int = 2) -> str:
    """``1610612736`` -> ``"1.50 GiB"`` (binary units); ``None`` -> ``"-"``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"


def format_seconds(s: float | None) -> str:
    """Seconds as ``"1.23 s"``, ``"45 ms"``, ``"2 min 05 s"``; ``None`` -> ``"-"``."""
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 10:
        return f"{s:.2f} s"
    if s < 100:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def format_clock(s: float | None) -> str:
    """Seconds as a clock ``m:ss`` / ``h:mm:ss`` for progress lines."""
    if s is None or not math.isfinite(s):
        return "--:--"
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def format_si(x: float | None, unit: str = "", digits: int = 3) -> str:
    """``3.2e12, "FLOP"`` -> ``"3.20 TFLOP"``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for p, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {p}{unit}"
    return f"{x:.{digits}g} {unit}".rstrip()
