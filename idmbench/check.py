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
import json
import logging
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from .harness.console import render_table
from .units import format_bytes

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2
DEFAULT_BASELINE = Path("reports/baseline/memory.json")
DEFAULT_TOLERANCE = "5%"
SCHEMA = 1

#: (preset, phase) -> cube sides whose predicted peak is tracked (each model keeps those it accepts)
PREDICTED = {
    ("small", "train"): (128, 256),
    ("small", "sample"): (256,),
    ("paper", "train"): (256,),
    ("paper", "sample"): (256,),
}
MEASURED_SIZE, MEASURED_PRESET = 16, "small"
KINDS = ("predicted_peak_bytes", "measured_activation_bytes")

#: the invariants' settings (see the module docstring)
INVARIANT_SIZE = 128  # predicted training peaks: IDM vs its twin and vs unet
TWIN_LIMIT = 1 / 4
UNET_LIMIT = 1 / 8
PARAM_MATCH = 0.05  # small presets: parameter counts within +-5 % of each other
FLAT_SIZE, FLAT_BLOCKS, FLAT_GROWTH = 64, (2, 8), 0.10
MEASURED_TWIN_SIZE, MEASURED_TWIN_BLOCKS, MEASURED_TWIN_LIMIT = 32, 8, 1 / 3


class CheckError(Exception):
    """Bad input: one line, exit code 2."""


@dataclass
class Figure:
    """One tracked figure (bytes); ``value`` is None and ``error`` says why when it could not be computed."""

    model: str
    preset: str
    size: str
    phase: str
    kind: str
    value: int | None
    error: str = ""

    def key(self) -> tuple[str, str, str, str, str]:
        return (self.model, self.preset, self.size, self.phase, self.kind)

    def label(self) -> str:
        return f"{self.model} {self.preset} {self.size}^3 {self.phase} {self.kind}"


@dataclass
class Invariant:
    name: str
    ok: bool
    detail: str


def _gib(n: float | int | None) -> str:
    return format_bytes(n, digits=3)


def _reason(exc: BaseException) -> str:
    """One line naming ``exc`` (the predictor's format); imported late so the parser loads without torch."""
    from .measure.predict import one_line

    return one_line(exc)


# --------------------------------------------------------------------------------------------- figures


def predicted_figures(models: Sequence[str]) -> list[Figure]:
    """The tracked predicted peaks of ``models`` (a failed prediction is a Figure with ``error``)."""
    from .measure.predict import Predictor
    from .registry import get_spec

    out: list[Figure] = []
    for name in models:
        spec = get_spec(name)
        for (preset, phase), sides in PREDICTED.items():
            if preset not in spec.presets:
                continue
            try:
                multiple = spec.valid_sides(spec.config(preset))
            except Exception as exc:  # noqa: BLE001 - a broken spec is a FAIL line, not a traceback
                out.append(Figure(name, preset, "*", phase, "predicted_peak_bytes", None, _reason(exc)))
                continue
            pred = Predictor(name, preset, flops=False)
            for side in sides:
                if side % multiple:
                    continue
                p = pred.predict(side, phase)
                value = int(p.peak_bytes) if p.ok else None
                out.append(Figure(name, preset, str(side), phase, "predicted_peak_bytes", value, p.error if not p.ok else ""))
    return out


def measured_activation(name: str, preset: str, side: int, **overrides: Any) -> int:
    """Activation bytes of one real forward + backward on CPU tensors (live-tensor accounting).

    Args:
        name / preset / overrides: the model (see :func:`idmbench.create_model`).
        side: the volume's cube side (voxels); the network sees what its recipe makes of it (a patch
            model: its training patch with coordinates).
    """
    import torch

    from .measure.memory import training_activation_bytes
    from .registry import create_model, get_spec

    spec = get_spec(name)
    cfg = spec.config(preset, **overrides)
    torch.manual_seed(0)
    model = create_model(name, preset=preset, **overrides)
    ex = spec.probe_example((side,) * 3, cfg)
    return int(training_activation_bytes(model, ex.x0, torch.tensor([500]), **ex.model_kwargs).activation_bytes)


def predicted_activation(name: str, preset: str, side: int, **overrides: Any) -> int:
    """The same as :func:`measured_activation` on fake tensors (no allocation)."""
    from .measure.memory import fake_mode

    with warnings.catch_warnings(), fake_mode():
        warnings.simplefilter("ignore")
        return measured_activation(name, preset, side, **overrides)


def measured_figures(models: Sequence[str]) -> list[Figure]:
    """The measured activation figure of every model of ``models`` that takes 16^3 at ``small``."""
    from .registry import get_spec

    out = []
    for name in models:
        spec = get_spec(name)
        if MEASURED_PRESET not in spec.presets:
            continue
        fig = Figure(name, MEASURED_PRESET, str(MEASURED_SIZE), "train", "measured_activation_bytes", None)
        try:
            if MEASURED_SIZE % spec.valid_sides(spec.config(MEASURED_PRESET)):
                continue
            fig.value = measured_activation(name, MEASURED_PRESET, MEASURED_SIZE)
        except Exception as exc:  # noqa: BLE001 - a FAIL line, not a traceback
            fig.error = _reason(exc)
        out.append(fig)
    return out


