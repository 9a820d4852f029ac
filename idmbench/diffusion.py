"""One shared diffusion step for every registered model, built on MONAI's schedulers.

Training: DDPM forward process (T = 1000 linear betas), epsilon-prediction, MSE loss, AdamW.
Sampling: DDIM with N steps over the *whole* volume.

A model's :class:`~idmbench.registry.ModelSpec` decides the recipe:

* ``full`` -- the network sees the whole volume;
* ``patch`` -- PatchDDM-3D: a random patch of ``patch_fraction`` of each side, and the network also
  receives the global voxel coordinates of that patch (keyword ``coords``, shape (B, 3, d, h, w));
* anything a plugin adds with :func:`register_recipe`.
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
    """Voxel-centre coordinates in [-1, 1] over a volume of ``shape`` (D, H, W): a (batch, 3, D, H, W) tensor.

    Channel ``a`` holds the coordinate along spatial axis ``a``: ``-1 + 2 * i / (n - 1)`` for voxel index ``i``
    of ``n`` (first voxel at -1, last at +1; 0 for an axis of length 1). The batch dimension is an
    ``expand``-ed view: no memory per batch element.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or any(n <= 0 for n in shape):
        raise ValueError(f"global_coordinates: shape must be three positive sides (D, H, W); got {shape}")
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return grid.unsqueeze(0).expand(batch, -1, -1, -1, -1)


@dataclass
class Patch:
    """A training example cut from a volume.

    Attributes:
        x0: the clean patch, (B, C, d, h, w) (the whole volume for the ``full`` recipe).
        origin: voxel index of the patch's first voxel in the volume, per spatial axis.
        model_kwargs: extra keyword arguments for the model's forward (``coords`` for ``patch``).
    """

    x0: torch.Tensor
    origin: tuple[int, int, int]
    model_kwargs: dict[str, Any]


def full_volume_example(x0: torch.Tensor, spec: ModelSpec, cfg: dict, generator: torch.Generator | None = None) -> Patch:
    """The ``full`` recipe: the network sees the whole volume."""
    return Patch(x0, (0, 0, 0), {})


def random_patch_example(x0: torch.Tensor, spec: ModelSpec, cfg: dict, generator: torch.Generator | None = None) -> Patch:
    """PatchDDM-3D: crop a random patch of ``patch_fraction`` of each side, with its global coordinates.

    One origin per batch, uniform over the positions where the patch fits; ``coords`` is the slice of
    :func:`global_coordinates` over the *whole* volume at that origin, (B, 3, d, h, w).
    """
    size = tuple(x0.shape[2:])
    pshape = spec.train_shape(size, cfg)
    origin = tuple(
        int(torch.randint(0, s - p + 1, (1,), generator=generator, device=_gen_device(generator)).item()) if s > p else 0
        for s, p in zip(size, pshape)
    )
    sl = tuple(slice(o, o + p) for o, p in zip(origin, pshape))
    coords = global_coordinates(size, x0.shape[0], device=x0.device, dtype=x0.dtype)
    patch = x0[(slice(None), slice(None)) + sl]
    cpatch = coords[(slice(None), slice(None)) + sl]
    return Patch(patch, origin, {"coords": cpatch})


#: recipe name -> ``fn(x0, spec, cfg, generator) -> Patch``; a plugin adds its own with :func:`register_recipe`
RECIPES: dict[str, Callable[..., Patch]] = {"full": full_volume_example, "patch": random_patch_example}


def register_recipe(name: str, fn: Callable[..., Patch], *, overwrite: bool = False) -> None:
    """Let specs with ``recipe=name`` be trained by ``fn(x0, spec, cfg, generator) -> Patch``.

    The shared step stays untouched: it adds noise to ``Patch.x0``, calls
    ``model(x=x_t, timesteps=t, **Patch.model_kwargs)`` and regresses the noise.
    """
    if name in RECIPES and RECIPES[name] is not fn and not overwrite:
        raise ValueError(f"a recipe named {name!r} is already registered; valid recipes: {', '.join(RECIPES)}")
    RECIPES[name] = fn


def _gen_device(generator: torch.Generator | None) -> torch.device | None:
    return generator.device if generator is not None else None


