"""A sweep request (:class:`SweepOptions`) and the checks that turn command-line values into one: each
model's preset (the chosen one, else the device default with the model spec's fallback policy), the sizes
every model can take, the precision on this device, a usable output folder, and the settings a resumed
folder's ``run.json`` holds (as defaults in the flags' own syntax). Every check raises
:class:`~idmbench.argtypes.UsageError` with one line naming the problem and the valid choices.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import argtypes as T
from ..argtypes import UsageError, writable_folder

DEFAULT_SIZES = (64, 128, 256)


@dataclass
class SweepOptions:
    """A validated sweep request (the CLI builds it; units in the names)."""

    models: list[str]
    presets: dict[str, str]
    sizes: list[tuple[int, int, int]]
    out: Path
    phases: list[str] = field(default_factory=lambda: ["train", "sample"])
    batch: int = 1
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    predict_only: bool = False
    budgets: list[tuple[str, int]] = field(default_factory=list)
    timeout_s: float = 600.0
    cpu_memory_limit_bytes: int | None = None
    max_measure_s: float = math.inf
    max_sweep_s: float = math.inf
    seed: int = 0
    min_energy_window_s: float = 1.0
    report: bool = True
    resume: bool = False
    command: str = ""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    #: data-parallel processes per node for the training configs, one world size each (``--nproc``)
    nproc: list[int] = field(default_factory=lambda: [1])
    #: torchrun's multi-node settings (:class:`~idmbench.harness.torchrun.LaunchSpec` fields but nproc_per_node)
    launch: dict[str, Any] = field(default_factory=dict)
    executor: str = "local"  # local | ray (:mod:`idmbench.harness.executors`)
    ray_address: str | None = None
    ray_cpus_per_task: int = 1


def check_precision(precision: str, device: str) -> None:
    """Refuse a precision this device cannot run (bf16 before compute capability 8.0; an autocast dtype
    the CPU build does not support). Allocates nothing on a GPU."""
    import torch

    from ..measure.workload import autocast_dtype

    dt = autocast_dtype(precision)
    if dt is None:
        return
    if device.startswith("cuda"):
        # no allocation here: a CUDA context in this (parent) process would sit in every worker's NVML figure
        if precision == "bf16":
            major, minor = torch.cuda.get_device_capability(torch.device(device))
            if major < 8:
                raise UsageError(f"--precision bf16 needs a GPU of compute capability >= 8.0; {device} has {major}.{minor} (use fp16)")
        return
    try:
        with torch.autocast(device_type="cpu", dtype=dt):
            y = torch.nn.Conv3d(1, 1, 1)(torch.zeros(1, 1, 2, 2, 2))
        if y.dtype != dt:
            raise RuntimeError(f"autocast produced {y.dtype}")
    except RuntimeError as exc:
        hint = "; on CPU prefer --precision bf16" if precision == "fp16" else ""
        raise UsageError(f"--precision {precision} is not supported on {device} ({exc}){hint}") from None


def choose_presets(choice: T.PresetChoice | None, models: list[str], device: str, sizes: list[tuple[int, int, int]] | None) -> dict[str, str]:
    """Each model's preset: the chosen ones, else the device default with the spec's fallback policy."""
    from ..registry import get_spec

    default = "paper" if device.startswith("cuda") else "small"
    chosen = choice or T.PresetChoice()
    for m in chosen.per_model:
        if m not in models:
            raise UsageError(f"--preset {m}={chosen.per_model[m]!r} names model {m!r}, which is not in --models ({', '.join(models)})")
    presets = {m: chosen.per_model.get(m, chosen.default or default) for m in models}
    for m, p in presets.items():
        spec = get_spec(m)
        if p not in spec.presets:
            raise UsageError(f"model {m!r} has no preset {p!r}; valid presets: {', '.join(sorted(spec.presets))}")
        if sizes and m not in chosen.per_model and chosen.default is None:
            presets[m], note = spec.fallback_preset(sizes, p)
            if note:
                print(f"note: {note}", file=sys.stderr)
    return presets


def choose_sizes(given: list[tuple[int, int, int]] | None, models: list[str], presets: dict[str, str]) -> list[tuple[int, int, int]]:
    """The sizes (D, H, W) to sweep: ``given`` if every model takes each at its preset (else the model's own
    one-line reason), or those of :data:`DEFAULT_SIZES` every model takes (else the two smallest common
    multiples of the models' valid sides)."""
    from ..registry import get_spec

    specs = {m: (get_spec(m), get_spec(m).config(presets[m])) for m in models}
    if given is None:
        def fits(s: tuple[int, int, int]) -> bool:
            try:
                for spec, cfg in specs.values():
                    spec.check_size(s, cfg)
                return True
            except ValueError:
                return False

        sizes = [(s, s, s) for s in DEFAULT_SIZES if fits((s, s, s))]
        if not sizes:
            mult = 1
            for spec, cfg in specs.values():
                v = spec.valid_sides(cfg)
                mult = mult * v // math.gcd(mult, v)
            sizes = [(mult,) * 3, (2 * mult,) * 3]  # type: ignore[list-item]
        return sizes
    for m, (spec, cfg) in specs.items():
        for s in given:
            try:
                spec.check_size(s, cfg)
            except ValueError as exc:
                raise UsageError(f"{exc} (preset {presets[m]})") from None
    return given


def check_out(path: Path, *, resume: bool) -> None:
    """Create ``path`` and prove it is writable; refuse a folder that already holds results (unless resuming)."""
    if not resume and path.is_dir() and (path / "results.csv").exists():
        raise UsageError(f"--out {path} already holds results.csv; continue it with --resume {path} or choose another --out")
    writable_folder(path)


def resume_defaults(rdir: Path) -> dict[str, Any]:
    """The argparse defaults for ``--resume rdir``: DIR/run.json's settings in the flags' own syntax."""
    from .metadata import read_run_json

    if not rdir.is_dir():
        raise UsageError(f"--resume {rdir}: no such folder")
    if not (rdir / "run.json").exists() and not (rdir / "results.csv").exists():
        raise UsageError(f"--resume {rdir}: not a sweep folder (no run.json or results.csv)")
    try:
        prev = read_run_json(rdir / "run.json")
    except ValueError as exc:
        raise UsageError(f"--resume {rdir}: {exc}") from None
    d: dict[str, Any] = {}
    if prev.get("models"):
        d["models"] = ",".join(prev["models"])
    if prev.get("sizes"):
        d["sizes"] = ",".join(map(str, prev["sizes"]))
    if isinstance(prev.get("presets"), dict) and prev["presets"]:
        d["preset"] = ",".join(f"{m}={p}" for m, p in prev["presets"].items())
    if prev.get("phases"):
        d["phases"] = ",".join(prev["phases"])
    for key in ("batch", "steps", "warmup", "seed", "precision", "device"):
        if prev.get(key) is not None:
            d[key] = str(prev[key])
    for flag, key in (("timeout", "timeout_s"), ("min_energy_window", "min_energy_window_s")):
        if prev.get(key) is not None:
            d[flag] = str(prev[key])
    for flag in ("max_measure_s", "max_sweep_s"):
        if flag in prev:
            d[flag] = "inf" if prev[flag] is None else str(prev[flag])
    if isinstance(prev.get("budgets"), list):
        d["budget"] = ",".join(b["label"] for b in prev["budgets"]) or "none"
    if prev.get("cpu_memory_limit_bytes"):
        d["cpu_memory_limit"] = f"{int(prev['cpu_memory_limit_bytes'])}B"
    if prev.get("predict_only"):
        d["predict"] = True
    if prev.get("nproc"):
        d["nproc"] = ",".join(map(str, prev["nproc"]))
    if isinstance(prev.get("launch"), dict) and prev["launch"].get("nnodes"):
        d["nnodes"] = str(prev["launch"]["nnodes"])
    d["overrides"] = prev.get("overrides") or {}
    return d

