"""The largest trainable cube per memory budget ("will 256^3 fit on my 24 GB card?").

For a model at a preset, the largest side S (a multiple of the sides the model accepts, at most
``max_side``) whose *predicted* training peak (fake tensors, see :mod:`idmbench.measure.predict`) plus the
labelled CUDA context/workspace constant fits in the budget. The peak grows monotonically with S, so the
search brackets the answer and narrows it by power-law interpolation (peak ~ c * S^p fitted on the
bracket), falling back to bisection: a handful of predictions per budget, shared through the predictor's
cache.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..measure.predict import CUDA_CONTEXT_BYTES, CUDA_CONTEXT_LABEL
from ..units import format_bytes

DEFAULT_BUDGETS = ("16GiB", "24GiB", "40GiB", "80GiB")
MAX_SIDE = 1024

BUDGET_COLUMNS = [
    "model", "preset", "budget", "budget_bytes", "largest_side", "peak_at_largest_bytes",
    "predicted_peak_bytes", "context_bytes", "batch", "precision", "capped", "source", "note",
]


@dataclass
class BudgetRow:
    """One line of ``budgets.csv`` (bytes; ``largest_side`` None when even the smallest side does not fit)."""

    model: str
    preset: str
    budget: str
    budget_bytes: int
    largest_side: int | None
    peak_at_largest_bytes: int | None  # predicted training peak + context constant at largest_side
    predicted_peak_bytes: int | None  # predicted training peak alone at largest_side
    context_bytes: int
    batch: int
    precision: str
    capped: bool  # the search stopped at max_side: larger cubes may fit too
    source: str
    note: str = ""


def largest_fitting_side(
    peak_at: Callable[[int], int | None],
    multiple: int,
    budget_bytes: int,
    *,
    overhead_bytes: int = CUDA_CONTEXT_BYTES,
    max_side: int = MAX_SIDE,
    known: dict[int, int | None] | None = None,
) -> tuple[int | None, int | None, bool]:
    """Largest ``side = k * multiple <= max_side`` with ``peak_at(side) + overhead_bytes <= budget_bytes``.

    ``peak_at(side)`` returns predicted bytes (None if the prediction failed: treated as not fitting).
    ``known`` (side -> bytes) is shared between calls for several budgets, so each side is predicted once.
    Returns ``(side or None, peak_at(side) or None, capped)``; ``capped`` means ``max_side`` itself fits.
    """
    kmax = max_side // multiple
    if kmax < 1:
        return None, None, False
    known = {} if known is None else known

    def peak(k: int) -> int | None:
        side = k * multiple
        if side not in known:
            known[side] = peak_at(side)
        return known[side]

    def fits(k: int) -> bool:
        p = peak(k)
        return p is not None and p + overhead_bytes <= budget_bytes

    target = budget_bytes - overhead_bytes
    # tightest bracket from what is already known: lo fits, hi does not (monotone in the side)
    lo, hi = 0, None
    for side, p in sorted(known.items()):
        if side % multiple or side > kmax * multiple:
            continue
        k = side // multiple
        if p is not None and p <= target:
            lo = max(lo, k)
        elif hi is None or k < hi:
            hi = k
    if lo == 0:
        if not fits(1):
            return None, peak(1), False
        lo = 1
    if hi is not None and hi <= lo:
        hi = None
    if hi is None:
        # nothing known above the budget: extrapolate from the largest fitting points, then verify
        while True:
            g = _extrapolate(known, multiple, lo, target)
            g = min(kmax, max(lo + 1, g)) if lo < kmax else kmax
            if g == lo:  # lo == kmax
                return kmax * multiple, peak(kmax), True
            if not fits(g):
                hi = g
                break
            lo = g
            if g == kmax:
                return kmax * multiple, peak(kmax), True
            if not fits(g + 1):
                return g * multiple, peak(g), False
            lo = g + 1
            if lo == kmax:
                return kmax * multiple, peak(kmax), True
    base = known.get(multiple) or 0  # parameters + optimiser state, when known: the part that does not grow
    step = 0
    while hi - lo > 1:
        step += 1
        plo, phi = peak(lo), peak(hi)
        guess = None
        if step % 3 != 0 and phi is not None and plo is not None and phi > base:
            # power law of the growing part through the bracket: peak - base ~ c * side^p
            if lo > 1 and plo > base:
                pw = math.log((phi - base) / (plo - base)) / math.log(hi / lo)
            else:
                pw = 3.0  # activations scale with voxels
            if pw > 0 and target > base:
                guess = int(math.floor(hi * ((target - base) / (phi - base)) ** (1.0 / pw)))
        if guess is None or not lo < guess < hi:
            guess = (lo + hi) // 2
        if fits(guess):
            lo = guess
            if lo + 1 < hi and not fits(lo + 1):  # the interpolation usually lands right below
                hi = lo + 1
        else:
            hi = guess
            if hi - 1 > lo and fits(hi - 1):
                lo = hi - 1
    return lo * multiple, peak(lo), False


def _extrapolate(known: dict[int, int | None], multiple: int, lo: int, target: int) -> int:
    """Guess the largest k whose peak fits ``target`` from the two largest known fitting sides
    (local power law), or a cubic law through ``lo`` alone."""
    pts = sorted((s, p) for s, p in known.items() if p is not None and p <= target and s % multiple == 0)
    pw = 3.0
    if len(pts) >= 2:
        (s1, p1), (s2, p2) = pts[-2], pts[-1]
        if p2 > p1 > 0 and s2 > s1:
            pw = max(1.0, math.log(p2 / p1) / math.log(s2 / s1))
    s_lo = lo * multiple
    p_lo = known.get(s_lo) or 1
    return int(math.floor(s_lo * (target / p_lo) ** (1.0 / pw) / multiple))


def budget_rows(
    model: str,
    preset: str,
    budgets: list[tuple[str, int]],
    peak_at: Callable[[int], int | None],
    multiple: int,
    *,
    batch: int = 1,
    precision: str = "fp32",
    max_side: int = MAX_SIDE,
    known: dict[int, int | None] | None = None,
) -> list[BudgetRow]:
    """A :class:`BudgetRow` per ``(label, bytes)`` budget for one model, smallest budget first.

    ``known``: predicted training peaks already at hand (cube side -> bytes), e.g. the sweep's own sizes.
    """
    rows = []
    source = f"predicted training peak (fake tensors) + {CUDA_CONTEXT_LABEL}"
    known: dict[int, int | None] = dict(known or {})
    for label, nbytes in sorted(budgets, key=lambda b: b[1]):
        side, peak, capped = largest_fitting_side(peak_at, multiple, nbytes, max_side=max_side, known=known)
        if side is None:
            note = f"even {multiple}^3 needs {format_bytes((peak or 0) + CUDA_CONTEXT_BYTES)}" if peak else "prediction failed"
        elif capped:
            note = f"search capped at {max_side}^3: larger cubes may fit"
        else:
            note = f"sides are multiples of {multiple}"
        rows.append(
            BudgetRow(
                model=model, preset=preset, budget=label, budget_bytes=int(nbytes), largest_side=side,
                peak_at_largest_bytes=(peak + CUDA_CONTEXT_BYTES) if (side is not None and peak is not None) else None,
                predicted_peak_bytes=peak if side is not None else None, context_bytes=CUDA_CONTEXT_BYTES,
                batch=batch, precision=precision, capped=capped, source=source, note=note,
            )
        )
    return rows


def search_model(model: str, preset: str, budgets: list[tuple[str, int]], predictor: Any, *,
                 known: Mapping[tuple[str, tuple[int, int, int], str], Any] | None = None,
                 overrides: dict[str, Any] | None = None, batch: int = 1, precision: str = "fp32",
                 params: dict[str, int] | None = None) -> list[BudgetRow]:
    """:func:`budget_rows` for one model through its :class:`~idmbench.measure.predict.Predictor`.

    Args:
        known: predictions already made, ``(model, size, phase) -> Prediction`` (the sweep's own cube
            training sizes seed the search).
        params: filled with ``model -> parameter count`` from the predictions.
    """
    from ..registry import get_spec

    spec = get_spec(model)
    multiple = spec.valid_sides(spec.config(preset, **(overrides or {})))

    def peak_at(side: int) -> int | None:
        p = predictor.predict((side, side, side), "train", flops=False)
        if params is not None and p.params is not None:
            params.setdefault(model, int(p.params))
        return p.peak_bytes if p.ok else None

    seeds = {s[0]: (p.peak_bytes if p.ok else None) for (m, s, ph), p in (known or {}).items()
             if m == model and ph == "train" and len(set(s)) == 1 and s[0] % multiple == 0}
    return budget_rows(model, preset, budgets, peak_at, multiple, batch=batch, precision=precision, known=seeds)


def write_budgets(path: str | os.PathLike, rows: list[BudgetRow]) -> None:
    """Write ``budgets.csv`` atomically (header + one line per row; empty cells for None)."""
    from ..results import write_csv_atomic

    write_csv_atomic(path, BUDGET_COLUMNS, rows)


def read_budgets(path: str | os.PathLike) -> list[BudgetRow]:
    """The rows of an existing ``budgets.csv`` (a resumed sweep keeps the searches already done); ``[]``
    when the file is absent. A malformed file raises ``ValueError`` naming it."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            try:
                side = rec.get("largest_side") or ""
                out.append(BudgetRow(
                    model=rec["model"], preset=rec["preset"], budget=rec["budget"], budget_bytes=int(rec["budget_bytes"]),
                    largest_side=int(side) if side else None,
                    peak_at_largest_bytes=int(rec["peak_at_largest_bytes"]) if rec.get("peak_at_largest_bytes") else None,
                    predicted_peak_bytes=int(rec["predicted_peak_bytes"]) if rec.get("predicted_peak_bytes") else None,
                    context_bytes=int(rec.get("context_bytes") or 0), batch=int(rec.get("batch") or 1),
                    precision=rec.get("precision") or "fp32", capped=str(rec.get("capped")) == "True",
                    source=rec.get("source") or "", note=rec.get("note") or "",
                ))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}: malformed budgets file ({type(exc).__name__}: {exc})") from None
    return out
