"""The report's five figures, drawn with matplotlib's object API (Agg, no pyplot state) and returned as
base64 PNG for inline ``<img src="data:image/png;base64,...">``.

1. peak training memory vs volume side (log–log; measured filled, predicted hollow, GPU sizes as lines);
2. energy per step vs volume side (NVML measurements filled, codecarbon estimates hollow/dashed);
3. throughput (voxels per second) vs volume side;
4. step time vs peak memory (the trade-off);
5. sampling memory vs volume side, with the training step dashed (PatchDDM trains on patches but
   samples whole volumes).

Every figure prints its source in a footer inside the image, so a copied PNG keeps its provenance.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .data import MemCell, RunData, memory_cells, phase_order, size_text
from ..units import GPU_SIZES_GIB, GiB

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<"]
DPI = 110
WIDTH_IN, HEIGHT_IN = 9.0, 4.8  # inches


@dataclass
class Figure:
    """One figure of the page: an anchor ``key``, a ``title``, a ``caption`` (what it shows and where the
    numbers came from) and the PNG as base64 text. ``empty`` when the run had no data for it."""

    key: str
    title: str
    caption: str
    png_b64: str
    empty: bool = False
    mpl: MplFigure | None = field(default=None, repr=False, compare=False)

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + self.png_b64


NO_MEMORY = "No training rows with a memory figure in this run"
NO_ENERGY = "No energy figures in this run (energy_source is 'none' for every measured row)"
NO_THROUGHPUT = "No measured throughput in this run (every row failed or was predicted)"
NO_TRADEOFF = "No measured training rows with both memory and time in this run"
NO_SAMPLING = "No sampling rows with a memory figure in this run (--phases did not include sample?)"


def _done(key: str, title: str, caption: str, fig: MplFigure, empty_reason: str | None) -> Figure:
    if empty_reason:
        caption = f"{empty_reason}. {caption}"
    out = Figure(key, title, caption, _png(fig), empty=bool(empty_reason))
    out.mpl = fig  # kept for inspection (tests); the page uses only the PNG
    return out


def _mpl_text(s: object) -> str:
    """Text safe for matplotlib (a ``$`` would start mathtext)."""
    return str(s).replace("$", r"\$")


def _style(run: RunData) -> dict[str, tuple[str, str]]:
    return {lab: (COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]) for i, lab in enumerate(run.labels)}


def _legend_text(lab: str, limit: int = 32) -> str:
    return _mpl_text(lab if len(lab) <= limit else lab[: limit - 1] + "…")


def _model_handles(run: RunData, present: set[str]) -> list[Line2D]:
    style = _style(run)
    return [Line2D([], [], color=style[lab][0], marker=style[lab][1], label=_legend_text(lab))
            for lab in run.labels if lab in present]


def _png(fig: MplFigure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new(ncols: int = 1, height: float = HEIGHT_IN) -> tuple[MplFigure, list]:
    fig = MplFigure(figsize=(WIDTH_IN, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _footer(fig: MplFigure, text: str) -> None:
    """The source line, printed in the image below the plot (a reserved strip of the figure)."""
    fig.get_layout_engine().set(rect=(0, 0.075, 1, 0.925))
    fig.text(0.01, 0.012, _mpl_text("Source: " + text), fontsize=7, color="#555555", ha="left", va="bottom",
             wrap=True)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, _mpl_text(text), ha="center", va="center", transform=ax.transAxes, fontsize=11,
            color="#555555", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _side_axis(ax, sides: list[float], short: bool = False) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted({s for s in sides if s == s and s > 0})
    if ticks:
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}" if abs(v - round(v)) < 1e-6 else f"{v:.1f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        lo, hi = ticks[0], ticks[-1]
        ax.set_xlim(lo / 1.25, hi * 1.25)
    ax.set_xlabel("volume side (voxels)" if short else "volume side (voxels; cube root of D·H·W for non-cubes)")
    ax.grid(True, which="major", axis="x", alpha=0.3)


def _plain_fmt(v: float, _pos: object = None) -> str:
    if v >= 1e9:
        return f"{v / 1e9:g}G"
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _gib_fmt(v: float, _pos: object = None) -> str:
    """Tick text for a value in GiB: powers of two read as whole MiB/GiB."""
    if v >= 1:
        return f"{v:g} GiB"
    if v >= 1 / 1024:
        return f"{v * 1024:g} MiB"
    return f"{v * 1024 * 1024:g} KiB"


def _log_axis(ax, which: str = "y", gib: bool = False) -> None:
    """Log scale on ``which`` axis after the data is drawn; ticks at powers of 4 (GiB values) or 10,
    denser when the data spans less than about two ticks, labelled without e-notation."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    ax.autoscale_view()
    lo, hi = sorted(ax.get_ylim() if which == "y" else ax.get_xlim())
    candidates = [LogLocator(base=4.0), LogLocator(base=2.0)] if gib else \
        [LogLocator(base=10.0), LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)),
         LogLocator(base=10.0, subs=tuple(range(1, 10)))]
    loc = candidates[-1]
    for cand in candidates:
        ticks = [t for t in cand.tick_values(lo, hi) if lo <= t <= hi]
        if len(ticks) >= 3:
            loc = cand
            break
    axis.set_major_locator(loc)
    axis.set_major_formatter(FuncFormatter(_gib_fmt if gib else _plain_fmt))
    axis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", axis=which, alpha=0.3)


