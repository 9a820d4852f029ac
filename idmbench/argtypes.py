"""Typed converters for command-line flags (argparse ``type=``), shared by every subcommand.

Each converter turns one string into a typed value or raises :class:`argparse.ArgumentTypeError` with a
one-line message that names the flag, what was given and what is valid; the parsers of
:mod:`idmbench.cli` print it as ``error: ...`` and exit with code 2. Converters that need the registry or
the machine (models, presets, devices) check only the syntax here; the CLI checks the rest once every flag
is known.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .results import parse_size
from .units import parse_bytes


class UsageError(Exception):
    """A bad command line found after parsing: printed as one ``error: ...`` line, exit code 2."""


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def name_list(flag: str, what: str) -> Callable[[str], list[str]]:
    """Comma-separated names (duplicates dropped, order kept); empty is refused naming ``what``."""

    def convert(text: str) -> list[str]:
        out: list[str] = []
        for n in split_list(text):
            if n not in out:
                out.append(n)
        if not out:
            raise argparse.ArgumentTypeError(f"{flag} is empty; give {what}")
        return out

    return convert


def choice_list(flag: str, kind: str, choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """Comma-separated values from ``choices``, returned in the order of ``choices``."""

    def convert(text: str) -> list[str]:
        items = split_list(text)
        if not items:
            raise argparse.ArgumentTypeError(f"{flag} is empty; valid {kind}s: {', '.join(choices)}")
        for it in items:
            if it not in choices:
                raise argparse.ArgumentTypeError(f"unknown {kind} {it!r}; valid {kind}s: {', '.join(choices)}")
        return [c for c in choices if c in items]

    return convert


def one_of(kind: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    """One value from ``choices`` (case-insensitive), with the valid ones in the error."""

    def convert(text: str) -> str:
        t = str(text).strip().lower()
        if t not in choices:
            raise argparse.ArgumentTypeError(f"unknown {kind} {text!r}; valid: {', '.join(choices)}")
        return t

    return convert


def sizes(text: str) -> list[tuple[int, int, int]]:
    """``"64,128"`` / ``"32x64x64"`` -> volume sizes (D, H, W) in voxels, duplicates dropped."""
    items = split_list(text)
    if not items:
        raise argparse.ArgumentTypeError("--sizes is empty; give cube sides like 64,128 or DxHxW like 32x64x64")
    out: list[tuple[int, int, int]] = []
    for it in items:
        try:
            s = parse_size(it)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if s not in out:
            out.append(s)
    return out


def whole(flag: str, minimum: int) -> Callable[[str], int]:
    """A whole number >= ``minimum``."""

    def convert(text: str) -> int:
        try:
            v = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number >= {minimum}; got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {minimum}; got {v}")
        return v

    return convert


def seconds(flag: str, *, unlimited: bool = False) -> Callable[[str], float]:
    """A positive number of seconds (``"90"``, ``"90s"``); with ``unlimited``, ``0``/``inf``/``none``
    mean no limit (``math.inf``)."""

    def convert(text: str) -> float:
        t = str(text).strip().lower()
        if unlimited and t in ("inf", "none", "unlimited", "0"):
            return math.inf
        try:
            v = float(t[:-1] if t.endswith("s") else t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number of seconds; got {text!r}") from None
        if not v > 0 or math.isnan(v):
            raise argparse.ArgumentTypeError(f"{flag} must be a positive number of seconds; got {text!r}")
        return v

    return convert


def byte_size(flag: str) -> Callable[[str], int]:
    """Bytes with a unit (``2GiB``, ``512MiB``, ``2GB``); see :func:`idmbench.units.parse_bytes`."""

    def convert(text: str) -> int:
        try:
            return parse_bytes(text, what=flag)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def budgets(text: str) -> list[tuple[str, int]]:
    """``"24GiB,40GiB"`` -> ``[("24GiB", bytes), ...]``; ``"none"`` -> ``[]`` (no budget search)."""
    items = split_list(text)
    if [i.lower() for i in items] in (["none"], ["off"], []):
        return []
    out = []
    for it in items:
        try:
            out.append((it, parse_bytes(it, what="budget")))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--budget: {exc}") from None
    return out


@dataclass(frozen=True)
class PresetChoice:
    """``--preset``: one preset for every model and/or per-model ones (``small,patchddm=paper``)."""

    default: str | None = None
    per_model: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        """Back to the flag's syntax."""
        return ",".join(([self.default] if self.default else []) + [f"{m}={p}" for m, p in self.per_model.items()])


def presets(text: str) -> PresetChoice:
    """``"small"`` / ``"small,patchddm=paper"`` -> :class:`PresetChoice` (names are checked against the
    models once they are known)."""
    default, per = None, {}
    items = split_list(text)
    if not items:
        raise argparse.ArgumentTypeError("--preset is empty; give a preset name (tiny, small, paper) or model=preset")
    for it in items:
        if "=" in it:
            m, _, p = it.partition("=")
            if not m.strip() or not p.strip():
                raise argparse.ArgumentTypeError(f"--preset {it!r}: use model=preset, e.g. patchddm=paper")
            per[m.strip()] = p.strip()
        else:
            default = it
    return PresetChoice(default, per)


def device(text: str) -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (syntax only; whether it exists is checked later)."""
    t = str(text).strip().lower()
    if t in ("auto", "cpu", "cuda"):
        return t
    if t.startswith("cuda:") and t[5:].isdigit():
        return t
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: auto, cpu, cuda, cuda:N")


def writable_folder(path: Path, flag: str = "--out") -> None:
    """Create the folder ``path`` and prove it is writable; :class:`UsageError` (one line) when it is a file,
    lies under a file, or cannot be written."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; choose a folder (it is created if missing)")
    blocker = next((q for q in [path, *path.parents] if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{flag} {path} is not writable: {blocker} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{flag} {path} is not writable ({exc.strerror or exc})") from None
