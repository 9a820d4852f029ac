"""A result is a row of plain data: a dataclass written to ``results.csv`` (and read back by the report).

The report and the check read only these files, never live objects, so any old run can be re-reported.
Units are in the names: ``*_bytes`` bytes, ``*_s`` seconds, ``*_j_*`` joules.

``results.csv`` is append-only: :func:`append_row` writes and fsyncs one row the moment a config
finishes, so a sweep killed at any point keeps every finished row; :func:`repair_csv` drops the
half-written last line such a kill can leave, and :func:`done_keys` tells a resumed sweep what it need
not redo.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

#: row status values
STATUS_OK = "ok"  # measured (and predicted where possible)
STATUS_PREDICTED = "predicted"  # not run for real: memory/FLOPs from fake tensors only
STATUS_OOM = "oom"  # an allocation failed (CUDA OOM, the --cpu-memory-limit cap, the kernel's OOM killer)
STATUS_ERROR = "error"  # any other failure, with a one-line reason
STATUS_TIMEOUT = "timeout"  # over --timeout: the worker was killed
STATUS_KILLED = "killed"  # the worker died of SIGKILL and nothing shows that memory was the cause
STATUSES = (STATUS_OK, STATUS_PREDICTED, STATUS_OOM, STATUS_ERROR, STATUS_TIMEOUT, STATUS_KILLED)
#: statuses of a config that ran and did not produce figures
FAILED_STATUSES = (STATUS_OOM, STATUS_ERROR, STATUS_TIMEOUT, STATUS_KILLED)

#: where a memory figure came from
MEM_SOURCES = ("cuda-allocator", "cpu-tensors", "predicted")
#: where an energy figure came from
ENERGY_SOURCES = ("nvml", "codecarbon-rapl", "codecarbon-estimate", "none")


@dataclass
class ResultRow:
    """One (model, preset, size, phase) measurement.

    Memory: ``peak_mem_bytes`` is the peak over one step of everything the step holds (parameters,
    gradients, optimiser state, activations, temporaries), from ``mem_source`` (one of
    :data:`MEM_SOURCES`). ``activation_bytes`` is that peak minus parameters, the gradients of all
    trainable parameters (training), optimiser state and buffers
    (:attr:`idmbench.measure.memory.MemoryPeak.activation_bytes`, the one definition). ``predicted_*``
    come from the same step run on fake tensors (no allocation). ``prediction_ratio`` = measured /
    predicted peak. ``voxels_per_s`` counts the image voxels the network processes per step (a patch
    for PatchDDM). ``warmup`` is the number of warm-up steps actually run (0 for a predicted row).
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
    warmup: int = 0  # warm-up steps run (0: nothing ran, e.g. a predicted row)
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
    # --- data-parallel training (run_bench.py --nproc); single-process rows: world_size 1, rank 0 ---
    world_size: int = 1  # processes of the DistributedDataParallel group that measured this row
    rank: int = 0  # this row's process in that group (its own memory and step time)
    group_voxels_per_s: float | None = None  # the whole group: world_size x batch x voxels / slowest rank's step
    nosync_step_time_s: float | None = None  # median step inside DDP's no_sync() (no gradient all-reduce)
    allreduce_share: float | None = None  # 1 - nosync / synced step time: the step's share spent all-reducing
    ddp_bucket_bytes: int | None = None  # DDP's gradient buckets (bytes; in peak_mem_bytes)

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


def write_csv_atomic(path: str | os.PathLike, columns: list[str], rows: Iterable[Any]) -> None:
    """Write dataclass ``rows`` under ``columns`` to ``path`` atomically (a temporary file, fsync, rename);
    None becomes an empty cell."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(r).items()})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _upgrade_header(path: Path) -> None:
    """Rewrite a results file written before columns were added (an old sweep being resumed) with today's
    header, its rows keeping their values and the new columns their defaults; atomic."""
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    if header == COLUMNS or not header:
        return
    rows = read_rows(path)
    write_csv_atomic(path, COLUMNS, rows)
    logger.info("%s: header upgraded to this version's %d columns (%d rows kept)", path, len(COLUMNS), len(rows))


def append_row(path: str | os.PathLike, row: ResultRow) -> None:
    """Append ``row`` to the CSV at ``path`` (header written if the file is new, upgraded if the file is
    from a version with fewer columns), flushed to disk at once."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        _upgrade_header(path)
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


def repair_csv(path: str | os.PathLike) -> bool:
    """Drop a half-written last line (a sweep killed mid-write) so the file parses; True if it cut one."""
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n")
    with open(path, "r+b") as fh:
        fh.truncate(cut + 1 if cut >= 0 else 0)
    logger.warning("%s: dropped a half-written last line (%d bytes) left by an interrupted write",
                   path, len(data) - (cut + 1))
    return True


def done_keys(path: str | os.PathLike) -> set[tuple[str, str, str, str]]:
    """Keys (model, preset, size, phase) of rows with a final status already in ``results.csv``."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return set()
    return {r.key() for r in read_rows(path) if r.status in STATUSES}


def done_world_sizes(path: str | os.PathLike) -> dict[tuple[str, str, str, str], set[int]]:
    """Per key (model, preset, size, phase), the world sizes with a row of a final status in ``results.csv``
    (1 for single-process rows). A ``predicted`` row adds 0, which stands for every world size: the config
    was not measured at all, so a resumed sweep does not redo it."""
    path = Path(path)
    out: dict[tuple[str, str, str, str], set[int]] = {}
    if not path.exists() or path.stat().st_size == 0:
        return out
    for r in read_rows(path):
        if r.status in STATUSES:
            out.setdefault(r.key(), set()).add(0 if r.status == STATUS_PREDICTED else int(r.world_size or 1))
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a temporary file replaced in one step), so a reader
    or a kill never sees half a file (``run.json``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def size_label(shape: Iterable[int]) -> str:
    """``(64, 64, 64)`` -> ``"64"``; ``(32, 64, 64)`` -> ``"32x64x64"``."""
    shape = tuple(int(s) for s in shape)
    return str(shape[0]) if len(set(shape)) == 1 else "x".join(map(str, shape))


def size_text(label: str) -> str:
    """A size label for people: ``"64"`` -> ``"64^3"``; ``"32x64x64"`` unchanged."""
    return f"{label}^3" if "x" not in str(label) else str(label)


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
