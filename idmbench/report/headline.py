"""The headline: peak training memory of every model per volume size, IDM's reduction against each
baseline (as % and ×), a few sentences that say it in words, and (from :mod:`.budgets`) the largest
trainable cube per GPU memory budget.

Reduction = 1 − IDM / baseline (positive: IDM needs less); factor × = baseline / IDM. A figure that
is predicted rather than measured is marked "(pred.)"; a comparison involving one is marked too. Each
baseline is compared as it ran; where run.json's ``model_info`` says a baseline ran in a configuration
its users would not pick (MONAI's naive attention path), the sentence says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .budgets import budget_table, paper_hint
from .data import MemCell, RunData, memory_cells, size_order, size_text
from .tables import Table
from ..units import fmt_bytes, fmt_num


@dataclass
class Headline:
    """What the top of the page says: sentences, the per-size table and the budget table."""

    sentences: list[str] = field(default_factory=list)
    table: Table | None = None
    budgets: Table | None = None
    budget_note: str = ""
    budget_hint: str = ""  # the command for the paper-size networks when the run used other presets


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
    if h.budgets is not None:
        h.budget_hint = paper_hint({r[1] for r in h.budgets.rows})
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
            h.sentences.append(_baseline_sentence(ref, b, sizes, cells) + _config_note(run, b))
    return h


def _config_note(run: RunData, label: str) -> str:
    """A clause when run.json's model_info says this baseline ran on MONAI's naive attention path."""
    info = run.model_info.get(label.split(" [")[0]) or {}
    settings = info.get("settings") if isinstance(info.get("settings"), dict) else {}
    if settings.get("use_flash_attention") is False:
        return (f" Note: {label} ran with use_flash_attention=False (MONAI's naive attention, which materialises "
                "the N×N attention matrix), not the SDPA path its users switch to first.")
    return ""


def _ok(cell: MemCell | None) -> bool:
    """A cell with a usable (positive) memory figure that did not fail."""
    return cell is not None and not cell.failed and cell.bytes is not None and cell.bytes > 0
