"""The report's scaling section: the rows of data-parallel groups (``run_bench.py --nproc N``), when a run has
them (:attr:`~.data.RunData.parallel`; one row per rank).

* **Summary**, one line per (model, size, world size): the group's throughput (world size x batch x voxels
  the network processes / the slowest rank's median step: a synchronous step ends for every rank when the
  last gradients arrive), its speed-up over the same training step in one process (the run's single-process
  training row of that model and size; none when the run has none) and the scaling efficiency (speed-up /
  world size; 1 = linear), the largest per-rank peak memory with DDP's gradient buckets in it, the slowest
  rank's step time and the largest share of a step spent all-reducing gradients (a synced step against a
  ``no_sync()`` step, alternated).
* **Every rank's row** with its own peak memory, buckets, step times and status.
* **Figure**: group throughput vs world size (with the linear-scaling line from one process), and per-rank
  peak memory vs world size (every rank a point).

Per-rank memory is per process -- per GPU on CUDA -- and includes DDP's gradient buckets (about the
parameters' bytes: ``ddp_bucket_bytes``); throughput is the whole group's. Every figure here is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from .data import RunData, size_order, size_text
from .plotting import (
    Figure, Omitted, finish, footer, legend_text, log_axis, model_style, new, outside_legend, provenance_handles,
    series,
)
from .tables import Table, _mem, status_class
from ..units import fmt_num, is_missing


@dataclass
class Scaling:
    """What the page shows of a run's data-parallel rows: an introduction, the figure (or why it is left
    out), the summary table and every rank's row."""

    intro: str
    figure: Figure | None
    omitted: Omitted | None
    summary: Table
    ranks: Table


def _num(v: object) -> float | None:
    return None if is_missing(v) else float(v)  # type: ignore[arg-type]


def single_process(run: RunData) -> dict[tuple[str, str], pd.Series]:
    """(label, size) -> the measured single-process training row (the last one, as a resumed sweep re-measures)."""
    f = run.frame
    ok = f[(f["phase"] == "train") & (f["status"] == "ok") & (f["voxels_per_s"] > 0)]
    return {(r["label"], r["size"]): r for _, r in ok.sort_values("row_id").iterrows()}


def groups(run: RunData) -> list[dict]:
    """One record per (label, size, world size) of the data-parallel rows, in model, size, world-size order."""
    par = run.parallel
    if par is None or not len(par):
        return []
    base = single_process(run)
    labels = {lab: i for i, lab in enumerate(run.labels or list(dict.fromkeys(par["label"])))}
    sizes = {s: i for i, s in enumerate(size_order(pd.concat([run.frame, par])))}
    out = []
    for (lab, size, ws), g in par.groupby(["label", "size", "world_size"], sort=False):
        ok = g[g["status"] == "ok"]
        bad = g[g["status"] != "ok"]  # an out-of-memory rank first: its partners' errors only follow from it
        bad = bad.assign(_oom=bad["status"] != "oom").sort_values(["_oom", "rank"])
        one = base.get((lab, size))
        t1 = _num(one["group_voxels_per_s"]) or _num(one["voxels_per_s"]) if one is not None else None
        tput = _num(ok["group_voxels_per_s"].max()) if len(ok) == len(g) else None
        speedup = tput / t1 if tput and t1 else None
        out.append({
            "label": lab, "size": size, "world_size": int(ws), "ranks": len(g), "ok": len(ok) == len(g),
            "throughput": tput, "single": t1, "speedup": speedup,
            "efficiency": speedup / int(ws) if speedup else None,
            "peak": _num(ok["peak_mem_bytes"].max()) if len(ok) else None,
            "single_peak": _num(one["peak_mem_bytes"]) if one is not None else None,
            "buckets": _num(ok["ddp_bucket_bytes"].max()) if len(ok) else None,
            "step": _num(ok["step_time_s"].max()) if len(ok) else None,
            "share": _num(ok["allreduce_share"].max()) if len(ok) else None,
            "status": "ok" if not len(bad) else str(bad.iloc[0]["status"]),
            "why": "" if not len(bad) else str(bad.iloc[0]["error"]).strip(),
            "rank_peaks": [float(v) for v in ok["peak_mem_bytes"] if not is_missing(v)],
            "_order": (labels.get(lab, len(labels)), sizes.get(size, len(sizes)), int(ws)),
        })
    return sorted(out, key=lambda r: r["_order"])