def _gpu_lines(ax) -> None:
    for gib in GPU_SIZES_GIB:
        ax.axhline(gib, color="#888888", lw=0.8, ls=":", zorder=0)
        ax.annotate(f"{gib} GB GPU", xy=(1.0, gib), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="#666666")


def _mem_series(ax, cells: dict[tuple[str, str], MemCell], lab: str, color: str, marker: str,
                ls: object = "-", alpha: float = 1.0, size: float = 7.0, fail_marks: bool = True,
                fails_at: dict[float, int] | None = None) -> bool:
    """Draw one model's memory curve; return True if anything was drawn."""
    mine = sorted(((c.side, s, c) for (lab2, s), c in cells.items() if lab2 == lab and c.side == c.side),
                  key=lambda t: t[0])
    pts = [(side, c.bytes / GiB, c.measured) for side, _, c in mine if c.bytes and c.bytes > 0 and not c.failed]
    drawn = False
    for (x0, y0, m0), (x1, y1, m1) in zip(pts, pts[1:]):
        ax.plot([x0, x1], [y0, y1], color=color, lw=1.3, alpha=alpha * (1 if m0 and m1 else 0.7),
                ls=ls if (m0 and m1) else "--", zorder=2)
    for x, y, m in pts:
        ax.plot([x], [y], marker=marker, ms=size, color=color, mfc=color if m else "white", mec=color,
                mew=1.5, ls="none", alpha=alpha, zorder=3)
        drawn = True
    # a prediction at a measured size, drawn hollow behind the filled point: shows how well they agree
    for side, _, c in mine:
        if c.measured and c.predicted and c.predicted > 0:
            ax.plot([side], [c.predicted / GiB], marker=marker, ms=size + 4, color=color, mfc="none", mec=color,
                    mew=1.0, ls="none", alpha=0.6 * alpha, zorder=2)
        if c.failed and c.bytes and c.bytes > 0:  # a failure that still has a prediction
            ax.plot([side], [c.bytes / GiB], marker=marker, ms=size, color=color, mfc="white", mec=color,
                    mew=1.5, ls="none", alpha=alpha, zorder=3)
            drawn = True
        if c.failed and fail_marks:
            k = 0
            if fails_at is not None:  # stack the marks of several models failing at one side
                k = fails_at.get(side, 0)
                fails_at[side] = k + 1
            y = 0.96 - 0.06 * k
            ax.plot([side], [y], marker="x", ms=9, mew=2, color=color, ls="none", alpha=alpha,
                    transform=ax.get_xaxis_transform(), zorder=4, clip_on=False)
            ax.annotate(c.status, xy=(side, y), xycoords=("data", "axes fraction"), xytext=(7, 0),
                        textcoords="offset points", fontsize=7, color=color, va="center")
            drawn = True
    return drawn


def _mem_sources(run: RunData, phases: tuple[str, ...]) -> str:
    sub = run.frame[run.frame["phase"].isin(phases) & (run.frame["status"] == "ok")]
    srcs = [s for s in dict.fromkeys(sub["mem_source"]) if s and s != "predicted"]
    return ", ".join(srcs) or "none measured"


