"""The headline: peak training memory of every model per volume size, IDM's reduction against each
baseline (as % and ×), a few sentences that say it in words, and the largest trainable cube per GPU
memory budget.

Reduction = 1 − IDM / baseline (positive: IDM needs less); factor × = baseline / IDM. A figure that
is predicted rather than measured is marked "(pred.)"; a comparison involving one is marked too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from .data import MemCell, RunData, memory_cells, size_order, size_text
from .tables import Table
from ..units import GPU_SIZES_GIB, GiB, fmt_bytes, fmt_num, is_missing


@dataclass
class Headline:
    """What the top of the page says: sentences, the per-size table and the budget table."""

    sentences: list[str] = field(default_factory=list)
    table: Table | None = None
    budgets: Table | None = None
    budget_note: str = ""


def _figure(cell: MemCell | None, unit: tuple[str, int] | None = None) -> tuple[str, str]:
    """(text, css class) for one model's peak at one size."""
    if cell is None:
        return "not run", "missing"
    if cell.measured:
        return fmt_bytes(cell.bytes, unit, with_unit=True), ""
    if cell.failed:
        extra = f" (pred. {fmt_bytes(cell.bytes, unit, with_unit=True)})" if cell.bytes is not None else ""
        return f"{cell.status}{extra}", "fail"
    if cell.bytes is not None:
        return f"{fmt_bytes(cell.bytes, unit, with_unit=True)} (pred.)", "pred"
    return cell.status, "missing"


def reduction(idm: float, base: float) -> tuple[float, float]:
    """(reduction in %, factor ×) of ``idm`` bytes against ``base`` bytes: (1 − idm/base)·100, base/idm."""
    pct = (1.0 - idm / base) * 100.0 if base else math.nan
    factor = base / idm if idm else math.inf
    return pct, factor


def _pct(p: float) -> str:
    """A percentage to whole units, with more decimals where rounding would read as 100 % or 0 %."""
    for digits in (0, 1, 2, 3):
        text = f"{p:.{digits}f}"
        if (abs(p) < 100 <= abs(float(text))) or (p != 0 and float(text) == 0):
            continue
        break
    return f"{text} %".replace("-", "−")


def _compare(idm: MemCell | None, base: MemCell | None, ref: str, name: str) -> tuple[str, str]:
    """(text, css class) of IDM against one baseline at one size."""
    if idm is None or base is None:
        return "—", "missing"
    if _ok(idm) and _ok(base):
        pct, factor = reduction(idm.bytes, base.bytes)  # type: ignore[arg-type]
        pred = "" if (idm.measured and base.measured) else " (pred.)"
        cls = "better" if pct > 0 else ("worse" if pct < 0 else "")
        return f"{_pct(pct)} · {fmt_num(factor)}×{pred}", cls + (" pred" if pred else "")
    if base.failed and _ok(idm):
        how = "measured" if idm.measured else "predicted to fit"
        return f"{name} {base.status}; {ref} {how}", "better"
    if idm.failed:
        return f"{ref} {idm.status}", "fail"
    return "—", "missing"


def _how(i: MemCell, b: MemCell) -> str:
    if i.measured and b.measured:
        return "measured, " + " / ".join(dict.fromkeys([i.source, b.source]))
    if not i.measured and not b.measured:
        return "predicted"
    return "IDM " + ("measured" if i.measured else "predicted") + ", baseline " + ("measured" if b.measured else "predicted")


def _at(ref: str, size: str, i: MemCell, b: MemCell) -> str:
    pct, factor = reduction(i.bytes, b.bytes)  # type: ignore[arg-type]
    word = "less" if pct >= 0 else "more"
    return (f"{ref} needs {_pct(abs(pct))} {word} ({fmt_num(factor)}×) at {size_text(size)}: "
            f"{fmt_bytes(i.bytes, None, True)} vs {fmt_bytes(b.bytes, None, True)} ({_how(i, b)})")


def _baseline_sentence(ref: str, base: str, sizes: list[str], cells: dict[tuple[str, str], MemCell]) -> str:
    """One sentence on ``ref`` against ``base``: the largest size both measured, the largest size with a
    figure for both beyond it (predicted), and the largest size where the baseline failed and IDM did not."""
    both = [s for s in sizes if _ok(cells.get((ref, s))) and _ok(cells.get((base, s)))]
    measured = [s for s in both if cells[(ref, s)].measured and cells[(base, s)].measured]
    parts = []
    if measured:
        s = measured[-1]
        parts.append(_at(ref, s, cells[(ref, s)], cells[(base, s)]))
    beyond = [s for s in both if not measured or sizes.index(s) > sizes.index(measured[-1])]
    if beyond:
        s = beyond[-1]
        parts.append(_at(ref, s, cells[(ref, s)], cells[(base, s)]))
    fails = [s for s in sizes if (cells.get((base, s)) or MemCell("missing")).failed and _ok(cells.get((ref, s)))]
    if fails:
        s = fails[-1]
        i = cells[(ref, s)]
        parts.append(f"at {size_text(s)} {base} ended with status {cells[(base, s)].status} while {ref} "
                     f"{'was measured at' if i.measured else 'is predicted at'} {fmt_bytes(i.bytes, None, True)}")
    if not parts:
        return f"Against {base}: no volume size has a memory figure for both models."
    return f"Against {base}: " + "; ".join(parts) + "."