def summary_table(run: RunData) -> Table:
    rows, classes = [], []
    for g in groups(run):
        rows.append([
            g["label"], size_text(g["size"]), str(g["world_size"]), g["status"],
            fmt_num(g["throughput"] / 1e6) if g["throughput"] else "",
            fmt_num(g["single"] / 1e6) if g["single"] else "",
            fmt_num(g["speedup"]) if g["speedup"] else "",
            f"{100 * g['efficiency']:.0f} %" if g["efficiency"] else "",
            _mem(g["peak"]), _mem(g["single_peak"]), _mem(g["buckets"]),
            fmt_num(g["step"]), f"{100 * g['share']:.0f} %" if g["share"] is not None else "", g["why"],
        ])
        classes.append(status_class(g["status"]))
    header = ["model", "volume (voxels)", "world size", "status", "group throughput (Mvoxel/s)",
              "1 process (Mvoxel/s)", "speed-up", "scaling efficiency", "peak memory per rank (largest)",
              "1 process peak", "DDP buckets per rank", "step time, slowest rank (s)", "all-reduce share", "error"]
    if not any(r[-1] for r in rows):  # no group failed: no error column
        header, rows = header[:-1], [r[:-1] for r in rows]
    return Table(
        header=header, rows=rows, numeric={2, 4, 5, 6, 7, 8, 9, 10, 11, 12}, row_classes=classes, wrap={13},
        caption=("training step of every data-parallel group (measured); speed-up and efficiency against the "
                 "single-process training row of the same model and size in this run"),
    )


def ranks_table(run: RunData) -> Table:
    par = run.parallel if run.parallel is not None else pd.DataFrame()
    order = {(g["label"], g["size"], g["world_size"]): i for i, g in enumerate(groups(run))}
    par = par.assign(_o=[order.get((r["label"], r["size"], int(r["world_size"])), 0) for _, r in par.iterrows()])
    par = par.sort_values(["_o", "rank", "row_id"])
    rows = [[r["label"], size_text(r["size"]), f"{int(r['rank'])} of {int(r['world_size'])}", r["status"],
             _mem(r["peak_mem_bytes"]), r["mem_source"], _mem(r["ddp_bucket_bytes"]), _mem(r["activation_bytes"]),
             fmt_num(r["step_time_s"]), fmt_num(r["nosync_step_time_s"]),
             "" if is_missing(r["allreduce_share"]) else f"{100 * float(r['allreduce_share']):.1f} %",
             fmt_num(r["voxels_per_s"] / 1e6) if _num(r["voxels_per_s"]) else "", r["device_name"] or r["device"],
             " · ".join(x for x in (str(r["error"]).strip(), str(r["notes"]).strip()) if x)]
            for _, r in par.iterrows()]
    return Table(
        header=["model", "volume (voxels)", "rank", "status", "peak memory", "memory source", "DDP buckets",
                "activations", "step time (s)", "no_sync step (s)", "all-reduce share", "rank throughput (Mvoxel/s)",
                "device", "error · notes"],
        rows=rows, numeric={4, 6, 7, 8, 9, 10, 11}, row_classes=[status_class(s) for s in par["status"]], wrap={13},
        caption=f"all {len(rows)} row(s) of data-parallel groups, one per rank",
    )


def _ws_axis(ax, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(sizes))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
    ax.set_xlabel("world size (processes; GPUs on CUDA)")
    ax.grid(True, which="major", axis="x", alpha=0.3)


