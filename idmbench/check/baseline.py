"""The committed baseline: reading it (one-line errors for every way it can be unusable), writing it,
and the tolerance it is compared with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .figures import KINDS, Figure, _gib

DEFAULT_BASELINE = Path("reports/baseline/memory.json")
DEFAULT_TOLERANCE = "5%"
SCHEMA = 1


class CheckError(Exception):
    """Bad input: one line, exit code 2."""


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