def compute_figures(models: Sequence[str]) -> list[Figure]:
    """Every tracked figure of ``models`` (deterministic: tensor accounting on fake and CPU tensors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return predicted_figures(models) + measured_figures(models)


# ------------------------------------------------------------------------------------------ invariants


def _guarded(name: str, fn: Callable[[], Invariant]) -> Invariant:
    """Run one invariant; any failure to compute it is a failed invariant with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except Exception as exc:  # noqa: BLE001 - a FAIL line, never a traceback
        logger.debug("invariant %s could not be computed", name, exc_info=True)
        return Invariant(name, False, f"could not be computed: {_reason(exc)}")


def _predicted_train_peak(name: str, overrides: dict[str, Any] | None = None) -> int:
    """Predicted training peak bytes of ``name`` (``small``, ``overrides``) at INVARIANT_SIZE^3."""
    from .measure.predict import Predictor

    p = Predictor(name, "small", overrides=overrides, flops=False).predict(INVARIANT_SIZE, "train")
    if not p.ok:
        raise RuntimeError(f"prediction of {name} {overrides or ''} failed: {p.error}")
    return int(p.peak_bytes)  # type: ignore[arg-type]


def _params(name: str, overrides: dict[str, Any] | None = None) -> int:
    """Trainable parameters of ``name`` at ``small`` with ``overrides``."""
    from .registry import count_parameters, create_model

    return count_parameters(create_model(name, preset="small", **(overrides or {})))


TWIN_NAME = f"idm <= 1/4 of its plain-autograd twin, predicted train {INVARIANT_SIZE}^3"
UNET_NAME = f"idm <= 1/8 of unet (SDPA, parameter-matched), predicted train {INVARIANT_SIZE}^3"
FLAT_NAME = "idm activations flat in blocks_per_level"
MEASURED_TWIN_NAME = "idm <= 1/3 of plain autograd, measured activations"


def twin_invariant(idm_peak: int | None = None) -> Invariant:
    """IDM's predicted training peak at 128^3 <= 1/4 of ``create_model("idm", memory_efficient=False)``'s."""

    def fn() -> Invariant:
        idm = idm_peak if idm_peak is not None else _predicted_train_peak("idm")
        twin = _predicted_train_peak("idm", {"memory_efficient": False})
        return Invariant(TWIN_NAME, idm <= twin * TWIN_LIMIT,
                         f"small: {_gib(idm)} vs {_gib(twin)} with memory_efficient=False "
                         f"(ratio {idm / twin:.3f}, limit {TWIN_LIMIT:.3f})")

    return _guarded(TWIN_NAME, fn)


def unet_invariant(idm_peak: int | None = None) -> Invariant:
    """IDM's predicted training peak at 128^3 <= 1/8 of unet's with SDPA attention, parameters within 5 %."""

    def fn() -> Invariant:
        from .registry import list_models

        if "unet" not in list_models():
            return Invariant(UNET_NAME, False, "unet is not registered")
        sdpa = {"use_flash_attention": True}
        idm = idm_peak if idm_peak is not None else _predicted_train_peak("idm")
        unet = _predicted_train_peak("unet", sdpa)
        pi, pu = _params("idm"), _params("unet", sdpa)
        matched = abs(pi / pu - 1) <= PARAM_MATCH
        return Invariant(UNET_NAME, matched and idm <= unet * UNET_LIMIT,
                         f"small: {_gib(idm)} vs {_gib(unet)} (ratio {idm / unet:.3f}, limit {UNET_LIMIT:.3f}); "
                         f"parameters {pi:,} vs {pu:,} ({(pi / pu - 1) * 100:+.1f} %, limit +-{PARAM_MATCH * 100:g} %)"
                         + ("" if matched else " -- NOT parameter-matched"))

    return _guarded(UNET_NAME, fn)


def flat_invariant() -> Invariant:
    """IDM's activation bytes (fake tensors, 64^3 small) grow by at most 10 % from 2 to 8 blocks per level."""

    def fn() -> Invariant:
        lo, hi = FLAT_BLOCKS
        a_lo = predicted_activation("idm", "small", FLAT_SIZE, blocks_per_level=lo)
        a_hi = predicted_activation("idm", "small", FLAT_SIZE, blocks_per_level=hi)
        return Invariant(FLAT_NAME, a_hi <= (1 + FLAT_GROWTH) * a_lo,
                         f"{FLAT_SIZE}^3 small, predicted: {_gib(a_lo)} at {lo} blocks, {_gib(a_hi)} at {hi} blocks "
                         f"({(a_hi / a_lo - 1) * 100:+.1f} %, limit +{FLAT_GROWTH * 100:g} %)")

    return _guarded(FLAT_NAME, fn)


