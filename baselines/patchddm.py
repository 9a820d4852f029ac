"""``patchddm``: PatchDDM-3D (Bieder et al., MIDL 2023) on MONAI's 3D diffusion UNet.

The UNet takes three extra input channels holding the *global* voxel coordinates in [-1, 1], computed over
the whole volume and cropped together with the training patch. Training runs on random patches of
``patch_fraction`` (default 1/2) of each side (the ``patch`` recipe of :mod:`idmbench.diffusion` crops the
patch and passes its coordinates as ``coords=``); sampling runs on the whole volume in one pass (``coords``
left ``None``: the forward builds the global grid of the input itself).

Its training memory at volume side S is therefore a UNet at S * patch_fraction, its sampling memory a UNet
at S. The public PatchDDM-3D code builds on the guided-diffusion UNet; this baseline uses MONAI's
``DiffusionModelUNet`` with the reference widths (base 29, multipliers 1,3,4,4,4,4,4), 2 res blocks and
no attention.
"""

from __future__ import annotations

from typing import Any

import torch

from idmbench.diffusion import global_coordinates
from idmbench.registry import ModelSpec

from .unet import DiffusionUNet3D, monai_unet_kwargs, unet_divisor

COORD_CHANNELS = 3

PATCHDDM_PRESETS: dict[str, dict[str, Any]] = {
    # tests: ~73 k parameters; divisor 4, so volumes of side 8k with half-side patches of 4k
    "tiny": dict(
        channels=(4, 8, 12),
        attention_levels="none",
        bottleneck_attention=False,
        num_res_blocks=1,
        norm_num_groups=4,
        patch_fraction=0.5,
    ),
    # CPU default, ~1.9 M parameters: base 10, multipliers (1, 3, 4, 4), 2 res blocks; divisor 8, volumes of
    # side 16k (32^3 trains on 16^3 patches)
    "small": dict(
        channels=(10, 30, 40, 40),
        attention_levels="none",
        bottleneck_attention=False,
        num_res_blocks=2,
        norm_num_groups=10,
        patch_fraction=0.5,
    ),
    # public PatchDDM-3D settings (its run.sh): base 29, multipliers (1, 3, 4, 4, 4, 4, 4), 29 norm groups,
    # 2 res blocks, no attention anywhere (also none in the bottleneck); divisor 64, so volumes of side 128k
    # (reference: 256^3 volumes, 128^3 patches). Unlike the reference (additive skips) MONAI's UNet
    # concatenates skips, so the decoder is wider than the reference's.
    "paper": dict(
        channels=(29, 87, 116, 116, 116, 116, 116),
        attention_levels="none",
        bottleneck_attention=False,
        num_res_blocks=2,
        norm_num_groups=29,
        patch_fraction=0.5,
    ),
}

DEFAULT_PRESET = "small"


def patchddm_divisor(cfg: dict[str, Any]) -> int:
    """Every side the network sees (patch or whole volume) must divide by ``2 ** (len(channels) - 1)``."""
    return unet_divisor({"channels": cfg.get("channels", PATCHDDM_PRESETS[DEFAULT_PRESET]["channels"])})


def check_patch_fraction(frac: Any, name: str = "patchddm") -> float:
    """``frac`` as a float in (0, 1], else ``ValueError``."""
    try:
        f = float(frac)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: patch_fraction must be a number in (0, 1]; got {frac!r}") from None
    if not 0.0 < f <= 1.0:
        raise ValueError(f"{name}: patch_fraction must be in (0, 1]; got {frac}")
    return f


class PatchDDM3D(DiffusionUNet3D):
    """MONAI's 3D diffusion UNet with 3 global-coordinate input channels.

    ``forward(x, timesteps, context=None, coords=None)``: ``x`` (B, C, d, h, w); ``coords`` (B, 3, d, h, w),
    the global coordinates in [-1, 1] of ``x``'s voxels in the whole volume (a training patch). ``coords=None``
    means ``x`` *is* the whole volume: the grid is built over it (the sampling path).

    Args:
        in_channels / out_channels: image channels / predicted-noise channels.
        patch_fraction: side fraction of the training patches, in (0, 1] (read by the ``patch`` recipe).
        **kw: :class:`~baselines.unet.DiffusionUNet3D` / ``DiffusionModelUNet`` options.
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, *, patch_fraction: float = 0.5, name: str = "patchddm", **kw: Any
    ) -> None:
        frac = check_patch_fraction(patch_fraction, name)
        super().__init__(in_channels, out_channels, name=name, network_in_channels=in_channels + COORD_CHANNELS, **kw)
        self.patch_fraction = frac

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise of ``x`` (B, C, d, h, w) given its global ``coords`` (B, 3, d, h, w) or the full grid."""
        timesteps = self.check_input(x, timesteps)
        b, size = x.shape[0], tuple(x.shape[2:])
        if coords is None:
            coords = global_coordinates(size, b, device=x.device, dtype=x.dtype)
        elif not _coords_fit(coords, b, size):
            shape = tuple(coords.shape) if torch.is_tensor(coords) else type(coords).__name__
            want = ", ".join(map(str, (b, COORD_CHANNELS) + size))
            raise ValueError(f"{self.model_name}: coords must have shape ({want}) like x; got {shape}")
        coords = coords.to(dtype=x.dtype).expand(b, -1, -1, -1, -1)
        return self.run_network(torch.cat([x, coords], dim=1), timesteps, context)


#: options of ours (not MONAI's) a ``patchddm`` config may set
OWN_OPTIONS = ("patch_fraction", "bottleneck_attention", "checkpoint_blocks")


def _coords_fit(coords: Any, batch: int, size: tuple[int, ...]) -> bool:
    """``coords`` is a (batch or 1, 3, *size) tensor."""
    return (
        torch.is_tensor(coords)
        and coords.ndim == 5
        and coords.shape[1] == COORD_CHANNELS
        and tuple(coords.shape[2:]) == size
        and coords.shape[0] in (1, batch)
    )


def build_patchddm(in_channels: int = 1, out_channels: int = 1, **cfg: Any) -> PatchDDM3D:
    """``patchddm``: missing options come from the ``small`` preset; ``checkpoint_blocks=True`` is accepted too."""
    merged = {**PATCHDDM_PRESETS[DEFAULT_PRESET], **cfg}
    own = {k: merged.pop(k) for k in OWN_OPTIONS if k in merged}
    return PatchDDM3D(in_channels, out_channels, **own, **monai_unet_kwargs(merged, "patchddm", own=OWN_OPTIONS))


PATCHDDM_SPEC = ModelSpec(
    name="patchddm",
    build=build_patchddm,
    presets=PATCHDDM_PRESETS,
    divisor=patchddm_divisor,
    recipe="patch",
    patch_fraction=0.5,
    description="PatchDDM-3D: MONAI 3D UNet + global coordinate channels, trained on half-side patches, sampled whole",
    family="patchddm",
    extra={"library": "monai.networks.nets.DiffusionModelUNet", "reference": "Bieder et al., MIDL 2023"},
)


def register() -> ModelSpec:
    """Entry point ``patchddm``."""
    return PATCHDDM_SPEC
