"""The largest trainable cube per GPU memory budget ("will 256³ fit on my 24 GiB card?").

From ``budgets.csv`` when the sweep wrote one: for each model *at the preset it ran* and each budget, the
largest side the model accepts whose predicted training peak (FakeTensorMode) plus a labelled CUDA
context constant fits, searched over every valid side. Without budgets.csv, a coarse bound from the run's
own cube sizes (measured peak where run, else predicted). The table names the preset and its parameter
count: a CPU run's ``small`` preset (~1.8 M parameters) is not the paper-size network, and the page says
how to get the answer for that.
"""

from __future__ import annotations

import pandas as pd

from .data import MemCell, RunData
from .tables import Table
from ..units import GPU_SIZES_GIB, GiB, fmt_bytes, fmt_num, is_missing, own_unit

PAPER_HINT = "python run_bench.py --predict --preset paper --budget 24GiB"


def whole_bytes(v: float) -> str:
    """A budget as people say it: 24 GiB, 1.5 TiB, 512 MiB (three significant digits at most)."""
    name, scale = own_unit(float(v))
    return f"{float(fmt_num(float(v) / scale).replace(',', '')):g} {name}"


def _cube(side: object) -> str:
    if is_missing(side):
        return "none fits"
    try:
        return f"{int(float(side))}³"  # type: ignore[arg-type]
    except ValueError:
        return str(side)


def _params(run: RunData, model: str) -> str:
    params = run.meta.get("params")
    v = params.get(model) if isinstance(params, dict) else None
    return f"{fmt_num(v / 1e6)} M" if isinstance(v, (int, float)) and v > 0 else ""


def _preset_words(run: RunData, pairs: list[tuple[str, str]]) -> str:
    """"small (idm 1.8 M, unet 1.88 M parameters)": which presets the table is for, in words."""
    by_preset: dict[str, list[str]] = {}
    for model, preset in pairs:
        p = _params(run, model)
        by_preset.setdefault(preset or "default", []).append(f"{model} {p}" if p else model)
    parts = [f"{preset} ({', '.join(models)}{' parameters' if any(' M' in m for m in models) else ''})"
             for preset, models in by_preset.items()]
    return "; ".join(parts)


def paper_hint(presets: set[str]) -> str:
    """The command that answers the question for the paper-size networks, when this run used other presets."""
    return "" if presets <= {"paper"} else PAPER_HINT


def budget_table(run: RunData, cells: dict[tuple[str, str], MemCell]) -> tuple[Table | None, str]:
    """The largest trainable cube per memory budget, and a note on how it was found. Returns (table, note);
    the table's second column is the preset (see :func:`paper_hint` for the paper-size answer)."""
    b = run.budgets
    if b is not None and len(b):
        return _from_budgets_csv(run, b)
    return _from_run_sizes(run, cells)


def _from_budgets_csv(run: RunData, b: pd.DataFrame) -> tuple[Table, str]:
    b = b.assign(preset=b["preset"] if "preset" in b.columns else "")
    if "budget_bytes" in b.columns:  # the harness wrote each budget's bytes next to its label
        b = b.assign(_bytes=pd.to_numeric(b["budget_bytes"], errors="coerce"))
        order = b.sort_values("_bytes", kind="stable").drop_duplicates("budget")
        budgets = [(lab, whole_bytes(v) if not is_missing(v) else lab) for lab, v in zip(order["budget"], order["_bytes"])]
    else:
        budgets = [(lab, lab) for lab in dict.fromkeys(b["budget"])]
    pairs = list(dict.fromkeys(zip(b["model"], b["preset"])))
    has_notes = "note" in b.columns and (b["note"].fillna("").str.strip() != "").any()
    rows = []
    for model, preset in pairs:
        mine = b[(b["model"] == model) & (b["preset"] == preset)]
        row = [model, preset, _params(run, model)]
        for bud, _ in budgets:
            hit = mine[mine["budget"] == bud]
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
        if has_notes:
            row.append("; ".join(dict.fromkeys(n for n in mine["note"].fillna("").str.strip() if n)))
        rows.append(row)
    header = ["model", "preset", "parameters"] + [text for _, text in budgets] + (["note"] if has_notes else [])
    words = _preset_words(run, pairs)
    caption = (f"largest cube side whose predicted training peak fits each GPU memory budget, at the preset run: "
               f"{words} (peak at that side in brackets)")
    if not any(r[2] for r in rows):
        header.pop(2)
        rows = [r[:2] + r[3:] for r in rows]
    table = Table(header=header, rows=rows, numeric=set(range(header.index("preset") + 1, len(header) - has_notes)),
                  caption=caption, wrap={len(header) - 1} if has_notes else set())
    ctx = _budget_context(b) or _context(run)
    ctx_txt = (f" The peak in brackets includes a CUDA context/workspace constant of {fmt_bytes(ctx, None, True)} "
               "(assumed, not measured) that the search adds to the prediction.") if ctx else ""
    return table, ("From budgets.csv: for each budget, the largest cube side the model accepts whose predicted "
                   "training peak (FakeTensorMode, batch and precision of the run) fits, searched over every valid "
                   "side; “≥” means the search stopped at its largest side and bigger cubes may fit too." + ctx_txt)


def _from_run_sizes(run: RunData, cells: dict[tuple[str, str], MemCell]) -> tuple[Table | None, str]:
    def ok(c: MemCell) -> bool:
        return not c.failed and c.bytes is not None and c.bytes > 0

    train = [(k, c) for k, c in cells.items() if ok(c) and "x" not in str(k[1]).lower()]
    if not train:
        return None, ("No budgets.csv in this folder and no cube sizes with a training memory figure; run with "
                      "--budget 16GiB,24GiB,40GiB,80GiB for the largest trainable cube per budget.")
    labels = [lab for lab in run.labels if any(k[0] == lab for k, _ in train)]
    presets = dict(zip(run.frame["label"], run.frame["preset"]))
    ctx = _context(run)
    rows = []
    for lab in labels:
        mine = sorted(((c.side, c) for k, c in cells.items() if k[0] == lab and "x" not in str(k[1]).lower()),
                      key=lambda t: t[0])
        model = lab.split(" [")[0]
        row = [model, presets.get(lab, ""), _params(run, model)]
        for gib in GPU_SIZES_GIB:
            fits = [(side, c) for side, c in mine if ok(c) and c.bytes + ctx <= gib * GiB]  # type: ignore[operator]
            if not fits:
                row.append(f"< {int(mine[0][0])}³" if mine else "—")
                continue
            side, c = fits[-1]
            mark = "" if any(t[0] > side for t in mine) else "≥ "
            row.append(f"{mark}{int(side)}³ ({fmt_bytes(c.bytes, ('GiB', GiB), True)}{'' if c.measured else ', pred.'})")
        rows.append(row)
    header = ["model", "preset", "parameters"] + [f"{g} GiB" for g in GPU_SIZES_GIB]
    if not any(r[2] for r in rows):
        header.pop(2)
        rows = [r[:2] + r[3:] for r in rows]
    pairs = [(r[0], r[1]) for r in rows]
    table = Table(header=header, rows=rows, numeric=set(range(2, len(header))),
                  caption=f"largest cube of this run whose training peak fits each budget, at the preset run: "
                          f"{_preset_words(run, pairs)}")
    ctx_txt = (f"plus a CUDA context constant of {fmt_bytes(ctx, None, True)} from run.json" if ctx
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
