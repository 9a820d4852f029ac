"""The report's tables: every results row (one table per phase), the memory detail of every row, and
the quality results. Built with pandas; cells are plain text (the HTML template escapes them).

Units are in the headers: bytes as MiB or GiB (one unit per column), seconds, joules per step,
millions of voxels per second, GFLOP per step, millions of parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from .data import RunData, model_order, phase_order, size_order, size_text
from ..units import byte_unit, fmt_bytes, fmt_num, is_missing

#: statuses that get their own CSS class (anything else is "status-other")
KNOWN_STATUSES = ("ok", "predicted", "oom", "error", "timeout")


@dataclass
class Table:
    """A table ready to render: ``header`` and ``rows`` are text, ``numeric`` lists the column indices
    to right-align, ``row_classes`` one CSS class per row, ``cell_classes`` optional per-cell classes."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    numeric: set[int] = field(default_factory=set)
    row_classes: list[str] = field(default_factory=list)
    cell_classes: list[list[str]] | None = None

    def cls(self, i: int, j: int) -> str:
        parts = ["num"] if j in self.numeric else []
        if self.cell_classes and self.cell_classes[i][j]:
            parts.append(self.cell_classes[i][j])
        return " ".join(parts)


def status_class(status: str) -> str:
    return f"status-{status}" if status in KNOWN_STATUSES else "status-other"


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


def _why(rec: pd.Series) -> str:
    parts = [str(rec["error"]).strip(), str(rec["notes"]).strip()]
    return " · ".join(p for p in parts if p)


def results_tables(run: RunData) -> list[tuple[str, Table]]:
    """One ``(phase, Table)`` per phase: every row of results.csv, failures included, in model, size order."""
    out = []
    for phase in phase_order(run.frame):
        sub = _sorted(run.frame[run.frame["phase"] == phase], run)
        mem_unit = byte_unit(list(sub["peak_mem_bytes"]) + list(sub["predicted_peak_bytes"]))
        columns: list[tuple[str, Callable[[pd.Series], str], bool]] = [
            ("model", lambda r: r["model"], False),
            ("preset", lambda r: r["preset"], False),
            ("volume (voxels)", lambda r: size_text(r["size"]), False),
            ("network sees (voxels)", _net, False),
            ("status", lambda r: r["status"], False),
            (f"peak memory ({mem_unit[0]})", lambda r: fmt_bytes(r["peak_mem_bytes"], mem_unit), True),
            ("memory source", lambda r: r["mem_source"], False),
            (f"predicted peak ({mem_unit[0]})", lambda r: fmt_bytes(r["predicted_peak_bytes"], mem_unit), True),
            ("measured / predicted", lambda r: _ratio(r["prediction_ratio"]), True),
            ("step time, median (s)", lambda r: fmt_num(r["step_time_s"]), True),
            ("step time, IQR (s)", lambda r: fmt_num(r["step_time_iqr_s"]), True),
            ("throughput (Mvoxel/s)", lambda r: _scaled(1e6)(r["voxels_per_s"]), True),
            ("energy (J/step)", lambda r: fmt_num(r["energy_j_per_step"]), True),
            ("energy source", lambda r: r["energy_source"], False),
            ("compute (GFLOP/step)", lambda r: _scaled(1e9)(r["flops_per_step"]), True),
            ("parameters (M)", lambda r: _scaled(1e6)(r["params"]), True),
            ("error", lambda r: str(r["error"]).strip(), False),
        ]
        table = Table(
            header=[c[0] for c in columns],
            rows=[[fn(rec) for _, fn, _ in columns] for _, rec in sub.iterrows()],
            numeric={i for i, c in enumerate(columns) if c[2]},
            row_classes=[status_class(s) for s in sub["status"]],
            caption=f"{phase}: {len(sub)} row(s) of results.csv",
        )
        out.append((phase, table))
    return out


