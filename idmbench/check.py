"""The CI memory-regression gate: ``python run_bench.py check [--baseline PATH] [--tolerance 5%] [--update]``.

Computes deterministic memory figures for every registered model and compares them with a committed
baseline (default ``reports/baseline/memory.json``):

* ``predicted_peak_bytes`` -- the peak live tensor bytes of one training step (parameters, gradients,
  AdamW state, activations) and one DDIM sampling step, on fake tensors (``FakeTensorMode``), for the
  ``small`` and ``paper`` presets at sizes up to 256^3;
* ``measured_activation_bytes`` -- the activation peak of one real forward + backward on CPU tensors
  at 16^3 (``small``), from live-tensor accounting (MemTracker).

Both are tensor accounting, not allocator readings or timings, so they are the same on every machine
with the same torch version. Exit codes: 0 all within tolerance; 1 a figure grew beyond the tolerance
or an invariant failed; 2 bad input (missing/malformed baseline, unknown model, bad tolerance).

Invariants no baseline update can waive:

* IDM's predicted training peak at 128^3 is at most half of ``unet``'s (both ``small``: parameter
  counts within 25 % of each other);
* IDM's activation memory does not grow with ``blocks_per_level`` (2 -> 8: at most +10 %) and, at 8
  blocks, is at most a third of the same network with plain autograd.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .harness.progress import render_table
from .units import format_bytes

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2
DEFAULT_BASELINE = Path("reports/baseline/memory.json")
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


class CheckError(Exception):
    """Bad input: one line, exit code 2."""


@dataclass
class Figure:
    model: str
    preset: str
    size: str
    phase: str
    kind: str
    value: int

    def key(self) -> tuple[str, str, str, str, str]:
        return (self.model, self.preset, self.size, self.phase, self.kind)


@dataclass
class Invariant:
    name: str
    ok: bool
    detail: str


# --------------------------------------------------------------------------------------------- figures


def _gib(n: float | int | None) -> str:
    return format_bytes(n, digits=3)


def predicted_figures(models: Sequence[str]) -> list[Figure]:
    from .measure.predict import Predictor
    from .registry import get_spec

    out: list[Figure] = []
    for name in models:
        spec = get_spec(name)
        for (preset, phase), sides in PREDICTED.items():
            if preset not in spec.presets:
                continue
            multiple = spec.valid_sides(spec.config(preset))
            pred = Predictor(name, preset, flops=False)
            for side in sides:
                if side % multiple:
                    continue
                p = pred.predict(side, phase)
                if p.error or p.peak_bytes is None:
                    raise RuntimeError(f"prediction failed for {name} {preset} {side}^3 {phase}: {p.error}")
                out.append(Figure(name, preset, str(side), phase, "predicted_peak_bytes", int(p.peak_bytes)))
    return out


def measured_activation(name: str, preset: str, side: int, **overrides: Any) -> int:
    """Activation peak (bytes) of one real forward + backward on CPU tensors (live-tensor accounting)."""
    import torch

    from .measure.memory import training_activation_bytes
    from .registry import create_model, get_spec

    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, preset=preset, **overrides)
    ex = spec.probe_example((side,) * 3, spec.config(preset, **overrides))  # the recipe's training input (patch + coords, ...)
    return int(training_activation_bytes(model, ex.x0, torch.tensor([500]), **ex.model_kwargs).activation_bytes)


def predicted_activation(name: str, preset: str, side: int, **overrides: Any) -> int:
    """The same as :func:`measured_activation` on fake tensors (no allocation)."""
    from .measure.memory import fake_mode

    with warnings.catch_warnings(), fake_mode():
        warnings.simplefilter("ignore")
        return measured_activation(name, preset, side, **overrides)


def measured_figures(models: Sequence[str]) -> list[Figure]:
    from .registry import get_spec

    out = []
    for name in models:
        spec = get_spec(name)
        if MEASURED_PRESET not in spec.presets:
            continue
        if MEASURED_SIZE % spec.valid_sides(spec.config(MEASURED_PRESET)):
            continue
        value = measured_activation(name, MEASURED_PRESET, MEASURED_SIZE)
        out.append(Figure(name, MEASURED_PRESET, str(MEASURED_SIZE), "train", "measured_activation_bytes", value))
    return out


def idm_activations() -> dict[str, int]:
    """IDM's activation peaks (bytes, fake tensors, 64^3 small) at 2 and 8 blocks, and its plain twin at 8."""
    return {
        "k2": predicted_activation("idm", "small", 64, blocks_per_level=2),
        "k8": predicted_activation("idm", "small", 64, blocks_per_level=8),
        "plain8": predicted_activation("idm", "small", 64, blocks_per_level=8, memory_efficient=False),
    }