def _context_note(run: RunData) -> str:
    ctx = run.meta.get("cuda_context_overhead_bytes")
    try:
        ctx = int(ctx)
    except (TypeError, ValueError):
        return "CUDA context not included"
    return f"CUDA context (+{ctx / 2**20:,.0f} MiB, a labelled constant) not included in the points"


def memory_figure(run: RunData) -> Figure:
    """Peak training memory vs volume side, log–log, with horizontal lines at 16/24/40/80 GB."""
    cells = memory_cells(run.frame, "train")
    fig, (ax,) = _new(height=5.4)
    style = _style(run)
    drawn = False
    handles = []
    fails_at: dict[float, int] = {}
    for lab in run.labels:
        color, marker = style[lab]
        if _mem_series(ax, cells, lab, color, marker, fails_at=fails_at):
            drawn = True
            handles.append(Line2D([], [], color=color, marker=marker, label=_legend_text(lab)))
    title = "Peak memory of one training step vs volume side"
    if not drawn:
        _empty(ax, NO_MEMORY)
    else:
        _side_axis(ax, [c.side for c in cells.values()])
        _gpu_lines(ax)
        _log_axis(ax, "y", gib=True)
        ax.set_ylabel("peak memory per training step")
        handles += [
            Line2D([], [], color="#333333", marker="o", ls="-", label="measured (filled)"),
            Line2D([], [], color="#333333", marker="o", mfc="white", ls="--", label="predicted (hollow)"),
            Line2D([], [], color="#333333", marker="x", ls="none", mew=2, label="failed (oom/error/timeout)"),
        ]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title, fontsize=11)
    src = (f"measured = {_mem_sources(run, ('train',))} peak of one step; predicted = the same step under "
           f"FakeTensorMode (live tensors, no allocator fragmentation); {_context_note(run)}.")
    _footer(fig, src)
    caption = ("Filled points are measured, hollow points predicted; a hollow ring around a filled point is the "
               "prediction at a measured size. Crosses on the top edge mark sizes that failed (status written "
               "beside them). Dotted lines: GPU memory sizes 16/24/40/80 GB. " "Source: " + src)
    return _done("fig-memory", title, caption, fig, None if drawn else NO_MEMORY)


ENERGY_STYLE = {  # energy_source -> (filled?, line style, legend text)
    "nvml": (True, "-", "NVML energy counter\n(measured, GPU board)"),
    "codecarbon-rapl": (True, "-.", "codecarbon RAPL counter\n(measured, CPU package)"),
    "codecarbon-estimate": (False, "--", "codecarbon estimate\n(TDP × load, not measured)"),
}


def _phase_panels(run: RunData, value_col: str) -> list[str]:
    ok = run.frame[(run.frame["status"] == "ok") & run.frame[value_col].notna() & (run.frame[value_col] > 0)]
    return [p for p in phase_order(run.frame) if (ok["phase"] == p).any()]


def energy_figure(run: RunData) -> Figure:
    """Energy per step (J) vs volume side, a panel per phase; marker fill and line style by energy source."""
    title = "Energy per step vs volume side"
    phases = _phase_panels(run, "energy_j_per_step")
    ok = run.frame[(run.frame["status"] == "ok") & (run.frame["energy_j_per_step"] > 0)]
    style = _style(run)
    fig, axes = _new(max(1, len(phases)), height=5.2)
    used_sources: list[str] = []
    if not phases:
        _empty(axes[0], NO_ENERGY)
    for ax, phase in zip(axes, phases):
        sub = ok[ok["phase"] == phase]
        for lab in run.labels:
            color, marker = style[lab]
            for src, grp in sub[sub["label"] == lab].groupby("energy_source", sort=False):
                filled, ls, _ = ENERGY_STYLE.get(src, (False, ":", src))
                used_sources.append(src)
                g = grp.sort_values("side")
                ax.plot(g["side"], g["energy_j_per_step"], color=color, marker=marker, ls=ls,
                        mfc=color if filled else "white", mec=color, mew=1.5, ms=7)
        _side_axis(ax, list(sub["side"]), short=True)
        _log_axis(ax, "y")
        ax.set_ylabel("energy per step (J)")
        ax.set_title(f"{phase} step", fontsize=10)
    if phases:
        handles = _model_handles(run, set(ok["label"]))
        for src in dict.fromkeys(used_sources):
            filled, ls, text = ENERGY_STYLE.get(src, (False, ":", src))
            handles.append(Line2D([], [], color="#333333", marker="o", ls=ls, mfc="#333333" if filled else "white",
                                  label=_legend_text(text, 48)))
        axes[len(phases) - 1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                     borderaxespad=0)
    fig.suptitle(title, fontsize=11)
    srcs = ", ".join(dict.fromkeys(used_sources)) or "none"
    src = (f"energy_source = {srcs}. NVML: GPU energy counter over a synchronised window of ≥ 1 s. "
           "codecarbon-estimate: TDP × CPU load, an estimate, never a measurement.")
    _footer(fig, src)
    caption = ("Joules per step (one optimiser step in training, one denoising step in sampling). Filled markers "
               "and solid lines are measured by a power/energy counter; hollow markers and dashed lines are "
               "estimates. Source: " + src)
    return _done("fig-energy", title, caption, fig, None if phases else NO_ENERGY)


