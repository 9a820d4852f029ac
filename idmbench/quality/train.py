"""Train one model to a fixed budget through the shared diffusion step, and what that cost.

* **Step**: :func:`idmbench.diffusion.training_step` with the model's spec (its recipe decides what the
  network sees: the whole volume, a PatchDDM patch with coordinates, wavelet sub-bands) and AdamW
  (:func:`idmbench.diffusion.make_optimizer`) at the run's learning rate. Timesteps, noise (and patch
  origins) come from one ``torch.Generator`` seeded with the run's seed; the volumes of each step follow
  :func:`idmbench.data.training_order` (the same for every model); no augmentation.
* **Time** ``train_time_s``: wall time of the whole loop (``time.perf_counter``; every step ends with the
  loss read back, which synchronises a GPU), including the per-step CSV append.
* **Energy** ``train_energy_j``: one window around the whole loop with the sweep's meters
  (:func:`idmbench.measure.energy.make_meter`): NVML's counter on CUDA (``nvml``), codecarbon on CPU
  (``codecarbon-rapl`` when it reads RAPL, else ``codecarbon-estimate``: TDP x load, an *estimate*),
  ``none`` without either.
* **Peak memory** ``peak_train_mem_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` over the whole
  training (reset before it; source ``cuda-allocator``). On CPU the live-tensor peak of one steady-state
  step (:func:`idmbench.measure.memory.track_peak` around the second step of an identically built
  twin of the model, before training starts, so the tracker slows no timed step; source
  ``cpu-tensors``); if the tracker fails, the process's peak resident set after training (``rss``,
  which also counts the data, the libraries and everything else in the process).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .. import diffusion

logger = logging.getLogger(__name__)

ENERGY_WINDOW = "quality-train"
#: ``final_loss`` is the mean of the last this many step losses (one step's loss depends on its random t)
FINAL_LOSS_STEPS = 20


@dataclass
class TrainResult:
    """What training cost and where each figure came from (units in the names); ``final_loss`` is the mean
    loss of the last :data:`FINAL_LOSS_STEPS` steps."""

    steps: int
    final_loss: float | None
    train_time_s: float
    train_energy_j: float | None
    energy_source: str
    energy_note: str
    peak_train_mem_bytes: int | None
    mem_source: str
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("losses", None)
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_peak_memory(
    build: Callable[[], torch.nn.Module],
    spec: Any,
    cfg: dict,
    x0: torch.Tensor,
    *,
    lr: float,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Live-tensor peak (bytes) of one steady-state training step of a model built by ``build()``.

    One untracked step first creates the AdamW state; the second runs under
    :func:`~idmbench.measure.memory.track_peak` with the model, optimiser and batch counted.
    """
    from ..measure.memory import track_peak

    model = build().to(x0.device)
    model.train()
    opt = diffusion.make_optimizer(model, lr=lr)
    sched = diffusion.make_train_scheduler()
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        return diffusion.training_step(model, opt, x0, sched, spec=spec, cfg=cfg, generator=gen, autocast_dtype=autocast_dtype)

    step()
    _, peak = track_peak(step, model, opt, x0, module_hooks=False)
    del model, opt
    return int(peak.total_bytes)


def train_model(
    model: torch.nn.Module,
    spec: Any,
    cfg: dict,
    volumes: Sequence[torch.Tensor],
    order: Sequence[Sequence[int]],
    *,
    lr: float,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    on_step: Callable[[int, float, float], None] | None = None,
    probe: Callable[[], torch.nn.Module] | None = None,
    meter: Any = None,
) -> TrainResult:
    """Train ``model`` for ``len(order)`` steps; see the module docstring for each recorded figure.

    Args:
        model: built on ``device`` (weights seeded by the caller).
        spec, cfg: the model's :class:`~idmbench.registry.ModelSpec` and config (recipe, patch fraction).
        volumes: training volumes, each (C, D, H, W) in [-1, 1].
        order: per step, the indices into ``volumes`` of its batch (:func:`idmbench.data.training_order`).
        lr: AdamW learning rate.
        seed: seeds the generator of timesteps, noise and patch origins.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 on CUDA with a GradScaler).
        on_step: called after every step with (step, loss, seconds since training began).
        probe: CPU only: builds an identical twin for the live-tensor memory probe (None: process RSS).
        meter: an energy meter (default :func:`idmbench.measure.energy.make_meter` for ``device``).

    Raises:
        FloatingPointError: the loss became NaN or infinite (one line naming the step; lower ``lr``).
    """
    from ..measure.workload import autocast_dtype as _ac

    dev = torch.device(device)
    ac = _ac(precision)
    data = torch.stack([v.float() for v in volumes]).to(dev)  # (N, C, D, H, W)
    mem_bytes: int | None = None
    mem_source = ""
    if dev.type == "cpu" and probe is not None:
        try:
            first = list(order[0]) if order else [0]
            mem_bytes = probe_peak_memory(probe, spec, cfg, data[first], lr=lr, autocast_dtype=ac)
            mem_source = "cpu-tensors"
        except Exception as exc:  # noqa: BLE001 - fall back to RSS, say why
            logger.warning("live-tensor memory probe failed (%s: %s); recording the process peak RSS instead", type(exc).__name__, exc)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    model.train()
    opt = diffusion.make_optimizer(model, lr=lr)
    sched = diffusion.make_train_scheduler()
    gen = torch.Generator().manual_seed(int(seed))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and dev.type == "cuda" else None
    losses: list[float] = []
    energy_j: float | None = None
    source, note = "none", ""
    if meter is None and order:
        from ..measure.energy import make_meter

        meter = make_meter(str(dev))
    if order:
        meter.begin_window(ENERGY_WINDOW)  # before the clock: codecarbon's start-up is not training time
    _sync(dev)
    t0 = time.perf_counter()
    try:
        for step, idx in enumerate(order):
            x0 = data[list(idx)]
            loss = diffusion.training_step(
                model, opt, x0, sched, spec=spec, cfg=cfg, generator=gen, autocast_dtype=ac, grad_scaler=scaler
            )
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged at step {step} (loss {loss}); lower --lr")
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss, time.perf_counter() - t0)
        _sync(dev)
        train_s = time.perf_counter() - t0
    finally:
        if order:
            try:
                energy_j = meter.end_window(ENERGY_WINDOW).energy_j
            except Exception as exc:  # noqa: BLE001 - a meter failure must not lose the training
                logger.warning("energy meter failed (%s: %s)", type(exc).__name__, exc)
                energy_j = None
            source = meter.source if energy_j is not None else "none"
            note = str(getattr(meter, "note", ""))
            try:
                meter.close()
            except Exception as exc:  # noqa: BLE001 - the figure is already taken; say so, go on
                logger.warning("energy meter did not close cleanly (%s: %s)", type(exc).__name__, exc)
    if dev.type == "cuda":
        mem_bytes, mem_source = int(torch.cuda.max_memory_allocated(dev)), "cuda-allocator"
    elif mem_bytes is None:
        from ..harness.worker import peak_rss_bytes

        mem_bytes, mem_source = peak_rss_bytes(), "rss"
    del opt
    tail = losses[-FINAL_LOSS_STEPS:]
    return TrainResult(
        steps=len(order), final_loss=sum(tail) / len(tail) if tail else None, train_time_s=train_s,
        train_energy_j=energy_j, energy_source=source, energy_note=note,
        peak_train_mem_bytes=mem_bytes, mem_source=mem_source, losses=losses,
    )
