"""Units in one place: byte sizes and durations as users type them (``24GiB``, ``2GB``, ``512MiB``) and as
terminal lines, tables and the report show them.

Binary byte units throughout (a card sold as "24 GB" has 24 GiB); :data:`MiB` / :data:`GiB` / :data:`TiB`
are the only byte-scale constants the package uses.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

KiB = 1024  # bytes
MiB = 1024**2  # bytes
GiB = 1024**3  # bytes
TiB = 1024**4  # bytes

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


# ---- report cells: the unit goes in the column header, not in the cell (unless with_unit) ----


#: GPU memory sizes drawn as horizontal lines and used as budgets when a run has no budgets.csv (GiB).
#: Cards sold as "16/24/40/80 GB" have about this many GiB (a 24 GB RTX 4090 has 24 576 MiB).
GPU_SIZES_GIB = (16, 24, 40, 80)


def is_missing(v: object) -> bool:
    """True for None, NaN and empty strings."""
    if v is None:
        return True
    if isinstance(v, str):
        return v.strip() == ""
    try:
        return bool(math.isnan(v))  # type: ignore[arg-type]
    except TypeError:
        return False


def fmt_num(v: object, sig: int = 3) -> str:
    """``v`` with about ``sig`` significant digits, thousands separated, never in e-notation for
    ordinary magnitudes (``1234.5 -> "1,234"``, ``0.001234 -> "0.00123"``); ``""`` when missing."""
    if is_missing(v):
        return ""
    x = float(v)  # type: ignore[arg-type]
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag < -6:
        return f"{x:.{sig - 1}e}"
    decimals = max(0, sig - 1 - mag)
    return f"{x:,.{decimals}f}"


def byte_unit(values: Iterable[object]) -> tuple[str, int]:
    """The unit for a column of byte counts: ``("GiB", GiB)`` when every non-zero value is at least
    1 GiB, else ``("MiB", MiB)`` (thousands separated, so 24 GiB reads "24,576")."""
    vals = [abs(float(v)) for v in values if not is_missing(v)]  # type: ignore[arg-type]
    vals = [v for v in vals if v > 0]
    if vals and min(vals) >= GiB:
        return "GiB", GiB
    return "MiB", MiB


def own_unit(v: float) -> tuple[str, int]:
    """The unit a single byte count reads best in: MiB below 1 GiB, GiB below 1 TiB, else TiB."""
    a = abs(v)
    return ("TiB", TiB) if a >= TiB else (("GiB", GiB) if a >= GiB else ("MiB", MiB))


def fmt_bytes(v: object, unit: tuple[str, int] | None = None, with_unit: bool = False) -> str:
    """Bytes ``v`` in ``unit`` (its own unit, see ``own_unit``, when None), e.g. ``"1.23"`` or ``"1.23 GiB"``."""
    if is_missing(v):
        return ""
    name, scale = unit or own_unit(float(v))  # type: ignore[arg-type]
    text = fmt_num(float(v) / scale)  # type: ignore[arg-type]
    return f"{text} {name}" if with_unit else text
