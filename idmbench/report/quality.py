"""The quality section: does the lighter model still learn, and at what cost?

Read from a quality run's files (``python run_bench.py quality``), never from live objects:

* ``quality.csv`` — one row per (model, evaluation timestep t): PSNR (dB), 3D SSIM and MAE of x̂₀ against
  x₀ on held-out volumes (mean ± standard deviation over volumes × noise draws, on the data range the row
  states), and the model's training cost (wall time, energy with its source, energy per parameter, peak
  memory with its source). Two tables: the scores, one row per (model, t); the cost, one row per model.
* ``training.csv`` — the loss curve of every model: the raw per-step loss faint, its moving mean bold.
* ``samples/<model>_sample<k>.png`` — middle axial, coronal and sagittal slices of generated samples,
  inlined in model, then sample order.
* quality beside cost — PSNR and SSIM at one evaluation timestep against peak training memory and
  training joules, in the page's one vocabulary (a codecarbon estimate drawn half-filled and dashed).
"""

from __future__ import annotations

import base64
from typing import Any

import pandas as pd
from matplotlib.ticker import MaxNLocator

from .data import RunData, size_text
from .plotting import (FAINT, Figure, Omitted, finish, footer, log_axis, model_style, new, outside_legend, point,
                       provenance_handles)
from .tables import Table
from ..units import MiB, fmt_bytes, fmt_num, is_missing

#: at most this many sample images are inlined (each is a base64 copy of the PNG)
MAX_SAMPLES = 48
#: and none bigger than this (bytes)
MAX_SAMPLE_BYTES = 2 * MiB
ESTIMATE = "codecarbon-estimate"
MEASURED_ENERGY = ("nvml", "codecarbon-rapl")


def _labelled(q: pd.DataFrame) -> pd.DataFrame:
    """quality.csv or training.csv with a ``label``: the model, or ``model [preset]`` when a model ran with
    several presets."""
    q = q.copy()
    if "preset" not in q.columns:
        q["preset"] = ""
    presets = q.groupby("model")["preset"].nunique()
    q["label"] = [f"{m} [{p}]" if presets.get(m, 1) > 1 else m for m, p in zip(q["model"], q["preset"])]
    return q


def _models(run: RunData, q: pd.DataFrame) -> list[str]:
    listed = run.quality_meta.get("models")
    order = [str(m) for m in listed] if isinstance(listed, list) else []
    labels = list(dict.fromkeys(q["label"]))
    out = [lab for m in order for lab in labels if lab == m or lab.startswith(m + " [")]
    return list(dict.fromkeys(out + labels))


def _ok_rows(run: RunData) -> pd.DataFrame | None:
    q = run.quality
    if q is None or not len(q) or "model" not in q.columns:
        return None
    q = _labelled(q)
    if "status" in q.columns:
        q = q[q["status"].fillna("ok").replace("", "ok") == "ok"]
    return q


def _pm(mean: object, std: object, sig: int, n: int) -> str:
    """``mean ± std``; the spread only when it was taken over more than one value."""
    if is_missing(mean):
        return ""
    text = fmt_num(mean, sig)
    return text if is_missing(std) or n <= 1 else f"{text} ± {fmt_num(std, 2)}"


def _get(rec: pd.Series, col: str) -> Any:
    return rec[col] if col in rec.index else None


