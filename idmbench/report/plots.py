"""The sweep's figures (drawn in the one vocabulary of :mod:`.plotting`; a figure with nothing to draw is
left out with a one-line reason):

1. peak training memory vs volume side (log–log; GPU memory sizes as grey lines);
2. sampling memory vs volume side, the training step faint behind it (PatchDDM trains on patches but
   samples whole volumes);
3. step time vs peak training memory (the trade-off; measured rows only);
4. throughput vs volume side: voxels the network processes per second;
5. energy per step vs volume side — unless every energy figure is codecarbon's TDP × load estimate: then
   energy per step is step time × a constant power, and the page says so with the watts the rows imply
   (J/step ÷ s/step) instead of drawing the same curve twice.
"""

from __future__ import annotations

import statistics

from matplotlib.lines import Line2D

from .data import MemCell, RunData, memory_cells, size_text
from .plotting import (FAINT, Figure, Omitted, finish, footer, gpu_lines, log_axis, model_handles, model_style, mpl_text,
                       new, outside_legend, per_phase_figure, point, provenance_handles, series, side_axis)
from .tables import THROUGHPUT_MEANING
from ..units import fmt_num

ESTIMATE_SOURCE = "codecarbon-estimate"


def _mem_series(ax, cells: dict[tuple[str, str], MemCell], lab: str, color: str, marker: str, *,
                alpha: float = 1.0, ms: float = 7.0, fail_marks: bool = True,
                fails_at: dict[float, int] | None = None) -> set[str]:
    """Draw one model's memory curve (y in bytes); return the provenance kinds drawn (plus "failed")."""
    mine = sorted(((c.side, c) for (lab2, _), c in cells.items() if lab2 == lab and c.side == c.side),
                  key=lambda t: t[0])
    pts = [(side, float(c.bytes), "measured" if c.measured else "predicted")
           for side, c in mine if c.bytes and c.bytes > 0 and not c.failed]
    series(ax, pts, color, marker, alpha=alpha, ms=ms)
    kinds = {p[2] for p in pts}
    for side, c in mine:
        if c.measured and c.predicted and c.predicted > 0:  # the prediction at a measured size: a hollow ring
            point(ax, side, c.predicted, color, marker, "predicted", alpha=0.6 * alpha, ms=ms + 4, zorder=2)
            kinds.add("predicted")
        if c.failed and c.bytes and c.bytes > 0:  # a failure that still has a prediction
            point(ax, side, c.bytes, color, marker, "predicted", alpha=alpha, ms=ms)
            kinds.add("predicted")
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
            kinds.add("failed")
    return kinds


def _mem_sources(run: RunData, phases: tuple[str, ...]) -> str:
    sub = run.frame[run.frame["phase"].isin(phases) & (run.frame["status"] == "ok")]
    srcs = [s for s in dict.fromkeys(sub["mem_source"]) if s and s != "predicted"]
    return ", ".join(srcs)


def _measured_text(run: RunData, phase: str, what: str) -> str:
    srcs = _mem_sources(run, (phase,))
    return f"measured = {srcs} peak of {what}" if srcs else f"nothing measured in the {phase} phase"


def _context_note(run: RunData) -> str:
    return "CUDA context not included in the points" if run.on_gpu else "no CUDA context (a CPU run)"


def _no_points(cells: dict[tuple[str, str], MemCell], phase: str) -> str:
    """Why a memory figure has nothing to draw ('' when it has): no row, or every row failed."""
    if any(c.bytes and c.bytes > 0 for c in cells.values()):
        return ""
    failed = [c.status for c in cells.values() if c.failed]
    if failed:
        counts = ", ".join(f"{failed.count(s)} {s}" for s in dict.fromkeys(failed))
        return f"every {phase} configuration failed ({counts}) and none has a prediction; see the failures table"
    return ""


def memory_figure(run: RunData) -> Figure | Omitted:
    """Peak training memory vs volume side, log–log, with grey lines at the GPU memory sizes."""
    key, title = "fig-memory", "Peak memory of one training step vs volume side"
    cells = memory_cells(run.frame, "train")
    if not cells or _no_points(cells, "training"):
        return Omitted(key, title, _no_points(cells, "training") or "no training rows in this run")
    fig, (ax,) = new(height=5.4)
    style = model_style(run.labels)
    kinds: set[str] = set()
    present = set()
    fails_at: dict[float, int] = {}
    for lab in run.labels:
        drawn = _mem_series(ax, cells, lab, *style[lab], fails_at=fails_at)
        if drawn:
            present.add(lab)
            kinds |= drawn
    side_axis(ax, [c.side for c in cells.values()])
    gpu_lines(ax)
    log_axis(ax, "y", nbytes=True)
    ax.set_ylabel("peak memory per training step")
    outside_legend(ax, model_handles(run, present) + provenance_handles(sorted(kinds), failed="failed" in kinds))
    ax.set_title(title, fontsize=11)
    src = (f"{_measured_text(run, 'train', 'one step')}; predicted = the same step under FakeTensorMode (live "
           f"tensors, no allocator fragmentation); {_context_note(run)}.")
    footer(fig, src)
    caption = ("A hollow ring around a filled point is the prediction at a measured size. Grey lines: GPU memory "
               "sizes (16/24/40/80 GiB). Source: " + src)
    return finish(key, title, caption, fig)


