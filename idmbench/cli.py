"""``python run_bench.py`` -- the command line.

    python run_bench.py --models idm,patchddm --sizes 64,128,256     # the sweep (default command)
    python run_bench.py report DIR                                  # (re)build DIR/report.html
    python run_bench.py check [...]                                 # the CI memory-regression gate

Bad input (unknown model, malformed size, a size a model cannot take, unknown device, ``cuda`` without a
GPU, an unwritable ``--out``, bad precision / phase / budget / limit) prints one line ``error: ...`` on
stderr naming the problem and the valid choices, and exits with code 2 before anything starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Sequence

EXIT_USAGE = 2

DEFAULT_SIZES = (64, 128, 256)
DEFAULT_MAX_MEASURE_S = 180.0  # CPU: per-config measuring budget (s)
DEFAULT_MAX_SWEEP_S = 480.0  # CPU: the whole sweep's budget for measuring (s)


class UsageError(Exception):
    """A bad command line: printed as one ``error: ...`` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse would print the usage too)
        raise UsageError(f"{message} (see {self.prog} --help)")


def _fmt_help() -> type:
    class F(argparse.RawDescriptionHelpFormatter):
        def __init__(self, prog: str) -> None:
            super().__init__(prog, max_help_position=30, width=100)

    return F


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run_bench.py",
        formatter_class=_fmt_help(),
        description=(
            "Sweep 3D diffusion models x volume sizes: peak memory, energy per step and throughput of a\n"
            "training step and a sampling step, each config in its own worker process. Configs that are not\n"
            "feasible on this machine are predicted from fake tensors instead (rows labelled 'predicted').\n\n"
            "Other commands:\n"
            "  run_bench.py report DIR     rebuild DIR/report.html from DIR's result files\n"
            "  run_bench.py check [...]    memory-regression gate for CI (see run_bench.py check --help)"
        ),
        epilog=(
            "output (DIR): results.csv (a row per config, appended as each finishes), run.json (what, where,\n"
            "when), budgets.csv (largest trainable cube per budget), logs/ (worker stderr), report.html.\n"
            "Byte sizes take units: B, MB, GB (10^n), MiB, GiB (2^n); a card sold as '24 GB' has 24 GiB.\n"
            "Exit codes: 0 done (rows may still say oom/error/timeout), 2 bad input, 130 interrupted (Ctrl-C)."
        ),
    )
    a = p.add_argument
    a("--models", metavar="M1,M2", help="registered model names, comma-separated (default: every registered model); see idmbench.list_models()")
    a("--sizes", metavar="S1,S2", help="volume sizes in voxels: cube sides (64) or DxHxW (32x64x64), comma-separated "
      f"(default: those of {','.join(map(str, DEFAULT_SIZES))} every chosen model accepts)")
    a("--preset", metavar="P", help="model preset: one name for all (tiny, small, paper) or per model, e.g. "
      "'small,patchddm=paper' (default: small on CPU, paper on CUDA)")
    a("--batch", metavar="N", help="volumes per step (default 1)")
    a("--steps", metavar="N", help="timed steps per config, after warm-up (default 3 on CPU, 10 on CUDA); more are "
      "run if needed to fill the energy window")
    a("--warmup", metavar="N", help="untimed warm-up steps per config, at least 1 so the optimiser state exists "
      "(default 1 on CPU, 3 on CUDA)")
    a("--phases", metavar="P1,P2", help="what to benchmark: train (one AdamW step), sample (one DDIM step of the "
      "whole volume), comma-separated (default train,sample)")
    a("--device", metavar="D", help="auto | cpu | cuda | cuda:N (default auto: cuda if a GPU is visible, else cpu)")
    a("--precision", metavar="P", help="fp32 | bf16 | fp16: autocast dtype of the forward pass (default fp32; fp16 "
      "on CUDA uses a GradScaler)")
    a("--out", metavar="DIR", help="output folder (default reports/<YYYYmmdd-HHMMSS>/); must not hold results "
      "already (use --resume)")
    a("--predict", action="store_true", help="predict every config from fake tensors (memory and FLOPs, about a "
      "second each); measure nothing")
    a("--budget", metavar="B1,B2", help="memory budgets in bytes with units for the largest-trainable-cube table, "
      "e.g. 24GiB,40GiB,80GiB, or 'none' (default 16GiB,24GiB,40GiB,80GiB)")
    a("--resume", metavar="DIR", help="continue the sweep in DIR: configs already in DIR/results.csv are skipped; "
      "the other settings come from DIR/run.json unless given again")
    a("--timeout", metavar="SECONDS", help="wall-clock limit per config in seconds; the worker is then killed and "
      "the row says timeout (default 600)")
    a("--cpu-memory-limit", metavar="BYTES", help="cap each CPU worker's address space (RLIMIT_AS), e.g. 2GiB; a "
      "config that needs more ends as an 'oom' row (configs predicted above the limit are run on purpose); "
      "the worker itself takes ~1 GiB of address space")
    a("--max-measure-s", metavar="SECONDS", help="CPU: measure a config only if its estimated measuring time is "
      "below this many seconds, else predict it (default 180 on CPU; unlimited on CUDA; 0 or inf = unlimited)")
    a("--max-sweep-s", metavar="SECONDS", help="CPU: time budget of the whole sweep in seconds, counted from its start; "
      "a config is measured only if it fits in what is left, else predicted (default 480 on CPU; unlimited on "
      "CUDA; 0 or inf = unlimited)")
    a("--min-energy-window", metavar="SECONDS", help="shortest energy-metering window in seconds; timed steps "
      "are repeated until it is filled (default 1; NVML's counter updates about every 100 ms)")
    a("--seed", metavar="N", help="random seed for weights and data (default 0)")
    a("--no-report", action="store_true", help="do not build report.html at the end (run_bench.py report DIR later)")
    return p


