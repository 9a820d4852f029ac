"""``wdm``: WDM-3D (Friedrich et al., DGM4MICCAI 2024) -- diffusion in wavelet space.

An orthonormal 3D Haar DWT maps the volume (B, C, S, S, S) to its 8 sub-bands per channel at half
resolution, (B, 8 C, S/2, S/2, S/2); the guided-diffusion 3D UNet of :mod:`baselines.gdunet` denoises them
(x0-prediction); the inverse DWT returns the image. The module's forward is ``IDWT(UNet(DWT(x_t)))`` on
image tensors. Because the Haar DWT is orthonormal, the DWT of i.i.d. N(0, 1) noise is i.i.d. N(0, 1) and
the MSE is the same in both domains, so this module in the shared image-space training step, the DDIM
sampler and MONAI's ``DiffusionInferer`` *is* WDM's wavelet-space diffusion; the ``wavelet`` recipe
(:class:`idmbench.recipes.WaveletRecipe`) supplies the rest: x0 as the prediction target, the low-pass band
of the data scaled by 1/3 (WDM-3D's ``cat(LLL / 3, LLH, ..., HHH)``), the network shape S/2 and the valid
sides (multiples of 2 x the UNet's divisor).

The transform is IDM's Haar matrix (:func:`idmbench.invertible.layers.haar_matrix`) as a stride-2 grouped
convolution (analysis) and its transposed convolution (synthesis); the kernel is built in the input's
dtype on every call, so the pair is orthonormal to that dtype's precision (float64 included).

Presets (public WDM-3D ``run.sh``, model ``ours_unet_*``: base 64, 2 res blocks, 32 groups, additive skips,
no attention, no bottleneck attention, 8 channels in and out, x0-prediction, fp32, lr 1e-5):

* ``paper`` -- the 256^3 configuration, multipliers (1, 2, 2, 4, 4, 4): 73,654,216 parameters; sides
  multiples of 64 (the UNet divides S/2 by 32);
* ``paper128`` -- the 128^3 configuration, multipliers (1, 2, 2, 4, 4): 52,083,400 parameters; sides
  multiples of 32;
* ``small`` -- the 128^3 pattern at base 12, (12, 24, 24, 48, 48), 6 groups: 1,840,220 parameters
  (parameter-matched to the other models' ``small``); sides multiples of 32;
* ``tiny`` -- tests; sides multiples of 8.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from idmbench.invertible.layers import haar_matrix
from idmbench.registry import ModelSpec, register

from .checks import check_model_input
from .gdunet import GD_OPTIONS, GDUNet3D, check_options, gd_attention


def haar_kernel(channels: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal 2x2x2 Haar analysis kernel for a grouped conv: (8 * channels, 1, 2, 2, 2).

    Output channel ``8 * j + k`` is sub-band ``k`` of input channel ``j``; ``k = 4 p + 2 q + r`` with ``p, q, r``
    the low (0) / high (1) pass filter along D, H, W, so channel ``8 j`` is the low-pass LLL band.
    """
    k = haar_matrix(1, dtype=torch.float64).reshape(8, 1, 2, 2, 2).to(dtype=dtype, device=device)
    return k.repeat(int(channels), 1, 1, 1, 1)


def haar_dwt3d(x: torch.Tensor) -> torch.Tensor:
    """One level of the orthonormal 3D Haar DWT: (B, C, D, H, W) -> (B, 8 C, D/2, H/2, W/2) (even sides)."""
    c = x.shape[1]
    return F.conv3d(x, haar_kernel(c, dtype=x.dtype, device=x.device), stride=2, groups=c)