def sampling_figure(run: RunData) -> Figure | Omitted:
    """Peak sampling memory vs volume side, with the training step of the same model faint behind it, so a
    patch-trained model (PatchDDM) shows its train-on-patch vs sample-whole-volume gap."""
    key, title = "fig-sampling", "Sampling memory vs volume side (training step faint)"
    sample = memory_cells(run.frame, "sample")
    train = memory_cells(run.frame, "train")
    if not sample or _no_points(sample, "sampling"):
        return Omitted(key, title, _no_points(sample, "sampling") or
                       "no sampling rows in this run (--phases did not include sample?)")
    fig, (ax,) = new(height=5.4)
    style = model_style(run.labels)
    kinds: set[str] = set()
    present = set()
    fails_at: dict[float, int] = {}
    patch_models = patch_trained(run)
    for lab in run.labels:
        drawn = _mem_series(ax, sample, lab, *style[lab], fails_at=fails_at)
        if drawn:
            present.add(lab)
            kinds |= drawn
            _mem_series(ax, train, lab, *style[lab], alpha=FAINT, ms=5, fail_marks=False)
    side_axis(ax, [c.side for c in list(sample.values()) + list(train.values())])
    gpu_lines(ax)
    log_axis(ax, "y", nbytes=True)
    ax.set_ylabel("peak memory per step")
    handles = model_handles(run, present, lambda lab: " (trains on patches)" if lab in patch_models else "")
    handles += provenance_handles(sorted(kinds), failed="failed" in kinds)
    handles.append(Line2D([], [], color="#333333", marker="o", ms=5, alpha=FAINT, label="faint: training step"))
    outside_legend(ax, handles)
    ax.set_title(title, fontsize=11)
    src = (f"{_measured_text(run, 'sample', 'one denoising step on the whole volume')}; predicted = "
           f"FakeTensorMode; {_context_note(run)}.")
    footer(fig, src)
    patch_txt = (f" {', '.join(patch_models)} train(s) on patches, so the faint training curve sits below the "
                 "sampling curve: sampling runs the network on the whole volume.") if patch_models else ""
    caption = ("Main series: one sampling (denoising) step; faint: one training step of the same model."
               + patch_txt + " Source: " + src)
    return finish(key, title, caption, fig)


def patch_trained(run: RunData) -> list[str]:
    """Labels whose network sees a smaller shape in training than in sampling at the same volume (patch
    training), read from the rows' ``net_shape``; a model that runs at another shape in both phases (a
    wavelet model at half the side) is not patch-trained."""
    f = run.frame[run.frame["net_shape"] != ""]
    norm = {(lab, size, phase): size_text(shape.replace(",", "x").replace("(", "").replace(")", "").replace(" ", ""))
            for lab, size, phase, shape in zip(f["label"], f["size"], f["phase"], f["net_shape"])}
    out = []
    for (lab, size, phase), shape in norm.items():
        if phase != "train":
            continue
        other = norm.get((lab, size, "sample"), size_text(size))
        if shape != other and lab not in out:
            out.append(lab)
    return [lab for lab in run.labels if lab in out]


def _timing_note(run: RunData) -> str:
    steps, warm = run.meta.get("steps"), run.meta.get("warmup")
    bits = []
    if steps is not None:
        bits.append(f"{steps} timed step(s)")
    if warm is not None:
        bits.append(f"{warm} warm-up step(s) excluded")
    return "synchronised wall-clock median" + (" over " + ", ".join(bits) if bits else "")


def _devices(run: RunData) -> str:
    names = [n for n in dict.fromkeys(run.frame["device_name"]) if n] or \
            [n for n in dict.fromkeys(run.frame["device"]) if n]
    return ", ".join(names) or str(run.meta.get("device_name") or run.meta.get("device") or "unknown")


def _measured(run: RunData, col: str):
    f = run.frame
    return f[(f["status"] == "ok") & (f[col] > 0) & (f["side"] > 0)]


def _nothing_measured(run: RunData) -> str:
    """The reason a measured-only figure is left out when no row of the run was measured, else ''."""
    if (run.frame["status"] == "ok").any():
        return ""
    return "nothing was measured in this run (every row was predicted or failed)"


def throughput_figure(run: RunData) -> Figure | Omitted:
    """Voxels the network processes per second vs volume side, a panel per phase; measured rows only."""
    key, title = "fig-throughput", "Throughput vs volume side"
    ok = _measured(run, "voxels_per_s")
    if not len(ok):
        return Omitted(key, title, _nothing_measured(run) or "no measured row has a throughput figure")
    src = f"voxels_per_s from the {_timing_note(run)}; measured rows only (device: {_devices(run)})."
    caption = f"Throughput = {THROUGHPUT_MEANING}; higher is better."
    return per_phase_figure(run, key=key, title=title, frame=ok, value="voxels_per_s", ylabel="voxels / s",
                            kind_of=lambda r: "measured", source=src, caption=caption)