# --------------------------------------------------------------------------------------------------
# validation helpers: each raises UsageError with one line naming the problem and the valid choices


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _int(text: Any, flag: str, minimum: int) -> int:
    try:
        v = int(str(text))
    except ValueError:
        raise UsageError(f"{flag} must be a whole number >= {minimum}; got {text!r}") from None
    if v < minimum:
        raise UsageError(f"{flag} must be >= {minimum}; got {v}")
    return v


def _seconds(text: Any, flag: str, *, allow_unlimited: bool = False) -> float:
    t = str(text).strip().lower()
    if allow_unlimited and t in ("inf", "none", "unlimited", "0"):
        return math.inf
    try:
        v = float(t.rstrip("s"))
    except ValueError:
        raise UsageError(f"{flag} must be a number of seconds; got {text!r}") from None
    if not v > 0 or math.isnan(v):
        raise UsageError(f"{flag} must be a positive number of seconds; got {text!r}")
    return v


def resolve_device(text: str | None) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; validates ``cpu``, ``cuda``, ``cuda:N`` against this machine."""
    import torch

    t = (text or "auto").strip().lower()
    if t == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if t == "cpu":
        return "cpu"
    if t == "cuda" or t.startswith("cuda:"):
        idx = 0
        if t.startswith("cuda:"):
            try:
                idx = int(t.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"unknown device {text!r}; valid: auto, cpu, cuda, cuda:N") from None
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {text} requested but {why} (torch {torch.__version__}); use --device cpu")
        n = torch.cuda.device_count()
        if idx >= n:
            raise UsageError(f"--device {text}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
        return f"cuda:{idx}"
    raise UsageError(f"unknown device {text!r}; valid: auto, cpu, cuda, cuda:N")


def _check_precision(precision: str, device: str) -> None:
    import torch

    from .measure.workload import PRECISIONS, autocast_dtype

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    dt = autocast_dtype(precision)
    if dt is None:
        return
    dev = "cuda" if device.startswith("cuda") else "cpu"
    if dev == "cuda":
        # no allocation here: a CUDA context in this (parent) process would sit in every worker's NVML figure
        if precision == "bf16":
            major, minor = torch.cuda.get_device_capability(torch.device(device))
            if major < 8:
                raise UsageError(f"--precision bf16 needs a GPU of compute capability >= 8.0; {device} has {major}.{minor} (use fp16)")
        return
    try:
        conv = torch.nn.Conv3d(1, 1, 1)
        with torch.autocast(device_type=dev, dtype=dt):
            y = conv(torch.zeros(1, 1, 2, 2, 2))
        if y.dtype != dt:
            raise RuntimeError(f"autocast produced {y.dtype}")
    except Exception as exc:
        hint = "; on CPU prefer --precision bf16" if precision == "fp16" else ""
        raise UsageError(f"--precision {precision} is not supported on {device} ({exc}){hint}") from None


def _parse_presets(text: str | None, models: list[str], device: str) -> dict[str, str]:
    from .registry import get_spec

    default = "paper" if device.startswith("cuda") else "small"
    presets = {m: default for m in models}
    if text:
        per: dict[str, str] = {}
        for item in _split(text):
            if "=" in item:
                m, _, p = item.partition("=")
                m, p = m.strip(), p.strip()
                if m not in models:
                    raise UsageError(f"--preset {item!r} names model {m!r}, which is not in --models ({', '.join(models)})")
                per[m] = p
            else:
                presets = {mm: item for mm in models}
        presets.update(per)
    for m, p in presets.items():
        spec = get_spec(m)
        if p not in spec.presets:
            raise UsageError(f"model {m!r} has no preset {p!r}; valid presets: {', '.join(sorted(spec.presets))}")
    return presets


def _fall_back_presets(text: str, models: list[str], presets: dict[str, str]) -> dict[str, str]:
    """With the default preset, a model that cannot take every requested size falls back to the next
    smaller preset that can (e.g. PatchDDM's reference ``paper`` network needs sides divisible by 128
    on a GPU run over 64^3), with a note on stderr. An explicit ``--preset`` is never changed."""
    from .registry import get_spec
    from .results import parse_size

    try:
        sizes = [parse_size(it) for it in _split(text)]
    except ValueError:
        return presets  # _parse_sizes reports it
    out = dict(presets)
    order = ["paper", "small", "tiny"]
    for m in models:
        spec = get_spec(m)

        def fits(preset: str) -> bool:
            try:
                for sz in sizes:
                    spec.check_size(sz, spec.config(preset))
                return True
            except ValueError:
                return False

        if fits(out[m]):
            continue
        start = order.index(out[m]) + 1 if out[m] in order else len(order)
        for alt in order[start:]:
            if alt in spec.presets and fits(alt):
                need = spec.valid_sides(spec.config(out[m]))
                print(
                    f"note: {m}'s default preset {out[m]} needs sides that are multiples of {need}; "
                    f"using preset {alt} for {m} (pass --preset to choose)",
                    file=sys.stderr,
                )
                out[m] = alt
                break
    return out


def _parse_sizes(text: str | None, models: list[str], presets: dict[str, str]) -> list[tuple[int, int, int]]:
    from .registry import get_spec
    from .results import parse_size

    if text is None:
        sizes = []
        for s in DEFAULT_SIZES:
            try:
                for m in models:
                    get_spec(m).check_size((s, s, s), get_spec(m).config(presets[m]))
                sizes.append((s, s, s))
            except ValueError:
                continue
        if not sizes:
            mult = 1
            for m in models:
                v = get_spec(m).valid_sides(get_spec(m).config(presets[m]))
                mult = mult * v // math.gcd(mult, v)
            sizes = [(mult, mult, mult), (2 * mult,) * 3]  # type: ignore[list-item]
        return sizes
    items = _split(text)
    if not items:
        raise UsageError(f"--sizes is empty; give cube sides like 64,128 or DxHxW like 32x64x64")
    sizes: list[tuple[int, int, int]] = []
    for it in items:
        try:
            s = parse_size(it)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if s not in sizes:
            sizes.append(s)
    for m in models:
        spec = get_spec(m)
        cfg = spec.config(presets[m])
        for s in sizes:
            try:
                spec.check_size(s, cfg)
            except ValueError as exc:
                raise UsageError(f"{exc} (preset {presets[m]})") from None
    return sizes


def _parse_budgets(text: str | None) -> list[tuple[str, int]]:
    from .harness.budget import DEFAULT_BUDGETS
    from .units import parse_bytes

    items = list(DEFAULT_BUDGETS) if text is None else _split(text)
    if text is not None and [i.lower() for i in items] in (["none"], ["off"], []):
        return []
    out = []
    for it in items:
        try:
            out.append((it, parse_bytes(it, what="budget")))
        except ValueError as exc:
            raise UsageError(f"--budget: {exc}") from None
    return out


def _check_out(path: Path, *, resume: bool) -> None:
    """Create ``path`` and prove it is writable; refuse a folder that already holds results (unless resuming)."""
    if not resume and (path / "results.csv").exists():
        raise UsageError(f"--out {path} already holds results.csv; continue it with --resume {path} or choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {path} is not writable ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------------------------------


def options_from_args(ns: argparse.Namespace, argv: Sequence[str]):
    """Validate the parsed flags (and, with ``--resume``, merge DIR/run.json) into :class:`SweepOptions`."""
    from .harness.sweep import SweepOptions
    from .units import parse_bytes
    from .measure.workload import PHASES
    from .registry import list_models

    prev: dict[str, Any] = {}
    resume = ns.resume is not None
    if resume:
        rdir = Path(ns.resume)
        if not rdir.is_dir():
            raise UsageError(f"--resume {rdir}: no such folder")
        if not (rdir / "run.json").exists() and not (rdir / "results.csv").exists():
            raise UsageError(f"--resume {rdir}: not a sweep folder (no run.json or results.csv)")
        if (rdir / "run.json").exists():
            try:
                prev = json.loads((rdir / "run.json").read_text())
            except json.JSONDecodeError as exc:
                raise UsageError(f"--resume {rdir}: run.json is not valid JSON ({exc})") from None
        if ns.out is not None and Path(ns.out).resolve() != rdir.resolve():
            raise UsageError(f"--resume {rdir} writes into that folder; drop --out {ns.out}")

    def pick(name: str, key: str | None = None) -> Any:
        v = getattr(ns, name)
        if v is not None:
            return v
        return prev.get(key or name)

    available = list_models()
    models_txt = pick("models")
    if isinstance(models_txt, list):
        models = models_txt
    elif models_txt is None:
        models = available
    else:
        models = []
        for m in _split(models_txt):
            if m not in models:
                models.append(m)
        if not models:
            raise UsageError(f"--models is empty; valid models: {', '.join(available)}")
    for m in models:
        if m not in available:
            from .registry import plugin_errors

            extra = plugin_errors().get(m)
            raise UsageError(
                f"unknown model {m!r}" + (f" (its plugin failed to load: {extra})" if extra else "")
                + f"; valid models: {', '.join(available)}"
            )

    dev_txt = ns.device if ns.device is not None else (prev.get("device") if resume else None)
    device = resolve_device(dev_txt)
    is_cuda = device.startswith("cuda")

    if ns.preset is None and resume and isinstance(prev.get("presets"), dict):
        presets = {m: prev["presets"].get(m) or ("paper" if is_cuda else "small") for m in models}
        _parse_presets(",".join(f"{m}={p}" for m, p in presets.items()), models, device)
    else:
        presets = _parse_presets(ns.preset, models, device)

    sizes_v = pick("sizes")
    if ns.preset is None and not (resume and isinstance(prev.get("presets"), dict)) and sizes_v is not None:
        presets = _fall_back_presets(",".join(sizes_v) if isinstance(sizes_v, list) else sizes_v, models, presets)
    sizes = _parse_sizes(",".join(sizes_v) if isinstance(sizes_v, list) else sizes_v, models, presets)

    phases_v = pick("phases")
    phases = phases_v if isinstance(phases_v, list) else (_split(phases_v) if phases_v is not None else list(PHASES))
    if not phases:
        raise UsageError(f"--phases is empty; valid phases: {', '.join(PHASES)}")
    for ph in phases:
        if ph not in PHASES:
            raise UsageError(f"unknown phase {ph!r}; valid phases: {', '.join(PHASES)}")
    phases = [ph for ph in PHASES if ph in phases]

    precision = str(pick("precision") or "fp32").lower()
    _check_precision(precision, device)

    batch = _int(pick("batch") or 1, "--batch", 1)
    steps = _int(pick("steps") or (10 if is_cuda else 3), "--steps", 1)
    warmup = _int(pick("warmup") or (3 if is_cuda else 1), "--warmup", 1)
    seed = _int(pick("seed") if pick("seed") is not None else 0, "--seed", 0)
    timeout = _seconds(pick("timeout", "timeout_s") or 600, "--timeout")

    if ns.budget is not None:
        budgets = _parse_budgets(ns.budget)
    elif resume and isinstance(prev.get("budgets"), list):
        budgets = [(b["label"], int(b["bytes"])) for b in prev["budgets"]]
    else:
        budgets = _parse_budgets(None)

    limit = None
    if ns.cpu_memory_limit is not None:
        try:
            limit = parse_bytes(ns.cpu_memory_limit, what="--cpu-memory-limit")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if is_cuda:
            raise UsageError("--cpu-memory-limit caps CPU workers only; it cannot be combined with --device cuda")
    elif resume and prev.get("cpu_memory_limit_bytes"):
        limit = int(prev["cpu_memory_limit_bytes"])

    mm = ns.max_measure_s
    if mm is None and resume and "max_measure_s" in prev:
        max_measure = math.inf if prev["max_measure_s"] is None else float(prev["max_measure_s"])
    elif mm is None:
        max_measure = math.inf if is_cuda else DEFAULT_MAX_MEASURE_S
    else:
        max_measure = _seconds(mm, "--max-measure-s", allow_unlimited=True)

    ms = ns.max_sweep_s
    if ms is None and resume and "max_sweep_s" in prev:
        max_sweep = math.inf if prev["max_sweep_s"] is None else float(prev["max_sweep_s"])
    elif ms is None:
        max_sweep = math.inf if is_cuda else DEFAULT_MAX_SWEEP_S
    else:
        max_sweep = _seconds(ms, "--max-sweep-s", allow_unlimited=True)

    win = pick("min_energy_window", "min_energy_window_s")
    min_window = _seconds(win, "--min-energy-window") if win is not None else 1.0

    predict_only = bool(ns.predict or (resume and prev.get("predict_only") and not ns.predict))

    if resume:
        out = Path(ns.resume)
    elif ns.out is not None:
        out = Path(ns.out)
    else:
        out = Path("reports") / datetime.now().strftime("%Y%m%d-%H%M%S")
    _check_out(out, resume=resume)

    from .measure.env import capture

    env = capture(device)
    return SweepOptions(
        models=models, presets=presets, sizes=sizes, out=out, phases=phases, batch=batch, steps=steps,
        warmup=warmup, device=device, precision=precision, predict_only=predict_only, budgets=budgets,
        timeout_s=timeout, cpu_memory_limit_bytes=limit, max_measure_s=max_measure, max_sweep_s=max_sweep, seed=seed,
        min_energy_window_s=min_window, report=not ns.no_report, resume=resume,
        command=" ".join(shlex.quote(a) for a in ["python", "run_bench.py", *argv]), env=env,
    )


def report_main(argv: Sequence[str]) -> int:
    """``run_bench.py report DIR``: build DIR/report.html from DIR's result files."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        stream = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        print("usage: run_bench.py report DIR   (writes DIR/report.html from DIR/results.csv, run.json, budgets.csv)", file=stream)
        return 0 if stream is sys.stdout else EXIT_USAGE
    d = Path(argv[0])
    if not (d / "results.csv").exists():
        print(f"error: {d} has no results.csv (not a sweep output folder)", file=sys.stderr)
        return EXIT_USAGE
    try:
        from .report import build_report
    except ImportError as exc:
        print(f"error: the report module is unavailable ({exc})", file=sys.stderr)
        return 1
    try:
        path = build_report(d)
    except Exception as exc:  # noqa: BLE001
        print(f"error: report failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    print(path)
    return 0


def check_main(argv: Sequence[str]) -> int:
    """``run_bench.py check ...``: dispatch to :func:`idmbench.check.main`."""
    try:
        from .check import main as _check
    except ImportError as exc:
        print(f"error: the check command is unavailable ({exc})", file=sys.stderr)
        return EXIT_USAGE
    return int(_check(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``run_bench.py`` and the ``idmbench`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        opts = options_from_args(ns, argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .harness.sweep import run_sweep

    return run_sweep(opts)


if __name__ == "__main__":
    sys.exit(main())
