"""One shared diffusion step for every registered model, built on MONAI's schedulers.

Training: DDPM forward process (T = 1000 linear betas), epsilon-prediction, MSE loss, AdamW.
Sampling: DDIM with N steps over the *whole* volume.

A model's :class:`~idmbench.registry.ModelSpec` decides the recipe:

* ``full`` -- the network sees the whole volume;
* ``patch`` -- PatchDDM-3D: a random patch of ``patch_fraction`` of each side, and the network also
  receives the global voxel coordinates of that patch (keyword ``coords``, shape (B, 3, d, h, w)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from .registry import ModelSpec, get_spec

NUM_TRAIN_TIMESTEPS = 1000


def make_train_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DDPMScheduler:
    """MONAI DDPM scheduler: linear betas 1e-4..2e-2, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule="linear_beta", prediction_type="epsilon")


def make_sample_scheduler(num_inference_steps: int = 50, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DDIMScheduler:
    """MONAI DDIM scheduler with ``num_inference_steps`` steps (eta = 0, deterministic)."""
    s = DDIMScheduler(num_train_timesteps=num_train_timesteps, schedule="linear_beta", prediction_type="epsilon", clip_sample=False)
    s.set_timesteps(num_inference_steps)
    return s


def global_coordinates(shape: tuple[int, int, int], batch: int = 1, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel-centre coordinates in [-1, 1] over a volume of ``shape``: (batch, 3, D, H, W)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return grid.unsqueeze(0).expand(batch, -1, -1, -1, -1)


@dataclass
class Patch:
    """A training example cut from a volume: the patch and its origin (voxels) in the volume."""

    x0: torch.Tensor
    origin: tuple[int, int, int]
    model_kwargs: dict[str, Any]


def full_volume_example(x0: torch.Tensor, spec: ModelSpec, cfg: dict, generator: torch.Generator | None = None) -> Patch:
    return Patch(x0, (0, 0, 0), {})


def random_patch_example(x0: torch.Tensor, spec: ModelSpec, cfg: dict, generator: torch.Generator | None = None) -> Patch:
    """PatchDDM-3D: crop a random patch of ``patch_fraction`` of each side, with its global coordinates."""
    size = tuple(x0.shape[2:])
    pshape = spec.train_shape(size, cfg)
    origin = tuple(
        int(torch.randint(0, s - p + 1, (1,), generator=generator).item()) if s > p else 0 for s, p in zip(size, pshape)
    )
    sl = tuple(slice(o, o + p) for o, p in zip(origin, pshape))
    coords = global_coordinates(size, x0.shape[0], device=x0.device, dtype=x0.dtype)
    patch = x0[(slice(None), slice(None)) + sl]
    cpatch = coords[(slice(None), slice(None)) + sl]
    return Patch(patch, origin, {"coords": cpatch})


RECIPES: dict[str, Callable[..., Patch]] = {"full": full_volume_example, "patch": random_patch_example}


def training_example(model_name: str | ModelSpec, x0: torch.Tensor, cfg: dict | None = None, generator: torch.Generator | None = None) -> Patch:
    spec = model_name if isinstance(model_name, ModelSpec) else get_spec(model_name)
    cfg = cfg if cfg is not None else {}
    if spec.recipe not in RECIPES:
        raise ValueError(f"{spec.name}: unknown recipe {spec.recipe!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[spec.recipe](x0, spec, cfg, generator)


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    scheduler: DDPMScheduler,
    *,
    spec: ModelSpec | str,
    cfg: dict | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The epsilon-prediction MSE loss of one batch (no backward)."""
    ex = training_example(spec, x0, cfg, generator)
    xs = ex.x0
    if noise is None:
        noise = torch.randn_like(xs) if generator is None else torch.randn(xs.shape, generator=generator, dtype=xs.dtype).to(xs.device)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (xs.shape[0],), generator=generator).to(xs.device)
    x_t = scheduler.add_noise(original_samples=xs, noise=noise, timesteps=timesteps)
    eps = model(x=x_t, timesteps=timesteps, **ex.model_kwargs)
    return F.mse_loss(eps.float(), noise.float())


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    scheduler: DDPMScheduler,
    *,
    spec: ModelSpec | str,
    cfg: dict | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_scaler: Any = None,
) -> float:
    """One optimiser step: sample t and noise, predict epsilon, MSE, backward, AdamW step. Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    dev = x0.device.type
    if autocast_dtype is not None:
        with torch.autocast(device_type=dev, dtype=autocast_dtype):
            loss = diffusion_loss(model, x0, scheduler, spec=spec, cfg=cfg, generator=generator)
    else:
        loss = diffusion_loss(model, x0, scheduler, spec=spec, cfg=cfg, generator=generator)
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def make_optimizer(model: torch.nn.Module, lr: float = 1e-5, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW (PatchDDM-3D reference: lr 1e-5)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    *,
    num_inference_steps: int = 50,
    scheduler: DDIMScheduler | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    max_steps: int | None = None,
) -> torch.Tensor:
    """DDIM sampling of a whole volume of ``shape`` = (B, C, D, H, W).

    ``max_steps`` stops after that many denoising steps (for timing one step); the full loop
    runs ``num_inference_steps`` network evaluations.
    """
    sched = scheduler or make_sample_scheduler(num_inference_steps)
    x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    dev = torch.device(device).type
    for i, t in enumerate(sched.timesteps):
        if max_steps is not None and i >= max_steps:
            break
        tt = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        if autocast_dtype is not None:
            with torch.autocast(device_type=dev, dtype=autocast_dtype):
                eps = model(x=x, timesteps=tt)
        else:
            eps = model(x=x, timesteps=tt)
        x, _ = sched.step(eps.to(x.dtype), int(t), x)
    return x