def estimate_watts(run: RunData) -> list[float]:
    """The power each codecarbon-estimate row implies: energy per step ÷ step time (W), measured rows only."""
    ok = _measured(run, "energy_j_per_step")
    ok = ok[(ok["energy_source"] == ESTIMATE_SOURCE) & (ok["step_time_s"] > 0)]
    return [float(e / t) for e, t in zip(ok["energy_j_per_step"], ok["step_time_s"])]


def energy_sentence(run: RunData) -> str:
    """When every energy figure is codecarbon's estimate: one sentence with the watts the rows imply."""
    watts = estimate_watts(run)
    if not watts:
        return ""
    med, lo, hi = statistics.median(watts), min(watts), max(watts)
    spread = (f"{fmt_num(med)} W in every row" if hi - lo <= 0.02 * med else
              f"{fmt_num(lo)}–{fmt_num(hi)} W over {len(watts)} rows (median {fmt_num(med)} W)")
    return (f"Every energy figure in this run is codecarbon's TDP × load estimate (no power counter on this machine): "
            f"energy per step ÷ step time gives {spread}, so energy per step is the step time times an assumed "
            f"power and an energy plot would repeat the step-time figures; it is not drawn.")


def energy_figure(run: RunData) -> Figure | Omitted:
    """Energy per step (J) vs volume side, a panel per phase; codecarbon estimates in the estimate style."""
    key, title = "fig-energy", "Energy per step vs volume side"
    ok = _measured(run, "energy_j_per_step")
    if not len(ok):
        return Omitted(key, title, _nothing_measured(run) or
                       "no energy figures in this run (energy_source is none for every measured row)")
    if (ok["energy_source"] == ESTIMATE_SOURCE).all():
        return Omitted(key, title, energy_sentence(run))
    srcs = ", ".join(dict.fromkeys(ok["energy_source"]))
    src = (f"energy_source = {srcs}. nvml: GPU energy counter over a synchronised window of ≥ 1 s; codecarbon-rapl: "
           "CPU package counters; codecarbon-estimate: TDP × CPU load, an estimate, never a measurement.")
    caption = "Joules per step (one optimiser step in training, one denoising step in sampling)."
    return per_phase_figure(run, key=key, title=title, frame=ok, value="energy_j_per_step",
                            ylabel="energy per step (J)", source=src, caption=caption,
                            kind_of=lambda r: "estimate" if r["energy_source"] == ESTIMATE_SOURCE else "measured")


def tradeoff_figure(run: RunData) -> Figure | Omitted:
    """Median training step time (s) vs measured peak training memory, bars = IQR, points labelled by size."""
    key, title = "fig-tradeoff", "Step time vs peak memory (training)"
    f = run.frame
    ok = f[(f["status"] == "ok") & (f["phase"] == "train") & (f["peak_mem_bytes"] > 0) & (f["step_time_s"] > 0)]
    if not len(ok):
        return Omitted(key, title, _nothing_measured(run) or
                       "no measured training row has both a memory figure and a step time")
    style = model_style(run.labels)
    fig, (ax,) = new()
    for lab in run.labels:
        g = ok[ok["label"] == lab].sort_values("side")
        if not len(g):
            continue
        color, marker = style[lab]
        iqr = g["step_time_iqr_s"].fillna(0).clip(lower=0)
        low = (g["step_time_s"] - iqr / 2).clip(lower=g["step_time_s"] * 0.01)
        ax.errorbar(g["peak_mem_bytes"], g["step_time_s"], yerr=[g["step_time_s"] - low, iqr / 2], color=color,
                    marker=marker, ms=7, capsize=3, lw=1.3, ls="-")
        for xi, yi, s in zip(g["peak_mem_bytes"], g["step_time_s"], g["size"]):
            ax.annotate(mpl_text(size_text(s)), (xi, yi), xytext=(5, 4), textcoords="offset points", fontsize=7,
                        color=color)
    log_axis(ax, "x", nbytes=True)
    log_axis(ax, "y")
    ax.set_xlabel("measured peak memory per training step")
    ax.set_ylabel("step time, median (s)")
    outside_legend(ax, model_handles(run, set(ok["label"])) + provenance_handles(["measured"]))
    ax.set_title(title, fontsize=11)
    src = (f"memory: {_mem_sources(run, ('train',))}; time: {_timing_note(run)}; bars span the IQR, drawn "
           "symmetric about the median.")
    footer(fig, src)
    return finish(key, title, "Each point is one measured (model, size) training step: lower-left is better. "
                  "Source: " + src, fig)


def all_figures(run: RunData) -> tuple[list[Figure], list[Omitted]]:
    """The sweep's figures in page order, and those left out with why."""
    made = [memory_figure(run), sampling_figure(run), tradeoff_figure(run), throughput_figure(run),
            energy_figure(run)]
    return [f for f in made if isinstance(f, Figure)], [f for f in made if isinstance(f, Omitted)]
