"""Terminal output of a sweep besides the progress display: tables (``rich``), the closing summary, and
where log records go (warnings on the terminal, everything in ``DIR/logs/sweep.log``).

Tables are plain text with an ASCII header rule, so they read the same on a terminal, in a log file and
in CI; every byte and time figure is formatted by :mod:`idmbench.units`.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from rich import box
from rich.console import Console
from rich.table import Table

from .. import results as R
from ..units import format_bytes, format_seconds, format_si

logger = logging.getLogger(__name__)

#: the policy's "too slow" reason: estimate, "(a guess)" or not, the limit
_ESTIMATED = re.compile(r"estimated (.+?)( \(a guess\))? to measure > (.+)$")
#: rich's SIMPLE_HEAD in ASCII: no frame, one rule under the header
_ASCII_HEAD = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, align: str | None = None) -> str:
    """A plain-text table (rich, no frame, ``-`` rule under the header, cells never wrapped).

    Args:
        headers: column titles.
        rows: cells (``None`` prints empty).
        align: one character per column, ``l`` or ``r`` (default all left).
    """
    align = align or "l" * len(headers)
    t = Table(box=_ASCII_HEAD, show_edge=False, pad_edge=False, safe_box=True)
    for h, a in zip(headers, align):
        t.add_column(str(h), justify="right" if a == "r" else "left", no_wrap=True)
    for r in rows:
        t.add_row(*["" if c is None else str(c) for c in r])
    buf = io.StringIO()
    Console(file=buf, width=10_000, color_system=None, force_terminal=False, legacy_windows=False).print(t)
    return "\n".join(ln.rstrip() for ln in buf.getvalue().rstrip("\n").splitlines())


def fmt_joules(j: float) -> str:
    """``123.4`` -> ``"123 J"``, ``1.234`` -> ``"1.23 J"``, ``0.0123`` -> ``"12.3 mJ"``."""
    if j >= 100:
        return f"{j:.0f} J"
    if j >= 1:
        return f"{j:.2f} J"
    return f"{j * 1000:.1f} mJ"


def summary_table(rows: list[R.ResultRow]) -> str:
    """The terminal summary: model, preset, size, phase, status, peak memory + source, step time,
    J/step + source (one line per :class:`~idmbench.results.ResultRow`; a data-parallel row names its
    rank in the phase column, ``train rank 1/2``)."""
    out = []
    for r in rows:
        if r.status == R.STATUS_OK:
            mem = f"{format_bytes(r.peak_mem_bytes)} {r.mem_source}"
            if r.prediction_ratio:
                mem += f" ({r.prediction_ratio:.2f}x pred)"
        elif r.predicted_peak_bytes is not None:
            mem = f"{format_bytes(r.predicted_peak_bytes)} predicted"
        else:
            mem = "-"
        t = "-"
        if r.step_time_s is not None:
            t = format_seconds(r.step_time_s)
            if r.step_time_iqr_s is not None:
                t += f" +/-{format_seconds(r.step_time_iqr_s / 2)}"
        e = "-"
        if r.energy_j_per_step is not None:
            e = f"{fmt_joules(r.energy_j_per_step)} {r.energy_source}"
        elif r.status == R.STATUS_OK:
            e = f"- {r.energy_source}"
        phase = r.phase if (r.world_size or 1) <= 1 else f"{r.phase} rank {r.rank}/{r.world_size}"
        out.append([r.model, r.preset, R.size_text(r.size), phase, r.status, mem, t, e])
    return render_table(
        ["model", "preset", "size", "phase", "status", "peak memory (source)", "step time (median +/-IQR/2)",
         "energy J/step (source)"],
        out,
    )


def budget_table(budget_rows: list[Any]) -> str:
    """Largest trainable cube per model (rows) and budget (columns), from
    :class:`~idmbench.harness.budget.BudgetRow` objects."""
    budgets: list[str] = []
    for b in budget_rows:
        if b.budget not in budgets:
            budgets.append(b.budget)
    models: dict[tuple[str, str], dict[str, str]] = {}
    for b in budget_rows:
        cell = "none" if b.largest_side is None else f"{'>=' if b.capped else ''}{b.largest_side}^3"
        models.setdefault((b.model, b.preset), {})[b.budget] = cell
    rows = [[m, p] + [cells.get(bud, "") for bud in budgets] for (m, p), cells in models.items()]
    return render_table(["model", "preset"] + budgets, rows, align="ll" + "r" * len(budgets))


def row_line(r: R.ResultRow) -> str:
    """One line for a finished measured row."""
    if r.status == R.STATUS_OK:
        s = f"ok  {format_bytes(r.peak_mem_bytes)} {r.mem_source}"
        if r.prediction_ratio:
            s += f" ({r.prediction_ratio:.3f}x predicted)"
        s += f", {format_seconds(r.step_time_s)}/step"
        if r.energy_j_per_step is not None:
            s += f", {r.energy_j_per_step:.3g} J/step {r.energy_source}"
        return s
    return f"{r.status}: {r.error}"


def job_line(label: str, rows: list[R.ResultRow], world_size: int, skipped: str | None = None) -> str:
    """The progress line of a finished job: its row (or each rank's, with the group's throughput and the
    largest all-reduce share), or why it ended as a prediction (``skipped``)."""
    if world_size > 1:
        label = f"{label} x{world_size} ranks"
    if skipped is not None:
        return f"{label}: {rows[0].status} ({format_bytes(rows[0].peak_mem_bytes)} predicted) - not measured: {skipped}"
    if world_size == 1:
        return f"{label}: " + "; ".join(row_line(r) for r in rows)
    line = f"{label}: " + " | ".join(f"rank {r.rank}: {row_line(r)}" for r in rows)
    ok = [r for r in rows if r.status == R.STATUS_OK and r.group_voxels_per_s]
    if ok:
        line += (f" | group {format_si(ok[0].group_voxels_per_s, 'voxel/s')}, all-reduce "
                 f"{100 * max(r.allreduce_share or 0.0 for r in ok):.0f} % of a step")
    return line


def header_lines(opts: Any, csv_path: Path, todo: int, total: int) -> list[str]:
    """The lines a sweep starts with: what it runs, on what, with which settings, and where it writes."""
    o, env = opts, opts.env
    presets = sorted(set(o.presets[m] for m in o.models))
    preset = presets[0] if len(presets) == 1 else ", ".join(f"{m}={o.presets[m]}" for m in o.models)
    where = env.get("device_name", "")
    if not o.device.startswith("cuda"):
        where += f", {env.get('cpu_count', '?')} cores"
    skipped = f" ({total - todo} already in {csv_path}, skipped)" if total != todo else ""
    steps = "prediction only" if o.predict_only else f"{o.warmup} warm-up + {o.steps} timed step(s)"
    return [
        f"idmbench sweep: {len(o.models)} model(s) x {len(o.sizes)} size(s) x {len(o.phases)} phase(s) = {total} configs{skipped}",
        f"  device {o.device} ({where}); preset {preset}; {o.precision}; batch {o.batch}; {steps}",
        f"  output {csv_path.parent}/ (log: {csv_path.parent / 'logs' / 'sweep.log'})",
    ]


def print_summary(out: TextIO, rows: list[R.ResultRow], budget_rows: list[Any], csv_path: Path) -> None:
    """The closing summary on ``out``: the results table, the largest-cube table, counts per status, what
    was only predicted and why (one line per reason), the failures, and how energy was obtained."""
    w = out.write
    w("\n")
    if rows:
        w(summary_table(rows) + "\n")
    else:
        w("no results yet: no config finished" + (" (nothing was written)" if not csv_path.exists() else "") + "\n")
    if budget_rows:
        presets = sorted({b.preset for b in budget_rows})
        w(f"\nlargest trainable cube (predicted training peak + 0.5 GiB CUDA context constant; preset "
          f"{', '.join(presets)}):\n")
        w(budget_table(budget_rows) + "\n")
    if rows:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        w("\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" -> {csv_path}\n")
    predicted = [r for r in rows if r.status == R.STATUS_PREDICTED]
    if predicted:
        w("predicted only (not run on this machine):\n")
        why: dict[str, list[str]] = {}
        for r in predicted:
            reason = r.notes.replace("not measured: ", "") if r.notes else "no reason recorded"
            cfg = f"{r.model} {R.size_text(r.size)} {r.phase}"
            m = _ESTIMATED.match(reason)
            if m:  # one line per limit, each config with its own estimate
                reason, cfg = f"estimated time to measure > {m.group(3)}", f"{cfg} (~{m.group(1)}{', a guess' if m.group(2) else ''})"
            why.setdefault(reason, []).append(cfg)
        for reason, cfgs in why.items():
            bare = not reason.startswith("estimated time to measure")
            listed = f"all {len(cfgs)} configs" if bare and len(cfgs) == len(rows) else ", ".join(cfgs)
            w(f"  {reason}: {listed}\n")
    failed = [r for r in rows if r.status in R.FAILED_STATUSES]
    if failed:
        w("failures:\n")
        for r in failed:
            w(f"  {r.model} {R.size_text(r.size)} {r.phase}: {r.status}: {r.error}\n")
    if "codecarbon-estimate" in {r.energy_source for r in rows if r.status == R.STATUS_OK}:
        w("energy: codecarbon-estimate = TDP x CPU load of the worker, an estimate (no power counter readable here)\n")
    out.flush()


# ------------------------------------------------------------------------------------------ logging


class _PlainWarnings(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


@dataclass
class LogRouting:
    """Handlers attached to the ``idmbench`` logger for one run; :meth:`close` detaches them."""

    handlers: list[logging.Handler]
    previous_level: int
    log_file: Path | None

    def close(self) -> None:
        root = logging.getLogger("idmbench")
        for h in self.handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(self.previous_level)


def route_logs(terminal: Console | TextIO, log_file: Path | None) -> LogRouting:
    """Send the package's log records to ``terminal`` (warnings and errors: one line each, above the
    progress bar when ``terminal`` is its rich console) and, with ``log_file``, everything from DEBUG up
    to that file (created with its folder)."""
    root = logging.getLogger("idmbench")
    handlers: list[logging.Handler] = []
    if isinstance(terminal, Console):
        from rich.logging import RichHandler

        th: logging.Handler = RichHandler(console=terminal, show_time=False, show_path=False, markup=False,
                                          rich_tracebacks=False, level=logging.WARNING)
    else:
        th = logging.StreamHandler(terminal)
        th.setFormatter(_PlainWarnings())
    th.setLevel(logging.WARNING)
    handlers.append(th)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    previous = root.level
    root.setLevel(logging.DEBUG)
    for h in handlers:
        root.addHandler(h)
    return LogRouting(handlers, previous, log_file)
