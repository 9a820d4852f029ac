"""What to measure for real and what only to predict, so that a sweep on a laptop CPU finishes in minutes
and never dies of memory.

Every config is predicted just before its turn (fake tensors: memory and FLOPs, about a second). On a GPU
every config is then measured (an out-of-memory is a fast, informative ``oom`` row). On the CPU a config
is measured only when

* its predicted peak fits comfortably in the RAM available now (with ``--cpu-memory-limit``, a config
  predicted above the limit is run regardless of its estimated time: the allocation fails as soon as the
  cap is crossed, which is how the OOM path is exercised; ``--timeout`` still applies), and
* its estimated measuring time (:mod:`.estimate`: calibrated, then learned from the configs measured so
  far) is under ``--max-measure-s`` and under what is left of ``--max-sweep-s`` (the whole sweep's
  budget; configs run smallest size first, every model, so the budget goes to the small sizes of all
  models before the large sizes of any),
* and the worker itself confirms it: after the warm-up step it projects the remaining time from that
  step's real duration and gives up early (status ``skipped``) if the budget would be exceeded. So an
  optimistic estimate costs at most one warm-up step.

Everything else becomes a ``predicted`` row, and the progress output and summary say why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..units import MiB, format_bytes, format_seconds
from .estimate import WORKER_STARTUP_S, Estimate, TimeEstimator

#: a measured config needs its predicted peak x this + RSS_OVERHEAD_BYTES of RAM
MEM_SAFETY_FACTOR = 1.3
RSS_OVERHEAD_BYTES = 768 * MiB
#: fraction of the available RAM a measurement may plan to use
RAM_FRACTION = 0.8
#: assumed seconds of a config to be measured whose time cannot be estimated (for the ETA only)
UNKNOWN_MEASURE_S = 30.0


@dataclass
class Decision:
    """``measure`` or not, why (one line for the progress output and the row's notes), the estimated
    measuring time (s, ``None`` when unknown) and whether that estimate is a guess."""

    measure: bool
    reason: str
    est_s: float | None = None
    guess: bool = True


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
        family_of: model name -> family (models of one family share their measured efficiency).
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
    family_of: Callable[[str], str] = field(default=lambda m: m)
    estimator: TimeEstimator = field(init=False)

    def __post_init__(self) -> None:
        self.estimator = TimeEstimator(
            flop_rate=None if self.is_cuda else self.flop_rate, steps=self.steps, warmup=self.warmup,
            min_window_s=self.min_window_s, family_of=self.family_of,
        )

    @property
    def is_cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def learn(self, model: str, phase: str, flops: float | None, step_time_s: float | None) -> None:
        """Remember the FLOP rate a measured config achieved (used for that model's later configs)."""
        self.estimator.learn_rate(model, phase, flops, step_time_s)

    def learn_result(self, model: str, phase: str, flops: float | None, res: Any) -> None:
        """Learn everything a finished worker's result tells (rate, untimed steps, overhead)."""
        self.estimator.learn(model, phase, flops, res)

    def estimate(self, model: str, phase: str, flops: float | None) -> Estimate | None:
        """Estimated wall time of a worker measuring this config (None when no rate is known)."""
        return self.estimator.estimate(model, phase, flops)

    def estimate_s(self, model: str, phase: str, flops: float | None) -> float | None:
        """Estimated wall time (s) of a worker measuring this config (None when no rate is known)."""
        e = self.estimate(model, phase, flops)
        return None if e is None else e.seconds

    def remaining_s(self) -> float:
        """Seconds left before the sweep's deadline (``math.inf`` without one)."""
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def budget_s(self) -> float:
        """What one config may spend measuring now: ``--max-measure-s``, or less near the deadline (s)."""
        return min(self.max_measure_s, self.remaining_s())

    def decide(self, model: str, phase: str, pred: Any) -> Decision:
        """Decide for one config given its :class:`~idmbench.measure.predict.Prediction` (or anything with
        ``ok``, ``peak_bytes`` and ``flops``)."""
        if self.predict_only:
            return Decision(False, "--predict: prediction only", guess=False)
        left = self.remaining_s()
        if left <= 0:
            return Decision(False, "--max-sweep-s reached: no time left to measure", guess=False)
        ok = bool(getattr(pred, "ok", False))
        peak = pred.peak_bytes if ok else None
        est = self.estimate(model, phase, pred.flops if ok else None)
        est_s, guess = (est.seconds, est.guess) if est is not None else (None, True)
        if self.is_cuda:
            if est_s is not None and est_s > self.max_measure_s:
                return Decision(False, f"estimated {format_seconds(est_s)} > --max-measure-s {format_seconds(self.max_measure_s)}", est_s, guess)
            return Decision(True, "GPU: every config is measured", est_s, guess)
        if peak is None:
            return Decision(True, "prediction failed; measuring under the address-space cap", None)
        if self.cpu_memory_limit and peak > self.cpu_memory_limit:
            # run on purpose: the allocation fails as soon as the cap is crossed (--timeout still applies)
            return Decision(True, f"predicted {format_bytes(peak)} > --cpu-memory-limit {format_bytes(self.cpu_memory_limit)}: "
                                  "run to exercise the OOM path", WORKER_STARTUP_S + 10.0)
        need = int(peak * MEM_SAFETY_FACTOR + RSS_OVERHEAD_BYTES)
        room = int(self.available_ram * RAM_FRACTION)
        if not self.cpu_memory_limit and need > room:
            return Decision(False, f"needs ~{format_bytes(need)} of RAM, {format_bytes(self.available_ram)} available", guess=False)
        what = " (a guess)" if guess else ""
        if est_s is not None and est_s > self.max_measure_s:
            return Decision(False, f"estimated {format_seconds(est_s)}{what} to measure > --max-measure-s "
                                   f"{format_seconds(self.max_measure_s)}", est_s, guess)
        if est_s is not None and est_s > left:
            return Decision(False, f"estimated {format_seconds(est_s)}{what} to measure > the {format_seconds(left)} "
                                   "left of --max-sweep-s", est_s, guess)
        return Decision(True, "fits in RAM and in the time budget", est_s, guess)