def scores_table(run: RunData) -> Table | None:
    """One row per (model, t): PSNR, SSIM, MAE as mean ± std, and what they were averaged over."""
    q = _ok_rows(run)
    if q is None or not len(q) or "t" not in q.columns:
        return None
    q = q.drop_duplicates(["label", "t"], keep="last")  # a resumed run re-scores: the later row wins
    order = {lab: i for i, lab in enumerate(_models(run, q))}
    q = q.assign(_o=q["label"].map(order)).sort_values(["_o", "t"])
    rows = []
    for _, r in q.iterrows():
        n_vol, n_noise = _get(r, "n_volumes"), _get(r, "n_noise")
        known = not is_missing(n_vol) and not is_missing(n_noise)
        over = f"{int(n_vol)} × {int(n_noise)}" if known else ""
        n = int(n_vol) * int(n_noise) if known else 2
        rows.append([r["label"], f"{int(r['t'])}" if not is_missing(r["t"]) else "",
                     _pm(r.get("psnr"), _get(r, "psnr_std"), 4, n), _pm(r.get("ssim"), _get(r, "ssim_std"), 3, n),
                     _pm(r.get("mae"), _get(r, "mae_std"), 3, n), over,
                     f"{float(_get(r, 'data_range')):g}" if not is_missing(_get(r, "data_range")) else ""])
    header = ["model", "timestep t", "PSNR (dB)", "SSIM", "MAE", "volumes × noise draws", "data range"]
    return Table(header=header, rows=rows, numeric=set(range(1, 7)),
                 caption="denoising of held-out volumes at fixed timesteps: x̂₀ from one prediction of the "
                         "model against x₀; mean ± standard deviation over volumes × noise draws")


def cost_table(run: RunData) -> Table | None:
    """One row per model: the training budget and what it cost."""
    q = _ok_rows(run)
    if q is None or not len(q):
        return None
    q = q.drop_duplicates("label", keep="last")
    order = {lab: i for i, lab in enumerate(_models(run, q))}
    q = q.assign(_o=q["label"].map(order)).sort_values("_o")
    rows = []
    for _, r in q.iterrows():
        def cell(col: str, fn=fmt_num) -> str:
            v = _get(r, col)
            return "" if is_missing(v) else fn(v)

        energy_src = str(_get(r, "energy_source") or "")
        mem_src = str(_get(r, "mem_source") or "")
        energy = cell("train_energy_j")
        rows.append([
            r["label"], str(_get(r, "preset") or ""), cell("params", lambda v: fmt_num(float(v) / 1e6)),
            size_text(str(_get(r, "size") or "")), cell("train_steps", lambda v: f"{int(v):,}"), cell("batch", lambda v: f"{int(v)}"),
            cell("train_time_s"), energy + (f" ({energy_src})" if energy and energy_src else ""),
            cell("energy_per_param_j", lambda v: fmt_num(v, 3)),
            cell("peak_train_mem_bytes", lambda v: fmt_bytes(v, None, True)) + (f" ({mem_src})" if mem_src else ""),
            cell("final_loss", lambda v: fmt_num(v, 3)),
        ])
    header = ["model", "preset", "parameters (M)", "volume", "training steps", "batch", "training time (s)",
              "training energy (J, source)", "energy per parameter (J)", "peak training memory (source)",
              "final loss"]
    return Table(header=header, rows=rows, numeric={2, 4, 5, 6, 7, 8, 9, 10},
                 caption="the identical training budget of every model and what it cost; energy and memory name "
                         "their source (codecarbon-estimate: TDP × load, not a measurement)")


def errors_table(run: RunData) -> Table | None:
    q = run.quality
    if q is None or "status" not in q.columns:
        return None
    bad = q[~q["status"].fillna("").isin(("ok", ""))]
    if not len(bad):
        return None
    return Table(header=["model", "preset", "timestep t", "status", "error"],
                 rows=[[str(r["model"]), str(_get(r, "preset") or ""), "" if is_missing(_get(r, "t")) else
                        f"{int(r['t'])}", str(r["status"]), str(_get(r, "error") or "").strip() or "(none recorded)"]
                       for _, r in bad.iterrows()],
                 row_classes=["status-error failed"] * len(bad),
                 caption=f"{len(bad)} quality row(s) with no score")