def build_headline(run: RunData) -> Headline:
    """The headline for ``run`` (says what it can when IDM or the baselines are absent)."""
    h = Headline()
    cells = memory_cells(run.frame, "train")
    labels = [lab for lab in run.labels if any(k[0] == lab for k in cells)]
    sizes = [s for s in size_order(run.frame) if any(k[1] == s for k in cells)]
    refs = [lab for lab in labels if lab == run.reference or lab.startswith(run.reference + " [")]
    ref = refs[0] if refs else None
    bases = [lab for lab in labels if lab not in refs]
    h.budgets, h.budget_note = budget_table(run, cells)
    if not cells:
        h.sentences.append("No training rows in this run, so there is no peak training memory to compare.")
        return h

    unit = None  # each figure in its own unit: a sweep spans MiB to GiB
    header = ["volume (voxels)"] + [f"{lab} peak" for lab in labels]
    if ref:
        header += [f"{ref} vs {b}" for b in bases]
    rows, classes = [], []
    for s in sizes:
        row, cls = [size_text(s)], [""]
        for lab in labels:
            text, c = _figure(cells.get((lab, s)), unit)
            row.append(text)
            cls.append(c)
        if ref:
            for b in bases:
                text, c = _compare(cells.get((ref, s)), cells.get((b, s)), ref, b)
                row.append(text)
                cls.append(c)
        rows.append(row)
        classes.append(cls)
    h.table = Table(header=header, rows=rows, cell_classes=classes, numeric=set(range(1, len(header))),
                    caption="peak memory of one training step; “vs” cells: reduction = 1 − IDM/baseline (%) · factor = "
                            "baseline/IDM (×)")

    if ref is None:
        h.sentences.append(
            f"{run.reference} (the invertible diffusion model) is not in this run, so no reduction is computed; "
            "the table lists each model's peak training memory."
        )
    elif not bases:
        h.sentences.append(f"Only {ref} ran: there is no baseline to compare against; the table lists its peak "
                           "training memory.")
    for b in bases:
        if ref:
            h.sentences.append(_baseline_sentence(ref, b, sizes, cells))
    return h


def _ok(cell: MemCell | None) -> bool:
    """A cell with a usable (positive) memory figure that did not fail."""
    return cell is not None and not cell.failed and cell.bytes is not None and cell.bytes > 0


def _cube(side: object) -> str:
    if is_missing(side):
        return "none fits"
    try:
        return f"{int(float(side))}³"  # type: ignore[arg-type]
    except ValueError:
        return str(side)


