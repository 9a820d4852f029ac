"""Number formatting for the report: bytes in MiB/GiB, plain numbers to about three significant digits.

Every function returns text; the unit goes in the column header, not in the cell, except where a
cell says so (``fmt_bytes(..., with_unit=True)``).
"""

from __future__ import annotations

import math
from typing import Iterable

MiB = 1024**2  # bytes
GiB = 1024**3  # bytes
TiB = 1024**4  # bytes

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