def measured_twin_invariant() -> Invariant:
    """IDM's measured activation bytes (CPU tensors, 32^3, 8 blocks) <= 1/3 of its plain-autograd twin's."""

    def fn() -> Invariant:
        k = MEASURED_TWIN_BLOCKS
        a = measured_activation("idm", "small", MEASURED_TWIN_SIZE, blocks_per_level=k)
        plain = measured_activation("idm", "small", MEASURED_TWIN_SIZE, blocks_per_level=k, memory_efficient=False)
        return Invariant(MEASURED_TWIN_NAME, a <= plain * MEASURED_TWIN_LIMIT,
                         f"{MEASURED_TWIN_SIZE}^3 small, {k} blocks, CPU tensors: {_gib(a)} vs {_gib(plain)} with "
                         f"memory_efficient=False (ratio {a / plain:.3f}, limit {MEASURED_TWIN_LIMIT:.3f})")

    return _guarded(MEASURED_TWIN_NAME, fn)


def invariants(figures: Sequence[Figure] = ()) -> list[Invariant]:
    """The checks no baseline can waive (see the module docstring); IDM's 128^3 peak is taken from
    ``figures`` when it is there."""
    from .registry import list_models

    if "idm" not in list_models():
        return [Invariant(n, False, "idm is not registered") for n in (TWIN_NAME, UNET_NAME, FLAT_NAME, MEASURED_TWIN_NAME)]
    idm_peak = next((f.value for f in figures if f.key() == ("idm", "small", str(INVARIANT_SIZE), "train",
                                                              "predicted_peak_bytes") and f.value), None)
    return [twin_invariant(idm_peak), unet_invariant(idm_peak), flat_invariant(), measured_twin_invariant()]


def compute(models: Sequence[str]) -> tuple[list[Figure], list[Invariant]]:
    """All figures of ``models`` and the invariants (sequential: on 2 cores a process pool measured slower)."""
    figures = compute_figures(models)
    return figures, invariants(figures)


# -------------------------------------------------------------------------------------------- baseline


def load_baseline(path: Path) -> dict[tuple, int]:
    """The baseline's figures, key -> bytes. Raises :class:`CheckError` (one line) if it is unusable.

    A figure of a model that is no longer registered is kept: it is then missing, which fails the gate.
    """
    if not path.exists():
        raise CheckError(f"baseline file {path} does not exist; create it with: python run_bench.py check --update --baseline {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckError(f"baseline file {path} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CheckError(f"baseline file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("figures"), list):
        raise CheckError(f"baseline file {path} is malformed: expected an object with a 'figures' list")
    if data.get("schema") != SCHEMA:
        raise CheckError(f"baseline file {path} has schema {data.get('schema')!r}; this idmbench reads schema {SCHEMA}")
    out: dict[tuple, int] = {}
    for i, rec in enumerate(data["figures"]):
        try:
            f = Figure(str(rec["model"]), str(rec["preset"]), str(rec["size"]), str(rec["phase"]), str(rec["kind"]), int(rec["value"]))
        except (KeyError, TypeError, ValueError):
            raise CheckError(
                f"baseline file {path} is malformed: figure {i} needs model, preset, size, phase, kind and an integer value"
            ) from None
        if f.kind not in KINDS:
            raise CheckError(f"baseline file {path}: figure {i} has unknown kind {f.kind!r}; valid: {', '.join(KINDS)}")
        if f.value is None or f.value <= 0:
            raise CheckError(f"baseline file {path}: figure {i} has a non-positive value {f.value}")
        out[f.key()] = f.value
    return out


def write_baseline(path: Path, figures: Sequence[Figure]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": SCHEMA,
        "about": "Deterministic memory figures for `python run_bench.py check` (bytes; tensor accounting, "
        "not allocator readings). Regenerate with `python run_bench.py check --update`.",
        "torch_version": torch.__version__.split("+")[0],
        "figures": [
            {"model": f.model, "preset": f.preset, "size": f.size, "phase": f.phase, "kind": f.kind,
             "value": int(f.value), "human": _gib(f.value)}  # type: ignore[arg-type]
            for f in sorted(figures, key=lambda f: f.key())
        ],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


def parse_tolerance(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05: the growth allowed per figure. Raises :class:`CheckError` (one line)."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise CheckError(f"bad --tolerance {text!r}: give a percentage like 5% or a fraction like 0.05") from None
    if not 0 <= v < 10:
        raise CheckError(f"bad --tolerance {text!r}: it is the growth allowed per figure, from 0% to 1000% (e.g. 5% or 0.05)")
    return v


# ------------------------------------------------------------------------------------------------ main

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
    from .registry import list_models

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
