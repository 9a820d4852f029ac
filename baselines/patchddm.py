"""``patchddm``: PatchDDM-3D (Bieder et al., MIDL 2023) as its public code builds it.

The network is the guided-diffusion 3D UNet of :mod:`baselines.gdunet` with the reference settings of the
public PatchDDM-3D ``run.sh``: base 29, channel multipliers (1, 3, 4, 4, 4, 4, 4), 2 res blocks, **additive
skips** ``(h + skip) / 2``, no attention anywhere (none in the bottleneck either), GroupNorm with 29
groups, no scale-shift norm -- 24,257,167 parameters with this benchmark's 1 image + 3 coordinate input
channels (24,260,299 with the reference's 8: 4 MRI + noisy mask + 3 coordinates).

The UNet takes three extra input channels holding the *global* voxel coordinates in [-1, 1], computed over
the whole volume and cropped together with the training patch. Training runs on random patches of
``patch_fraction`` (default 1/2: the reference trains on 128^3 crops of 256^3 volumes) of each side (the
``patch`` recipe of :mod:`idmbench.recipes` crops the patch and passes its coordinates as ``coords=``);
sampling runs on the whole volume in one pass (``coords`` left ``None``: the forward builds the global grid
of the input itself). Its training memory at volume side S is therefore a UNet at S * patch_fraction, its
sampling memory a UNet at S.

Presets: ``paper`` = the reference settings above (sides multiples of 128: the 7-level UNet divides by 64,
and so must the half-side patch); ``small`` = the same pattern at base 12, (12, 36, 48, 48), 12 groups,
1,881,445 parameters (parameter-matched to the other models' ``small``; sides multiples of 16);
``tiny`` for tests.
"""

from __future__ import annotations

from typing import Any

import torch

from idmbench.recipes import COORD_CHANNELS, global_coordinates
from idmbench.registry import ModelSpec, register

from .checks import check_model_input
from .gdunet import GD_OPTIONS, GDUNet3D, check_options, gd_attention

PATCHDDM_PRESETS: dict[str, dict[str, Any]] = {
    # tests: divisor 4, so volumes of side 8k with half-side patches of 4k
    "tiny": dict(channels=(4, 12, 16), num_res_blocks=1, norm_num_groups=4, attention_levels="none",
                 bottleneck_attention=False, additive_skips=True, patch_fraction=0.5),
    # CPU default: PatchDDM-3D's pattern at base 12 -> (12, 36, 48, 48), 12 groups, 1,881,445 parameters;
    # divisor 8, so volumes of side 16k (32^3 trains on 16^3 patches)
    "small": dict(channels=(12, 36, 48, 48), num_res_blocks=2, norm_num_groups=12, attention_levels="none",
                  bottleneck_attention=False, additive_skips=True, patch_fraction=0.5),
    # public PatchDDM-3D run.sh: base 29, multipliers (1, 3, 4, 4, 4, 4, 4), 29 norm groups, 2 res blocks,
    # additive skips, no attention (also none in the bottleneck); divisor 64, so volumes of side 128k
    # (reference: 256^3 volumes, 128^3 patches)
    "paper": dict(channels=(29, 87, 116, 116, 116, 116, 116), num_res_blocks=2, norm_num_groups=29, attention_levels="none",
                  bottleneck_attention=False, additive_skips=True, patch_fraction=0.5),
}

DEFAULT_PRESET = "small"

PATCHDDM_SOURCES = {
    "paper": "PatchDDM-3D public code run.sh (model 'patchddm'): num_channels 29, channel_mult 1,3,4,4,4,4,4, "
    "num_res_blocks 2, num_groups 29, additive_skips True, attention_resolutions empty, bottleneck_attention False, "
    "use_scale_shift_norm False, 3 coordinate channels, 128^3 training crops of 256^3 volumes, whole-volume sampling, "
    "lr 1e-5, batch 1 (the reference trains with use_fp16=True; here the precision is the sweep's --precision)",
    "small": "PatchDDM-3D's pattern (multipliers 1,3,4,4, groups = base, additive skips, no attention) at base 12, "
    "parameter-matched (±5 %) to the other models' small preset; half-side training patches",
    "tiny": "test size; PatchDDM-3D's layout (additive skips, no attention, half-side patches)",
}


