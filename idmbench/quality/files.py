"""The files of a quality run, written the moment each row exists (the report reads only these).

* ``quality.csv`` -- one :class:`QualityRow` per (model, eval timestep t), appended when scored;
* ``training.csv`` -- the loss curve: ``model, preset, step, loss, seconds`` (seconds since that model's
  training began), one row per optimiser step, appended while training;
* ``samples/<model>_sample<k>.png`` -- mid-slices of generated sample k (see :mod:`.samples`);
* ``run.json`` -- a quality run keeps whatever a sweep wrote there and puts its metadata under ``"quality"``.

Every CSV append is flushed at once (quality rows also ``fsync``-ed), so Ctrl-C or a crash keeps every
finished row; a half-written last line from a killed run is dropped before the file is read again.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

QUALITY_CSV = "quality.csv"
TRAINING_CSV = "training.csv"
RUN_JSON = "run.json"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"

STATUS_OK = "ok"
STATUS_ERROR = "error"
MEM_SOURCES = ("cuda-allocator", "cpu-tensors", "rss")
ENERGY_SOURCES = ("nvml", "codecarbon-rapl", "codecarbon-estimate", "none")


@dataclass
class QualityRow:
    """One (model, eval timestep) score with the training cost behind it.

    Units: ``psnr`` dB; ``ssim`` 3D SSIM (1 = identical); ``mae`` mean absolute error on the [-1, 1] scale;
    ``data_range`` the intensity range the metrics used (2.0); ``train_time_s`` seconds; ``train_energy_j`` and
    ``energy_per_param_j`` joules (from ``energy_source``); ``peak_train_mem_bytes`` bytes (from ``mem_source``).
    ``final_loss`` is the mean training loss of the last 20 steps (fewer if the run had fewer). An ``error``
    row carries a one-line ``error`` and empty metrics.
    """

    model: str
    preset: str
    size: str
    train_steps: int
    t: int
    psnr: float | None = None
    ssim: float | None = None
    mae: float | None = None
    psnr_std: float | None = None
    ssim_std: float | None = None
    mae_std: float | None = None
    n_volumes: int | None = None
    n_noise: int | None = None
    data_range: float | None = None
    data: str = ""
    params: int | None = None
    batch: int = 1
    lr: float | None = None
    seed: int = 0
    device: str = ""
    precision: str = "fp32"
    train_time_s: float | None = None
    train_energy_j: float | None = None
    energy_source: str = "none"
    energy_per_param_j: float | None = None
    peak_train_mem_bytes: int | None = None
    mem_source: str = ""
    final_loss: float | None = None
    status: str = STATUS_OK
    error: str = ""
    timestamp: str = ""


QUALITY_COLUMNS: list[str] = [f.name for f in fields(QualityRow)]
TRAINING_COLUMNS: list[str] = ["model", "preset", "step", "loss", "seconds"]


def repair_csv(path: Path) -> None:
    """Drop a half-written last line (a run killed mid-write) so the file parses."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n")
        with open(path, "r+b") as fh:
            fh.truncate(cut + 1 if cut >= 0 else 0)


def _cell(v: Any) -> Any:
    return "" if v is None else v


def append_quality_row(path: Path, row: QualityRow) -> None:
    """Append ``row`` to ``quality.csv`` (header first if new), flushed and fsync-ed."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=QUALITY_COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: _cell(v) for k, v in dataclasses.asdict(row).items()})
        fh.flush()
        os.fsync(fh.fileno())


class TrainingLog:
    """Appends ``training.csv`` rows while a model trains (flushed per row); use as a context manager."""

    def __init__(self, path: Path, model: str, preset: str) -> None:
        self.path, self.model, self.preset = path, model, preset
        self._fh: Any = None
        self._w: Any = None

    def __enter__(self) -> "TrainingLog":
        repair_csv(self.path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fh = open(self.path, "a", newline="")
        self._w = csv.writer(self._fh)
        if new:
            self._w.writerow(TRAINING_COLUMNS)
        return self

    def log(self, step: int, loss: float, seconds: float) -> None:
        self._w.writerow([self.model, self.preset, int(step), f"{loss:.6g}", f"{seconds:.4f}"])
        self._fh.flush()

    def __exit__(self, *exc: Any) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


def read_csv(path: Path) -> list[dict[str, str]]:
    """Every row of a CSV as a dict of strings ([] when the file is missing)."""
    if not path.exists():
        return []
    repair_csv(path)
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def drop_model_rows(path: Path, model: str, columns: list[str], keep: Any = None) -> int:
    """Rewrite ``path`` without ``model``'s rows (except those ``keep(row)`` accepts); returns how many went."""
    rows = read_csv(path)
    if not rows:
        return 0
    kept = [r for r in rows if r.get("model") != model or (keep is not None and keep(r))]
    gone = len(rows) - len(kept)
    if gone:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept)
        os.replace(tmp, path)
    return gone


def scored_timesteps(path: Path, model: str) -> set[int]:
    """Timesteps at which ``model`` already has an ``ok`` row in ``quality.csv``."""
    out = set()
    for r in read_csv(path):
        if r.get("model") == model and r.get("status") == STATUS_OK:
            try:
                out.add(int(float(r["t"])))
            except (KeyError, ValueError):
                continue
    return out


def sample_path(out: Path, model: str, k: int) -> Path:
    """``DIR/samples/<model>_sample<k>.png``."""
    return out / SAMPLES_DIR / f"{model}_sample{int(k)}.png"


def update_run_json(out: Path, quality: dict[str, Any], environment: dict[str, Any] | None = None) -> None:
    """Put ``quality`` under the ``"quality"`` key of ``DIR/run.json``, keeping every other key.

    A new run.json gets just that key plus ``"environment"``. Written atomically (temp file + rename).
    """
    path = out / RUN_JSON
    meta: dict[str, Any] = {}
    if path.exists():
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError:
            meta = {}
    if not isinstance(meta, dict):
        meta = {}
    if not meta and environment is not None:
        meta["environment"] = environment
    meta["quality"] = quality
    tmp = path.with_suffix(".json.tmp-quality")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
