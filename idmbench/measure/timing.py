"""Wall time of steps: synchronised (CUDA), warm-up excluded by the caller, median and IQR (seconds)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for all queued work on ``device`` (no-op on CPU, where ops are synchronous)."""
    if str(device).startswith("cuda"):
        import torch

        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def timed_call(step: Callable[[], Any], sync: Callable[[], None]) -> tuple[Any, float]:
    """Run ``step()`` once between two synchronisations; returns (its result, seconds)."""
    sync()
    t0 = time.perf_counter()
    out = step()
    sync()
    return out, time.perf_counter() - t0


@dataclass
class TimingStats:
    """Step times (seconds): median, interquartile range (p75 - p25), min, max and the count."""

    median_s: float
    iqr_s: float
    min_s: float
    max_s: float
    n: int

    @classmethod
    def from_times(cls, times_s: list[float]) -> "TimingStats":
        if not times_s:
            raise ValueError("no step times to summarise")
        a = np.asarray(times_s, dtype=float)
        q25, q50, q75 = np.percentile(a, [25, 50, 75])
        return cls(float(q50), float(q75 - q25), float(a.min()), float(a.max()), int(a.size))


def time_steps(step: Callable[[], Any], n: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of each of ``n`` synchronised calls of ``step``."""
    return [timed_call(step, sync)[1] for _ in range(int(n))]