def quality_notes(run: RunData) -> list[str]:
    """What a reader must know before comparing the scores (the held-out set, an unfinished run)."""
    m, out = run.quality_meta, []
    if m.get("heldout_is_train") is True:
        out.append("Fewer than two volumes: the held-out set is the training set, so these scores measure fit, "
                   "not generalisation.")
    status = m.get("status")
    if status in ("running", "interrupted"):
        out.append(f"The quality run is {status}: the tables hold what was scored so far.")
    return out


def quality_facts(run: RunData) -> list[tuple[str, str]]:
    """(name, value) lines on the quality run from run.json's ``quality`` object."""
    m = run.quality_meta

    def get(key: str) -> str:
        v = m.get(key)
        if v is None or v == "" or v == []:
            return ""
        return ", ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)

    data = get("data")
    if data and get("modalities") and get("modalities") != data:
        data += f" (modalities {get('modalities')})"
    split = " / ".join(x for x in (get("n_train"), get("n_heldout")) if x)
    return [(k, v) for k, v in (
        ("command", get("command")), ("data", data), ("volumes: training / held-out", split),
        ("size", get("size")), ("training steps, batch, lr", ", ".join(x for x in (get("train_steps"), get("batch"),
                                                                                  get("lr")) if x)),
        ("evaluation timesteps", get("eval_t")), ("samples (DDIM steps)", " ".join(
            x for x in (get("samples"), f"({get('sample_steps')})" if get("sample_steps") else "") if x)),
        ("device, precision", ", ".join(x for x in (get("device"), get("precision")) if x)),
        ("seed", get("seed")), ("status", get("status")),
    ) if v]


