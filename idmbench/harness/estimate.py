"""How long measuring a config will take on this machine: the estimates that decide measure-versus-predict
on a CPU (:mod:`.policy`) and feed the ETA (:mod:`.progress`).

A worker's wall time is modelled as ``overhead_s + (untimed_steps + timed_steps) x step_s``:

* ``step_s`` of a model in a phase, from what was measured of it (FLOPs per step from the prediction,
  median step time from the worker):

  - two or more measured sizes: the affine fit ``step_s = a + flops / rate`` through them (a: the fixed
    per-step cost of launching hundreds of small ops, which dominates small volumes on a CPU);
  - one measured size: its step time scaled by ``(flops / flops_measured) ** SCALE_EXPONENT`` (step time
    grows slower than FLOPs while the fixed cost still matters);
  - none, but a model of the same family (``unet`` for ``unet-ckpt``): the same, from the family's points;
  - nothing (a *guess*): ``(flops / PRIOR_EFFICIENCY + PRIOR_STEP_FLOPS) / conv_rate``, where
    ``conv_rate`` is the calibrated FLOP rate of a dense Conv3d (:func:`calibrate_cpu_flop_rate`, which
    also captures how loaded the machine is now).
* ``untimed_steps``: the warm-up steps and the tracked (memory) step in steady-step equivalents -- first
  steps and the live-tensor tracker cost more than a steady step. Learned per model from its measured
  warm-up and tracked-step times; before that ``warmup x`` :data:`FIRST_STEP_FACTOR` ``+``
  :data:`TRACKED_STEP_FACTOR`.
* ``timed_steps = max(steps, ceil(min_window_s / step_s))`` (the energy window).
* ``overhead_s``: interpreter, imports, model build and energy-meter start. Learned per model (process
  wall minus its steps); before that the largest learned for any model, else :data:`WORKER_STARTUP_S` +
  :data:`METER_OVERHEAD_S`.

Models of different families do not inform each other's step time: their efficiencies differ ten-fold
(measured at 32^3, ``small``, on a loaded 2-core CPU: achieved / conv rate 0.04 for IDM training, 0.34 for
the MONAI UNet; 0.04-0.44 in sampling). An estimate that rests on the prior is a *guess* and says so; the
worker checks the estimate itself after its warm-up step (:func:`remaining_measure_s`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

#: seconds to start a worker (interpreter, torch, MONAI imports, model build) on 2 cores (prior)
WORKER_STARTUP_S = 6.0
#: extra seconds per worker for the energy meter (codecarbon hardware detection and stop) (prior)
METER_OVERHEAD_S = 1.5
#: the tracked (memory) step in steady-step equivalents (dispatch-mode bookkeeping) (prior)
TRACKED_STEP_FACTOR = 1.5
#: a warm-up (first) step in steady-step equivalents: kernel selection, allocator, AdamW state (prior)
FIRST_STEP_FACTOR = 1.3
#: fraction of the calibrated Conv3d rate a whole model reaches before it was measured (prior; the
#: project's models reach 0.04-0.44 at 32^3, see the module docstring: within ~3x either way)
PRIOR_EFFICIENCY = 0.15
#: the fixed cost of one step before any was measured, in calibrated-conv FLOPs (prior: ~0.4-1 s on 2 cores)
PRIOR_STEP_FLOPS = 1e10
#: how step time grows with FLOPs when a model was measured at one size only
SCALE_EXPONENT = 0.8
#: the smallest per-step cost (s) an affine fit may return
MIN_STEP_S = 1e-3


def calibrate_cpu_flop_rate(repeats: int = 3) -> float:
    """FLOP/s of this CPU on a dense kernel: Conv3d 32->32 channels, 3^3, 32^3 voxels, forward + backward,
    fp32, median of ``repeats`` after one warm-up (about a second). Whole models reach less."""
    import torch

    from ..measure.flops import count_flops

    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, 32, 32, 32, requires_grad=True)

    def step() -> None:
        conv.zero_grad(set_to_none=True)
        conv(x).square().mean().backward()

    with count_flops() as fc:
        step()
    flops = fc.get_total_flops()
    step()  # warm-up (oneDNN primitive creation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return float(flops / max(times[len(times) // 2], 1e-6))


def timed_steps(step_s: float, steps: int, min_window_s: float) -> int:
    """Timed steps a worker runs: at least ``steps`` and enough to fill the energy window."""
    return max(steps, math.ceil(min_window_s / step_s)) if step_s > 0 else steps


def remaining_measure_s(step_s: float, *, steps: int, min_window_s: float,
                        tracked_factor: float = TRACKED_STEP_FACTOR, meter_s: float = METER_OVERHEAD_S) -> float:
    """Seconds a worker still needs after its warm-up step took ``step_s``: the tracked step, the timed
    window and the meter's start."""
    return step_s * (tracked_factor + timed_steps(step_s, steps, min_window_s)) + meter_s


