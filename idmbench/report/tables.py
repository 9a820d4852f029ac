"""The report's tables: every results row (one table per phase), the memory detail of every row, the
failures and the per-row notes. Built with pandas; cells are plain text (the HTML template escapes them).

One unit convention for the page: every byte figure carries its own binary unit in the cell (``35.3 MiB``,
``1.72 GiB``, ``2.04 TiB``, three significant digits, via :mod:`idmbench.units`); the other units are in
the headers: seconds, joules per step, millions of voxels per second (the voxels the network processes:
patch voxels for patch-trained models, image voxels represented for a wavelet model), GFLOP per step,
millions of parameters. A column no row has a value for is left out and named in the caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from .data import FAILED, RunData, model_order, phase_order, size_order, size_text
from ..results import STATUS_PREDICTED, STATUSES
from ..units import fmt_bytes, fmt_num, is_missing

#: the column description of voxels_per_s, shared by the table header note and the throughput plot
THROUGHPUT_MEANING = ("voxels the network processes per second (patch voxels for patch-trained models; image "
                      "voxels represented for the wavelet model)")


@dataclass
class Table:
    """A table ready to render: ``header`` and ``rows`` are text, ``numeric`` lists the column indices
    to right-align, ``wrap`` the columns of running text, ``row_classes`` one CSS class per row,
    ``cell_classes`` optional per-cell classes."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    numeric: set[int] = field(default_factory=set)
    row_classes: list[str] = field(default_factory=list)
    cell_classes: list[list[str]] | None = None
    wrap: set[int] = field(default_factory=set)  # columns of running text, wrapped instead of kept on one line

    def cls(self, i: int, j: int) -> str:
        parts = ["num"] if j in self.numeric else (["text"] if j in self.wrap else [])
        if self.cell_classes and self.cell_classes[i][j]:
            parts.append(self.cell_classes[i][j])
        return " ".join(parts)


def status_class(status: str) -> str:
    """CSS class of a row: ``status-<s>`` for a known status (``idmbench.results.STATUSES``), plus ``failed``
    for every status that produced no measurement."""
    base = f"status-{status}" if status in STATUSES else "status-other"
    return base + (" failed" if status in FAILED else "")


def _mem(v: object) -> str:
    """Bytes in their own unit, the number and unit kept on one line (a no-break space)."""
    return fmt_bytes(v, None, with_unit=True).replace(" ", "\u00a0")


Column = tuple[str, Callable[[pd.Series], str], bool]


def _build(columns: list[Column], sub: pd.DataFrame, caption: str, keep_first: int,
           say_once: tuple[str, ...] = ()) -> Table:
    """A Table of ``sub`` with ``columns``; columns past the first ``keep_first`` that are empty in every
    row are left out and named in the caption; a ``say_once`` column whose non-empty cells all hold one
    value is left out and that value said in the caption instead (more room for the numbers)."""
    rows = [[fn(rec) for _, fn, _ in columns] for _, rec in sub.iterrows()]
    keep = [j for j in range(len(columns)) if j < keep_first or any(r[j] for r in rows)]
    dropped = [columns[j][0] for j in range(len(columns)) if j not in keep]
    once = []
    for j in list(keep):
        values = {r[j] for r in rows if r[j]}
        if columns[j][0] in say_once and len(values) == 1:
            keep.remove(j)
            once.append(f"{columns[j][0]}: {values.pop()} for every row that has one")
    if once and rows:
        caption += "; " + "; ".join(once)
    if dropped and rows:
        caption += "; no row has a value for: " + ", ".join(dropped)
    return Table(
        header=[columns[j][0] for j in keep],
        rows=[[r[j] for j in keep] for r in rows],
        numeric={i for i, j in enumerate(keep) if columns[j][2]},
        row_classes=[status_class(s) for s in sub["status"]],
        caption=caption,
    )


def _sorted(frame: pd.DataFrame, run: RunData) -> pd.DataFrame:
    labels = {lab: i for i, lab in enumerate(model_order(run.frame, run.meta))}
    sizes = {s: i for i, s in enumerate(size_order(run.frame))}
    phases = {p: i for i, p in enumerate(phase_order(run.frame))}
    key = frame.assign(
        _m=frame["label"].map(labels), _s=frame["size"].map(sizes), _p=frame["phase"].map(phases)
    )
    return key.sort_values(["_m", "_s", "_p", "row_id"]).drop(columns=["_m", "_s", "_p"])


def _scaled(scale: float, sig: int = 3) -> Callable[[object], str]:
    return lambda v: "" if is_missing(v) else fmt_num(float(v) / scale, sig)  # type: ignore[arg-type]


def _ratio(v: object) -> str:
    return "" if is_missing(v) else f"{float(v):.3f}"  # type: ignore[arg-type]


def _int(v: object) -> str:
    return "" if is_missing(v) else f"{int(float(v)):,}"  # type: ignore[arg-type]


def _net(rec: pd.Series) -> str:
    shape = str(rec["net_shape"]).strip()
    if not shape:
        return ""
    text = size_text(shape.replace(",", "x").replace("(", "").replace(")", "").replace(" ", ""))
    return "" if text == size_text(rec["size"]) else text