def training_example(model_name: str | ModelSpec, x0: torch.Tensor, cfg: dict | None = None, generator: torch.Generator | None = None) -> Patch:
    """Cut the training example for ``model_name``'s recipe from the clean batch ``x0`` (B, C, D, H, W).

    The volume size is checked first (:meth:`ModelSpec.check_size`): a size the model cannot use raises a
    ``ValueError`` naming the model, the size and the valid multiples.
    """
    spec = model_name if isinstance(model_name, ModelSpec) else get_spec(model_name)
    cfg = cfg if cfg is not None else {}
    if spec.recipe not in RECIPES:
        raise ValueError(f"{spec.name}: unknown recipe {spec.recipe!r}; valid: {', '.join(RECIPES)}")
    if x0.ndim != 5:
        raise ValueError(f"{spec.name}: a training batch is (B, C, D, H, W); got shape {tuple(x0.shape)}")
    spec.check_size(tuple(x0.shape[2:]), cfg)
    return RECIPES[spec.recipe](x0, spec, cfg, generator)


def _config_of(model: torch.nn.Module, cfg: dict | None) -> dict:
    """``cfg``, or the config :func:`~idmbench.registry.create_model` stamped on ``model``, or ``{}``."""
    if cfg is not None:
        return cfg
    return dict(getattr(model, "idmbench_config", None) or {})


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
    """The epsilon-prediction MSE loss of one batch (no backward): a scalar tensor.

    ``x0`` is the clean batch (B, C, D, H, W). The spec's recipe cuts the training example (the whole volume,
    or a random patch plus its ``coords``); then ``t ~ U{0..T-1}`` and ``noise ~ N(0, I)`` (both drawn from
    ``generator`` when given, so a fixed generator gives a fixed batch), ``x_t = add_noise(x0, noise, t)``
    and the loss is ``MSE(model(x=x_t, timesteps=t, **kw), noise)`` in float32. ``noise`` (the example's
    shape) and ``timesteps`` (B,) may be given explicitly. ``cfg`` defaults to the config ``create_model``
    stamped on ``model``.
    """
    ex = training_example(spec, x0, _config_of(model, cfg), generator)
    xs = ex.x0
    if noise is None:
        noise = torch.randn(xs.shape, generator=generator, dtype=xs.dtype, device=_gen_device(generator) or xs.device).to(xs.device)
    elif tuple(noise.shape) != tuple(xs.shape):
        raise ValueError(f"diffusion_loss: noise must have the training example's shape {tuple(xs.shape)}; got {tuple(noise.shape)}")
    if timesteps is None:
        timesteps = torch.randint(
            0, scheduler.num_train_timesteps, (xs.shape[0],), generator=generator, device=_gen_device(generator) or xs.device
        ).to(xs.device)
    x_t = scheduler.add_noise(original_samples=xs, noise=noise.to(xs.dtype), timesteps=timesteps)
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
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> float:
    """One optimiser step: sample t and noise, predict epsilon, MSE, backward, optimiser step. Returns the loss.

    The same step for every registered model; the spec's recipe decides what the network sees (see
    :func:`diffusion_loss`). ``autocast_dtype`` runs the forward under ``torch.autocast``; ``grad_scaler``
    (a ``torch.amp.GradScaler``) scales the loss for float16.
    """
    optimizer.zero_grad(set_to_none=True)
    dev = x0.device.type
    kw = dict(spec=spec, cfg=cfg, generator=generator, noise=noise, timesteps=timesteps)
    if autocast_dtype is not None:
        with torch.autocast(device_type=dev, dtype=autocast_dtype):
            loss = diffusion_loss(model, x0, scheduler, **kw)
    else:
        loss = diffusion_loss(model, x0, scheduler, **kw)
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def make_optimizer(model: torch.nn.Module, lr: float = 1e-5, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW (PatchDDM-3D reference: lr 1e-5), multi-tensor (``foreach``) on every device.

    ``foreach=True`` is what PyTorch picks by default on CUDA; fixing it makes CPU measurements and
    fake-tensor predictions follow the same optimiser code path as a GPU run.
    """
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, foreach=True
    )


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
    """DDIM sampling (eta = 0) of a whole volume of ``shape`` = (B, C, D, H, W); returns x_0 of that shape.

    Every model samples the whole volume in one pass per step (a patch model builds the global
    coordinate grid itself when called without ``coords``); the model's forward rejects a size it cannot
    downsample. ``max_steps`` stops after that many denoising steps (for timing one step); the full loop
    runs ``num_inference_steps`` network evaluations.
    """
    shape = tuple(int(s) for s in shape)
    sched = scheduler or make_sample_scheduler(num_inference_steps)
    x = torch.randn(shape, generator=generator, dtype=dtype, device=_gen_device(generator)).to(device)
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
