"""Read a run folder into plain data for the report: results.csv (a sweep), run.json, budgets.csv, and a
quality run's quality.csv, training.csv and samples/.

The report reads only these files, never live objects, so any old run can be re-reported. A folder needs a
sweep (results.csv) or a quality run (quality.csv or training.csv), or both; every other file and key is
optional, and what could not be read is listed in ``RunData.notes`` so the page can say so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from idmbench.results import STATUS_OK, STATUS_PREDICTED, STATUSES, parse_size, read_rows

#: the model the headline compares against every other one
REFERENCE_MODEL = "idm"
#: statuses that mean "this configuration did not produce a measurement" (every known status but ok/predicted)
FAILED = tuple(s for s in STATUSES if s not in (STATUS_OK, STATUS_PREDICTED))
#: numeric columns of quality.csv (the quality run's agreed format)
QUALITY_NUMERIC = (
    "train_steps", "t", "psnr", "ssim", "mae", "psnr_std", "ssim_std", "mae_std", "n_volumes", "n_noise", "data_range",
    "params", "batch", "lr", "seed", "train_time_s", "train_energy_j", "energy_per_param_j", "peak_train_mem_bytes",
    "final_loss",
)
#: sample images are named <model>_sample<k>.png
SAMPLE_NAME = re.compile(r"^(?P<model>.+)_sample(?P<k>\d+)\.png$")
#: numeric columns of ResultRow (read as float, NaN when empty)
NUMERIC = (
    "params", "peak_mem_bytes", "predicted_peak_bytes", "step_time_s", "step_time_iqr_s", "voxels_per_s",
    "energy_j_per_step", "flops_per_step", "voxels", "batch", "steps", "warmup", "activation_bytes",
    "predicted_activation_bytes", "prediction_ratio", "reserved_bytes", "nvml_used_bytes", "rss_peak_bytes",
    "energy_window_s", "loss", "wall_s", "seed", "world_size", "rank", "group_voxels_per_s", "nosync_step_time_s",
    "allreduce_share", "ddp_bucket_bytes",
)
#: order of phases in tables and plots (others follow alphabetically)
PHASE_ORDER = ("train", "sample")


@dataclass
class RunData:
    """Everything the report shows, as read from ``run_dir``.

    ``frame`` has one row per results.csv row (every column of ``ResultRow``) plus:
    ``label`` (model, or ``model [preset]`` when a model ran with several presets), ``voxels_n``
    (voxels of the volume), ``side`` (cube side, or the cube root of the voxel count for a
    ``DxHxW`` size; voxels), ``size_order`` (sort key) and ``row_id`` (0-based row number in the CSV);
    it is empty (``has_sweep`` False) for a folder with a quality run only.

    ``quality`` is quality.csv (numbers as float, NaN when empty), ``training`` training.csv (model,
    preset, step, loss, seconds), ``samples`` the sample PNGs in model, then sample order;
    ``model_info`` is run.json's ``model_info`` (model -> what ``ModelSpec.describe`` wrote: description,
    family, settings, source, attention, recipe, prediction, network_input), empty for older runs;
    ``quality_meta`` is run.json's ``quality`` object.

    ``frame`` holds the single-process rows (``world_size`` 1, which every older results.csv has); the rows
    of data-parallel groups (``--nproc``, one per rank) are in ``parallel`` (same columns), shown by the
    scaling section (:mod:`.scaling`) only, so that no other figure mixes one rank's numbers with a
    single process's.
    """

    run_dir: Path
    frame: pd.DataFrame
    meta: dict[str, Any]
    budgets: pd.DataFrame | None = None
    quality: pd.DataFrame | None = None
    training: pd.DataFrame | None = None
    samples: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference: str = REFERENCE_MODEL
    has_sweep: bool = True
    model_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    quality_meta: dict[str, Any] = field(default_factory=dict)
    parallel: pd.DataFrame | None = None

    @property
    def labels(self) -> list[str]:
        """Model labels in run order (run.json's ``models`` first, then as they appear in the CSV)."""
        return model_order(self.frame, self.meta)

    @property
    def on_gpu(self) -> bool:
        """Whether any figure of this run involved a CUDA device (the sweep's rows, run.json, the quality run)."""
        devices = set(self.frame["device"]) | {str(self.meta.get("device") or ""),
                                               str(self.quality_meta.get("device") or "")}
        if self.quality is not None and "device" in self.quality.columns:
            devices |= {str(d) for d in self.quality["device"]}
        return any(d.startswith("cuda") for d in devices)

    @property
    def has_quality(self) -> bool:
        return (self.quality is not None and len(self.quality) > 0) or \
            (self.training is not None and len(self.training) > 0) or bool(self.samples)

    def finished(self) -> str:
        """When the run's data was complete, from the data itself (run.json, else the newest row's
        timestamp); '' when nothing says. The page shows this instead of the time it was built, so
        rebuilding a report from the same files gives the same bytes."""
        stamps = [str(x) for x in (self.meta.get("finished"), self.quality_meta.get("finished")) if x]
        if not stamps:
            for frame in (self.frame, self.quality):
                if frame is not None and "timestamp" in frame.columns:
                    stamps += [str(t) for t in frame["timestamp"] if isinstance(t, str) and t]
        return max(stamps) if stamps else ""


def _voxels(size: str, recorded: Any) -> float:
    if recorded is not None and not (isinstance(recorded, float) and math.isnan(recorded)) and recorded != "":
        try:
            if int(recorded) > 0:
                return float(int(recorded))
        except (TypeError, ValueError):
            pass
    try:
        d, h, w = parse_size(size)
    except ValueError:
        return math.nan
    return float(d * h * w)


def _side(size: str, voxels: float) -> float:
    try:
        d, h, w = parse_size(size)
    except ValueError:
        return voxels ** (1 / 3) if voxels == voxels else math.nan
    if d == h == w:
        return float(d)
    return float(d * h * w) ** (1 / 3)


def rows_frame(rows: list) -> pd.DataFrame:
    """A DataFrame of ``ResultRow`` objects with the derived columns described in ``RunData``."""
    from idmbench.results import COLUMNS

    df = pd.DataFrame([dataclasses.asdict(r) for r in rows], columns=COLUMNS)
    df["row_id"] = range(len(df))
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in ("model", "preset", "size", "phase", "status", "mem_source", "energy_source", "error", "notes",
                "net_shape", "device", "device_name"):
        df[col] = df[col].fillna("").astype(str)
    df["voxels_n"] = [_voxels(s, v) for s, v in zip(df["size"], df["voxels"])]
    df["side"] = [_side(s, v) for s, v in zip(df["size"], df["voxels_n"])]
    df["size_order"] = df["voxels_n"].fillna(float("inf"))
    presets_per_model = df.groupby("model")["preset"].nunique() if len(df) else pd.Series(dtype=int)
    df["label"] = [
        f"{m} [{p}]" if presets_per_model.get(m, 1) > 1 else m for m, p in zip(df["model"], df["preset"])
    ]
    return df


def model_order(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """Model labels in the order the run listed them, then any others in CSV order."""
    seen: list[str] = []
    models = meta.get("models") or []
    if isinstance(models, str):
        models = models.split(",")
    listed = [str(m).strip() for m in models if isinstance(m, (str, int))] if isinstance(models, list) else []
    labels = list(dict.fromkeys(frame["label"])) if len(frame) else []
    for m in listed:
        for lab in labels:
            if (lab == m or lab.startswith(m + " [")) and lab not in seen:
                seen.append(lab)
    for lab in labels:
        if lab not in seen:
            seen.append(lab)
    return seen


def size_order(frame: pd.DataFrame) -> list[str]:
    """Size labels from smallest to largest volume."""
    if not len(frame):
        return []
    sizes = frame[["size", "size_order"]].drop_duplicates("size").sort_values(["size_order", "size"])
    return list(sizes["size"])


def phase_order(frame: pd.DataFrame) -> list[str]:
    phases = list(dict.fromkeys(frame["phase"])) if len(frame) else []
    return [p for p in PHASE_ORDER if p in phases] + sorted(p for p in phases if p not in PHASE_ORDER)


def _read_csv(path: Path, notes: list[str]) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable optional file becomes a note on the page
        notes.append(f"{path.name} could not be read: {type(exc).__name__}: {exc}".splitlines()[0])
        return None


def _frame_numeric(df: pd.DataFrame | None, cols: tuple[str, ...]) -> pd.DataFrame | None:
    if df is None:
        return None
    for col in cols:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce")
    return df


def _sample_key(path: Path, models: list[str]) -> tuple[int, str, int, str]:
    m = SAMPLE_NAME.match(path.name)
    if not m:
        return (len(models) + 1, "", 0, path.name)
    model = m.group("model")
    rank = models.index(model) if model in models else len(models)
    return (rank, model, int(m.group("k")), path.name)


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path if a report can be built from it; else ValueError, one line: it does not exist,
    is not a folder, or holds neither a sweep (results.csv) nor a quality run (quality.csv / training.csv)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ValueError(f"{run_dir} does not exist")
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder (give the run folder that holds results.csv or quality.csv)")
    if not any((run_dir / name).is_file() for name in ("results.csv", "quality.csv", "training.csv")):
        raise ValueError(f"no results.csv or quality.csv in {run_dir}: not an idmbench run folder "
                         "(run `python run_bench.py` or `python run_bench.py quality` first)")
    return run_dir


def load_run(run_dir: str | Path) -> RunData:
    """Read ``run_dir``. Raises ValueError (one line, see :func:`check_run_dir`) when no report can be
    built from it."""
    run_dir = check_run_dir(run_dir)
    results = run_dir / "results.csv"
    everything = rows_frame(read_rows(results) if results.is_file() else [])
    grouped = everything["world_size"].fillna(1) > 1
    frame, parallel = everything[~grouped].copy(), everything[grouped].copy()
    notes: list[str] = []

    meta: dict[str, Any] = {}
    meta_path = run_dir / "run.json"
    if meta_path.is_file():
        try:
            loaded = json.loads(meta_path.read_text())
            if isinstance(loaded, dict):
                meta = loaded
            else:
                notes.append("run.json is not a JSON object; run details come from the CSV files only")
        except (OSError, ValueError) as exc:
            notes.append(f"run.json could not be read ({type(exc).__name__}); run details come from the CSV files only")
    else:
        notes.append("no run.json in this folder; run details come from the CSV files only")

    budgets = _read_csv(run_dir / "budgets.csv", notes)
    if budgets is not None and not {"model", "budget", "largest_side"} <= set(budgets.columns):
        notes.append("budgets.csv lacks the columns model, budget, largest_side; it is not shown")
        budgets = None
    quality = _frame_numeric(_read_csv(run_dir / "quality.csv", notes), QUALITY_NUMERIC)
    training = _frame_numeric(_read_csv(run_dir / "training.csv", notes), ("step", "loss", "seconds"))
    if training is not None and not {"model", "step", "loss"} <= set(training.columns):
        notes.append("training.csv lacks the columns model, step, loss; the loss curves are not shown")
        training = None
    qmeta = meta.get("quality") if isinstance(meta.get("quality"), dict) else {}
    info = meta.get("model_info") if isinstance(meta.get("model_info"), dict) else {}
    info = {str(k): v for k, v in info.items() if isinstance(v, dict)}
    samples_dir = run_dir / "samples"
    models = [str(m) for m in (qmeta.get("models") or [])] if isinstance(qmeta.get("models"), list) else []
    if quality is not None and "model" in quality.columns:
        models += [m for m in dict.fromkeys(quality["model"]) if m not in models]
    samples = sorted(samples_dir.glob("*.png"), key=lambda p: _sample_key(p, models)) if samples_dir.is_dir() else []
    return RunData(run_dir=run_dir, frame=frame, meta=meta, budgets=budgets, quality=quality, training=training,
                   samples=samples, notes=notes, has_sweep=results.is_file(), model_info=info, quality_meta=qmeta,
                   parallel=parallel if len(parallel) else None)


def size_text(size: str) -> str:
    """``"64" -> "64³"``, ``"32x64x64" -> "32×64×64"`` (the text the page shows for a volume)."""
    try:
        d, h, w = parse_size(size)
    except ValueError:
        return str(size)
    return f"{d}³" if d == h == w else f"{d}×{h}×{w}"


@dataclass
class MemCell:
    """The memory figure shown for one (model label, size, phase).

    ``bytes`` is the measured peak when ``measured``, else the predicted peak (None when there is
    none); ``status`` is the status of the row it came from (``missing`` when nothing ran);
    ``source`` its ``mem_source``; ``predicted`` the predicted peak wherever one was recorded.
    """

    status: str
    bytes: float | None = None
    measured: bool = False
    source: str = ""
    predicted: float | None = None
    side: float = math.nan
    net_shape: str = ""

    @property
    def failed(self) -> bool:
        return self.status in FAILED


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def memory_cells(frame: pd.DataFrame, phase: str) -> dict[tuple[str, str], MemCell]:
    """For every (label, size) of ``phase``, the figure to show: a measured ``ok`` row first, then a
    ``predicted`` row, then a failure (carrying its predicted peak if it has one). Later rows win
    among equals (a resumed sweep re-measures)."""
    out: dict[tuple[str, str], MemCell] = {}
    rank = {"ok": 3, "predicted": 2}
    sub = frame[frame["phase"] == phase]
    best: dict[tuple[str, str], tuple[int, Any]] = {}
    for rec in sub.itertuples(index=False):
        r = rank.get(rec.status, 1)
        if rec.status == "ok" and _num(rec.peak_mem_bytes) is None:
            r = 1  # an ok row without a memory figure is no better than a failure for this purpose
        key = (rec.label, rec.size)
        if key not in best or r >= best[key][0]:
            best[key] = (r, rec)
    for key, (r, rec) in best.items():
        pred = _num(rec.predicted_peak_bytes)
        peak = _num(rec.peak_mem_bytes)
        if rec.status == "ok" and peak is not None:
            cell = MemCell("ok", peak, True, rec.mem_source, pred)
        elif rec.status == "predicted":
            figure = peak if peak is not None else pred
            cell = MemCell("predicted", figure, False, rec.mem_source or "predicted", figure)
        else:
            status = rec.status if rec.status in FAILED else (rec.status or "missing")
            cell = MemCell(status, pred, False, "predicted" if pred is not None else "", pred)
        cell.side = rec.side
        cell.net_shape = rec.net_shape
        out[key] = cell
    return out