def haar_idwt3d(y: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`haar_dwt3d`: (B, 8 C, d, h, w) -> (B, C, 2 d, 2 h, 2 w)."""
    if y.shape[1] % 8:
        raise ValueError(f"haar_idwt3d: channels must be a multiple of 8 (8 sub-bands per channel); got {y.shape[1]}")
    c = y.shape[1] // 8
    return F.conv_transpose3d(y, haar_kernel(c, dtype=y.dtype, device=y.device), stride=2, groups=c)


class WDM3D(nn.Module):
    """WDM-3D: ``IDWT(UNet(DWT(x)))``, the UNet working on the 8 Haar sub-bands per channel at half resolution.

    ``forward(x, timesteps, context=None)``: ``x`` (B, C, S, S, S) (any D, H, W that are multiples of
    ``2 * unet.divisor``), ``timesteps`` (B,) or (1,) -> the predicted x0, (B, out_channels, S, S, S).

    Args:
        in_channels / out_channels: image channels (the UNet takes / returns 8 times as many).
        **kw: :class:`~baselines.gdunet.GDUNet3D` options (``channels``, ``num_res_blocks``, ...).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, *, name: str = "wdm", **kw: Any) -> None:
        super().__init__()
        self.model_name = name
        self.image_channels, self.out_channels = int(in_channels), int(out_channels)
        self.unet = GDUNet3D(8 * self.image_channels, 8 * self.out_channels, name=name, **kw)
        #: every image side must divide by this (the DWT halves it, the UNet divides the half)
        self.divisor = 2 * self.unet.divisor

    def network_shape(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """(8 C, D/2, H/2, W/2): what the UNet sees for an image of spatial ``size``."""
        return (8 * self.image_channels,) + tuple(int(s) // 2 for s in size)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict x0 of ``x`` (B, C, D, H, W); ``context`` is ignored."""
        t = check_model_input(
            self.model_name,
            x,
            timesteps,
            channels=self.image_channels,
            divisor=self.divisor,
            divisor_reason=f" (the Haar transform halves each side and its UNet divides the half by {self.unet.divisor})",
        )
        return haar_idwt3d(self.unet.run_network(haar_dwt3d(x), t))


WDM_PRESETS: dict[str, dict[str, Any]] = {
    # tests: UNet (8, 16, 16) on the sub-bands, divisor 4 -> image sides multiples of 8
    "tiny": dict(channels=(8, 16, 16), num_res_blocks=1, norm_num_groups=4, attention_levels="none",
                 bottleneck_attention=False, additive_skips=True),
    # CPU default: WDM-3D's 128^3 pattern (1, 2, 2, 4, 4) at base 12, 6 groups: 1,840,220 parameters;
    # image sides multiples of 32
    "small": dict(channels=(12, 24, 24, 48, 48), num_res_blocks=2, norm_num_groups=6, attention_levels="none",
                  bottleneck_attention=False, additive_skips=True),
    # WDM-3D run.sh 'ours_unet_256': base 64, channel_mult 1,2,2,4,4,4, 32 groups: 73,654,216 parameters
    "paper": dict(channels=(64, 128, 128, 256, 256, 256), num_res_blocks=2, norm_num_groups=32, attention_levels="none",
                  bottleneck_attention=False, additive_skips=True),
    # WDM-3D run.sh 'ours_unet_128': base 64, channel_mult 1,2,2,4,4, 32 groups: 52,083,400 parameters
    "paper128": dict(channels=(64, 128, 128, 256, 256), num_res_blocks=2, norm_num_groups=32, attention_levels="none",
                     bottleneck_attention=False, additive_skips=True),
}

DEFAULT_PRESET = "small"

_WDM_COMMON = ("num_channels 64, num_res_blocks 2, num_groups 32, additive_skips True, attention_resolutions empty, "
               "bottleneck_attention False, use_scale_shift_norm False, in/out channels 8, predict_xstart True, "
               "LLL band / 3, lr 1e-5, fp32")
WDM_SOURCES = {
    "paper": "WDM-3D public code run.sh (model 'ours_unet_256'): channel_mult 1,2,2,4,4,4, " + _WDM_COMMON + ", batch 1 at 256^3",
    "paper128": "WDM-3D public code run.sh (model 'ours_unet_128'): channel_mult 1,2,2,4,4, " + _WDM_COMMON,
    "small": "WDM-3D's 128^3 pattern (multipliers 1,2,2,4,4, additive skips, no attention, x0-prediction, LLL / 3) at "
    "base 12, parameter-matched (±5 %) to the other models' small preset",
    "tiny": "test size; WDM-3D's layout (Haar sub-bands, additive skips, no attention, x0-prediction)",
}

def wdm_divisor(cfg: dict[str, Any]) -> int:
    """Every side the UNet sees (the half-resolution sub-bands) must divide by ``2 ** (len(channels) - 1)``."""
    return 2 ** (len(tuple(cfg.get("channels", WDM_PRESETS[DEFAULT_PRESET]["channels"]))) - 1)


def build_wdm(in_channels: int = 1, out_channels: int = 1, **cfg: Any) -> WDM3D:
    """``wdm``: missing options come from the ``small`` preset."""
    check_options(cfg, "wdm", GD_OPTIONS)
    return WDM3D(in_channels, out_channels, **{**WDM_PRESETS[DEFAULT_PRESET], **cfg})


WDM_SPEC = register(
    ModelSpec(
        name="wdm",
        build=build_wdm,
        presets=WDM_PRESETS,
        divisor=wdm_divisor,
        recipe="wavelet",
        description="WDM-3D: guided-diffusion 3D UNet (additive skips, no attention) on the 8 orthonormal Haar "
        "sub-bands at half resolution, x0-prediction",
        family="wdm",
        extra={"network": "baselines.gdunet.GDUNet3D", "reference": "Friedrich et al., DGM4MICCAI 2024; public wdm-3d code"},
        attention=lambda cfg: gd_attention(cfg, WDM_PRESETS[DEFAULT_PRESET]),
        sources=WDM_SOURCES,
    )
)


def register() -> ModelSpec:
    """The ``wdm`` spec (registered on import; usable as an entry-point target too)."""
    return WDM_SPEC