def loss_figure(run: RunData) -> Figure | Omitted:
    """Training loss per step, per model: raw faint, moving mean bold."""
    key, title = "fig-loss", "Training loss per step"
    t = run.training
    if t is None or not len(t) or not t["loss"].notna().any():
        return Omitted(key, title, "no training.csv with losses in this folder")
    t = _labelled(t.dropna(subset=["step", "loss"]))
    labels = _models(run, t)
    style = model_style(labels)
    fig, (ax,) = new(height=4.8)
    windows = []
    for lab in labels:
        g = t[t["label"] == lab].sort_values("step")
        color = style[lab][0]
        win = max(1, len(g) // 20)
        windows.append(win)
        ax.plot(g["step"], g["loss"], color=color, lw=0.8, alpha=FAINT)
        ax.plot(g["step"], g["loss"].rolling(win, min_periods=1).mean(), color=color, lw=1.8, label=lab)
    if (t["loss"] > 0).all():
        log_axis(ax, "y")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (ε-prediction MSE)" if _prediction_is_eps(run) else "training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_title(title, fontsize=11)
    src = f"training.csv, every step logged as it ran; bold = moving mean over {max(windows)} step(s), faint = raw."
    footer(fig, src)
    return finish(key, title, "Every model trains on the identical budget (steps, batch, learning rate, seed, "
                  "data order). Each curve is the model's own training loss (the MSE of what it predicts: noise, or "
                  "the clean volume for an x₀-predicting model), so compare the shapes of the curves, not their "
                  "levels across prediction targets. Source: " + src, fig)


def _prediction_is_eps(run: RunData) -> bool:
    preds = {str(i.get("prediction", "")) for i in run.model_info.values()}
    return preds <= {"epsilon", "eps", ""} and bool(preds - {""})


def eval_t(q: pd.DataFrame) -> float | None:
    """The evaluation timestep the quality-vs-cost view uses: the median of the timesteps scored by the most
    models (ties to the smaller)."""
    if "t" not in q.columns or not q["t"].notna().any():
        return None
    counts = q.dropna(subset=["t"]).groupby("t")["label"].nunique()
    best = sorted(t for t, n in counts.items() if n == counts.max())
    return best[(len(best) - 1) // 2]


def cost_figure(run: RunData) -> Figure | Omitted:
    """PSNR and SSIM (rows) against peak training memory and training energy (columns), a point per model."""
    key, title = "fig-quality-cost", "Quality beside cost"
    q = _ok_rows(run)
    if q is None or not len(q) or not {"psnr", "ssim"} <= set(q.columns):
        return Omitted(key, title, "no scored quality rows in quality.csv")
    t = eval_t(q)
    if t is None:
        return Omitted(key, title, "quality.csv has no evaluation timestep t")
    at = q[q["t"] == t].drop_duplicates("label", keep="last")
    def usable(r: pd.Series, xcol: str) -> bool:
        x = _get(r, xcol)
        if is_missing(x) or float(x) <= 0:
            return False
        return xcol != "train_energy_j" or str(_get(r, "energy_source") or "") in MEASURED_ENERGY + (ESTIMATE,)

    xs = [(c, name, nbytes) for c, name, nbytes in
          (("peak_train_mem_bytes", "peak training memory", True), ("train_energy_j", "training energy (J)", False))
          if any(usable(r, c) for _, r in at.iterrows())]
    if not xs:
        return Omitted(key, title, "quality.csv records neither peak training memory nor training energy")
    labels = _models(run, at)
    style = model_style(labels)
    fig, axes = new(len(xs), height=6.4, nrows=2)
    kinds: set[str] = set()
    for row, (metric, name) in enumerate((("psnr", "PSNR (dB)"), ("ssim", "SSIM"))):
        for col, (xcol, xname, nbytes) in enumerate(xs):
            ax = axes[row * len(xs) + col]
            for _, r in at.iterrows():
                y = r[metric]
                if not usable(r, xcol) or is_missing(y):
                    continue
                x = float(_get(r, xcol))
                kind = "estimate" if xcol == "train_energy_j" and _get(r, "energy_source") == ESTIMATE else "measured"
                kinds.add(kind)
                color, marker = style[r["label"]]
                std = _get(r, f"{metric}_std")
                if not is_missing(std):
                    ax.errorbar([x], [y], yerr=[std], color=color, ls="none", capsize=3, lw=1)
                point(ax, x, float(y), color, marker, kind, ms=8)
            log_axis(ax, "x", nbytes=nbytes)
            ax.set_xlabel(xname if row == 1 else "")
            ax.set_ylabel(name if col == 0 else "")
            ax.grid(True, alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=style[lab][0], marker=style[lab][1], ls="none", label=lab) for lab in labels]
    outside_legend(axes[len(xs) - 1], handles + provenance_handles(sorted(kinds)))
    fig.suptitle(f"{title} (scores at t = {int(t)})", fontsize=11)
    srcs = ", ".join(dict.fromkeys(str(s) for s in at.get("energy_source", pd.Series(dtype=str)) if str(s)))
    src = (f"quality.csv at t = {int(t)}; memory: {', '.join(dict.fromkeys(str(s) for s in at.get('mem_source', [])))}"
           f"; energy: {srcs or 'none'} (codecarbon-estimate = TDP × load, not measured).")
    footer(fig, src)
    return finish(key, title, "Up and to the left is better: more quality for less memory or energy. Bars: ± one "
                  "standard deviation over volumes × noise draws. Source: " + src, fig)


def sample_images(run: RunData) -> tuple[list[tuple[str, str]], str]:
    """(name, data URI) of the sample slices to inline, in model then sample order, and a note on any left out."""
    out, skipped = [], 0
    for p in run.samples:
        if len(out) >= MAX_SAMPLES:
            skipped += 1
            continue
        try:
            data = p.read_bytes()
        except OSError:
            skipped += 1
            continue
        if len(data) > MAX_SAMPLE_BYTES or not data.startswith(b"\x89PNG\r\n\x1a\n"):
            skipped += 1
            continue
        out.append((p.name, "data:image/png;base64," + base64.b64encode(data).decode("ascii")))
    note = f"{skipped} sample image(s) not inlined (over {MAX_SAMPLES} images, over 2 MiB, or not a PNG)." \
        if skipped else ""
    return out, note
