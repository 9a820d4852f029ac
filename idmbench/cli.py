"""The command line of ``python run_bench.py`` and of the ``idmbench`` console script (same program).

    run_bench.py --models idm,patchddm --sizes 64,128,256     # the sweep (the default command)
    run_bench.py report DIR                                  # (re)build DIR/report.html
    run_bench.py check [...]                                 # the CI memory-regression gate
    run_bench.py quality [...]                               # train to one budget, score, sample

argparse does the parsing: typed converters (:mod:`idmbench.argtypes`) for sizes, byte sizes, seconds,
presets and devices; a subparser per command (the ``check`` and ``quality`` modules add their own flags
through ``add_arguments(parser)`` and run through ``run(ns) -> int``); ``--resume DIR`` takes its defaults
from ``DIR/run.json`` (``set_defaults``), and refuses flags that would change what that folder holds
(models, sizes, presets, phases, batch, precision, device, seed): start a new ``--out`` for those.

Every bad input -- a malformed or unknown value, a size a model cannot take, ``cuda`` without a GPU, an
unusable ``--out`` -- goes through one path: one line ``error: ...`` on stderr naming the problem and the
valid choices, exit code 2, nothing started.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import re
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Sequence

from . import argtypes as T
from .argtypes import UsageError
from .harness import options as O
from .harness import parallel as P

logger = logging.getLogger(__name__)

EXIT_USAGE = 2

DEFAULT_BUDGETS = "16GiB,24GiB,40GiB,80GiB"
DEFAULT_MAX_MEASURE_S = 180.0  # CPU: per-config measuring budget (s)
DEFAULT_MAX_SWEEP_S = 480.0  # CPU: the whole sweep's budget for measuring (s)
PHASES = ("train", "sample")
PRECISIONS = ("fp32", "bf16", "fp16")
#: subcommands whose flags live in their own module: name -> (module, one-line help)
SUBCOMMANDS = {
    "check": ("idmbench.check", "memory-regression gate for CI (exit 0 ok, 1 regression, 2 bad input)"),
    "quality": ("idmbench.quality.cli", "train every model to one budget, then score denoising and save samples"),
}
#: sweep settings a resumed folder keeps (a different value would mix two sweeps in one results.csv)
RESUME_FIXED = ("models", "sizes", "preset", "phases", "batch", "precision", "device", "seed", "nproc", "nnodes")

__all__ = ["UsageError", "build_parser", "main", "options_from_args", "resolve_device"]


class ArgParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (:class:`UsageError`), not usage + message."""

    def error(self, message: str) -> NoReturn:
        m = re.match(r"argument ([^:]+): (.*)", message, flags=re.S)
        if m and any(flag in m.group(2) for flag in m.group(1).split("/")):
            message = m.group(2)  # the converter already named the flag
        raise UsageError(f"{' '.join(message.split())} (see {self.prog} --help)")


