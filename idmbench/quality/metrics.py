"""Held-out denoising scores: x̂₀ from the model's prediction at a fixed timestep, against the clean x₀.

For each held-out volume x₀ (C, D, H, W) in [-1, 1], each timestep t and each of ``n_noise`` fixed noise
draws ε (seeded by (seed, volume, draw): the same draws for every model and every t):

* ``x_t = sqrt(ᾱ_t) z₀ + sqrt(1 - ᾱ_t) ε`` (MONAI's ``DDPMScheduler.add_noise``, the training schedule:
  1000 linear betas 1e-4..2e-2), where z₀ is the model's diffusion state of x₀ (the image itself, or for a
  wavelet model its sub-bands; :func:`idmbench.diffusion.noisy_input`) and ε is drawn in that state's shape;
* x̂₀ is the model's estimate of x₀ from one forward pass: for an ε-predicting model
  ``x̂₀ = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)``, for an x₀-predicting model (WDM) its output (through
  :func:`idmbench.diffusion.predict_x0`, mapped back to image space); x̂₀ is clipped to the data range
  [-1, 1];
* metrics (MONAI), per volume and draw, data range 2.0 (the width of [-1, 1]):

  - ``psnr`` -- ``monai.metrics.PSNRMetric(max_val=2.0)``: 20 log10(2) - 10 log10(MSE), in dB;
  - ``ssim`` -- ``monai.metrics.SSIMMetric(spatial_dims=3, data_range=2.0)``, a 3D Gaussian window
    (sigma 1.5, 11 voxels, or the largest odd size that fits a smaller volume), computed on x + 1 so
    intensities are non-negative (SSIM's luminance term assumes that; PSNR and MAE are unchanged by the shift);
  - ``mae`` -- ``monai.metrics.MAEMetric``: mean |x̂₀ - x₀| on the [-1, 1] scale;

* reported: the mean and the standard deviation over all (volume, draw) pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import diffusion

logger = logging.getLogger(__name__)

DATA_RANGE = 2.0  # the metrics' data range: width of [-1, 1]
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
METRICS = ("psnr", "ssim", "mae")


def ssim_window(shape: Sequence[int]) -> int:
    """SSIM's window side: 11 voxels, or the largest odd size <= the smallest side of ``shape`` (D, H, W)."""
    m = min(int(s) for s in shape)
    w = min(SSIM_WINDOW, m if m % 2 else m - 1)
    if w < 3:
        raise ValueError(f"3D SSIM needs every side >= 3 voxels; got {tuple(shape)}")
    return w


def volume_metrics(pred: torch.Tensor, target: torch.Tensor, data_range: float = DATA_RANGE) -> dict[str, torch.Tensor]:
    """PSNR (dB), 3D SSIM and MAE of each batch element of ``pred`` against ``target``.

    Args:
        pred, target: (B, C, D, H, W) on the [-1, 1] scale (``data_range`` wide).
        data_range: max - min of the intensity scale.

    Returns:
        ``{"psnr", "ssim", "mae"}`` -> (B,) float64 tensors (PSNR is ``inf`` for identical volumes).
    """
    from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric

    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"volume_metrics: pred and target must both be (B, C, D, H, W); got {tuple(pred.shape)} and {tuple(target.shape)}")
    p, t = pred.detach().double().cpu(), target.detach().double().cpu()
    psnr = PSNRMetric(max_val=data_range, reduction="none")(p, t).view(-1)
    ssim = SSIMMetric(
        spatial_dims=3, data_range=data_range, kernel_sigma=SSIM_SIGMA, win_size=ssim_window(p.shape[2:]), reduction="none"
    )(p + data_range / 2, t + data_range / 2).view(-1)
    mae = MAEMetric(reduction="none")(p, t).view(-1)
    return {"psnr": psnr, "ssim": ssim, "mae": mae}


