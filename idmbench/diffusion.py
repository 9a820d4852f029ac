"""One shared diffusion step for every registered model, built on MONAI's schedulers.

Training: DDPM forward process (T = 1000 linear betas 1e-4..2e-2), MSE loss, AdamW. The regression target is
the model's prediction target: the noise for ``"epsilon"`` models, the clean example x0 for ``"sample"``
models (WDM-3D).
Sampling: DDIM (eta = 0) with N steps over the *whole* volume, the scheduler set to the model's prediction
type.

A model's :class:`~idmbench.registry.ModelSpec` names its recipe (:mod:`idmbench.recipes`), which cuts the
training example (the whole volume; a random patch plus its ``coords`` for PatchDDM-3D) and maps image
data to the diffusion state and back (the identity, except WDM's scaled low-pass band). A plugin brings
its own recipe with :func:`register_recipe`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from .recipes import (  # noqa: F401  (re-exported: the public names of this module since the first version)
    PREDICTION_TYPES,
    RECIPES,
    FunctionRecipe,
    Patch,
    Recipe,
    global_coordinates,
    patch_coordinates,
)
from .recipes import register_recipe as _register_recipe_object
from .registry import ModelSpec, get_spec

NUM_TRAIN_TIMESTEPS = 1000


def _check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def make_train_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, prediction_type: str = "epsilon") -> DDPMScheduler:
    """MONAI DDPM scheduler: linear betas 1e-4..2e-2; ``prediction_type`` ``"epsilon"`` or ``"sample"`` (x0)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, schedule="linear_beta", prediction_type=_check_prediction_type(prediction_type)
    )


def make_sample_scheduler(
    num_inference_steps: int = 50, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, prediction_type: str = "epsilon"
) -> DDIMScheduler:
    """MONAI DDIM scheduler with ``num_inference_steps`` steps (eta = 0, deterministic, no clipping).

    ``prediction_type`` is what the model predicts: ``"epsilon"`` (the noise) or ``"sample"`` (x0; WDM-3D);
    a spec's is ``spec.prediction_type``.
    """
    s = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        schedule="linear_beta",
        prediction_type=_check_prediction_type(prediction_type),
        clip_sample=False,
    )
    s.set_timesteps(num_inference_steps)
    return s


# ------------------------------------------------------------------------------------------------ recipes


def full_volume_example(x0: torch.Tensor, spec: ModelSpec, cfg: dict, generator: torch.Generator | None = None) -> Patch:
    """The ``full`` recipe: the network sees the whole volume."""
    return RECIPES["full"].example(x0, spec, cfg, generator)


def random_patch_example(x0: torch.Tensor, spec: ModelSpec, cfg: dict, generator: torch.Generator | None = None) -> Patch:
    """PatchDDM-3D: crop a random patch of ``patch_fraction`` of each side, with its global coordinates
    (see :meth:`idmbench.recipes.PatchRecipe.example`)."""
    return RECIPES["patch"].example(x0, spec, cfg, generator)


def register_recipe(name: str | Recipe, fn: Callable[..., Patch] | None = None, *, overwrite: bool = False) -> Recipe:
    """Register a recipe: a :class:`~idmbench.recipes.Recipe` object, or ``(name, fn)`` for a full-volume
    recipe whose training example is ``fn(x0, spec, cfg, generator) -> Patch``.

    The shared step stays untouched: it adds noise to ``Patch.x0``, calls
    ``model(x=x_t, timesteps=t, **Patch.model_kwargs)`` and regresses the recipe's target.
    """
    if isinstance(name, Recipe):
        return _register_recipe_object(name, overwrite=overwrite)
    if fn is None or not callable(fn):
        raise TypeError("register_recipe(name, fn): fn must be a callable (x0, spec, cfg, generator) -> Patch")
    old = RECIPES.get(name)
    if old is not None and getattr(old, "fn", None) is fn:
        return old
    return _register_recipe_object(FunctionRecipe(name, fn), overwrite=overwrite)


def _gen_device(generator: torch.Generator | None) -> torch.device | None:
    return generator.device if generator is not None else None