@dataclass(frozen=True)
class Estimate:
    """Estimated wall time of a worker (s), its step time (s), what it rests on (``basis``) and whether it
    is a guess (on priors, nothing of the model or its family measured)."""

    seconds: float
    step_s: float
    basis: str
    guess: bool


def step_time_from(points: list[tuple[float, float]], flops: float) -> float:
    """Step time (s) at ``flops`` from measured ``(flops, step_s)`` points (see the module docstring)."""
    pts = sorted(points)
    if len(pts) >= 2:
        (f1, t1), (f2, t2) = pts[0], pts[-1]
        if f2 > f1 and t2 > t1:
            slope = (t2 - t1) / (f2 - f1)
            a = max(0.0, t1 - slope * f1)
            return max(MIN_STEP_S, a + slope * flops)
    f0, t0 = min(pts, key=lambda p: abs(math.log(p[0] / flops)))
    return max(MIN_STEP_S, t0 * (flops / f0) ** SCALE_EXPONENT)


@dataclass
class TimeEstimator:
    """Learns from measured configs and estimates the next ones (see the module docstring).

    Args:
        flop_rate: calibrated Conv3d FLOP/s of this CPU (None: no estimate before a measurement).
        steps / warmup: timed and warm-up steps per config. min_window_s: energy window (s).
        family_of: model name -> family name (models of one family share their measured points).
    """

    flop_rate: float | None = None
    steps: int = 3
    warmup: int = 1
    min_window_s: float = 1.0
    family_of: Callable[[str], str] = field(default=lambda m: m)
    points: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)  # (model, phase)
    untimed: dict[str, float] = field(default_factory=dict)  # model -> steady-step equivalents
    overhead_s: dict[str, float] = field(default_factory=dict)  # model -> seconds

    def learn_rate(self, model: str, phase: str, flops: float | None, step_time_s: float | None) -> None:
        """Remember a measured step: ``flops`` per step (prediction) took ``step_time_s`` (median, s)."""
        if not flops or not step_time_s or step_time_s <= 0:
            return
        pts = self.points.setdefault((model, phase), [])
        pts[:] = [p for p in pts if p[0] != float(flops)] + [(float(flops), float(step_time_s))]

    def learn(self, model: str, phase: str, flops: float | None, res: Any) -> None:
        """Learn from a finished worker's :class:`~idmbench.harness.records.WorkerResult` (``ok`` ones:
        its step time, warm-up and tracked-step times and its overhead)."""
        step = getattr(res, "step_time_s", None)
        self.learn_rate(model, phase, flops, step)
        if not step or step <= 0:
            return
        ps = dict(getattr(res, "phase_s", {}) or {})
        if "warmup" in ps and "track" in ps:
            self.untimed[model] = (ps["warmup"] + ps["track"]) / step
        process = ps.get("process") or getattr(res, "wall_s", None)
        if process:
            stepping = ps.get("warmup", 0.0) + ps.get("track", 0.0) + ps.get("window", 0.0)
            self.overhead_s[model] = max(0.0, float(process) - stepping)

    def _step(self, model: str, phase: str, flops: float) -> tuple[float | None, str, bool]:
        own = self.points.get((model, phase))
        if own:
            return step_time_from(own, flops), "its measured steps", False
        fam = self.family_of(model)
        kin = [p for (m, ph), pts in self.points.items() if ph == phase and self.family_of(m) == fam for p in pts]
        if kin:
            return step_time_from(kin, flops), f"measured steps of family {fam}", False
        if not self.flop_rate:
            return None, "", True
        t = (float(flops) / PRIOR_EFFICIENCY + PRIOR_STEP_FLOPS) / self.flop_rate
        return t, "the calibrated conv rate and priors (a guess)", True

    def step_s(self, model: str, phase: str, flops: float | None) -> float | None:
        """Estimated seconds per steady step (None when nothing is known)."""
        return None if not flops else self._step(model, phase, flops)[0]

    def estimate(self, model: str, phase: str, flops: float | None) -> Estimate | None:
        """Estimated wall time of a worker measuring this config (None when nothing is known)."""
        if not flops:
            return None
        t, basis, guess = self._step(model, phase, flops)
        if t is None:
            return None
        untimed = self.untimed.get(model, max(1, self.warmup) * FIRST_STEP_FACTOR + TRACKED_STEP_FACTOR)
        if model in self.overhead_s:
            overhead = self.overhead_s[model]
        elif self.overhead_s:
            overhead = max(self.overhead_s.values())
        else:
            overhead = WORKER_STARTUP_S + METER_OVERHEAD_S
        seconds = overhead + (untimed + timed_steps(t, self.steps, self.min_window_s)) * t
        return Estimate(seconds, t, basis, guess)
