"""What every plot of the report shares: one legend vocabulary, the figure record, axes and the footer.

**One vocabulary for the whole page** (:data:`PROVENANCE`): how a point is drawn says where its number
came from, in every plot alike —

* **measured** (an allocator, a tensor tracker, a power counter, a clock): filled marker, solid line;
* **predicted** (the same step on fake tensors, nothing allocated): hollow marker, dotted line;
* **estimate** (codecarbon's TDP × load where no power counter exists): half-filled marker, dashed line;
* **failed** (oom, error, timeout, …): a cross on the top edge with the status beside it;
* **faint** lines and markers are context behind the main series (the training step drawn under the
  sampling step; the raw per-step loss under its moving mean);
* grey horizontal lines are GPU memory sizes, labelled in GiB like every table.

A segment between two points is drawn in the weaker style of its two ends. Figures are drawn with
matplotlib's object API (Agg, no pyplot state) and kept as base64 PNG for ``<img src="data:...">``;
every figure prints its source in a footer inside the image, so a copied PNG keeps its provenance.
A figure with nothing to draw is not made: the page says in one line why it is left out.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from .data import RunData, phase_order
from ..units import GPU_SIZES_GIB, GiB, own_unit

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<"]
DPI = 110
WIDTH_IN, HEIGHT_IN = 9.0, 4.8  # inches
FAINT = 0.3  # alpha of context series

#: provenance -> (marker fill style, line style, legend text); the one vocabulary of the page
PROVENANCE = {
    "measured": ("full", "-", "measured (filled, solid)"),
    "predicted": ("none", ":", "predicted, fake tensors (hollow, dotted)"),
    "estimate": ("left", "--", "estimate, TDP × load (half-filled, dashed)"),
}
#: how a status that is no number is drawn
FAILED_TEXT = "failed: status beside the cross"
STRENGTH = {"measured": 2, "estimate": 1, "predicted": 0}


def legend_sentence() -> str:
    """The vocabulary in one sentence (the page prints it above the plots)."""
    return ("In every plot: filled markers on solid lines are measured; hollow markers on dotted lines are "
            "predicted from fake tensors (nothing allocated); half-filled markers on dashed lines are estimates "
            "(codecarbon's TDP × load, no power counter); a cross on the top edge is a configuration that "
            "failed, its status beside it; faint series are context behind the main one; grey horizontal lines "
            "are GPU memory sizes in GiB.")


@dataclass
class Figure:
    """One figure of the page: an anchor ``key``, a ``title``, a ``caption`` (what it shows and where the
    numbers came from) and the matplotlib figure, rendered to PNG (base64) when the page asks for it."""

    key: str
    title: str
    caption: str
    mpl: MplFigure = field(repr=False, compare=False)
    _png: str = field(default="", repr=False, compare=False)

    @property
    def png_b64(self) -> str:
        if not self._png:
            self._png = png(self.mpl)
        return self._png

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + self.png_b64


@dataclass
class Omitted:
    """A figure left out because the run has nothing to draw in it, and why (one line)."""

    key: str
    title: str
    reason: str


def finish(key: str, title: str, caption: str, fig: MplFigure) -> Figure:
    return Figure(key, title, caption, fig)


def mpl_text(s: object) -> str:
    """Text safe for matplotlib (a ``$`` would start mathtext)."""
    return str(s).replace("$", r"\$")


def legend_text(lab: str, limit: int = 32) -> str:
    return mpl_text(lab if len(lab) <= limit else lab[: limit - 1] + "…")


def model_style(labels: list[str]) -> dict[str, tuple[str, str]]:
    """label -> (colour, marker), stable in run order, so a model looks the same in every plot."""
    return {lab: (COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]) for i, lab in enumerate(labels)}


def model_handles(run: RunData, present: set[str], suffix: Callable[[str], str] = lambda lab: "") -> list[Line2D]:
    style = model_style(run.labels)
    return [Line2D([], [], color=style[lab][0], marker=style[lab][1], ls="-", label=legend_text(lab + suffix(lab), 48))
            for lab in run.labels if lab in present]


def provenance_handles(kinds: list[str], failed: bool = False) -> list[Line2D]:
    """Legend entries (in grey) for the provenance kinds a plot uses, in vocabulary order."""
    out = []
    for kind in PROVENANCE:
        if kind in kinds:
            fill, ls, text = PROVENANCE[kind]
            out.append(Line2D([], [], color="#333333", marker="o", ls=ls, fillstyle=fill, mfc="#333333",
                              mfcalt="white", label=text))
    if failed:
        out.append(Line2D([], [], color="#333333", marker="x", ls="none", mew=2, label=FAILED_TEXT))
    return out


def point(ax, x: float, y: float, color: str, marker: str, kind: str, *, alpha: float = 1.0, ms: float = 7.0,
          zorder: int = 3) -> None:
    """One marker in the style of ``kind`` (measured / predicted / estimate)."""
    fill = PROVENANCE[kind][0]
    ax.plot([x], [y], marker=marker, ms=ms, color=color, fillstyle=fill, mfc=color, mfcalt="white", mec=color,
            mew=1.5, ls="none", alpha=alpha, zorder=zorder)


def series(ax, pts: list[tuple[float, float, str]], color: str, marker: str, *, alpha: float = 1.0,
           ms: float = 7.0) -> None:
    """Points ``(x, y, kind)`` sorted by x, joined by segments in the weaker style of their two ends."""
    pts = sorted(pts)
    for (x0, y0, k0), (x1, y1, k1) in zip(pts, pts[1:]):
        kind = k0 if STRENGTH[k0] <= STRENGTH[k1] else k1
        ax.plot([x0, x1], [y0, y1], color=color, lw=1.3, ls=PROVENANCE[kind][1], alpha=alpha, zorder=2)
    for x, y, k in pts:
        point(ax, x, y, color, marker, k, alpha=alpha, ms=ms)


def png(fig: MplFigure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def new(ncols: int = 1, height: float = HEIGHT_IN, nrows: int = 1) -> tuple[MplFigure, list]:
    fig = MplFigure(figsize=(WIDTH_IN, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def footer(fig: MplFigure, text: str) -> None:
    """The source line, printed in the image below the plot (a reserved strip of the figure)."""
    fig.get_layout_engine().set(rect=(0, 0.075, 1, 0.925))
    fig.text(0.01, 0.012, mpl_text("Source: " + text), fontsize=7, color="#555555", ha="left", va="bottom",
             wrap=True)


def side_axis(ax, sides: list[float], short: bool = False) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted({s for s in sides if s == s and s > 0})
    if ticks:
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}" if abs(v - round(v)) < 1e-6 else f"{v:.1f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)
    ax.set_xlabel("volume side (voxels)" if short else "volume side (voxels; cube root of D·H·W for non-cubes)")
    ax.grid(True, which="major", axis="x", alpha=0.3)


def plain_tick(v: float, _pos: object = None) -> str:
    """A count without e-notation: 20,000 -> "20k", 3e6 -> "3M"."""
    for scale, suffix, div in ((1e12, "T", 1e12), (1e9, "G", 1e9), (1e6, "M", 1e6), (1e4, "k", 1e3)):
        if v >= scale:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def byte_tick(v: float, _pos: object = None) -> str:
    """A byte count in its own binary unit: one TiB -> "1 TiB", half a GiB -> "512 MiB"."""
    if v <= 0:
        return ""
    name, scale = own_unit(v)
    return f"{v / scale:g} {name}"


def _ticks(lo: float, hi: float, base: float, subs: tuple[float, ...]) -> list[float]:
    """Every ``s × base**k`` (s in ``subs``) from just below ``lo`` to just above ``hi``."""
    k0, k1 = math.floor(math.log(lo, base)) - 1, math.ceil(math.log(hi, base)) + 1
    return sorted(s * base**k for k in range(k0, k1 + 1) for s in subs)


def log_axis(ax, which: str = "y", nbytes: bool = False) -> None:
    """Log scale on ``which`` after the data is drawn, ending on labelled ticks: powers of 4 for bytes
    (1 MiB, 4 MiB, …, 1 GiB, then powers of 2 when that gives fewer than three), else 1/2/5 × 10^k as
    needed; labels without e-notation (bytes in their own binary unit)."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    ax.autoscale_view()
    lo, hi = sorted(ax.get_ylim() if which == "y" else ax.get_xlim())
    lo = max(lo, hi * 1e-12, 1e-300)
    options = [(4.0, (1.0,)), (2.0, (1.0,))] if nbytes else \
        [(10.0, (1.0,)), (10.0, (1.0, 2.0, 5.0)), (10.0, tuple(float(i) for i in range(1, 10)))]
    ticks, lim = [], (lo, hi)
    for base, subs in options:  # the sparsest ticks that give >= 3 once the axis ends on ticks
        cand = _ticks(lo, hi, base, subs)
        below, above = max(t for t in cand if t <= lo), min(t for t in cand if t >= hi)
        inside = [t for t in cand if below <= t <= above]
        ticks, lim = inside, (below, above)
        if len(inside) >= 3 and above / below <= 4 * (hi / lo):  # enough ticks, the data not squeezed
            break
    (ax.set_ylim if which == "y" else ax.set_xlim)(*lim)
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(byte_tick if nbytes else plain_tick))
    axis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", axis=which, alpha=0.3)