def _spec(spec: ModelSpec | str) -> ModelSpec:
    return spec if isinstance(spec, ModelSpec) else get_spec(spec)


def _spec_of_model(model: torch.nn.Module, spec: ModelSpec | str | None) -> ModelSpec | None:
    """``spec``, or the spec :func:`~idmbench.registry.create_model` stamped on ``model``, or None."""
    if spec is not None:
        return _spec(spec)
    name = getattr(model, "idmbench_spec", None)
    if isinstance(name, str):
        try:
            return get_spec(name)
        except ValueError:
            return None
    return None


def training_example(model_name: str | ModelSpec, x0: torch.Tensor, cfg: dict | None = None, generator: torch.Generator | None = None) -> Patch:
    """Cut the training example for ``model_name``'s recipe from the clean batch ``x0`` (B, C, D, H, W).

    The volume size is checked first (:meth:`ModelSpec.check_size`): a size the model cannot use raises a
    ``ValueError`` naming the model, the size and the valid multiples.
    """
    spec = _spec(model_name)
    cfg = cfg if cfg is not None else {}
    recipe = spec.get_recipe()
    if x0.ndim != 5:
        raise ValueError(f"{spec.name}: a training batch is (B, C, D, H, W); got shape {tuple(x0.shape)}")
    spec.check_size(tuple(x0.shape[2:]), cfg)
    return recipe.example(x0, spec, cfg, generator)


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
    """The MSE loss of one batch (no backward): a scalar float32 tensor.

    ``x0`` is the clean batch (B, C, D, H, W). The spec's recipe cuts the training example (the whole volume,
    or a random patch plus its ``coords``) and maps it to the diffusion state ``z0 = recipe.encode(example)``;
    then ``t ~ U{0..T-1}`` and ``noise ~ N(0, I)`` (both drawn from ``generator`` when given, so a fixed
    generator gives a fixed batch), ``x_t = add_noise(z0, noise, t)`` and the loss is
    ``MSE(model(x=x_t, timesteps=t, **kw), target)`` with target ``noise`` for epsilon-prediction and ``z0``
    for x0-prediction (``spec.prediction_type``). ``noise`` (the example's shape) and ``timesteps`` (B,) may
    be given explicitly. ``cfg`` defaults to the config ``create_model`` stamped on ``model``.
    """
    spec = _spec(spec)
    ex = training_example(spec, x0, _config_of(model, cfg), generator)
    xs = spec.get_recipe().encode(ex.x0, _config_of(model, cfg))
    if noise is None:
        noise = torch.randn(xs.shape, generator=generator, dtype=xs.dtype, device=_gen_device(generator) or xs.device).to(xs.device)
    elif tuple(noise.shape) != tuple(xs.shape):
        raise ValueError(f"diffusion_loss: noise must have the training example's shape {tuple(xs.shape)}; got {tuple(noise.shape)}")
    if timesteps is None:
        timesteps = torch.randint(
            0, scheduler.num_train_timesteps, (xs.shape[0],), generator=generator, device=_gen_device(generator) or xs.device
        ).to(xs.device)
    x_t = scheduler.add_noise(original_samples=xs, noise=noise.to(xs.dtype), timesteps=timesteps)
    out = model(x=x_t, timesteps=timesteps, **ex.model_kwargs)
    target = noise if spec.prediction_type == "epsilon" else xs
    return F.mse_loss(out.float(), target.float())


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
    """One optimiser step: sample t and noise, predict, MSE against the recipe's target, backward, step. Returns the loss.

    The same step for every registered model; the spec's recipe decides what the network sees and what it
    regresses (see :func:`diffusion_loss`). ``autocast_dtype`` runs the forward under ``torch.autocast``;
    ``grad_scaler`` (a ``torch.amp.GradScaler``) scales the loss for float16.
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
    """AdamW (PatchDDM-3D and WDM-3D reference: lr 1e-5), multi-tensor (``foreach``) on every device.

    ``foreach=True`` is what PyTorch picks by default on CUDA; fixing it makes CPU measurements and
    fake-tensor predictions follow the same optimiser code path as a GPU run.
    """
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, foreach=True
    )


# ----------------------------------------------------------------------------------------- denoising


def noisy_input(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler | DDIMScheduler,
    *,
    spec: ModelSpec | str,
) -> torch.Tensor:
    """``x_t`` for the clean image batch ``x0`` (B, C, D, H, W): ``add_noise(recipe.encode(x0), noise, t)``.

    The model's input at step ``timesteps`` (B,) in the spec's diffusion state (for WDM the low-pass band
    scaled as in training); pair it with :func:`predict_x0`.
    """
    spec = _spec(spec)
    return scheduler.add_noise(original_samples=spec.get_recipe().encode(x0), noise=noise.to(x0.dtype), timesteps=timesteps)


def predict_x0(
    model: torch.nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler | DDIMScheduler,
    *,
    spec: ModelSpec | str,
    cfg: dict | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """The model's estimate of the clean image x0 from ``x_t`` (B, C, D, H, W) at ``timesteps`` (B,), in image units.

    For an epsilon model ``x0_hat = (x_t - sqrt(1 - a_t) * eps_hat) / sqrt(a_t)`` with ``a_t`` the scheduler's
    ``alphas_cumprod[t]``; for an x0 model the output itself. The result is mapped back from the diffusion
    state to image data (``recipe.decode``), so it compares directly with the clean volume. ``x_t`` is in
    the diffusion state: build it with :func:`noisy_input`. Runs under the caller's grad mode.
    """
    spec = _spec(spec)
    out = model(x=x_t, timesteps=timesteps, **model_kwargs).to(x_t.dtype)
    if spec.prediction_type == "sample":
        z0 = out
    else:
        a = scheduler.alphas_cumprod.to(device=x_t.device, dtype=x_t.dtype)[timesteps.to(x_t.device).long()]
        a = a.reshape((-1,) + (1,) * (x_t.ndim - 1))
        z0 = (x_t - (1 - a).sqrt() * out) / a.sqrt()
    return spec.get_recipe().decode(z0, cfg)


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
    spec: ModelSpec | str | None = None,
) -> torch.Tensor:
    """DDIM sampling (eta = 0) of a whole volume of ``shape`` = (B, C, D, H, W); returns x_0 of that shape.

    Every model samples the whole volume in one pass per step (a patch model builds the global
    coordinate grid itself when called without ``coords``); the model's forward rejects a size it cannot
    downsample. ``spec`` (default: the one ``create_model`` stamped on ``model``; none for a bare module:
    epsilon, no data map) sets the scheduler's prediction type and maps the final state back to image
    data. ``max_steps`` stops after that many denoising steps (for timing one step); the full loop runs
    ``num_inference_steps`` network evaluations.

    Raises:
        ValueError: an explicit ``scheduler`` whose ``prediction_type`` is not the model's.
    """
    shape = tuple(int(s) for s in shape)
    sp = _spec_of_model(model, spec)
    pred = sp.prediction_type if sp is not None else "epsilon"
    sched = scheduler or make_sample_scheduler(num_inference_steps, prediction_type=pred)
    if getattr(sched, "prediction_type", pred) != pred:
        name = sp.name if sp is not None else "the model"
        raise ValueError(f"sample: the scheduler predicts {sched.prediction_type!r} but {name} predicts {pred!r}; valid: a scheduler with prediction_type={pred!r}")
    x = torch.randn(shape, generator=generator, dtype=dtype, device=_gen_device(generator)).to(device)
    dev = torch.device(device).type
    for i, t in enumerate(sched.timesteps):
        if max_steps is not None and i >= max_steps:
            break
        tt = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        if autocast_dtype is not None:
            with torch.autocast(device_type=dev, dtype=autocast_dtype):
                out = model(x=x, timesteps=tt)
        else:
            out = model(x=x, timesteps=tt)
        x, _ = sched.step(out.to(x.dtype), int(t), x)
    return sp.get_recipe().decode(x) if sp is not None else x