class _Help(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def _models(text: str) -> list[str]:
    out = T.split_list(text)
    if not out:
        from .registry import list_models

        raise argparse.ArgumentTypeError(f"--models is empty; valid models: {', '.join(list_models())}")
    return list(dict.fromkeys(out))


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's flags (each says its unit and default)."""
    a = p.add_argument
    a("--models", metavar="M1,M2", type=_models,
      help="registered model names, comma-separated (default: every registered model); see idmbench.list_models()")
    a("--sizes", metavar="S1,S2", type=T.sizes,
      help="volume sizes in voxels: cube sides (64) or DxHxW (32x64x64), comma-separated "
           f"(default: those of {','.join(map(str, O.DEFAULT_SIZES))} every chosen model accepts)")
    a("--preset", metavar="P", type=T.presets,
      help="model preset: one name for all (tiny, small, paper) or per model, e.g. 'small,patchddm=paper' "
           "(default: small on CPU, paper on CUDA; a model whose default cannot take a size falls back to a "
           "smaller preset, with a note)")
    a("--batch", metavar="N", type=T.whole("--batch", 1), help="volumes per step (default 1)")
    a("--steps", metavar="N", type=T.whole("--steps", 1),
      help="timed steps per config, after warm-up (default 3 on CPU, 10 on CUDA); more are run if needed "
           "to fill the energy window")
    a("--warmup", metavar="N", type=T.whole("--warmup", 1),
      help="untimed warm-up steps per config, at least 1 so the optimiser state exists (default 1 on CPU, 3 on CUDA)")
    a("--phases", metavar="P1,P2", type=T.choice_list("--phases", "phase", PHASES),
      help="what to benchmark: train (one AdamW step), sample (one DDIM step of the whole volume), "
           "comma-separated (default train,sample)")
    a("--device", metavar="D", type=T.device,
      help="auto | cpu | cuda | cuda:N (default auto: cuda if a GPU is visible, else cpu)")
    a("--precision", metavar="P", type=T.one_of("precision", PRECISIONS),
      help="fp32 | bf16 | fp16: autocast dtype of the forward pass (default fp32; fp16 on CUDA uses a GradScaler)")
    a("--out", metavar="DIR", help="output folder (default reports/<YYYYmmdd-HHMMSS>/); must not hold results "
                                   "already (use --resume)")
    a("--predict", action="store_true",
      help="predict every config from fake tensors (memory and FLOPs, about a second each); measure nothing")
    a("--budget", metavar="B1,B2", type=T.budgets,
      help="memory budgets in bytes with units for the largest-trainable-cube table, e.g. 24GiB,40GiB,80GiB, "
           f"or 'none' (default {DEFAULT_BUDGETS}); searched at the end")
    a("--resume", metavar="DIR",
      help="continue the sweep in DIR: configs already in DIR/results.csv and budgets already in "
           "DIR/budgets.csv are not redone; every setting comes from DIR/run.json; policy flags (--timeout, "
           "--max-measure-s, --max-sweep-s, --cpu-memory-limit, --budget, --predict, ...) may be given anew, "
           "flags that change what the folder holds (--models, --sizes, --preset, --phases, --batch, "
           "--precision, --device, --seed) are refused")
    a("--timeout", metavar="SECONDS", type=T.seconds("--timeout"),
      help="wall-clock limit per config in seconds; the worker is then killed and the row says timeout (default 600)")
    a("--cpu-memory-limit", metavar="BYTES", type=T.byte_size("--cpu-memory-limit"),
      help="cap each CPU worker's address space (RLIMIT_AS) in bytes with a unit, e.g. 2GiB; a config that "
           "needs more ends as an 'oom' row (configs predicted above the limit are run on purpose); the worker "
           "itself takes ~1 GiB of address space")
    a("--max-measure-s", metavar="SECONDS", type=T.seconds("--max-measure-s", unlimited=True),
      help="CPU: measure a config only if its estimated measuring time is below this many seconds, else "
           f"predict it (default {DEFAULT_MAX_MEASURE_S:g} on CPU; unlimited on CUDA; 0 or inf = unlimited)")
    a("--max-sweep-s", metavar="SECONDS", type=T.seconds("--max-sweep-s", unlimited=True),
      help="CPU: time budget of the whole sweep in seconds, counted from its start; a config is measured only "
           f"if it fits in what is left, else predicted (default {DEFAULT_MAX_SWEEP_S:g} on CPU; unlimited on "
           "CUDA; 0 or inf = unlimited)")
    a("--min-energy-window", metavar="SECONDS", type=T.seconds("--min-energy-window"),
      help="shortest energy-metering window in seconds; timed steps are repeated until it is filled "
           "(default 1; NVML's counter updates about every 100 ms)")
    a("--seed", metavar="N", type=T.whole("--seed", 0), help="random seed for weights and data (default 0)")
    a("--no-report", action="store_true", help="do not build report.html at the end (run_bench.py report DIR later)")
    P.add_arguments(p)


def _subcommand_module(name: str) -> Any:
    """The module behind subcommand ``name``, or None when it cannot be imported (logged)."""
    try:
        return importlib.import_module(SUBCOMMANDS[name][0])
    except Exception as exc:  # noqa: BLE001 - a broken command module must not take the sweep down
        logger.debug("%s command unavailable", name, exc_info=True)
        return _Unavailable(f"{type(exc).__name__}: {exc}")


class _Unavailable:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The whole command line: the sweep's flags and the ``report``, ``check`` and ``quality`` commands."""
    p = ArgParser(
        prog=prog,
        formatter_class=_Help,
        description=(
            "Sweep 3D diffusion models x volume sizes: peak memory, energy per step and throughput of a\n"
            "training step and a sampling step, each config in its own worker process. Configs that are not\n"
            "feasible on this machine are predicted from fake tensors instead (rows labelled 'predicted').\n\n"
            "Other commands (each has --help):\n"
            "  report DIR     rebuild DIR/report.html from DIR's result files\n"
            "  check [...]    memory-regression gate for CI\n"
            "  quality [...]  train to one budget, then score denoising (PSNR, SSIM, MAE) and save samples"
        ),
        epilog=(
            "output (DIR): results.csv (a row per config, appended as each finishes), run.json (what, where,\n"
            "when), budgets.csv (largest trainable cube per budget), logs/ (worker output, sweep.log), report.html.\n"
            "Byte sizes take units: B, MB, GB (10^n), MiB, GiB (2^n); a card sold as '24 GB' has 24 GiB.\n"
            "Exit codes: 0 done (rows may still say oom/error/timeout/killed), 2 bad input, 130 interrupted (Ctrl-C)."
        ),
    )
    add_sweep_arguments(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgParser,
                           help="report, check or quality (listed above; each has --help); none: the sweep")
    rp = sub.add_parser("report",
                        formatter_class=_Help, description="Build DIR/report.html and DIR/report.md from "
                        "DIR/results.csv, run.json and budgets.csv (no live objects: any old run can be re-reported).")
    rp.add_argument("dir", metavar="DIR", help="a sweep output folder (holds results.csv)")
    p.commands = {"report": rp}  # type: ignore[attr-defined]
    for name, (_mod, help_text) in SUBCOMMANDS.items():
        mod = _subcommand_module(name)
        sp = sub.add_parser(name, formatter_class=_Help, description=getattr(mod, "DESCRIPTION", help_text))
        if hasattr(mod, "add_arguments") and hasattr(mod, "run"):
            mod.add_arguments(sp)
        else:
            sp.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.commands[name] = sp  # type: ignore[attr-defined]
    return p


# --------------------------------------------------------------------------------------------------
# sweep settings that need the registry or the machine


def resolve_device(text: str | None) -> str:
    """``auto`` -> ``cuda:0`` or ``cpu``; checks ``cuda`` / ``cuda:N`` against this machine."""
    import torch

    t = T.device(text or "auto")
    if t in ("auto", "cpu"):
        return "cuda:0" if t == "auto" and torch.cuda.is_available() else "cpu"
    idx = int(t.split(":", 1)[1]) if ":" in t else 0
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UsageError(f"--device {text} requested but {why} (torch {torch.__version__}); use --device cpu")
    n = torch.cuda.device_count()
    if idx >= n:
        raise UsageError(f"--device {text}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    return f"cuda:{idx}"


# --------------------------------------------------------------------------------------------------
# --resume: defaults from run.json


def _refuse_changes(parser: argparse.ArgumentParser, ns: argparse.Namespace, defaults: dict[str, Any], rdir: Path) -> None:
    """``--resume`` with a flag that would change what the folder holds: one line, exit 2."""
    for flag in RESUME_FIXED:
        given = getattr(ns, flag, None)
        if given is None or flag not in defaults:
            continue
        before = getattr(parser.parse_args([f"--{flag}", defaults[flag]]), flag)
        if flag == "preset":
            same = all(before.per_model.get(m) == given.per_model.get(m, given.default) for m in before.per_model)
        elif flag == "device":
            same = resolve_device(given) == resolve_device(before)
        elif flag in ("models", "sizes", "nproc"):
            same = set(given) == set(before)
        else:
            same = given == before
        if not same:
            raise UsageError(f"--resume {rdir} ran with --{flag} {defaults[flag]}; resuming cannot change --{flag}: "
                             f"leave it out, or start a new sweep with --out")


def parse_args(argv: Sequence[str], prog: str | None = None) -> argparse.Namespace:
    """Parse ``argv`` (raises :class:`UsageError`).

    A command (``report``, ``check``, ``quality``) comes first and is parsed by its own subparser into its
    own namespace (``ns.command`` names it); anything else is the sweep. With ``--resume DIR`` every sweep
    flag not given defaults to DIR/run.json's value."""
    parser = build_parser(prog)
    argv = list(argv)
    if argv[:1] and argv[0] in parser.commands:  # type: ignore[attr-defined]
        ns = parser.commands[argv[0]].parse_args(argv[1:])  # type: ignore[attr-defined]
        ns.command = argv[0]
        return ns
    ns = parser.parse_args(argv)
    if ns.command is not None:
        raise UsageError(f"the {ns.command} command goes first (run_bench.py {ns.command} ...); "
                         "the flags before it belong to the sweep")
    ns.overrides = {}
    if ns.resume is not None:
        rdir = Path(ns.resume)
        defaults = O.resume_defaults(rdir)
        if ns.out is not None and Path(ns.out).resolve() != rdir.resolve():
            raise UsageError(f"--resume {rdir} writes into that folder; drop --out {ns.out}")
        _refuse_changes(parser, ns, defaults, rdir)
        parser.set_defaults(**defaults)
        ns = parser.parse_args(argv)
    return ns


def options_from_args(ns: argparse.Namespace, argv: Sequence[str]):
    """Check the parsed sweep flags against the registry and this machine and build
    :class:`~idmbench.harness.sweep.SweepOptions` (raises :class:`UsageError`)."""
    from .registry import list_models, plugin_errors

    available = list_models()
    models = ns.models if ns.models is not None else available
    for m in models:
        if m not in available:
            extra = plugin_errors().get(m)
            raise UsageError(f"unknown model {m!r}" + (f" (its plugin failed to load: {extra})" if extra else "")
                             + f"; valid models: {', '.join(available)}")
    device = resolve_device(ns.device)
    is_cuda = device.startswith("cuda")
    presets = O.choose_presets(ns.preset, models, device, ns.sizes)
    sizes = O.choose_sizes(ns.sizes, models, presets)
    precision = ns.precision or "fp32"
    O.check_precision(precision, device)
    if ns.cpu_memory_limit is not None and is_cuda:
        raise UsageError("--cpu-memory-limit caps CPU workers only; it cannot be combined with --device cuda")

    def unlimited_on_cuda(v: float | None, cpu_default: float) -> float:
        if (ns.nnodes or 1) > 1:  # every node must take the same measure-or-predict decisions
            if v is not None and not math.isinf(v):
                raise UsageError("--max-measure-s / --max-sweep-s cannot be used with --nnodes > 1: every node must "
                                 "measure the same configs")
            return math.inf
        return v if v is not None else (math.inf if is_cuda else cpu_default)

    nproc, launch, executor = ns.nproc or [1], P.launch_from_args(ns), ns.executor or "local"
    phases = ns.phases or list(PHASES)
    notes = P.check_parallel(nproc, launch, device, phases, executor, ns.ray_address)
    max_measure_s = unlimited_on_cuda(ns.max_measure_s, DEFAULT_MAX_MEASURE_S)
    max_sweep_s = unlimited_on_cuda(ns.max_sweep_s, DEFAULT_MAX_SWEEP_S)
    resume = ns.resume is not None
    out = Path(ns.resume) if resume else Path(ns.out) if ns.out is not None else \
        Path("reports") / datetime.now().strftime("%Y%m%d-%H%M%S")
    O.check_out(out, resume=resume)
    from .measure.env import capture

    opts = O.SweepOptions(
        models=list(models), presets=presets, sizes=sizes, out=out, phases=phases,
        batch=ns.batch or 1, steps=ns.steps or (10 if is_cuda else 3), warmup=ns.warmup or (3 if is_cuda else 1),
        device=device, precision=precision, predict_only=bool(ns.predict),
        budgets=ns.budget if ns.budget is not None else T.budgets(DEFAULT_BUDGETS),
        timeout_s=ns.timeout or 600.0, cpu_memory_limit_bytes=ns.cpu_memory_limit,
        max_measure_s=max_measure_s, max_sweep_s=max_sweep_s,
        seed=ns.seed if ns.seed is not None else 0, min_energy_window_s=ns.min_energy_window or 1.0,
        report=not ns.no_report, resume=resume, overrides=dict(getattr(ns, "overrides", None) or {}),
        command=" ".join(shlex.quote(a) for a in ["python", "run_bench.py", *argv]), env=capture(device),
        nproc=nproc, launch=launch, executor=executor, ray_address=ns.ray_address,
        ray_cpus_per_task=ns.ray_cpus_per_task or 1,
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return opts


# --------------------------------------------------------------------------------------------------
# commands


def report_main(d: Path) -> int:
    """``report DIR``: build DIR/report.html from DIR's result files (0 done, 1 failed, 2 bad folder)."""
    from .report.data import check_run_dir

    try:  # a sweep (results.csv), a quality run (quality.csv / training.csv), or both
        check_run_dir(d)
    except ValueError as exc:
        print(f"error: report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .report import build_report

    try:
        path = build_report(d)
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback in the debug log
        logger.debug("report failed", exc_info=True)
        print(f"error: report failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    print(path)
    return 0


def _run_subcommand(name: str, ns: argparse.Namespace) -> int:
    mod = _subcommand_module(name)
    if isinstance(mod, _Unavailable):
        print(f"error: the {name} command is unavailable ({mod.reason})", file=sys.stderr)
        return EXIT_USAGE
    if hasattr(mod, "run"):
        return int(mod.run(ns) or 0)
    return int(mod.main(list(ns.args)) or 0)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``run_bench.py`` and the ``idmbench`` console script; returns the exit code.

    ``prog``: the program name in usage lines (default: the name it was invoked by)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        mod = _subcommand_module(argv[0])
        if not isinstance(mod, _Unavailable) and not hasattr(mod, "add_arguments") and hasattr(mod, "main"):
            return int(mod.main(argv[1:]) or 0)  # a command module that parses its own flags
    try:
        ns = parse_args(argv, prog)
        if ns.command == "report":
            return report_main(Path(ns.dir))
        if ns.command is not None:
            return _run_subcommand(ns.command, ns)
        opts = options_from_args(ns, argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .harness.sweep import run_sweep

    return run_sweep(opts)


if __name__ == "__main__":
    sys.exit(main())