def _state_shape(spec: Any, cfg: dict | None, x0: torch.Tensor) -> tuple[int, ...]:
    """Shape of the diffusion state of ``x0`` (1, C, D, H, W): the image's, or its recipe's encoding (WDM: sub-bands)."""
    return tuple(spec.get_recipe().encode(x0, cfg).shape)


def noise_seed(seed: int, volume: int, draw: int) -> int:
    """The torch seed of noise draw ``draw`` for held-out volume ``volume`` (the same for every model)."""
    return int(np.random.SeedSequence([int(seed), 0x0153, int(volume), int(draw)]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class Score:
    """Mean and standard deviation of each metric over ``n_volumes`` x ``n_noise`` (volume, draw) pairs at ``t``."""

    t: int
    psnr: float
    ssim: float
    mae: float
    psnr_std: float
    ssim_std: float
    mae_std: float
    n_volumes: int
    n_noise: int
    data_range: float = DATA_RANGE


def _mean_std(v: torch.Tensor) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value; PSNR of identical volumes is inf, std then 0)."""
    v = v.double()
    mean = float(v.mean())
    if v.numel() < 2 or not torch.isfinite(v).all():
        return mean, 0.0
    return mean, float(v.std(unbiased=False))


@torch.no_grad()
def score_denoising(
    model: torch.nn.Module,
    spec: Any,
    cfg: dict | None,
    volumes: Sequence[torch.Tensor],
    t: int,
    *,
    n_noise: int = 4,
    seed: int = 0,
    batch: int = 1,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    scheduler: Any = None,
) -> Score:
    """Score ``model``'s x̂₀ at timestep ``t`` on ``volumes`` (each (C, D, H, W) in [-1, 1]); see the module docstring.

    ``batch`` noisy copies go through the network at once. The model is put in eval mode.
    """
    if not volumes:
        raise ValueError("score_denoising: no held-out volumes")
    sched = scheduler or diffusion.make_train_scheduler()
    if not 0 <= int(t) < sched.num_train_timesteps:
        raise ValueError(f"timestep {t} outside 0..{sched.num_train_timesteps - 1}")
    dev = torch.device(device)
    model.eval()
    vals: dict[str, list[torch.Tensor]] = {m: [] for m in METRICS}
    for vi, vol in enumerate(volumes):
        x0 = vol.to(dev, torch.float32).unsqueeze(0)
        state_shape = _state_shape(spec, cfg, x0)
        for start in range(0, n_noise, max(1, batch)):
            draws = range(start, min(n_noise, start + max(1, batch)))
            noise = torch.cat(
                [torch.randn(state_shape, generator=torch.Generator().manual_seed(noise_seed(seed, vi, j))) for j in draws]
            ).to(dev)
            xb = x0.expand(len(draws), -1, -1, -1, -1)
            tt = torch.full((len(draws),), int(t), dtype=torch.long, device=dev)
            x_t = diffusion.noisy_input(xb, noise, tt, sched, spec=spec)
            if autocast_dtype is not None:
                with torch.autocast(device_type=dev.type, dtype=autocast_dtype):
                    x0_hat = diffusion.predict_x0(model, x_t, tt, sched, spec=spec, cfg=cfg)
            else:
                x0_hat = diffusion.predict_x0(model, x_t, tt, sched, spec=spec, cfg=cfg)
            x0_hat = x0_hat.float().clamp(-1.0, 1.0)
            if not torch.isfinite(x0_hat).all():
                raise FloatingPointError(f"the model's prediction at t={t} is not finite (training diverged?)")
            m = volume_metrics(x0_hat, xb)
            for k in METRICS:
                vals[k].append(m[k])
    cat = {k: torch.cat(v) for k, v in vals.items()}
    (pm, ps), (sm, ss), (mm, ms) = (_mean_std(cat[k]) for k in METRICS)
    return Score(int(t), pm, sm, mm, ps, ss, ms, len(volumes), int(n_noise))
