"""Read a run folder into plain data for the report: results.csv, run.json, budgets.csv, quality.csv, samples/.

The report reads only these files, never live objects, so any old run can be re-reported. Missing
optional files and missing keys are tolerated; what could not be read is listed in ``RunData.notes``
so the page can say so.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from idmbench.results import read_rows, parse_size

#: the model the headline compares against every other one
REFERENCE_MODEL = "idm"
#: statuses that mean "this configuration did not produce a measurement"
FAILED = ("oom", "error", "timeout")
#: numeric columns of ResultRow (read as float, NaN when empty)
NUMERIC = (
    "params", "peak_mem_bytes", "predicted_peak_bytes", "step_time_s", "step_time_iqr_s", "voxels_per_s",
    "energy_j_per_step", "flops_per_step", "voxels", "batch", "steps", "warmup", "activation_bytes",
    "predicted_activation_bytes", "prediction_ratio", "reserved_bytes", "nvml_used_bytes", "rss_peak_bytes",
    "energy_window_s", "loss", "wall_s", "seed",
)
#: order of phases in tables and plots (others follow alphabetically)
PHASE_ORDER = ("train", "sample")


@dataclass
class RunData:
    """Everything the report shows, as read from ``run_dir``.

    ``frame`` has one row per results.csv row (every column of ``ResultRow``) plus:
    ``label`` (model, or ``model [preset]`` when a model ran with several presets), ``voxels_n``
    (voxels of the volume), ``side`` (cube side, or the cube root of the voxel count for a
    ``DxHxW`` size; voxels), ``size_order`` (sort key) and ``row_id`` (0-based row number in the CSV).
    """

    run_dir: Path
    frame: pd.DataFrame
    meta: dict[str, Any]
    budgets: pd.DataFrame | None = None
    quality: pd.DataFrame | None = None
    samples: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference: str = REFERENCE_MODEL

    @property
    def labels(self) -> list[str]:
        """Model labels in run order (run.json's ``models`` first, then as they appear in the CSV)."""
        return model_order(self.frame, self.meta)


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


def load_run(run_dir: str | Path) -> RunData:
    """Read ``run_dir``. Raises ValueError (one line) when it holds no results.csv."""
    run_dir = Path(run_dir)
    results = run_dir / "results.csv"
    if not results.is_file():
        raise ValueError(f"no results.csv in {run_dir}: not an idmbench run folder (run `python run_bench.py` first)")
    frame = rows_frame(read_rows(results))
    notes: list[str] = []

    meta: dict[str, Any] = {}
    meta_path = run_dir / "run.json"
    if meta_path.is_file():
        try:
            loaded = json.loads(meta_path.read_text())
            if isinstance(loaded, dict):
                meta = loaded
            else:
                notes.append("run.json is not a JSON object; run details come from results.csv only")
        except (OSError, ValueError) as exc:
            notes.append(f"run.json could not be read ({type(exc).__name__}); run details come from results.csv only")
    else:
        notes.append("no run.json in this folder; run details come from results.csv only")

    budgets = _read_csv(run_dir / "budgets.csv", notes)
    if budgets is not None and not {"model", "budget", "largest_side"} <= set(budgets.columns):
        notes.append("budgets.csv lacks the columns model, budget, largest_side; it is not shown")
        budgets = None
    quality = _read_csv(run_dir / "quality.csv", notes)
    samples_dir = run_dir / "samples"
    samples = sorted(samples_dir.glob("*.png")) if samples_dir.is_dir() else []
    return RunData(run_dir=run_dir, frame=frame, meta=meta, budgets=budgets, quality=quality, samples=samples,
                   notes=notes)


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
