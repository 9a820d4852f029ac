"""Measured versus predicted memory of a finished sweep: ``python -m idmbench.harness.compare DIR``.

For every measured row the ratio measured / predicted peak is checked against a tolerance that depends on
the memory source:

* ``cpu-tensors`` -- the same live-tensor accounting as the prediction: within 10 % either way.
* ``cuda-allocator`` -- the caching allocator adds block rounding and kernel workspaces (cuDNN) that fake
  tensors do not see: from 0.90x to 1.25x.

On CUDA rows it also reports what NVML saw beyond the allocator (``nvml_used_bytes - reserved_bytes``:
the CUDA context and library handles), next to the 0.5 GiB constant the budgets assume, and checks that
energy came from NVML. Exit code 1 if a row is outside its tolerance (or a GPU row lacks NVML energy),
2 on bad input, else 0. ``scripts/gpu_run.sh`` runs it after the GPU sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..measure.predict import CUDA_CONTEXT_BYTES
from ..results import STATUS_OK, read_rows
from .console import render_table
from ..units import format_bytes

TOLERANCE = {"cpu-tensors": (0.90, 1.10), "cuda-allocator": (0.90, 1.25)}


def compare(run_dir: str | Path, *, out=None) -> int:
    """Print the comparison table for ``run_dir``; return the exit code (see the module docstring)."""
    out = out or sys.stdout
    path = Path(run_dir) / "results.csv"
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    rows = [r for r in read_rows(path) if r.status == STATUS_OK and r.peak_mem_bytes]
    if not rows:
        out.write(f"no measured rows in {path}\n")
        return 0
    table, bad = [], []
    for r in rows:
        lo, hi = TOLERANCE.get(r.mem_source, (0.9, 1.1))
        ratio = r.peak_mem_bytes / r.predicted_peak_bytes if r.predicted_peak_bytes else None
        ok = ratio is not None and lo <= ratio <= hi
        extra = "-"
        if r.mem_source == "cuda-allocator" and r.nvml_used_bytes and r.reserved_bytes:
            extra = format_bytes(r.nvml_used_bytes - r.reserved_bytes)
        energy_ok = r.mem_source != "cuda-allocator" or r.energy_source == "nvml"
        verdict = "ok" if ok and energy_ok else ("ENERGY" if ok else "OFF")
        if verdict != "ok":
            bad.append(r)
        table.append([
            r.model, r.preset, r.size, r.phase, r.mem_source, format_bytes(r.peak_mem_bytes),
            format_bytes(r.predicted_peak_bytes), f"{ratio:.3f}" if ratio else "-", f"{lo:.2f}-{hi:.2f}",
            format_bytes(r.reserved_bytes) if r.reserved_bytes else "-", extra, r.energy_source, verdict,
        ])
    out.write(render_table(
        ["model", "preset", "size", "phase", "source", "measured", "predicted", "ratio", "allowed", "reserved",
         "NVML beyond reserved", "energy", "verdict"],
        table,
    ) + "\n")
    out.write(f"budgets assume a CUDA context/workspace constant of {format_bytes(CUDA_CONTEXT_BYTES)} (not measured); "
              "'NVML beyond reserved' is what this GPU actually used outside the allocator\n")
    if bad:
        out.write(f"{len(bad)} row(s) outside tolerance or without NVML energy: "
                  + ", ".join(f"{r.model} {r.size} {r.phase}" for r in bad) + "\n")
        return 1
    out.write(f"all {len(rows)} measured rows within tolerance of the prediction\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m idmbench.harness.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a sweep output folder (holds results.csv)")
    ns = p.parse_args(argv)
    return compare(ns.run_dir)


if __name__ == "__main__":
    sys.exit(main())