def _timing_note(run: RunData) -> str:
    steps, warm = run.meta.get("steps"), run.meta.get("warmup")
    bits = []
    if steps is not None:
        bits.append(f"{steps} timed step(s)")
    if warm is not None:
        bits.append(f"{warm} warm-up step(s) excluded")
    return "synchronised wall-clock median" + (" over " + ", ".join(bits) if bits else "")


def throughput_figure(run: RunData) -> Figure:
    """Throughput (voxels per second) vs volume side, a panel per phase; measured rows only."""
    title = "Throughput vs volume side"
    phases = _phase_panels(run, "voxels_per_s")
    ok = run.frame[(run.frame["status"] == "ok") & (run.frame["voxels_per_s"] > 0)]
    style = _style(run)
    fig, axes = _new(max(1, len(phases)), height=5.2)
    if not phases:
        _empty(axes[0], NO_THROUGHPUT)
    for ax, phase in zip(axes, phases):
        sub = ok[ok["phase"] == phase]
        for lab in run.labels:
            g = sub[sub["label"] == lab].sort_values("side")
            if len(g):
                color, marker = style[lab]
                ax.plot(g["side"], g["voxels_per_s"], color=color, marker=marker, ms=7)
        _side_axis(ax, list(sub["side"]), short=True)
        _log_axis(ax, "y")
        ax.set_ylabel("throughput (voxels/s)")
        ax.set_title(f"{phase} step", fontsize=10)
    if phases:
        handles = _model_handles(run, set(ok["label"]))
        axes[len(phases) - 1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                     borderaxespad=0)
    fig.suptitle(title, fontsize=11)
    src = f"voxels_per_s from the {_timing_note(run)}; measured rows only (device: {_devices(run)})."
    _footer(fig, src)
    caption = "Voxels of the volume processed per second (higher is better). Source: " + src
    return _done("fig-throughput", title, caption, fig, None if phases else NO_THROUGHPUT)


def _devices(run: RunData) -> str:
    names = [n for n in dict.fromkeys(run.frame["device_name"]) if n] or \
            [n for n in dict.fromkeys(run.frame["device"]) if n]
    return ", ".join(names) or str(run.meta.get("device_name") or run.meta.get("device") or "unknown")


