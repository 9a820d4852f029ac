"""The gate's figures: predicted peaks on fake tensors and measured activation bytes on CPU tensors.

Each :class:`Figure` is one deterministic number (bytes) keyed by model, preset, size, phase and kind; a
figure that cannot be computed carries the one-line reason instead of a value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from ..units import format_bytes

#: (preset, phase) -> cube sides whose predicted peak is tracked (each model keeps those it accepts)
PREDICTED = {
    ("small", "train"): (128, 256),
    ("small", "sample"): (256,),
    ("paper", "train"): (256,),
    ("paper", "sample"): (256,),
}
MEASURED_SIZE, MEASURED_PRESET = 16, "small"
KINDS = ("predicted_peak_bytes", "measured_activation_bytes")


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


def _gib(n: float | int | None) -> str:
    return format_bytes(n, digits=3)


def _reason(exc: BaseException) -> str:
    """One line naming ``exc`` (the predictor's format); imported late so the parser loads without torch."""
    from ..measure.predict import one_line

    return one_line(exc)


def predicted_figures(models: Sequence[str]) -> list[Figure]:
    """The tracked predicted peaks of ``models`` (a failed prediction is a Figure with ``error``)."""
    from ..measure.predict import Predictor
    from ..registry import get_spec

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

    from ..measure.memory import training_activation_bytes
    from ..registry import create_model, get_spec

    spec = get_spec(name)
    cfg = spec.config(preset, **overrides)
    torch.manual_seed(0)
    model = create_model(name, preset=preset, **overrides)
    ex = spec.probe_example((side,) * 3, cfg)
    return int(training_activation_bytes(model, ex.x0, torch.tensor([500]), **ex.model_kwargs).activation_bytes)


def predicted_activation(name: str, preset: str, side: int, **overrides: Any) -> int:
    """The same as :func:`measured_activation` on fake tensors (no allocation)."""
    from ..measure.memory import fake_mode

    with warnings.catch_warnings(), fake_mode():
        warnings.simplefilter("ignore")
        return measured_activation(name, preset, side, **overrides)


def measured_figures(models: Sequence[str]) -> list[Figure]:
    """The measured activation figure of every model of ``models`` that takes 16^3 at ``small``."""
    from ..registry import get_spec

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