def invariants(figures: list[Figure], acts: dict[str, int] | None = None) -> list[Invariant]:
    """The checks no baseline can waive (see the module docstring)."""
    from .registry import count_parameters, create_model, list_models

    res: list[Invariant] = []
    names = list_models()
    if "idm" not in names or "unet" not in names:
        return [Invariant("idm and unet registered", False, "the invariants compare idm with unet; one is not registered")]
    by_key = {f.key(): f.value for f in figures}
    # 1. IDM vs unet at 128^3 (small presets are parameter-matched); predicted here if not in ``figures``
    vals = {}
    for n in ("idm", "unet"):
        vals[n] = by_key.get((n, "small", "128", "train", "predicted_peak_bytes"))
        if vals[n] is None:
            from .measure.predict import Predictor

            vals[n] = Predictor(n, "small", flops=False).predict(128, "train").peak_bytes
    idm, unet = vals["idm"], vals["unet"]
    pi, pu = (count_parameters(create_model(n, preset="small")) for n in ("idm", "unet"))
    comparable = 0.75 <= pi / pu <= 1.25
    res.append(Invariant(
        "idm <= 1/2 unet, train 128^3",
        bool(idm and unet and comparable and idm <= unet / 2),
        f"idm {_gib(idm)} vs unet {_gib(unet)} (ratio {idm / unet:.3f}, limit 0.5); "
        f"parameters {pi:,} vs {pu:,}{'' if comparable else ' -- NOT comparable (outside ±25 %)'}",
    ))
    # 2. activation memory independent of depth, and far below plain autograd
    acts = acts if acts is not None else idm_activations()
    a2, a8, plain8 = acts["k2"], acts["k8"], acts["plain8"]
    res.append(Invariant(
        "idm activations flat in blocks_per_level",
        a8 <= 1.10 * a2,
        f"64^3 small: {_gib(a2)} at 2 blocks, {_gib(a8)} at 8 blocks (+{(a8 / a2 - 1) * 100:.1f} %, limit +10 %)",
    ))
    res.append(Invariant(
        "idm <= 1/3 of plain autograd",
        a8 <= plain8 / 3,
        f"64^3 small, 8 blocks: {_gib(a8)} vs {_gib(plain8)} with memory_efficient=False (ratio {a8 / plain8:.3f}, limit 0.333)",
    ))
    return res