def tradeoff_figure(run: RunData) -> Figure:
    """Median training step time (s) vs measured peak training memory, bars = IQR, points labelled by size."""
    title = "Step time vs peak memory (training)"
    ok = run.frame[(run.frame["status"] == "ok") & (run.frame["phase"] == "train")
                   & (run.frame["peak_mem_bytes"] > 0) & (run.frame["step_time_s"] > 0)]
    style = _style(run)
    fig, (ax,) = _new()
    if not len(ok):
        _empty(ax, NO_TRADEOFF)
    for lab in run.labels:
        g = ok[ok["label"] == lab].sort_values("side")
        if not len(g):
            continue
        color, marker = style[lab]
        iqr = g["step_time_iqr_s"].fillna(0).clip(lower=0)
        x = g["peak_mem_bytes"] / GiB
        low = (g["step_time_s"] - iqr / 2).clip(lower=g["step_time_s"] * 0.01)
        ax.errorbar(x, g["step_time_s"], yerr=[g["step_time_s"] - low, iqr / 2], color=color, marker=marker, ms=7,
                    capsize=3, lw=1.3, label=_legend_text(lab))
        for xi, yi, s in zip(x, g["step_time_s"], g["size"]):
            ax.annotate(_mpl_text(size_text(s)), (xi, yi), xytext=(5, 4), textcoords="offset points", fontsize=7,
                        color=color)
    if len(ok):
        _log_axis(ax, "x", gib=True)
        _log_axis(ax, "y")
        ax.set_xlabel("measured peak memory per training step")
        ax.set_ylabel("step time, median (s)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title, fontsize=11)
    src = (f"memory: {_mem_sources(run, ('train',))}; time: {_timing_note(run)}; bars span the IQR, drawn "
           "symmetric about the median.")
    _footer(fig, src)
    caption = ("Each point is one measured (model, size) training step: lower-left is better. Source: " + src)
    return _done("fig-tradeoff", title, caption, fig, None if len(ok) else NO_TRADEOFF)


def sampling_figure(run: RunData) -> Figure:
    """Peak sampling memory vs volume side (solid), with the training step of the same model dashed and
    faint, so a patch-trained model (PatchDDM) shows its train-on-patch vs sample-whole-volume gap."""
    title = "Sampling memory vs volume side (training dashed)"
    sample = memory_cells(run.frame, "sample")
    train = memory_cells(run.frame, "train")
    style = _style(run)
    fig, (ax,) = _new(height=5.4)
    drawn = False
    handles = []
    fails_at: dict[float, int] = {}
    patch_models = _patch_models(run)
    for lab in run.labels:
        color, marker = style[lab]
        if _mem_series(ax, sample, lab, color, marker, fails_at=fails_at):
            drawn = True
            text = lab + (" (trains on patches)" if lab in patch_models else "")
            handles.append(Line2D([], [], color=color, marker=marker, label=_legend_text(text, 48)))
            _mem_series(ax, train, lab, color, marker, ls=(0, (4, 2)), alpha=0.35, size=5, fail_marks=False)
    if not drawn:
        _empty(ax, NO_SAMPLING)
    else:
        _side_axis(ax, [c.side for c in list(sample.values()) + list(train.values())])
        _gpu_lines(ax)
        _log_axis(ax, "y", gib=True)
        ax.set_ylabel("peak memory per step")
        handles += [
            Line2D([], [], color="#333333", marker="o", ls="-", label="sampling step (measured filled)"),
            Line2D([], [], color="#333333", marker="o", ls="--", alpha=0.35, ms=5, label="training step"),
        ]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title, fontsize=11)
    src = (f"measured = {_mem_sources(run, ('sample',))} peak of one denoising step on the whole volume; "
           f"hollow = predicted (FakeTensorMode); {_context_note(run)}.")
    _footer(fig, src)
    patch_txt = (f" {', '.join(patch_models)} train(s) on patches, so the training curve (faint, dashed) sits "
                 "below the sampling curve: sampling runs the network on the whole volume.") if patch_models else ""
    caption = ("Solid: one sampling (denoising) step on the whole volume; faint dashed: one training step of the "
               "same model." + patch_txt + " Source: " + src)
    return _done("fig-sampling", title, caption, fig, None if drawn else NO_SAMPLING)


def _patch_models(run: RunData) -> list[str]:
    """Labels whose training network sees a smaller shape than the volume (patch-based training)."""
    out = []
    tr = run.frame[(run.frame["phase"] == "train") & (run.frame["net_shape"] != "")]
    for lab, g in tr.groupby("label", sort=False):
        for shape, size in zip(g["net_shape"], g["size"]):
            norm = shape.replace(",", "x").replace("(", "").replace(")", "").replace(" ", "")
            if size_text(norm) != size_text(size):
                out.append(lab)
                break
    return [lab for lab in run.labels if lab in out]


def all_figures(run: RunData) -> list[Figure]:
    """The five figures, in page order."""
    return [memory_figure(run), energy_figure(run), throughput_figure(run), tradeoff_figure(run),
            sampling_figure(run)]
