"""Where IDM's training memory peak is set: live tensor bytes at every layer boundary of the memory-saving
forward and backward, from the live-tensor tracker.

One forward + backward of ``model(x, t)`` with a squared-mean loss runs under PyTorch's ``MemTracker``
(the tracker behind :func:`idmbench.measure.memory.track_peak`, without module hooks). The core's
``probe`` is called at every layer boundary; there the live total is read and the peak since the
previous boundary recorded and reset, so each row says how high the memory went *while that layer ran*
(its recompute working set on top of what is alive). Every figure uses the suite's activation
definition (:class:`~idmbench.measure.memory.MemoryPeak`): live bytes minus parameters and the gradients
of all trainable parameters, so the largest row equals ``activation_bytes`` of the same step. On real
CPU tensors the figures are measured (``cpu-tensors``); under ``FakeTensorMode`` (``fake=True``) the
same code predicts them for any size (``predicted``).

``python -m idmbench.invertible.breakdown --preset small --size 64`` prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


@dataclass
class LayerPeak:
    """One segment of the step, ending at a layer boundary (bytes, activation accounting).

    Attributes:
        label: ``"backward 03 AdditiveCoupling c=16"`` (the layer that just ran), ``"forward ..."``,
            ``"forward end"`` or ``"backward end"``.
        peak_bytes: the highest live bytes while the segment ran.
        live_bytes: live bytes when it ended.
    """

    label: str
    peak_bytes: int
    live_bytes: int


@dataclass
class PeakBreakdown:
    """Activation bytes of one training forward + backward, per layer.

    Attributes:
        state_bytes: the core's live state, ``base_channels x voxels x batch x element size``.
        persistent_bytes: parameters + the gradients of every trainable parameter (subtracted everywhere).
        source: ``cpu-tensors`` (measured) or ``predicted`` (fake tensors).
        segments: one :class:`LayerPeak` per layer boundary, in execution order.
    """

    state_bytes: int
    persistent_bytes: int
    source: str
    segments: list[LayerPeak] = field(default_factory=list)

    @property
    def activation_bytes(self) -> int:
        """The step's activation peak (the largest segment peak)."""
        return max(s.peak_bytes for s in self.segments)

    @property
    def multiple(self) -> float:
        """Activation peak / live state."""
        return self.activation_bytes / self.state_bytes

    def peak_segment(self) -> LayerPeak:
        """The segment that sets the peak."""
        return max(self.segments, key=lambda s: s.peak_bytes)

    def table(self) -> str:
        """A plain-text table: segment, peak and live bytes as multiples of the state."""
        top = self.peak_segment()
        lines = [f"activation peak {self.activation_bytes / 2**20:.2f} MiB = {self.multiple:.3f} x the live state "
                 f"({self.state_bytes / 2**20:.2f} MiB; {self.source}); set by {top.label}",
                 f"{'segment':46s} {'peak':>8s} {'after':>8s}  (x live state)"]
        for s in self.segments:
            mark = "  <- peak" if s is top else ""
            lines.append(f"{s.label:46s} {s.peak_bytes / self.state_bytes:8.3f} {s.live_bytes / self.state_bytes:8.3f}{mark}")
        return "\n".join(lines)


class _BoundaryProbe:
    """Reads and resets the tracker's peak at each boundary. Uses ``MemTracker``'s current / peak totals
    (its ``_curr_mem_snap`` and ``_peak_mem``), which its public snapshot API only offers as a running
    maximum that cannot be reset."""

    def __init__(self, tracker: Any, persistent_bytes: int) -> None:
        self.tracker = tracker
        self.persistent = persistent_bytes
        self.segments: list[LayerPeak] = []

    def _current(self) -> int:
        return sum(int(s.get("Total", 0)) for s in self.tracker._curr_mem_snap.values())

    def __call__(self, label: str) -> None:
        cur = self._current()
        peak = max([cur, *(int(v) for v in self.tracker._peak_mem.values())])
        self.segments.append(LayerPeak(label, peak - self.persistent, cur - self.persistent))
        for dev in list(self.tracker._peak_mem):
            self.tracker._peak_mem[dev] = int(self.tracker._curr_mem_snap.get(dev, {}).get("Total", 0))


def backward_breakdown(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, *, fake: bool = False) -> PeakBreakdown:
    """Per-layer activation bytes of one forward + backward of ``model(x=x, timesteps=timesteps)``.

    Args:
        model: an IDM (anything with a ``core`` that has a ``probe`` attribute and ``base_channels``).
        x: (B, C, D, H, W). timesteps: (B,) or (1,) long.
        fake: whether ``model`` and ``x`` live in a ``FakeTensorMode`` (the caller enters it; see
            :func:`breakdown`): the figures are then predicted.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    from ..measure.memory import NoModuleHooks, trainable_bytes

    core = getattr(model, "core", None)
    if core is None or not hasattr(core, "probe"):
        raise ValueError(f"backward_breakdown needs an IDM (a model with an invertible core); got {type(model).__name__}")
    model.zero_grad(set_to_none=True)
    esize = max(x.element_size(), 4)
    state = int(x.shape[0] * model.base_channels * x[0, 0].numel() * esize)
    persistent = sum(p.numel() * p.element_size() for p in model.parameters()) + trainable_bytes(model)
    persistent += sum(b.numel() * b.element_size() for b in model.buffers())
    mt = MemTracker()
    mt._mod_tracker = NoModuleHooks()  # type: ignore[assignment]
    probe = _BoundaryProbe(mt, persistent)
    core.probe = probe
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mt.track_external(model, x, timesteps)
            with mt:
                probe("start")
                out = model(x=x, timesteps=timesteps)  # the step of measure.memory.training_activation_bytes
                probe("forward end")
                loss = out.float().square().mean()
                loss.backward()
                probe("backward end")
    finally:
        core.probe = None
    segments = [s for s in probe.segments if s.label != "start"]
    return PeakBreakdown(state, persistent, "predicted" if fake else "cpu-tensors", segments)


def breakdown(preset: str = "small", size: int | Sequence[int] = 32, *, fake: bool | None = None, batch: int = 1,
              seed: int = 0, **overrides: Any) -> PeakBreakdown:
    """:func:`backward_breakdown` of ``create_model("idm", preset=preset, **overrides)`` on a random volume of
    ``size`` (a side or (D, H, W)), fp32, batch ``batch``. ``fake=None`` predicts above 64^3 voxels."""
    from ..measure.memory import fake_mode
    from ..registry import create_model

    shape = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if fake is None:
        fake = shape[0] * shape[1] * shape[2] > 64**3
    ctx = fake_mode() if fake else contextlib.nullcontext()
    with ctx:
        torch.manual_seed(seed)
        model = create_model("idm", preset=preset, **overrides)
        x = torch.randn(batch, model.in_channels, *shape)
        t = torch.full((batch,), 10, dtype=torch.long)
        return backward_breakdown(model, x, t, fake=bool(fake))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idmbench.invertible.breakdown", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="IDM preset (tiny, small, paper; default small)")
    parser.add_argument("--size", type=int, default=32, help="cube side in voxels (default 32)")
    parser.add_argument("--predict", action="store_true", help="fake tensors (predicted; default above 64^3)")
    args = parser.parse_args(argv)
    print(breakdown(args.preset, args.size, fake=True if args.predict else None).table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
