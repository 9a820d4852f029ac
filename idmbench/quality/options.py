"""The validated settings of a quality run: defaults, :class:`QualityOptions`, and the checks argparse cannot do.

:func:`options_from_namespace` turns the flags of :func:`idmbench.quality.cli.add_arguments` into
:class:`QualityOptions`, checking up front everything that would otherwise fail later (unknown model or
preset, a size a model cannot take, the device and precision on this machine, the data folder, an
``--out`` that already holds a run, a ``--resume`` folder and its budget). Each problem raises
:class:`UsageError` with one line naming it and the valid choices.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_SIZE = "32"
DEFAULT_TRAIN_STEPS = 200
DEFAULT_BATCH = 1
DEFAULT_LR = 1e-4
DEFAULT_SEED = 0
DEFAULT_EVAL_T = (50, 250, 500)
DEFAULT_SAMPLES = 2
DEFAULT_SAMPLE_STEPS = 50
DEFAULT_NOISE_DRAWS = 4
DEFAULT_HELDOUT_FRACTION = 0.2
DEFAULT_SYNTHETIC_VOLUMES = 8
DEFAULT_PRESET = "small"
PRECISIONS = ("fp32", "bf16", "fp16")


class UsageError(ValueError):
    """Bad input to ``quality``: :func:`~idmbench.quality.cli.run` prints it as one ``error: ...`` line and
    returns exit code 2."""


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


@dataclass
class QualityOptions:
    """Validated settings of a quality run (see ``run_bench.py quality --help`` for each)."""

    models: list[str]
    presets: dict[str, str]
    size: tuple[int, int, int]
    data: str
    out: Path
    modalities: list[str] | None = None
    train_steps: int = DEFAULT_TRAIN_STEPS
    batch: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    seed: int = DEFAULT_SEED
    eval_t: tuple[int, ...] | list[int] = DEFAULT_EVAL_T
    noise_draws: int = DEFAULT_NOISE_DRAWS
    samples: int = DEFAULT_SAMPLES
    sample_steps: int = DEFAULT_SAMPLE_STEPS
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    synthetic_volumes: int = DEFAULT_SYNTHETIC_VOLUMES
    max_volumes: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    resume: bool = False

    @property
    def size_label(self) -> str:
        from ..results import size_label

        return size_label(self.size)

    def settings(self) -> dict[str, Any]:
        """The budget (what ``--resume`` keeps), JSON-able."""
        return {
            "models": list(self.models), "presets": dict(self.presets), "data": self.data, "size": self.size_label,
            "modalities": self.modalities, "train_steps": self.train_steps, "batch": self.batch, "lr": self.lr,
            "seed": self.seed, "eval_t": list(self.eval_t), "samples": self.samples, "sample_steps": self.sample_steps,
            "noise_draws": self.noise_draws, "heldout_fraction": self.heldout_fraction,
            "synthetic_volumes": self.synthetic_volumes, "max_volumes": self.max_volumes,
            "precision": self.precision, "device": self.device,
        }

    def command(self) -> str:
        """The command line that reruns exactly this budget."""
        ps = set(self.presets.values())
        preset = next(iter(ps)) if len(ps) == 1 else ",".join(f"{m}={p}" for m, p in self.presets.items())
        args = ["--models", ",".join(self.models), "--data", self.data, "--size", self.size_label,
                "--train-steps", self.train_steps, "--preset", preset, "--batch", self.batch, "--lr", f"{self.lr:g}",
                "--device", self.device, "--precision", self.precision, "--seed", self.seed,
                "--eval-t", ",".join(map(str, self.eval_t)), "--noise-draws", self.noise_draws,
                "--samples", self.samples, "--sample-steps", self.sample_steps,
                "--heldout-fraction", f"{self.heldout_fraction:g}"]
        if self.modalities:
            args += ["--modalities", ",".join(self.modalities)]
        if self.data == "synthetic":
            args += ["--synthetic-volumes", self.synthetic_volumes]
        if self.max_volumes:
            args += ["--max-volumes", self.max_volumes]
        args += ["--out", str(self.out)]
        return " ".join(shlex.quote(str(a)) for a in ["python", "run_bench.py", "quality", *args])


def _resolve_device(text: str | None) -> str:
    """``auto`` -> ``cuda:0`` or ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` checked against this machine."""
    import torch

    t = (text or "auto").strip().lower()
    if t == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if t == "cpu":
        return "cpu"
    if t == "cuda" or t.startswith("cuda:"):
        idx_txt = t.split(":", 1)[1] if ":" in t else "0"
        if not idx_txt.isdigit():
            raise UsageError(f"unknown device {text!r}; valid: auto, cpu, cuda, cuda:N")
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {text} requested but {why} (torch {torch.__version__}); use --device cpu")
        n = torch.cuda.device_count()
        if int(idx_txt) >= n:
            raise UsageError(f"--device {text}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
        return f"cuda:{int(idx_txt)}"
    raise UsageError(f"unknown device {text!r}; valid: auto, cpu, cuda, cuda:N")


def _check_precision(precision: str, device: str) -> None:
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    dt = torch.bfloat16 if precision == "bf16" else torch.float16
    dev = "cuda" if device.startswith("cuda") else "cpu"
    if dev == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UsageError(f"--precision bf16 is not supported on {device}; use fp16 or fp32")
        return
    try:
        with torch.autocast(device_type="cpu", dtype=dt):
            y = torch.nn.Conv3d(1, 1, 1)(torch.zeros(1, 1, 2, 2, 2))
        if y.dtype != dt:
            raise RuntimeError(f"autocast produced {y.dtype}")
    except Exception as exc:
        hint = "; on CPU use --precision bf16 or fp32" if precision == "fp16" else ""
        raise UsageError(f"--precision {precision} is not supported on {device} ({exc}){hint}") from None


def _default_models() -> list[str]:
    """Every registered model, one per network family (the first by name)."""
    from ..registry import get_spec, list_models

    out, families = [], set()
    for m in list_models():
        fam = get_spec(m).family or m
        if fam in families:
            continue
        families.add(fam)
        out.append(m)
    return out


def _check_models(models: list[str]) -> list[str]:
    from ..registry import list_models, plugin_errors

    available = list_models()
    for m in models:
        if m not in available:
            extra = plugin_errors().get(m)
            raise UsageError(
                f"unknown model {m!r}" + (f" (its plugin failed to load: {extra})" if extra else "")
                + f"; valid models: {', '.join(available)}"
            )
    return models


def _parse_presets(text: str | None, models: list[str]) -> dict[str, str]:
    from ..registry import get_spec

    presets = {m: DEFAULT_PRESET for m in models}
    if text:
        per: dict[str, str] = {}
        for item in split_list(text):
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


def _check_sizes(size: tuple[int, int, int], models: list[str], presets: dict[str, str]) -> None:
    from ..registry import get_spec

    for m in models:
        spec = get_spec(m)
        try:
            spec.check_size(size, spec.config(presets[m]))
        except ValueError as exc:
            raise UsageError(f"--size: {exc} (preset {presets[m]})") from None


def _check_out(path: Path, *, resume: bool) -> None:
    if not resume and path.is_dir() and (path / "quality.csv").exists():
        raise UsageError(f"--out {path} already holds a quality run (quality.csv); continue it with --resume {path} or choose another --out")
    from ..argtypes import UsageError as FlagError, writable_folder

    try:
        writable_folder(path)
    except FlagError as exc:
        raise UsageError(str(exc)) from None


def _previous_settings(rdir: Path) -> dict[str, Any]:
    if not rdir.is_dir():
        raise UsageError(f"--resume {rdir}: no such folder")
    rj = rdir / "run.json"
    if not rj.exists():
        raise UsageError(f"--resume {rdir}: no run.json there (not a quality run folder)")
    try:
        meta = json.loads(rj.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"--resume {rdir}: run.json is not valid JSON ({exc})") from None
    q = meta.get("quality") if isinstance(meta, dict) else None
    if not isinstance(q, dict) or "settings" not in q:
        raise UsageError(f"--resume {rdir}: run.json holds no quality run (no 'quality' key); start one with --out {rdir}")
    return dict(q["settings"])


def options_from_namespace(ns: argparse.Namespace) -> QualityOptions:
    """Validate ``ns`` (from :func:`add_arguments`) into :class:`~idmbench.quality.runner.QualityOptions`.

    Raises :class:`UsageError` (one line) on anything that would fail later.
    """
    from ..results import size_label

    resume = getattr(ns, "resume", None) is not None
    prev: dict[str, Any] = _previous_settings(Path(ns.resume)) if resume else {}
    if resume and ns.out is not None and Path(ns.out).resolve() != Path(ns.resume).resolve():
        raise UsageError(f"--resume {ns.resume} writes into that folder; drop --out {ns.out}")

    given: dict[str, Any] = {
        "data": ns.data, "size": size_label(ns.size) if ns.size is not None else None,
        "modalities": ns.modalities, "train_steps": ns.train_steps, "batch": ns.batch, "lr": ns.lr,
        "seed": ns.seed, "eval_t": ns.eval_t, "samples": ns.samples, "sample_steps": ns.sample_steps,
        "noise_draws": ns.noise_draws, "heldout_fraction": ns.heldout_fraction,
        "synthetic_volumes": ns.synthetic_volumes, "max_volumes": ns.max_volumes, "precision": ns.precision,
        "device": ns.device,
    }
    if resume:
        for k, v in given.items():
            if v is None or k not in prev:
                continue
            old = prev[k]
            same = (str(v) == str(old)) if k in ("device", "data") else (v == old or json.dumps(v) == json.dumps(old))
            if k == "device" and str(v).lower() == "auto":
                same = True
            if not same:
                flag = "--" + k.replace("_", "-")
                raise UsageError(
                    f"--resume {ns.resume} was run with {flag} {_show(old)}; drop {flag} {_show(v)} or start a new --out"
                )

    def pick(key: str, default: Any) -> Any:
        v = given.get(key)
        if v is not None:
            return v
        if key in prev and prev[key] is not None:
            return prev[key]
        return default

    models = ns.models or (prev.get("models") if resume else None) or _default_models()
    if resume and ns.models:  # a resumed run may add models (they train on the same budget)
        models = list(dict.fromkeys(list(prev.get("models") or []) + list(ns.models)))
    models = _check_models(list(models))

    device = _resolve_device(pick("device", None))
    precision = str(pick("precision", "fp32")).lower()
    _check_precision(precision, device)

    if ns.preset is None and resume and isinstance(prev.get("presets"), dict):
        presets = {m: prev["presets"].get(m, DEFAULT_PRESET) for m in models}
        _parse_presets(",".join(f"{m}={p}" for m, p in presets.items()), models)
    else:
        presets = _parse_presets(ns.preset, models)
        if resume and isinstance(prev.get("presets"), dict):
            for m, p in presets.items():
                if m in prev["presets"] and prev["presets"][m] != p:
                    raise UsageError(f"--resume {ns.resume} ran {m} at preset {prev['presets'][m]}; drop --preset or start a new --out")

    from ..results import parse_size

    size = ns.size if ns.size is not None else parse_size(str(pick("size", DEFAULT_SIZE)))
    _check_sizes(size, models, presets)

    data = str(pick("data", "synthetic"))
    if data.lower() == "synthetic":
        data = "synthetic"
    else:
        p = Path(data)
        if not p.exists():
            raise UsageError(f"--data {data}: no such folder (give a folder of NIfTI volumes or 'synthetic')")
        if not p.is_dir():
            raise UsageError(f"--data {data}: not a folder (give a folder of NIfTI volumes or 'synthetic')")
    modalities = pick("modalities", None)
    if modalities is not None and data == "synthetic":
        raise UsageError("--modalities needs --data DIR in the BraTS layout; the synthetic volumes have one channel")

    eval_t = list(pick("eval_t", list(DEFAULT_EVAL_T)))
    samples = int(pick("samples", DEFAULT_SAMPLES))
    sample_steps = int(pick("sample_steps", DEFAULT_SAMPLE_STEPS))
    from ..diffusion import NUM_TRAIN_TIMESTEPS

    if sample_steps > NUM_TRAIN_TIMESTEPS:
        raise UsageError(f"--sample-steps {sample_steps} exceeds the {NUM_TRAIN_TIMESTEPS} training timesteps; valid: 1..{NUM_TRAIN_TIMESTEPS}")

    if resume:
        out = Path(ns.resume)
    elif ns.out is not None:
        out = Path(ns.out)
    else:
        out = Path("reports") / f"quality-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    _check_out(out, resume=resume)

    return QualityOptions(
        models=models,
        presets=presets,
        size=tuple(size),
        data=data,
        modalities=list(modalities) if modalities else None,
        train_steps=int(pick("train_steps", DEFAULT_TRAIN_STEPS)),
        batch=int(pick("batch", DEFAULT_BATCH)),
        lr=float(pick("lr", DEFAULT_LR)),
        seed=int(pick("seed", DEFAULT_SEED)),
        eval_t=eval_t,
        noise_draws=int(pick("noise_draws", DEFAULT_NOISE_DRAWS)),
        samples=samples,
        sample_steps=sample_steps,
        heldout_fraction=float(pick("heldout_fraction", DEFAULT_HELDOUT_FRACTION)),
        synthetic_volumes=int(pick("synthetic_volumes", DEFAULT_SYNTHETIC_VOLUMES)),
        max_volumes=pick("max_volumes", None),
        device=device,
        precision=precision,
        out=out,
        resume=resume,
    )


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


