"""The CI memory-regression gate: ``python run_bench.py check [--baseline PATH] [--tolerance 5%] [--update]``.

Computes deterministic memory figures for every registered model and compares them with a committed
baseline (default ``reports/baseline/memory.json``):

* ``predicted_peak_bytes`` -- the peak live tensor bytes of one training step (parameters, gradients,
  AdamW state, activations) and one DDIM sampling step, on fake tensors (``FakeTensorMode``), for the
  ``small`` and ``paper`` presets at sizes up to 256^3;
* ``measured_activation_bytes`` -- the activation bytes (:class:`~idmbench.measure.memory.MemoryPeak`'s
  one definition: peak - parameters - all gradients - optimiser state - buffers) of one real forward +
  backward on CPU tensors at 16^3 (``small``), from live-tensor accounting (MemTracker).

Both are tensor accounting, not allocator readings or timings, so they are the same on every machine
with the same torch version. Every baseline figure must still be computed: one that is not (a preset
renamed, a size no longer accepted, a model removed) fails the gate, naming it, until ``--update`` drops
it; a figure with no baseline yet is listed and taken in by ``--update``; a figure whose computation
fails prints a FAIL line.

Invariants no ``--update`` can waive (each fails when what it guards is switched off; see the tests):

* IDM's predicted training peak at 128^3 (``small``) is at most 1/4 of its own plain-autograd twin's
  (``memory_efficient=False``: the same network, so this isolates the memory-saving backward);
* ... and at most 1/8 of ``unet``'s with SDPA attention (``use_flash_attention=True``, how MONAI users
  run it), the two ``small`` presets parameter-matched within 5 %;
* IDM's activation bytes do not grow with ``blocks_per_level`` (2 -> 8 at 64^3, fake tensors: at most
  +10 %), so nothing is stored per block;
* IDM's activation bytes measured on CPU tensors (32^3, 8 blocks per level) are at most 1/3 of its
  plain-autograd twin's.

Exit codes: 0 every figure within tolerance and every invariant holds; 1 a figure grew beyond the
tolerance, a baseline figure is missing, a figure could not be computed or an invariant failed; 2 bad
input (missing/malformed baseline, unknown model, bad tolerance).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

from ..harness.console import render_table
from .baseline import DEFAULT_BASELINE, DEFAULT_TOLERANCE, SCHEMA, CheckError, load_baseline, parse_tolerance, write_baseline
from .figures import (KINDS, MEASURED_PRESET, MEASURED_SIZE, PREDICTED, Figure, _gib, compute_figures, measured_activation,
                      measured_figures, predicted_activation, predicted_figures)
from .guards import (FLAT_BLOCKS, FLAT_GROWTH, FLAT_NAME, FLAT_SIZE, INVARIANT_SIZE, MEASURED_TWIN_BLOCKS,
                         MEASURED_TWIN_LIMIT, MEASURED_TWIN_NAME, MEASURED_TWIN_SIZE, PARAM_MATCH, TWIN_LIMIT, TWIN_NAME,
                         UNET_LIMIT, UNET_NAME, Invariant, flat_invariant, invariants, measured_twin_invariant,
                         twin_invariant, unet_invariant)

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2

__all__ = [
    "CheckError", "Figure", "Invariant", "add_arguments", "build_parser", "compute", "compute_figures", "evaluate",
    "flat_invariant", "invariants", "load_baseline", "main", "measured_activation", "measured_figures",
    "measured_twin_invariant", "parse_tolerance", "predicted_activation", "predicted_figures", "run", "twin_invariant",
    "unet_invariant", "write_baseline", "DEFAULT_BASELINE", "DEFAULT_TOLERANCE", "SCHEMA", "KINDS", "PREDICTED",
    "MEASURED_SIZE", "MEASURED_PRESET", "INVARIANT_SIZE", "TWIN_LIMIT", "UNET_LIMIT", "PARAM_MATCH", "FLAT_SIZE",
    "FLAT_BLOCKS", "FLAT_GROWTH", "MEASURED_TWIN_SIZE", "MEASURED_TWIN_BLOCKS", "MEASURED_TWIN_LIMIT", "TWIN_NAME",
    "UNET_NAME", "FLAT_NAME", "MEASURED_TWIN_NAME",
]


def compute(models: Sequence[str]) -> tuple[list[Figure], list[Invariant]]:
    """All figures of ``models`` and the invariants (sequential: on 2 cores a process pool measured slower)."""
    figures = compute_figures(models)
    return figures, invariants(figures)


# -------------------------------------------------------------------------------------------- baseline


DESCRIPTION = (
    "Memory-regression gate: compare deterministic memory figures (bytes) of every registered model with a "
    "committed baseline; exit 1 on growth beyond the tolerance, a baseline figure no longer computed, a figure "
    "that cannot be computed or a failed invariant; 2 on bad input."
)

#: values such as ``-5%`` or ``-0.05`` are taken as values (then rejected with a clear message), not options
_NEGATIVE_VALUE = re.compile(r"^-\d*\.?\d+%*$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the gate's options to ``parser`` (the ``check`` subcommand's parser, or :func:`main`'s).

    ``--tolerance -5%`` reaches :func:`parse_tolerance` as a value (and gets its one-line error) instead of
    argparse's "expected one argument": the parser takes negative-looking numbers, with or without ``%``,
    as values (argparse's own rule covers plain ``-5`` only).
    """
    parser.add_argument("--baseline", default=str(DEFAULT_BASELINE), help=f"baseline JSON (default {DEFAULT_BASELINE})")
    parser.add_argument("--tolerance", default=DEFAULT_TOLERANCE,
                        help="growth allowed per figure: a percentage (5%%) or a fraction (0.05); default 5%%")
    parser.add_argument("--update", action="store_true",
                        help="rewrite the baseline with the current figures (takes in new ones, drops missing ones) "
                        "and say what changed; the invariants must still hold")
    parser.add_argument("--models", default=None, help="comma-separated subset of registered models (default: all)")
    # argparse consults this private matcher to decide whether '-5%' is a value or an option
    parser._negative_number_matcher = _NEGATIVE_VALUE  # type: ignore[attr-defined]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        raise CheckError(f"check: {message} (see run_bench.py check --help)")


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of :func:`main` (bad input raises :class:`CheckError`)."""
    p = _OneLineParser(prog="run_bench.py check", description=DESCRIPTION)
    add_arguments(p)
    return p


def _select_models(text: str | None) -> list[str]:
    from ..registry import list_models

    all_models = list_models()
    if not text:
        return all_models
    models = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in models if m not in all_models]
    if bad or not models:
        raise CheckError(f"unknown model {bad[0] if bad else text!r}; valid models: {', '.join(all_models)}")
    return models


def run(ns: argparse.Namespace) -> int:
    """Run the gate for parsed options ``ns`` (``baseline``, ``tolerance``, ``update``, ``models``); exit code."""
    t0 = time.perf_counter()
    try:
        tol = parse_tolerance(ns.tolerance)
        models = _select_models(ns.models)
        path = Path(ns.baseline)
        baseline = None if ns.update and not path.exists() else load_baseline(path)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"check: baseline {path} ({'new' if baseline is None else f'{len(baseline)} figures'}), "
          f"tolerance {tol * 100:g} % per figure, models {', '.join(models)}")
    figures, inv = compute(models)
    return evaluate(figures, inv, baseline, path=path, tol=tol, update=ns.update, models=models,
                    subset=bool(ns.models), started=t0)


def main(argv: Sequence[str] | None = None) -> int:
    """``run_bench.py check ...`` as one function (exit code); bad input prints one line and returns 2."""
    try:
        ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run(ns)


def evaluate(
    figures: Sequence[Figure],
    inv: Sequence[Invariant],
    baseline: dict[tuple, int] | None,
    *,
    path: Path,
    tol: float,
    update: bool = False,
    models: Sequence[str] = (),
    subset: bool = False,
    started: float | None = None,
) -> int:
    """Compare ``figures`` with ``baseline``, print the table and verdicts, update if asked; exit code.

    Args:
        figures / inv: what :func:`compute` returned.
        baseline: key -> bytes (:func:`load_baseline`), or None when there is none yet (``--update``).
        path: the baseline file (written with ``update``). tol: growth allowed per figure (0.05 = 5 %).
        models: the models computed. subset: whether they are a ``--models`` subset (the baseline's
            other models are then neither missing nor dropped).
    """
    t0 = time.perf_counter() if started is None else started
    base = baseline or {}
    rows, grew, shrank, new, failed = [], [], [], [], []
    for f in figures:
        b = base.get(f.key())
        change, verdict = "", "ok"
        if f.value is None:
            verdict = "FAIL"
            failed.append(f)
        elif b is None:
            change, verdict = "", "new"
            new.append(f)
        else:
            ch = f.value / b - 1
            change = f"{ch * 100:+.1f} %"
            if ch > tol:
                verdict = "GREW"
                grew.append(f)
            elif ch < -tol:
                verdict = "shrank"
                shrank.append(f)
        rows.append([f.model, f.preset, f"{f.size}^3", f.phase, f.kind.replace("_bytes", "").replace("_", " "),
                     _gib(b), _gib(f.value), change, verdict])
    computed = {f.key() for f in figures}
    missing = sorted(k for k in base if (not subset or k[0] in models) and k not in computed)
    for k in missing:
        rows.append([k[0], k[1], f"{k[2]}^3", k[3], k[4].replace("_bytes", "").replace("_", " "), _gib(base[k]), "-", "",
                     "dropped" if update else "MISSING"])
    print(render_table(["model", "preset", "size", "phase", "figure", "baseline", "now", "change", "verdict"], rows,
                       align="lllllrrrl"))
    print()
    print("invariants (cannot be waived by --update):")
    for i in inv:
        print(f"  [{'pass' if i.ok else 'FAIL'}] {i.name}: {i.detail}")
    print()
    failed_inv = [i for i in inv if not i.ok]

    for f in failed:
        print(f"FAIL: {f.label()} could not be computed: {f.error}")
    if update:
        keep = [Figure(*k, v) for k, v in base.items() if subset and k[0] not in models]  # other models' figures
        keep += [Figure(*f.key(), base[f.key()]) for f in failed if f.key() in base]  # not lost by a failure
        write_baseline(path, [f for f in figures if f.value is not None] + keep)
        unchanged = len(figures) - len(grew) - len(shrank) - len(new) - len(failed)
        print(f"updated {path}: {len(figures)} figures: {len(grew)} grew, {len(shrank)} shrank, {len(new)} new, "
              f"{unchanged} unchanged within {tol * 100:g} %, {len(missing)} dropped, {len(failed)} failed (kept)")
        for f in grew + shrank:
            print(f"  {f.label()}: {_gib(base[f.key()])} -> {_gib(f.value)}")
        for f in new:
            print(f"  new: {f.label()}: {_gib(f.value)}")
        for k in missing:
            print(f"  dropped: {' '.join(k)} (no longer computed)")
    else:
        for f in grew:
            print(f"REGRESSION: {f.label()} grew from {_gib(base[f.key()])} to {_gib(f.value)} (tolerance {tol * 100:g} %)")
        for k in missing:
            print(f"MISSING: baseline figure {k[0]} {k[1]} {k[2]}^3 {k[3]} {k[4]} is no longer computed (preset, size or "
                  "model gone?); if intended, run `python run_bench.py check --update` to drop it")
        if shrank:
            print(f"{len(shrank)} figure(s) shrank beyond {tol * 100:g} %: run `python run_bench.py check --update` "
                  "to lock in the improvement")
        if new:
            print(f"{len(new)} figure(s) have no baseline yet: "
                  + ", ".join(f.label() for f in new) + "; run `python run_bench.py check --update` to take them in")
    for i in failed_inv:
        print(f"INVARIANT FAILED: {i.name}: {i.detail}")
    bad = failed_inv or failed or (not update and (grew or missing))
    status = EXIT_REGRESSION if bad else EXIT_OK
    print(f"check {'FAILED' if status else 'passed'} in {time.perf_counter() - t0:.1f} s "
          f"(baseline {path}, tolerance {tol * 100:g} %)")
    return status
