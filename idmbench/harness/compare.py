"""Measured versus predicted memory of a finished sweep: ``python -m idmbench.harness.compare DIR [--cuda]``.

For every measured row (status ``ok``) the ratio measured / predicted peak is checked against a tolerance
that depends on the memory source:

* ``cpu-tensors`` -- the same live-tensor accounting as the prediction: within 10 % either way (on CPU
  tensors the two agree to the byte for the built-in models; a plugin may differ a little);
* ``cuda-allocator`` -- the caching allocator adds block rounding and kernel workspaces (cuDNN) that fake
  tensors do not see: from 0.90x to 1.25x.

On CUDA rows it also reports what NVML saw beyond the allocator (``nvml_used_bytes - reserved_bytes``:
the CUDA context and library handles), next to the 0.5 GiB constant the budgets assume, and checks that
energy came from NVML.

The comparison cannot pass empty: it fails when no row was measured, when a row failed (``error``,
``timeout``, ``killed``; an ``oom`` row is a finding, listed but allowed), and -- with ``--cuda``, as
``scripts/gpu_run.sh`` runs it -- when a model of the sweep has no row measured on CUDA.

Exit codes: 0 every check passed; 1 a row outside its tolerance, without NVML energy, failed, nothing
measured, or (``--cuda``) a model without a CUDA measurement; 2 bad input (no results file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from ..measure.predict import CUDA_CONTEXT_BYTES
from ..results import STATUS_ERROR, STATUS_KILLED, STATUS_OK, STATUS_OOM, STATUS_TIMEOUT, ResultRow, read_rows
from ..units import format_bytes
from .console import render_table

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: mem_source -> (lowest, highest) allowed measured / predicted peak
TOLERANCE = {"cpu-tensors": (0.90, 1.10), "cuda-allocator": (0.90, 1.25)}
#: statuses that mean a config failed to run (an ``oom`` is a result: the config does not fit)
ERROR_STATUSES = (STATUS_ERROR, STATUS_TIMEOUT, STATUS_KILLED)


def _row_check(r: ResultRow) -> tuple[list[str], str]:
    """(table cells, verdict) of one measured row."""
    lo, hi = TOLERANCE.get(r.mem_source, TOLERANCE["cpu-tensors"])
    ratio = r.peak_mem_bytes / r.predicted_peak_bytes if r.peak_mem_bytes and r.predicted_peak_bytes else None
    in_range = ratio is not None and lo <= ratio <= hi
    cuda = r.mem_source == "cuda-allocator"
    energy_ok = not cuda or r.energy_source == "nvml"
    verdict = "ok" if in_range and energy_ok else ("NO PREDICTION" if ratio is None else ("OFF" if not in_range else "NO NVML ENERGY"))
    beyond = format_bytes(r.nvml_used_bytes - r.reserved_bytes) if cuda and r.nvml_used_bytes and r.reserved_bytes else "-"
    cells = [
        r.model, r.preset, r.size, r.phase, r.mem_source, format_bytes(r.peak_mem_bytes), format_bytes(r.predicted_peak_bytes),
        f"{ratio:.3f}" if ratio else "-", f"{lo:.2f}-{hi:.2f}", format_bytes(r.reserved_bytes) if r.reserved_bytes else "-",
        beyond, r.energy_source, verdict,
    ]
    return cells, verdict


def compare(run_dir: str | Path, *, cuda: bool = False, out: TextIO | None = None) -> int:
    """Print the prediction-vs-measurement table of ``run_dir`` and what failed; return the exit code.

    Args:
        run_dir: a sweep's output folder (holds ``results.csv``).
        cuda: the sweep ran on a GPU: every model in it needs at least one row measured on CUDA
            (``mem_source`` ``cuda-allocator``).
        out: where to write (default stdout).
    """
    out = out or sys.stdout
    path = Path(run_dir) / "results.csv"
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return EXIT_USAGE
    rows = read_rows(path)
    ranks = [r for r in rows if (r.world_size or 1) > 1]
    if ranks:  # a rank's peak holds DDP's buckets: the single-process prediction does not describe it
        out.write(f"{len(ranks)} data-parallel row(s) (world_size > 1) not compared: the prediction is of one process\n")
        rows = [r for r in rows if (r.world_size or 1) <= 1]
    measured = [r for r in rows if r.status == STATUS_OK and r.peak_mem_bytes]
    problems: list[str] = []

    table, off = [], []
    for r in measured:
        cells, verdict = _row_check(r)
        table.append(cells)
        if verdict != "ok":
            off.append(f"{r.model} {r.size} {r.phase} ({verdict})")
    if table:
        out.write(render_table(
            ["model", "preset", "size", "phase", "source", "measured", "predicted", "ratio", "allowed", "reserved",
             "NVML beyond reserved", "energy", "verdict"],
            table,
        ) + "\n")
        if any(r.mem_source == "cuda-allocator" for r in measured):
            out.write(f"budgets assume a CUDA context/workspace constant of {format_bytes(CUDA_CONTEXT_BYTES)} (not "
                      "measured); 'NVML beyond reserved' is what this GPU actually used outside the allocator\n")
    else:
        problems.append(f"no measured rows in {path}: nothing was compared")
    if off:
        problems.append(f"{len(off)} measured row(s) outside tolerance or without NVML energy: {', '.join(off)}")

    failed = [r for r in rows if r.status in ERROR_STATUSES]
    if failed:
        problems.append(f"{len(failed)} config(s) failed: "
                        + "; ".join(f"{r.model} {r.size} {r.phase} {r.status}: {r.error or '(no reason recorded)'}" for r in failed))
    ooms = [r for r in rows if r.status == STATUS_OOM]
    if ooms:
        out.write(f"{len(ooms)} config(s) did not fit (oom; a finding, not a failure): "
                  + ", ".join(f"{r.model} {r.size} {r.phase}" for r in ooms) + "\n")
    if cuda:
        models = sorted({r.model for r in rows})
        on_cuda = {r.model for r in measured if r.mem_source == "cuda-allocator"}
        lacking = [m for m in models if m not in on_cuda]
        if lacking:
            problems.append(f"no config measured on CUDA for {', '.join(lacking)} (every model needs at least one)")

    for p in problems:
        out.write(f"FAIL: {p}\n")
    if problems:
        return EXIT_FAILED
    out.write(f"all {len(measured)} measured rows within tolerance of the prediction"
              + (f"; every model ({len({r.model for r in rows})}) measured on CUDA" if cuda else "") + "\n")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m idmbench.harness.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a sweep output folder (holds results.csv)")
    p.add_argument("--cuda", action="store_true", help="the sweep ran on a GPU: every model needs a row measured on CUDA")
    ns = p.parse_args(argv)
    return compare(ns.run_dir, cuda=ns.cuda)


if __name__ == "__main__":
    sys.exit(main())