def _step_time(rec: pd.Series) -> str:
    median, iqr = fmt_num(rec["step_time_s"]), fmt_num(rec["step_time_iqr_s"])
    return f"{median} ({iqr})" if median and iqr else median


def _why(rec: pd.Series) -> str:
    parts = [str(rec["error"]).strip(), str(rec["notes"]).strip()]
    return " · ".join(p for p in parts if p)


def results_tables(run: RunData) -> list[tuple[str, Table]]:
    """One ``(phase, Table)`` per phase: every row of results.csv, failures included, in model, size order."""
    columns: list[Column] = [
        ("model", lambda r: r["model"], False),
        ("preset", lambda r: r["preset"], False),
        ("volume (voxels)", lambda r: size_text(r["size"]), False),
        ("status", lambda r: r["status"], False),
        ("network sees (voxels)", _net, False),
        ("peak memory", lambda r: _mem(r["peak_mem_bytes"]), True),
        ("memory source", lambda r: "" if r["status"] == STATUS_PREDICTED else r["mem_source"], False),
        ("predicted peak", lambda r: _mem(r["predicted_peak_bytes"]), True),
        ("measured / predicted", lambda r: _ratio(r["prediction_ratio"]), True),
        ("step time, median (IQR) (s)", _step_time, True),
        ("throughput (Mvoxel/s)", lambda r: _scaled(1e6)(r["voxels_per_s"]), True),
        ("energy (J/step)", lambda r: fmt_num(r["energy_j_per_step"]), True),
        ("energy source", lambda r: "" if r["energy_source"] == "none" else r["energy_source"], False),
        ("compute (GFLOP/step)", lambda r: _scaled(1e9)(r["flops_per_step"]), True),
        ("error", lambda r: str(r["error"]).strip(), False),
    ]
    out = []
    for phase in phase_order(run.frame):
        sub = _sorted(run.frame[run.frame["phase"] == phase], run)
        out.append((phase, _build(columns, sub, f"{phase}: {len(sub)} row(s) of results.csv", keep_first=4,
                                  say_once=("memory source", "energy source"))))
    return out


def detail_table(run: RunData) -> Table:
    """Every row's memory breakdown and provenance: activations, allocator reserved, NVML used, RSS,
    energy window, parameters, batch, precision, timed/warm-up steps, wall time and timestamp."""
    sub = _sorted(run.frame, run)
    columns: list[Column] = [
        ("model", lambda r: r["model"], False),
        ("volume (voxels)", lambda r: size_text(r["size"]), False),
        ("phase", lambda r: r["phase"], False),
        ("status", lambda r: r["status"], False),
        ("activations", lambda r: _mem(r["activation_bytes"]), True),
        ("predicted activations", lambda r: _mem(r["predicted_activation_bytes"]), True),
        ("CUDA reserved", lambda r: _mem(r["reserved_bytes"]), True),
        ("NVML used, incl. context", lambda r: _mem(r["nvml_used_bytes"]), True),
        ("process peak RSS", lambda r: _mem(r["rss_peak_bytes"]), True),
        ("energy window (s)", lambda r: fmt_num(r["energy_window_s"]), True),
        ("parameters (M)", lambda r: _scaled(1e6)(r["params"]), True),
        ("batch", lambda r: _int(r["batch"]), True),
        ("precision", lambda r: r["precision"], False),
        ("timed steps", lambda r: _int(r["steps"]), True),
        ("warm-up steps", lambda r: _int(r["warmup"]), True),
        ("loss", lambda r: fmt_num(r["loss"], 4), True),
        ("worker wall time (s)", lambda r: fmt_num(r["wall_s"]), True),
        ("device", lambda r: r["device_name"] or r["device"], False),
        ("finished", lambda r: r["timestamp"], False),
    ]
    return _build(columns, sub, f"memory breakdown and provenance of all {len(sub)} row(s)", keep_first=4)


def failures_table(run: RunData) -> Table | None:
    """The rows that did not produce a measurement (every failed status), with their reason; None if none."""
    sub = _sorted(run.frame[run.frame["status"].isin(FAILED)], run)
    if not len(sub):
        return None
    return Table(
        header=["model", "preset", "volume (voxels)", "phase", "status", "reason"],
        rows=[[r["model"], r["preset"], size_text(r["size"]), r["phase"], r["status"], _why(r) or "(none recorded)"]
              for _, r in sub.iterrows()],
        row_classes=[status_class(s) for s in sub["status"]],
        caption=f"{len(sub)} configuration(s) did not produce a measurement",
    )


def notes_table(run: RunData) -> Table | None:
    """The harness's note on each row (why it was measured or predicted, how energy was read); None when
    no row has one."""
    sub = _sorted(run.frame, run)
    sub = sub[sub["notes"].str.strip() != ""]
    if not len(sub):
        return None
    return Table(
        header=["model", "volume (voxels)", "phase", "status", "notes"],
        rows=[[r["model"], size_text(r["size"]), r["phase"], r["status"], str(r["notes"]).strip()]
              for _, r in sub.iterrows()],
        row_classes=[status_class(s) for s in sub["status"]],
        caption=f"notes recorded with {len(sub)} row(s)",
    )
