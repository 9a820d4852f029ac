"""Progress bar with ETA on stderr while a sweep runs, and the summary tables at the end.

On a terminal the bar redraws in place (about once a second) under a scrolling log of finished configs;
elsewhere (a pipe, CI, a test) every event is one plain line.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import Any, Iterable, TextIO

from ..units import format_bytes, format_clock, format_seconds


class Progress:
    """``n`` items with estimated seconds each; call :meth:`begin`, :meth:`tick` (while waiting) and
    :meth:`finish` per item. The ETA is the remaining estimates scaled by how long finished items really
    took compared with their estimates."""

    def __init__(self, estimates: list[float], *, stream: TextIO | None = None, tty: bool | None = None, title: str = "",
                 t0: float | None = None) -> None:
        """``t0``: ``time.monotonic()`` the elapsed time counts from (default: now)."""
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.est = [max(0.0, float(e)) for e in estimates]
        self.done_flags = [False] * len(self.est)
        self.t0 = time.monotonic() if t0 is None else t0
        self.current: int | None = None
        self.current_label = ""
        self.current_t0 = self.t0
        self.actual_sum = 0.0
        self.est_sum_done = 0.0
        self.title = title
        self._last_draw = 0.0
        self._drawn = False

    @property
    def n(self) -> int:
        return len(self.est)

    @property
    def finished(self) -> int:
        return sum(self.done_flags)

    def set_estimate(self, i: int, est_s: float) -> None:
        self.est[i] = max(0.0, float(est_s))

    def _factor(self) -> float:
        if self.est_sum_done < 5.0:
            return 1.0
        return min(2.0, max(0.5, self.actual_sum / self.est_sum_done))

    def eta_s(self) -> float:
        """Estimated seconds until every item is done."""
        rem = sum(e for e, d in zip(self.est, self.done_flags) if not d)
        if self.current is not None and not self.done_flags[self.current]:
            spent = time.monotonic() - self.current_t0
            rem = rem - self.est[self.current] + max(self.est[self.current] * self._factor() - spent, 0.0) / self._factor()
        return max(0.0, rem * self._factor())

    def _bar(self) -> str:
        frac = self.finished / self.n if self.n else 1.0
        width = 20
        full = int(round(frac * width))
        elapsed = time.monotonic() - self.t0
        cur = ""
        if self.current is not None and not self.done_flags[self.current]:
            cur = f"  {self.current_label} ({format_clock(time.monotonic() - self.current_t0)})"
        return (
            f"[{'#' * full}{'.' * (width - full)}] {self.finished}/{self.n} "
            f"elapsed {format_clock(elapsed)} ETA {format_clock(self.eta_s())}{cur}"
        )

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\033[K")
            self._drawn = False

    def _draw(self) -> None:
        if not self.tty:
            return
        cols = shutil.get_terminal_size((100, 20)).columns
        line = self._bar()
        if len(line) > cols - 1:
            line = line[: cols - 2] + "~"
        self.stream.write("\r\033[K" + line)
        self.stream.flush()
        self._drawn = True
        self._last_draw = time.monotonic()

    def log(self, line: str) -> None:
        """Print ``line`` above the bar (a plain line off a terminal)."""
        self._clear()
        self.stream.write(line.rstrip("\n") + "\n")
        self.stream.flush()
        self._draw()

    def begin(self, i: int, label: str, note: str = "") -> None:
        self.current = i
        self.current_label = label
        self.current_t0 = time.monotonic()
        if not self.tty and note:
            self.log(f"[{self.finished + 1:>{len(str(self.n))}}/{self.n}] {label}: {note}")
        elif self.tty and note:
            self.log(f"  {label}: {note}")
        self._draw()

    def tick(self) -> None:
        """Redraw (at most once a second) while waiting on a worker."""
        if self.tty and time.monotonic() - self._last_draw >= 1.0:
            self._draw()

    def finish(self, i: int, line: str, *, measured: bool = True) -> None:
        spent = time.monotonic() - self.current_t0 if self.current == i else 0.0
        if not self.done_flags[i]:
            self.done_flags[i] = True
            if measured and self.est[i] > 0:
                self.actual_sum += spent
                self.est_sum_done += self.est[i]
        self.current = None
        tail = f"  elapsed {format_clock(time.monotonic() - self.t0)}  ETA {format_clock(self.eta_s())}"
        self.log(f"[{self.finished:>{len(str(self.n))}}/{self.n}] {line}{tail}")

    def close(self) -> None:
        self._clear()
        self.stream.flush()


def render_table(headers: list[str], rows: Iterable[list[Any]], *, align: str | None = None) -> str:
    """A plain-text table; ``align`` is one character per column (``l`` / ``r``)."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        for j, c in enumerate(r):
            widths[j] = max(widths[j], len(c))
    align = align or "l" * len(headers)

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def summary_table(rows: list[Any]) -> str:
    """The terminal summary: model, preset, size, phase, status, peak memory + source, step time,
    J/step + source (one line per :class:`~idmbench.results.ResultRow`)."""
    out = []
    for r in rows:
        if r.status == "ok":
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
            e = f"{_fmt_j(r.energy_j_per_step)} {r.energy_source}"
        elif r.status == "ok":
            e = f"- {r.energy_source}"
        out.append([r.model, r.preset, _size(r.size), r.phase, r.status, mem, t, e])
    return render_table(
        ["model", "preset", "size", "phase", "status", "peak memory (source)", "step time (median +/-IQR/2)", "energy J/step (source)"],
        out,
        align="llllllll",
    )


def _fmt_j(j: float) -> str:
    if j >= 100:
        return f"{j:.0f} J"
    if j >= 1:
        return f"{j:.2f} J"
    return f"{j * 1000:.1f} mJ"


def _size(s: str) -> str:
    return f"{s}^3" if "x" not in str(s) else str(s)


def budget_table(budget_rows: list[Any]) -> str:
    """Largest trainable cube per model (rows) and budget (columns)."""
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