def scaling_figure(run: RunData) -> Figure | Omitted:
    """Group throughput and per-rank peak memory vs world size, a series per (model, size); measured rows only."""
    key, title = "fig-scaling", "Data-parallel scaling (training)"
    done = [g for g in groups(run) if g["ok"] and g["throughput"]]
    if not done:
        return Omitted(key, title, "no data-parallel group finished with every rank ok")
    style = model_style(run.labels or list(dict.fromkeys(g["label"] for g in done)))
    fig, (ax_t, ax_m) = new(2, height=5.0)
    handles, sizes_seen = [], [1]
    for (lab, size) in dict.fromkeys((g["label"], g["size"]) for g in done):
        mine = [g for g in done if (g["label"], g["size"]) == (lab, size)]
        color, marker = style.get(lab, ("#333333", "o"))
        t = [(float(g["world_size"]), g["throughput"], "measured") for g in mine]
        m = [(float(g["world_size"]), g["peak"], "measured") for g in mine]
        one = mine[0]
        if one["single"]:
            t.append((1.0, one["single"], "measured"))
            ws_max = max(g["world_size"] for g in mine)
            ax_t.plot([1, ws_max], [one["single"], one["single"] * ws_max], color="#999999", lw=0.8, zorder=0)
        if one["single_peak"]:
            m.append((1.0, one["single_peak"], "measured"))
        series(ax_t, t, color, marker)
        series(ax_m, m, color, marker)
        for g in mine:
            ax_m.plot([g["world_size"]] * len(g["rank_peaks"]), g["rank_peaks"], ls="none", marker=marker, ms=4,
                      color=color, alpha=0.35, zorder=2)
        sizes_seen += [g["world_size"] for g in mine]
        handles.append(Line2D([], [], color=color, marker=marker, ls="-", label=legend_text(f"{lab} {size_text(size)}", 48)))
    for ax in (ax_t, ax_m):
        _ws_axis(ax, sizes_seen)
    log_axis(ax_t, "y")
    ax_t.set_ylabel("group throughput (voxels / s)")
    ax_t.set_title("whole group (grey: linear from 1 process)", fontsize=9)
    log_axis(ax_m, "y", nbytes=True)
    ax_m.set_ylabel("peak memory per rank")
    ax_m.set_title("each rank (faint: every rank; line: the largest)", fontsize=9)
    outside_legend(ax_m, handles + provenance_handles(["measured"]))
    fig.suptitle(title, fontsize=11)
    sources = ", ".join(dict.fromkeys(s for s in run.parallel["mem_source"] if s)) if run.parallel is not None else ""
    src = (f"group_voxels_per_s = world size × batch × voxels / the slowest rank's synchronised median step; "
           f"peak_mem_bytes per rank ({sources or 'no memory source'}), DDP's gradient buckets included; world size 1 "
           "= the single-process training row of the same model and size.")
    footer(fig, src)
    return finish(key, title, "Left: higher is better, the grey line is perfect linear scaling. Right: memory "
                  "one process (one GPU) needs. Source: " + src, fig)


def scaling_section(run: RunData) -> Scaling | None:
    """The section, or None when the run has no data-parallel rows."""
    par = run.parallel
    if par is None or not len(par):
        return None
    fig = scaling_figure(run)
    sizes = sorted({int(w) for w in par["world_size"]})
    intro = (f"{len(par)} row(s) of data-parallel training (DistributedDataParallel under torchrun; world size "
             f"{', '.join(map(str, sizes))}), one per rank. Each rank's peak memory is that process's own -- one GPU's "
             "on CUDA -- and includes DDP's gradient buckets (about one copy of the parameters); throughput is the "
             "whole group's; the all-reduce share is the part of a step that gradient communication adds (a synced "
             "step against a no_sync() step). Sampling rows stay single-process and are in the tables below.")
    return Scaling(intro, fig if isinstance(fig, Figure) else None, fig if isinstance(fig, Omitted) else None,
                   summary_table(run), ranks_table(run))
