"""The unit of work every figure is about, built the same way on real tensors (measurement) and on fake
tensors (prediction).

* ``train``: one steady-state optimiser step of :func:`idmbench.diffusion.training_step` (the shared
  epsilon-prediction MSE step with AdamW; the model's recipe decides whether the network sees the whole
  volume or a PatchDDM patch). Its memory is parameters + gradients + AdamW state + activations.
* ``sample``: one DDIM denoising step of the whole volume under ``torch.no_grad``: one network
  evaluation plus the scheduler update (MONAI's ``DDIMScheduler``).

:attr:`Workload.voxels` counts the image voxels the network processes in that step (a PatchDDM
training step: the patch), the one basis for throughput and FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import diffusion
from ..registry import ModelSpec, count_parameters, create_model, get_spec

PHASES = ("train", "sample")
PRECISIONS = ("fp32", "bf16", "fp16")

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """``fp32`` -> None (no autocast); ``bf16`` / ``fp16`` -> the autocast dtype."""
    if precision not in _AUTOCAST:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return _AUTOCAST[precision]


@dataclass
class ModelState:
    """A built model (and optimiser for ``train``), reusable across volume sizes."""

    spec: ModelSpec
    cfg: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    phase: str
    device: torch.device
    precision: str
    grad_scaler: Any = None

    @property
    def params(self) -> int:
        return count_parameters(self.model)


@dataclass
class Workload:
    """One benchmarked step: ``step()`` runs it; ``track`` are the objects that existed before the step and
    count towards its memory (model, optimiser, inputs)."""

    state: ModelState
    size: tuple[int, int, int]
    batch: int
    step: Callable[[], Any]
    track: tuple[Any, ...]
    net_shape: tuple[int, ...] = field(default_factory=tuple)

    @property
    def voxels(self) -> int:
        """Image voxels the network processes in one step, per volume (batch element).

        The basis of throughput (``voxels_per_s`` = batch x voxels / step time) and of the FLOPs, which are
        counted on the same step: the whole volume for a full-volume model and for sampling, the patch
        for a PatchDDM training step, the image voxels represented by the sub-bands for a wavelet model.
        It comes from the model's recipe through ``ModelSpec.network_voxels(size, cfg, phase)``.
        """
        return int(self.state.spec.network_voxels(self.size, self.state.cfg, self.state.phase))


def build_state(
    model_name: str,
    preset: str,
    phase: str,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> ModelState:
    """Build the model (eval mode for ``sample``, AdamW for ``train``) on ``device``.

    Called inside ``FakeTensorMode`` this allocates nothing (fake parameters).
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}")
    autocast_dtype(precision)
    spec = get_spec(model_name)
    cfg = spec.config(preset, **(overrides or {}))
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = create_model(model_name, in_channels=1, out_channels=1, preset=preset, **(overrides or {}))
    if dev.type != "cpu":  # models are built on the CPU (under fake mode .to("cpu") would try to swap fakes)
        model = model.to(dev)
    optimizer = None
    scaler = None
    if phase == "train":
        model.train()
        optimizer = diffusion.make_optimizer(model)
        if precision == "fp16" and dev.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
    else:
        model.eval()  # parameters keep requires_grad (the tracker hooks them); the step runs under no_grad
    return ModelState(spec, cfg, model, optimizer, phase, dev, precision, scaler)


def make_workload(state: ModelState, size: tuple[int, int, int], batch: int = 1) -> Workload:
    """The step of ``state``'s phase on a volume of ``size`` = (D, H, W) voxels, batch ``batch``."""
    size = tuple(int(s) for s in size)  # type: ignore[assignment]
    state.spec.check_size(size, state.cfg)
    dev = state.device
    ac = autocast_dtype(state.precision)
    shape = (int(batch), 1) + tuple(size)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if state.phase == "train":
        with unset_fake_temporarily():  # a few KiB of real schedule tensors, even when predicting
            sched = diffusion.make_train_scheduler()
        x0 = torch.randn(shape, device=dev)
        model, opt, spec, cfg, scaler = state.model, state.optimizer, state.spec, state.cfg, state.grad_scaler

        def train_step() -> float:
            return diffusion.training_step(
                model, opt, x0, sched, spec=spec, cfg=cfg, autocast_dtype=ac, grad_scaler=scaler
            )

        return Workload(state, size, int(batch), train_step, (model, opt, x0), state.spec.network_shape(size, state.cfg, "train"))

    with unset_fake_temporarily():  # its timesteps are read as Python ints
        sched = diffusion.make_sample_scheduler(prediction_type=state.spec.prediction_type)
        t = int(sched.timesteps[0])
    x = torch.randn(shape, device=dev)
    tt = torch.full((int(batch),), t, dtype=torch.long, device=dev)
    model = state.model

    def sample_step() -> torch.Tensor:
        with torch.no_grad():
            if ac is not None:
                with torch.autocast(device_type=dev.type, dtype=ac):
                    eps = model(x=x, timesteps=tt)
            else:
                eps = model(x=x, timesteps=tt)
            prev, _ = sched.step(eps.to(x.dtype), t, x)
        return prev

    return Workload(state, size, int(batch), sample_step, (model, x, tt), state.spec.network_shape(size, state.cfg, "sample"))