def gpu_lines(ax) -> None:
    """Grey lines at the GPU memory sizes (y axis in bytes), labelled in GiB like the tables."""
    for gib in GPU_SIZES_GIB:
        ax.axhline(gib * GiB, color="#999999", lw=0.8, ls="-", zorder=0)
        ax.annotate(f"{gib} GiB", xy=(1.0, gib * GiB), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="#666666")


def outside_legend(ax, handles: list[Line2D]) -> None:
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def phase_panels(run: RunData, frame: pd.DataFrame) -> list[str]:
    """Phases (in page order) that have rows in ``frame``."""
    return [p for p in phase_order(run.frame) if (frame["phase"] == p).any()]


def per_phase_figure(run: RunData, *, key: str, title: str, frame: pd.DataFrame, value: str, ylabel: str,
                     kind_of: Callable[[pd.Series], str], source: str, caption: str) -> Figure:
    """The skeleton of the per-phase plots (energy, throughput): one panel per phase, ``value`` against the
    volume side on log–log axes, a series per model drawn in the provenance style ``kind_of(row)``, the
    model legend plus the provenance kinds used. ``frame`` holds only rows to draw (value > 0)."""
    phases = phase_panels(run, frame)
    style = model_style(run.labels)
    fig, axes = new(max(1, len(phases)), height=5.2)
    kinds: list[str] = []
    for ax, phase in zip(axes, phases):
        sub = frame[frame["phase"] == phase]
        for lab in run.labels:
            mine = sub[sub["label"] == lab]
            if not len(mine):
                continue
            pts = [(float(r["side"]), float(r[value]), kind_of(r)) for _, r in mine.iterrows()]
            kinds += [p[2] for p in pts]
            series(ax, pts, *style[lab])
        side_axis(ax, list(sub["side"]), short=True)
        log_axis(ax, "y")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{phase} step", fontsize=10)
    handles = model_handles(run, set(frame["label"])) + provenance_handles(list(dict.fromkeys(kinds)))
    outside_legend(axes[len(phases) - 1], handles)
    fig.suptitle(title, fontsize=11)
    footer(fig, source)
    return finish(key, title, caption + " Source: " + source, fig)