def compute(models: Sequence[str]) -> tuple[list[Figure], list[Invariant]]:
    """All figures of ``models`` and the invariants (sequential: on 2 cores a process pool measured slower)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures = compute_figures(models)
        return figures, invariants(figures)


# -------------------------------------------------------------------------------------------- baseline


def load_baseline(path: Path) -> dict[tuple, int]:
    from .registry import list_models

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
    known = set(list_models())
    out: dict[tuple, int] = {}
    for i, rec in enumerate(data["figures"]):
        try:
            f = Figure(str(rec["model"]), str(rec["preset"]), str(rec["size"]), str(rec["phase"]), str(rec["kind"]), int(rec["value"]))
        except (KeyError, TypeError, ValueError):
            raise CheckError(
                f"baseline file {path} is malformed: figure {i} needs model, preset, size, phase, kind and an integer value"
            ) from None
        if f.model not in known:
            raise CheckError(f"baseline file {path} names unknown model {f.model!r}; registered models: {', '.join(sorted(known))}")
        if f.kind not in KINDS:
            raise CheckError(f"baseline file {path}: figure {i} has unknown kind {f.kind!r}; valid: {', '.join(KINDS)}")
        if f.value <= 0:
            raise CheckError(f"baseline file {path}: figure {i} has a non-positive value {f.value}")
        out[f.key()] = f.value
    return out


def write_baseline(path: Path, figures: list[Figure]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": SCHEMA,
        "about": "Deterministic memory figures for `python run_bench.py check` (bytes; tensor accounting, "
        "not allocator readings). Regenerate with `python run_bench.py check --update`.",
        "torch_version": torch.__version__.split("+")[0],
        "figures": [dict(asdict(f), human=_gib(f.value)) for f in sorted(figures, key=lambda f: f.key())],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


def parse_tolerance(text: str) -> float:
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise CheckError(f"bad --tolerance {text!r}: give a percentage like 5% or a fraction like 0.05") from None
    if not 0 <= v < 10:
        raise CheckError(f"bad --tolerance {text!r}: must be between 0% and 1000%")
    return v


# ------------------------------------------------------------------------------------------------ main



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_bench.py check",
        description="Memory-regression gate: compare deterministic memory figures (bytes) of every registered "
        "model with a committed baseline; exit 1 on growth beyond the tolerance or a failed invariant, 2 on bad input.",
    )
    p.add_argument("--baseline", default=str(DEFAULT_BASELINE), help=f"baseline JSON (default {DEFAULT_BASELINE})")
    p.add_argument("--tolerance", default="5%", help="allowed growth per figure, e.g. 5%% or 0.05 (default 5%%)")
    p.add_argument("--update", action="store_true", help="rewrite the baseline with the current figures and say what changed")
    p.add_argument("--models", default=None, help="comma-separated subset of registered models (default: all)")
    return p


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise CheckError(f"check: {message}")


def main(argv: Sequence[str] | None = None) -> int:
    t0 = time.perf_counter()
    parser = build_parser()
    parser.__class__ = _Parser
    try:
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        tol = parse_tolerance(ns.tolerance)
        from .registry import list_models

        all_models = list_models()
        models = all_models if not ns.models else [m.strip() for m in ns.models.split(",") if m.strip()]
        bad = [m for m in models if m not in all_models]
        if bad:
            raise CheckError(f"unknown model {bad[0]!r}; valid models: {', '.join(all_models)}")
        path = Path(ns.baseline)
        baseline = None if ns.update and not path.exists() else load_baseline(path)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    figures, inv = compute(models)
    return evaluate(figures, inv, baseline, path=path, tol=tol, update=ns.update, models=models,
                    subset=bool(ns.models), started=t0)


def compute_figures(models: Sequence[str]) -> list[Figure]:
    """Every tracked figure of ``models`` (deterministic: tensor accounting on fake and CPU tensors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return predicted_figures(models) + measured_figures(models)


def evaluate(
    figures: list[Figure],
    inv: list[Invariant],
    baseline: dict[tuple, int] | None,
    *,
    path: Path,
    tol: float,
    update: bool = False,
    models: Sequence[str] = (),
    subset: bool = False,
    started: float | None = None,
) -> int:
    """Compare ``figures`` with ``baseline``, print the table and verdicts, update if asked; exit code."""
    t0 = time.perf_counter() if started is None else started

    rows, grew, shrank, new = [], [], [], []
    for f in figures:
        base = None if baseline is None else baseline.get(f.key())
        if base is None:
            change, mark = "new", "new"
            new.append(f)
        else:
            ch = f.value / base - 1
            change = f"{ch * 100:+.1f} %"
            mark = "GREW" if ch > tol else ("shrank" if ch < -tol else "ok")
            if ch > tol:
                grew.append(f)
            elif ch < -tol:
                shrank.append(f)
        label = f.kind.replace("_bytes", "").replace("_", " ")
        rows.append([f.model, f.preset, f"{f.size}^3", f.phase, label, _gib(base), _gib(f.value), change, mark])
    computed = {f.key() for f in figures}
    missing = [] if baseline is None else sorted(k for k in baseline if k[0] in models and k not in computed)
    print(render_table(["model", "preset", "size", "phase", "figure", "baseline", "now", "change", ""], rows,
                       align="lllllrrrl"))
    print()
    print("invariants (cannot be waived by --update):")
    for i in inv:
        print(f"  [{'pass' if i.ok else 'FAIL'}] {i.name}: {i.detail}")
    print()
    failed_inv = [i for i in inv if not i.ok]

    if update:
        keep = []
        if baseline is not None and subset:  # a subset run keeps the other models' figures
            keep = [Figure(*k, v) for k, v in baseline.items() if k[0] not in models]
        write_baseline(path, figures + keep)
        unchanged = len(figures) - len(grew) - len(shrank) - len(new)
        print(f"updated {path}: {len(figures)} figures computed: {len(grew)} grew, {len(shrank)} shrank, "
              f"{len(new)} new, {unchanged} unchanged within {tol * 100:g} %; {len(missing)} dropped")
        for f in grew + shrank:
            print(f"  {f.model} {f.preset} {f.size}^3 {f.phase} {f.kind}: {_gib(baseline[f.key()])} -> {_gib(f.value)}")
    else:
        for f in grew:
            print(f"REGRESSION: {f.model} {f.preset} {f.size}^3 {f.phase} {f.kind} grew from {_gib(baseline[f.key()])} "
                  f"to {_gib(f.value)} (tolerance {tol * 100:g} %)")
        if shrank:
            print(f"{len(shrank)} figure(s) shrank beyond {tol * 100:g} %: run `python run_bench.py check --update` "
                  "to lock in the improvement")
        if new:
            print(f"{len(new)} figure(s) have no baseline yet (new model or size): run `python run_bench.py check --update`")
        for k in missing:
            print(f"note: baseline figure {' '.join(k)} was not computed (model or size no longer offered)")
    for i in failed_inv:
        print(f"INVARIANT FAILED: {i.name}: {i.detail}")
    status = EXIT_REGRESSION if (failed_inv or (grew and not update)) else EXIT_OK
    print(f"check {'FAILED' if status else 'passed'} in {time.perf_counter() - t0:.1f} s")
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