def budget_table(run: RunData, cells: dict[tuple[str, str], MemCell]) -> tuple[Table | None, str]:
    """The largest trainable cube per memory budget: from budgets.csv when present (a search over every
    side the model accepts), else from this run's own cube sizes (a coarse bound). Returns (table, note)."""
    b = run.budgets
    if b is not None and len(b):
        presets = b.groupby("model")["preset"].nunique() if "preset" in b.columns else None
        b = b.assign(_label=[
            f"{m} [{p}]" if presets is not None and presets.get(m, 1) > 1 else m
            for m, p in zip(b["model"], b["preset"] if "preset" in b.columns else [""] * len(b))
        ])
        if "budget_bytes" in b.columns:  # the harness wrote each budget's bytes next to its label
            budgets = list(b.sort_values("budget_bytes", kind="stable")["budget"].drop_duplicates())
        else:
            budgets = list(dict.fromkeys(b["budget"]))
        labels = list(dict.fromkeys(b["_label"]))
        has_notes = "note" in b.columns and (b["note"].fillna("").str.strip() != "").any()
        rows = []
        for lab in labels:
            row = [lab]
            for bud in budgets:
                hit = b[(b["_label"] == lab) & (b["budget"] == bud)]
                if not len(hit):
                    row.append("—")
                    continue
                rec = hit.iloc[-1]
                peak = rec.get("peak_at_largest_bytes", "")
                capped = str(rec.get("capped", "")).strip().lower() in ("true", "1", "yes")
                text = ("≥ " if capped and not is_missing(rec["largest_side"]) else "") + _cube(rec["largest_side"])
                if not is_missing(peak) and not is_missing(rec["largest_side"]):
                    text += f" ({fmt_bytes(float(peak), ('GiB', GiB), with_unit=True)})"
                row.append(text)
            mine = b[b["_label"] == lab]
            srcs = sorted({str(x) for x in mine["source"]} - {""}) if "source" in b.columns else []
            row.append(", ".join(srcs) or "predicted")
            if has_notes:
                row.append("; ".join(dict.fromkeys(n for n in mine["note"].fillna("").str.strip() if n)))
            rows.append(row)
        header = ["model"] + [f"budget {bud}" for bud in budgets] + ["source"] + (["note"] if has_notes else [])
        caption = "largest cube side whose training peak fits each budget (peak at that side in brackets)"
        col = len(budgets) + 1
        if len({r[col] for r in rows}) == 1:  # one source for all: say it once
            caption += f"; source: {rows[0][col]}"
            header.pop(col)
            rows = [r[:col] + r[col + 1:] for r in rows]
        table = Table(header=header, rows=rows, numeric=set(range(1, len(budgets) + 1)), caption=caption)
        ctx = _budget_context(b) or _context(run)
        ctx_txt = (f" The peak in brackets includes the CUDA context/workspace constant of {ctx / 2**20:,.0f} MiB "
                   "(assumed, not measured) that the search adds to the prediction.") if ctx else ""
        return table, ("From budgets.csv: for each budget, the largest cube side the model accepts whose "
                       "predicted training peak (FakeTensorMode) fits, searched over every valid side; “≥” means "
                       "the search stopped at its largest side and bigger cubes may fit too." + ctx_txt)

    train = [(k, c) for k, c in cells.items() if _ok(c) and _is_cube(k[1])]
    if not train:
        return None, ("No budgets.csv in this folder and no cube sizes with a training memory figure; run with "
                      "--budget 16GiB,24GiB,40GiB,80GiB for the largest trainable cube per budget.")
    labels = [lab for lab in run.labels if any(k[0] == lab for k, _ in train)]
    ctx = _context(run)
    rows = []
    for lab in labels:
        mine = [(c.side, k[1], c) for k, c in cells.items() if k[0] == lab and _is_cube(k[1])]
        mine.sort(key=lambda t: t[0])
        row = [lab]
        for gib in GPU_SIZES_GIB:
            fits = [(side, s, c) for side, s, c in mine if _ok(c) and c.bytes + ctx <= gib * GiB]  # type: ignore[operator]
            if not fits:
                row.append(f"< {int(mine[0][0])}³" if mine else "—")
                continue
            side, s, c = fits[-1]
            bigger = [t for t in mine if t[0] > side]
            mark = "" if bigger else "≥ "
            row.append(f"{mark}{int(side)}³ ({fmt_bytes(c.bytes, ('GiB', GiB), True)}{'' if c.measured else ', pred.'})")
        rows.append(row)
    table = Table(header=["model"] + [f"budget {g} GiB" for g in GPU_SIZES_GIB], rows=rows,
                  numeric=set(range(1, len(GPU_SIZES_GIB) + 1)),
                  caption="largest cube of this run whose training peak fits each budget")
    ctx_txt = (f"plus the CUDA context constant of {ctx / 2**20:,.0f} MiB from run.json" if ctx
               else "the CUDA context is not included")
    return table, ("No budgets.csv in this folder, so this is a coarse bound from this run's own cube sizes "
                   f"(peak measured where run, else predicted; {ctx_txt}): “≥” means the largest size run "
                   "still fits, “<” that even the smallest did not. Run with --budget for a search over every "
                   "side.")


def _budget_context(b: pd.DataFrame) -> int:
    """The context constant budgets.csv says it added (bytes), 0 when it does not say."""
    if "context_bytes" not in b.columns:
        return 0
    vals = pd.to_numeric(b["context_bytes"], errors="coerce").dropna()
    return int(vals.max()) if len(vals) else 0


def _context(run: RunData) -> int:
    """The CUDA context constant recorded in run.json (bytes), 0 when absent."""
    try:
        return max(0, int(run.meta.get("cuda_context_overhead_bytes") or 0))
    except (TypeError, ValueError):
        return 0


def _is_cube(size: str) -> bool:
    return "x" not in str(size).lower()


def frame_of(table: Table) -> pd.DataFrame:
    """A Table as a DataFrame (for Markdown and tests)."""
    return pd.DataFrame(table.rows, columns=table.header)
