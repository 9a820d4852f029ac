"""What to measure for real and what only to predict, so that a sweep on a laptop CPU finishes in minutes
and never dies of memory.

Every config is predicted first (fake tensors: memory and FLOPs, about a second each). On a GPU every
config is then measured (an out-of-memory is a fast, informative ``oom`` row). On the CPU a config is
measured only when

* its predicted peak fits comfortably in the RAM available now (with ``--cpu-memory-limit``, a config
  predicted above the limit is run regardless of its estimated time: the allocation fails as soon as the
  cap is crossed, which is how the OOM path is exercised; ``--timeout`` still applies), and
* its estimated measuring time is under ``--max-measure-s`` and under what is left of ``--max-sweep-s``
  (the whole sweep's budget; configs run smallest size first, every model, so the budget goes to the
  small sizes of all models before the large sizes of any). The estimate is FLOPs per step / a FLOP rate
  x the number of steps (warm-up + tracked step + timed steps, at least the energy window). The rate is
  first a calibrated CPU rate (a Conv3d forward + backward, measured once per sweep: an optimistic rate,
  whole models reach less) and, once a model/phase has run, that model's own achieved rate.
* and the worker itself confirms it: after the warm-up step it projects the remaining time from that
  step's real duration and gives up early (status ``skipped``) if the budget would be exceeded. So an
  optimistic estimate costs at most one warm-up step.

Everything else becomes a ``predicted`` row, and the progress output and summary say why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..units import format_bytes, format_seconds

#: seconds to start a worker (interpreter, torch, MONAI imports, model build), on 2 cores
WORKER_STARTUP_S = 6.0
#: extra seconds per worker for the energy meter (codecarbon hardware detection and stop)
METER_OVERHEAD_S = 1.5
#: the tracked (memory) step is slower than a plain step (dispatch-mode bookkeeping)
TRACKED_STEP_FACTOR = 1.5
#: fraction of the calibrated Conv3d FLOP rate assumed for a whole model before one was measured
#: (norms, attention, data movement and Python overhead are not in the FLOP count; the worker's own
#: check after its warm-up step catches what this optimistic screen lets through)
UNMEASURED_RATE_FRACTION = 1.0
#: per-step fixed cost assumed (s): kernel launches and Python for hundreds of small ops
STEP_OVERHEAD_S = 0.05
#: a measured config needs its predicted peak x this + RSS_OVERHEAD_BYTES of RAM
MEM_SAFETY_FACTOR = 1.3
RSS_OVERHEAD_BYTES = 768 * 2**20
#: fraction of the available RAM a measurement may plan to use
RAM_FRACTION = 0.8


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


@dataclass
class Decision:
    """``measure`` or not, why (one line for the progress output and the row's notes), and the estimated
    measuring time (s, ``None`` when unknown)."""

    measure: bool
    reason: str
    est_s: float | None = None


@dataclass
class Policy:
    """Measure-or-predict rules for one sweep (see the module docstring).

    Args:
        device: ``cpu`` or ``cuda[:N]``.
        predict_only: ``--predict``: nothing is measured.
        max_measure_s: per-config measuring budget (s); ``math.inf`` = unlimited.
        deadline: ``time.monotonic()`` by which the sweep should be done (``--max-sweep-s``), or None.
        cpu_memory_limit: ``--cpu-memory-limit`` (bytes) or None.
        available_ram: bytes available to a worker (CPU).
        flop_rate: calibrated CPU FLOP/s (None on CUDA).
        steps / warmup: timed and warm-up steps per config. min_window_s: energy window (s).
    """

    device: str
    predict_only: bool = False
    max_measure_s: float = math.inf
    deadline: float | None = None
    cpu_memory_limit: int | None = None
    available_ram: int = 0
    flop_rate: float | None = None
    steps: int = 3
    warmup: int = 1
    min_window_s: float = 1.0
    rates: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def learn(self, model: str, phase: str, flops: float | None, step_time_s: float | None) -> None:
        """Remember the FLOP rate a measured config achieved (used for that model's later configs)."""
        if flops and step_time_s and step_time_s > 0:
            self.rates[(model, phase)] = float(flops) / float(step_time_s)

    def step_time(self, model: str, phase: str, flops: float | None) -> float | None:
        """Estimated seconds per step: FLOPs / the best rate known for this model (s)."""
        if not flops:
            return None
        rate = self.rates.get((model, phase))  # (phases differ too much to share a rate)
        if rate is None and self.flop_rate and not self.is_cuda:
            rate = self.flop_rate * UNMEASURED_RATE_FRACTION
        if rate is None:
            return None
        return STEP_OVERHEAD_S + float(flops) / rate

    def estimate_s(self, model: str, phase: str, flops: float | None) -> float | None:
        """Estimated wall time (s) of a worker measuring this config (None when no rate is known)."""
        t = self.step_time(model, phase, flops)
        if t is None:
            return None
        timed = max(self.steps, math.ceil(self.min_window_s / t)) if t > 0 else self.steps
        n = max(1, self.warmup) + TRACKED_STEP_FACTOR + timed
        return WORKER_STARTUP_S + METER_OVERHEAD_S + n * t

    def remaining_s(self) -> float:
        """Seconds left before the sweep's deadline (``math.inf`` without one)."""
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def budget_s(self) -> float:
        """What one config may spend measuring now: ``--max-measure-s``, or less near the deadline (s)."""
        return min(self.max_measure_s, self.remaining_s())

    def decide(self, model: str, phase: str, pred: Any) -> Decision:
        """Decide for one config given its :class:`~idmbench.measure.predict.Prediction`."""
        if self.predict_only:
            return Decision(False, "--predict: prediction only")
        left = self.remaining_s()
        if left <= 0:
            return Decision(False, "--max-sweep-s reached: no time left to measure")
        peak = pred.peak_bytes if getattr(pred, "ok", False) else None
        flops = pred.flops if getattr(pred, "ok", False) else None
        if self.is_cuda:
            est = self.estimate_s(model, phase, flops)
            if est is not None and est > self.max_measure_s:
                return Decision(False, f"estimated {format_seconds(est)} > --max-measure-s {format_seconds(self.max_measure_s)}", est)
            return Decision(True, "GPU: every config is measured", est)
        if peak is None:
            return Decision(True, "prediction failed; measuring under the address-space cap", None)
        if self.cpu_memory_limit and peak > self.cpu_memory_limit:
            # run on purpose: the allocation fails as soon as the cap is crossed (--timeout still applies)
            return Decision(True, f"predicted {format_bytes(peak)} > --cpu-memory-limit {format_bytes(self.cpu_memory_limit)}: "
                                  "run to exercise the OOM path", WORKER_STARTUP_S + 10.0)
        need = int(peak * MEM_SAFETY_FACTOR + RSS_OVERHEAD_BYTES)
        room = int(self.available_ram * RAM_FRACTION)
        if not self.cpu_memory_limit and need > room:
            return Decision(False, f"needs ~{format_bytes(need)} of RAM, {format_bytes(self.available_ram)} available")
        est = self.estimate_s(model, phase, flops)
        if est is not None and est > self.max_measure_s:
            return Decision(False, f"estimated {format_seconds(est)} to measure > --max-measure-s {format_seconds(self.max_measure_s)}", est)
        if est is not None and est > left:
            return Decision(False, f"estimated {format_seconds(est)} to measure > the {format_seconds(left)} left of --max-sweep-s", est)
        return Decision(True, "fits in RAM and in the time budget", est)