def detail_table(run: RunData) -> Table:
    """Every row's memory breakdown and provenance: activations, allocator reserved, NVML used, RSS,
    energy window, batch, precision, timed/warm-up steps, wall time and timestamp."""
    sub = _sorted(run.frame, run)
    unit = byte_unit(
        list(sub["activation_bytes"]) + list(sub["predicted_activation_bytes"]) + list(sub["reserved_bytes"])
        + list(sub["nvml_used_bytes"]) + list(sub["rss_peak_bytes"])
    )
    u = unit[0]
    columns: list[tuple[str, Callable[[pd.Series], str], bool]] = [
        ("model", lambda r: r["model"], False),
        ("volume (voxels)", lambda r: size_text(r["size"]), False),
        ("phase", lambda r: r["phase"], False),
        ("status", lambda r: r["status"], False),
        (f"activations ({u})", lambda r: fmt_bytes(r["activation_bytes"], unit), True),
        (f"predicted activations ({u})", lambda r: fmt_bytes(r["predicted_activation_bytes"], unit), True),
        (f"CUDA reserved ({u})", lambda r: fmt_bytes(r["reserved_bytes"], unit), True),
        (f"NVML used, incl. context ({u})", lambda r: fmt_bytes(r["nvml_used_bytes"], unit), True),
        (f"process peak RSS ({u})", lambda r: fmt_bytes(r["rss_peak_bytes"], unit), True),
        ("energy window (s)", lambda r: fmt_num(r["energy_window_s"]), True),
        ("batch", lambda r: _int(r["batch"]), True),
        ("precision", lambda r: r["precision"], False),
        ("timed steps", lambda r: _int(r["steps"]), True),
        ("warm-up steps", lambda r: _int(r["warmup"]), True),
        ("loss", lambda r: fmt_num(r["loss"], 4), True),
        ("worker wall time (s)", lambda r: fmt_num(r["wall_s"]), True),
        ("device", lambda r: r["device_name"] or r["device"], False),
        ("finished", lambda r: r["timestamp"], False),
    ]
    rows = [[fn(rec) for _, fn, _ in columns] for _, rec in sub.iterrows()]
    keep = [j for j, c in enumerate(columns) if j < 4 or any(r[j] for r in rows)]
    dropped = [columns[j][0] for j in range(len(columns)) if j not in keep]
    caption = f"memory breakdown and provenance of all {len(sub)} row(s)"
    if dropped:
        caption += "; no row has a value for: " + ", ".join(dropped)
    return Table(
        header=[columns[j][0] for j in keep],
        rows=[[r[j] for j in keep] for r in rows],
        numeric={i for i, j in enumerate(keep) if columns[j][2]},
        row_classes=[status_class(s) for s in sub["status"]],
        caption=caption,
    )


def failures_table(run: RunData) -> Table | None:
    """The rows that did not produce a measurement (oom, error, timeout), with their reason; None if none."""
    sub = _sorted(run.frame[run.frame["status"].isin(("oom", "error", "timeout"))], run)
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


def quality_table(run: RunData) -> Table | None:
    """quality.csv as it is (any columns), numbers to about four significant digits; None when absent."""
    q = run.quality
    if q is None:
        return None
    numeric = set()
    rows = [[str(v) for v in rec] for rec in q.itertuples(index=False)]
    for j, col in enumerate(q.columns):
        vals = pd.to_numeric(q[col].replace("", None), errors="coerce")
        if col == "size" or not vals.notna().any() or vals.notna().sum() != (q[col] != "").sum():
            continue  # labels, empty columns and mixed text stay as written
        numeric.add(j)
        integral = bool(((vals.dropna() % 1) == 0).all())
        for i, v in enumerate(vals):
            rows[i][j] = "" if is_missing(v) else (f"{int(v):,}" if integral else fmt_num(v, 4))
    return Table(header=[str(c) for c in q.columns], rows=rows, numeric=numeric,
                 caption=f"quality.csv: {len(q)} row(s)")