def patchddm_divisor(cfg: dict[str, Any]) -> int:
    """Every side the network sees (patch or whole volume) must divide by ``2 ** (len(channels) - 1)``."""
    return 2 ** (len(tuple(cfg.get("channels", PATCHDDM_PRESETS[DEFAULT_PRESET]["channels"]))) - 1)


def check_patch_fraction(frac: Any, name: str = "patchddm") -> float:
    """``frac`` as a float in (0, 1], else ``ValueError``."""
    try:
        f = float(frac)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: patch_fraction must be a number in (0, 1]; got {frac!r}") from None
    if not 0.0 < f <= 1.0:
        raise ValueError(f"{name}: patch_fraction must be in (0, 1]; got {frac}")
    return f


class PatchDDM3D(GDUNet3D):
    """The guided-diffusion 3D UNet with 3 global-coordinate input channels.

    ``forward(x, timesteps, context=None, coords=None)``: ``x`` (B, C, d, h, w); ``coords`` (B, 3, d, h, w),
    the global coordinates in [-1, 1] of ``x``'s voxels in the whole volume (a training patch). ``coords=None``
    means ``x`` *is* the whole volume: the grid is built over it (the sampling path).

    Args:
        in_channels / out_channels: image channels / predicted-noise channels.
        patch_fraction: side fraction of the training patches, in (0, 1] (read by the ``patch`` recipe).
        **kw: :class:`~baselines.gdunet.GDUNet3D` options (``channels``, ``num_res_blocks``, ...).
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, *, patch_fraction: float = 0.5, name: str = "patchddm", **kw: Any
    ) -> None:
        frac = check_patch_fraction(patch_fraction, name)
        super().__init__(int(in_channels) + COORD_CHANNELS, out_channels, name=name, **kw)
        self.image_channels = int(in_channels)
        self.patch_fraction = frac

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise of ``x`` (B, C, d, h, w) given its global ``coords`` (B, 3, d, h, w) or the full grid."""
        timesteps = check_model_input(self.model_name, x, timesteps, channels=self.image_channels, divisor=self.divisor)
        b, size = x.shape[0], tuple(x.shape[2:])
        if coords is None:
            coords = global_coordinates(size, b, device=x.device, dtype=x.dtype)
        elif not _coords_fit(coords, b, size):
            shape = tuple(coords.shape) if torch.is_tensor(coords) else type(coords).__name__
            want = ", ".join(map(str, (b, COORD_CHANNELS) + size))
            raise ValueError(f"{self.model_name}: coords must have shape ({want}) like x; got {shape}")
        coords = coords.to(dtype=x.dtype).expand(b, -1, -1, -1, -1)
        return self.run_network(torch.cat([x, coords], dim=1), timesteps)


def _coords_fit(coords: Any, batch: int, size: tuple[int, ...]) -> bool:
    """``coords`` is a (batch or 1, 3, *size) tensor."""
    return (
        torch.is_tensor(coords)
        and coords.ndim == 5
        and coords.shape[1] == COORD_CHANNELS
        and tuple(coords.shape[2:]) == size
        and coords.shape[0] in (1, batch)
    )


#: options a ``patchddm`` config may set
OPTIONS = GD_OPTIONS + ("patch_fraction",)


def build_patchddm(in_channels: int = 1, out_channels: int = 1, **cfg: Any) -> PatchDDM3D:
    """``patchddm``: missing options come from the ``small`` preset."""
    check_options(cfg, "patchddm", OPTIONS)
    merged = {**PATCHDDM_PRESETS[DEFAULT_PRESET], **cfg}
    return PatchDDM3D(in_channels, out_channels, **merged)


PATCHDDM_SPEC = register(
    ModelSpec(
        name="patchddm",
        build=build_patchddm,
        presets=PATCHDDM_PRESETS,
        divisor=patchddm_divisor,
        recipe="patch",
        patch_fraction=0.5,
        description="PatchDDM-3D: guided-diffusion 3D UNet (additive skips, no attention) + 3 global-coordinate "
        "channels, trained on half-side patches, sampled on the whole volume",
        family="patchddm",
        extra={"network": "baselines.gdunet.GDUNet3D", "reference": "Bieder et al., MIDL 2023; public PatchDDM-3D code"},
        attention=lambda cfg: gd_attention(cfg, PATCHDDM_PRESETS[DEFAULT_PRESET]),
        sources=PATCHDDM_SOURCES,
    )
)


def register() -> ModelSpec:
    """The ``patchddm`` spec (registered on import; usable as an entry-point target too)."""
    return PATCHDDM_SPEC
