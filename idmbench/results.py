"""A result is a row of plain data: a dataclass written to ``results.csv`` (and read back by the report).

The report and the check read only these files, never live objects, so any old run can be re-reported.
Units are in the names: ``*_bytes`` bytes, ``*_s`` seconds, ``*_j_*`` joules.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

#: row status values
STATUS_OK = "ok"  # measured (and predicted where possible)
STATUS_PREDICTED = "predicted"  # not run for real: memory/FLOPs from fake tensors only
STATUS_OOM = "oom"
STATUS_ERROR = "error"
STATUS_TIMEOUT = "timeout"
STATUSES = (STATUS_OK, STATUS_PREDICTED, STATUS_OOM, STATUS_ERROR, STATUS_TIMEOUT)

#: where a memory figure came from
MEM_SOURCES = ("cuda-allocator", "cpu-tensors", "predicted")
#: where an energy figure came from
ENERGY_SOURCES = ("nvml", "codecarbon-rapl", "codecarbon-estimate", "none")


@dataclass
class ResultRow:
    """One (model, preset, size, phase) measurement.

    Memory: ``peak_mem_bytes`` is the peak over one step of everything the step holds (parameters,
    gradients, optimiser state, activations, temporaries), from ``mem_source``. ``activation_bytes``
    is that peak minus parameters, gradients and optimiser state. ``predicted_*`` come from the same
    step run on fake tensors (no allocation). ``prediction_ratio`` = measured / predicted peak.
    """

    model: str
    preset: str
    size: str  # "64" for a cube, "DxHxW" otherwise
    phase: str  # "train" | "sample"
    status: str = STATUS_OK
    params: int | None = None
    peak_mem_bytes: int | None = None
    mem_source: str = ""
    predicted_peak_bytes: int | None = None
    step_time_s: float | None = None
    step_time_iqr_s: float | None = None
    voxels_per_s: float | None = None
    energy_j_per_step: float | None = None
    energy_source: str = "none"
    flops_per_step: float | None = None
    device: str = ""
    # --- beyond the contract columns ---
    voxels: int | None = None  # voxels of the volume (D*H*W)
    net_shape: str = ""  # spatial shape the network runs at in this phase (PatchDDM trains on patches)
    batch: int = 1
    precision: str = "fp32"
    steps: int = 0  # timed steps
    warmup: int = 0
    activation_bytes: int | None = None
    predicted_activation_bytes: int | None = None
    prediction_ratio: float | None = None
    reserved_bytes: int | None = None  # CUDA caching allocator reserved peak
    nvml_used_bytes: int | None = None  # NVML device memory used at peak (includes the CUDA context)
    rss_peak_bytes: int | None = None  # process peak resident set size (CPU)
    energy_window_s: float | None = None
    loss: float | None = None
    error: str = ""
    wall_s: float | None = None
    timestamp: str = ""
    torch_version: str = ""
    device_name: str = ""
    git_rev: str = ""
    seed: int | None = None
    notes: str = ""

    def key(self) -> tuple[str, str, str, str]:
        return (self.model, self.preset, self.size, self.phase)


COLUMNS: list[str] = [f.name for f in fields(ResultRow)]
CONTRACT_COLUMNS = [
    "model", "preset", "size", "phase", "status", "params", "peak_mem_bytes", "mem_source",
    "predicted_peak_bytes", "step_time_s", "step_time_iqr_s", "voxels_per_s", "energy_j_per_step",
    "energy_source", "flops_per_step", "device",
]
_TYPES = {f.name: f.type for f in fields(ResultRow)}


def _coerce(name: str, value: str) -> Any:
    t = str(_TYPES.get(name, "str"))
    if value == "" or value is None:
        if "None" in t:
            return None
        if t.startswith("int"):
            return 0
        return ""
    if t.startswith("int"):
        return int(float(value))
    if t.startswith("float"):
        return float(value)
    return value


def append_row(path: str | os.PathLike, row: ResultRow) -> None:
    """Append ``row`` to the CSV at ``path`` (header written if the file is new), flushed to disk at once."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(row).items()})
        fh.flush()
        os.fsync(fh.fileno())


def read_rows(path: str | os.PathLike) -> list[ResultRow]:
    """Read every row of a results CSV (unknown columns are ignored, missing ones take defaults)."""
    rows = []
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            kw = {k: _coerce(k, v) for k, v in rec.items() if k in _TYPES}
            missing = [k for k in ("model", "preset", "size", "phase") if k not in kw]
            if missing:
                raise ValueError(f"{path}: not an idmbench results file (missing columns {missing})")
            rows.append(ResultRow(**kw))
    return rows


def write_json(path: str | os.PathLike, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def size_label(shape: Iterable[int]) -> str:
    shape = tuple(int(s) for s in shape)
    return str(shape[0]) if len(set(shape)) == 1 else "x".join(map(str, shape))


def parse_size(text: str) -> tuple[int, int, int]:
    """``"64"`` -> (64, 64, 64); ``"32x64x64"`` -> (32, 64, 64). Raises ValueError on anything else."""
    t = str(text).strip().lower()
    parts = t.split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"malformed size {text!r}: use a cube side like 64 or DxHxW like 32x64x64") from None
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or any(n <= 0 for n in nums):
        raise ValueError(f"malformed size {text!r}: use a cube side like 64 or DxHxW like 32x64x64")
    return tuple(nums)  # type: ignore[return-value]
