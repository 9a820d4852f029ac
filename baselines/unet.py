"""``unet`` and ``unet-ckpt``: MONAI's 3D diffusion UNet, plain and with per-block activation checkpointing.

``unet`` is ``monai.networks.nets.DiffusionModelUNet(spatial_dims=3, ...)`` -- the network medical-imaging
users actually train -- with input checks in front of it so that a bad volume fails with a one-line
``ValueError`` instead of a tensor-size mismatch deep inside MONAI. Its attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (MONAI's ``use_flash_attention=True``: flash /
memory-efficient kernels on CUDA, no N x N matrix stored) in every preset, as users run it once they hit
out-of-memory; ``use_flash_attention=False`` (MONAI's default, the materialised attention matrix) is an
override. Both paths share the parameters and compute the same function.

``unet-ckpt`` is the *same class with the same parameter names* (a ``unet`` state_dict loads into it),
whose forward reproduces ``DiffusionModelUNet.forward`` but wraps every down block, the middle block,
every up block and the output head in ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.
MONAI's ``ActivationCheckpointWrapper`` takes one tensor only, while these blocks also take the time
embedding (and the up blocks the list of skip tensors), hence the hand-written forward. What stays stored
for backward is each block's inputs (the feature map entering it, the skip tensors, the time embedding);
everything inside a block is recomputed during backward.

Shapes: ``x`` is (B, C, D, H, W) float, ``timesteps`` is (B,) or (1,) (broadcast to the batch), the output
is (B, out_channels, D, H, W). Every spatial side must divide by ``2 ** (len(channels) - 1)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn as nn
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch.utils.checkpoint import checkpoint

from idmbench.registry import ModelSpec, register

from .checks import check_model_input

#: Presets. ``attention_levels`` may be ``"last"`` / ``"none"`` / ``"all"`` so that overriding ``channels``
#: with a different number of levels keeps working; an explicit tuple of bools is accepted too.
#: ``num_head_channels`` defaults to one attention head per level over that level's full width.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # tests: ~75 k parameters; a training step at 16^3 takes a few tens of milliseconds on one CPU core
    "tiny": dict(channels=(4, 8, 12), attention_levels="last", num_res_blocks=1, norm_num_groups=4, use_flash_attention=True),
    # CPU default: ~1.9 M parameters, like the IDM and PatchDDM small presets
    "small": dict(channels=(24, 32, 48), attention_levels="last", num_res_blocks=2, norm_num_groups=8, use_flash_attention=True),
    # MONAI 3D DDPM tutorial: channels (64, 64, 128), attention at the last level only with one head over
    # its full width (the tutorial's num_head_channels (0, 0, C_last)), 2 res blocks, 32 norm groups
    "paper": dict(channels=(64, 64, 128), attention_levels="last", num_res_blocks=2, norm_num_groups=32, use_flash_attention=True),
}
# Every preset runs MONAI's attention through torch SDPA (``use_flash_attention=True``): MONAI's default
# (False) materialises the N x N attention matrix, and switching it on is the first fix MONAI's maintainers
# give for out-of-memory reports. ``use_flash_attention=False`` stays available as an override.

DEFAULT_PRESET = "small"

# DiffusionModelUNet options a config may set (everything but what the registry/forward contract fixes).
_FIXED = {"self", "spatial_dims", "in_channels", "out_channels", "num_class_embeds"}
MONAI_OPTIONS = frozenset(inspect.signature(DiffusionModelUNet.__init__).parameters) - _FIXED


def unet_divisor(cfg: dict[str, Any]) -> int:
    """Every spatial side the network sees must divide by this: ``2 ** (len(channels) - 1)``."""
    channels = cfg.get("channels", UNET_PRESETS[DEFAULT_PRESET]["channels"])
    return 2 ** (len(tuple(channels)) - 1)


def attention_levels_for(levels: str | Sequence[bool], n_levels: int, name: str = "unet") -> tuple[bool, ...]:
    """Expand ``"last"`` / ``"none"`` / ``"all"`` (or check a tuple of bools) for ``n_levels`` levels."""
    if isinstance(levels, str):
        if levels == "last":
            return tuple(i == n_levels - 1 for i in range(n_levels))
        if levels == "none":
            return (False,) * n_levels
        if levels == "all":
            return (True,) * n_levels
        raise ValueError(f"{name}: attention_levels must be 'last', 'none', 'all' or one bool per level; got {levels!r}")
    out = tuple(bool(a) for a in levels)
    if len(out) != n_levels:
        raise ValueError(f"{name}: attention_levels has {len(out)} entries but channels has {n_levels} levels")
    return out


def monai_unet_kwargs(cfg: dict[str, Any], name: str, own: Sequence[str] = ()) -> dict[str, Any]:
    """Translate a preset config into ``DiffusionModelUNet`` keyword arguments, rejecting unknown keys.

    ``own`` are the options the caller handles itself (listed as valid in the error message).
    """
    unknown = sorted(set(cfg) - MONAI_OPTIONS)
    if unknown:
        valid = ", ".join(sorted(MONAI_OPTIONS | set(own)))
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    kw = dict(cfg)
    channels = tuple(int(c) for c in kw["channels"])
    groups = int(kw.get("norm_num_groups", 32))
    if any(c % groups for c in channels):
        raise ValueError(f"{name}: every channel count must be a multiple of norm_num_groups={groups}; got channels {channels}")
    kw["channels"] = channels
    kw["attention_levels"] = attention_levels_for(kw.get("attention_levels", "none"), len(channels), name)
    # one head per attention level over its full width unless told (MONAI always builds the middle
    # block's attention too, with the last level's setting)
    kw.setdefault("num_head_channels", channels)
    return kw


class DiffusionUNet3D(DiffusionModelUNet):
    """MONAI's ``DiffusionModelUNet`` (3D) with input checks and optional per-block activation checkpointing.

    Args:
        in_channels: image channels of ``x``.
        out_channels: channels of the predicted noise.
        name: the registry name, used in error messages.
        checkpoint_blocks: wrap every down/middle/up block and the output head in non-reentrant
            ``torch.utils.checkpoint`` while gradients are enabled (the ``unet-ckpt`` baseline).
        bottleneck_attention: keep the self-attention MONAI always puts in the middle block (``False``
            replaces it by the identity, as PatchDDM-3D's reference settings do).
        **monai_kwargs: passed to ``DiffusionModelUNet`` (``channels``, ``attention_levels``, ...).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        name: str = "unet",
        checkpoint_blocks: bool = False,
        bottleneck_attention: bool = True,
        **monai_kwargs: Any,
    ) -> None:
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            **monai_kwargs,
        )
        self.model_name = name
        self.image_channels = int(in_channels)
        self.checkpoint_blocks = bool(checkpoint_blocks)
        if not bottleneck_attention:
            if not hasattr(self.middle_block, "attention"):
                raise ValueError(f"{name}: bottleneck_attention=False needs MONAI's AttnMidBlock (no conditioning)")
            self.middle_block.attention = nn.Identity()
        #: every spatial side must divide by this
        self.divisor = 2 ** (len(self.block_out_channels) - 1)

    # ------------------------------------------------------------------ checks
    def check_input(self, x: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """Raise a one-line ``ValueError`` for a bad ``x`` / ``timesteps``; return timesteps as a (B,) tensor."""
        return check_model_input(self.model_name, x, timesteps, channels=self.image_channels, divisor=self.divisor)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise: ``x`` (B, C, D, H, W), ``timesteps`` (B,) or (1,) -> (B, out_channels, D, H, W)."""
        timesteps = self.check_input(x, timesteps)
        return self.run_network(x, timesteps, context)

    def run_network(self, h: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet itself on already-checked inputs."""
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return self._checkpointed_forward(h, timesteps, context)
        return DiffusionModelUNet.forward(self, h, timesteps, context)

    def _checkpointed_forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """``DiffusionModelUNet.forward`` step for step, with every block recomputed in backward."""
        # 1. time (MONAI: the embedding is float32, cast to the input's dtype)
        t_emb = get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype)
        emb = self.time_embed(t_emb)
        # 3. initial convolution (cheap, and its output is stored as the first skip anyway)
        h = self.conv_in(x)
        # 4. down
        if context is not None and self.with_conditioning is False:
            raise ValueError("model should have with_conditioning = True if context is provided")
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            h, res = checkpoint(_block, block, h, emb, context, use_reentrant=False)
            skips.extend(res)
        # 5. mid
        h = checkpoint(_block, self.middle_block, h, emb, context, use_reentrant=False)
        # 6. up: each block takes as many skips as it has resnets, popped from the end
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            h = checkpoint(_up, block, h, emb, context, *res, use_reentrant=False)
        # 7. output head (GroupNorm, SiLU, conv at full resolution)
        return checkpoint(self.out, h, use_reentrant=False)


def _block(block, h, emb, context):
    """A down block ((h, skips) out) or the middle block (h out), called as MONAI calls it."""
    return block(hidden_states=h, temb=emb, context=context)


def _up(block, h, emb, context, *res):
    """An up block; the skips travel as separate tensor arguments so checkpoint saves each of them."""
    return block(hidden_states=h, res_hidden_states_list=list(res), temb=emb, context=context)


def build_unet(in_channels: int = 1, out_channels: int = 1, **cfg: Any) -> DiffusionUNet3D:
    """``unet``: missing options come from the ``small`` preset."""
    return _build("unet", in_channels, out_channels, checkpoint_blocks=False, **cfg)


def build_unet_ckpt(in_channels: int = 1, out_channels: int = 1, **cfg: Any) -> DiffusionUNet3D:
    """``unet-ckpt``: the identical network (same parameter names) with per-block activation checkpointing."""
    return _build("unet-ckpt", in_channels, out_channels, checkpoint_blocks=True, **cfg)


#: options of ours (not MONAI's) a ``unet`` / ``unet-ckpt`` config may set
OWN_OPTIONS = ("bottleneck_attention",)


def _build(name: str, in_channels: int, out_channels: int, *, checkpoint_blocks: bool, **cfg: Any) -> DiffusionUNet3D:
    merged = {**UNET_PRESETS[DEFAULT_PRESET], **cfg}
    own = {k: merged.pop(k) for k in OWN_OPTIONS if k in merged}
    return DiffusionUNet3D(
        in_channels,
        out_channels,
        name=name,
        checkpoint_blocks=checkpoint_blocks,
        **own,
        **monai_unet_kwargs(merged, name, own=OWN_OPTIONS),
    )


def unet_attention(cfg: dict[str, Any]) -> str:
    """The attention implementation a ``unet`` / ``unet-ckpt`` / MONAI-based config runs, for the report."""
    merged = {**UNET_PRESETS[DEFAULT_PRESET], **cfg}
    n = len(tuple(merged["channels"]))
    levels = attention_levels_for(merged.get("attention_levels", "none"), n)
    # MONAI always builds the middle block's attention unless ``bottleneck_attention=False`` removes it
    if not any(levels) and merged.get("bottleneck_attention", True) is False:
        return "none"
    return "sdpa" if merged.get("use_flash_attention", False) else "naive (materialised N×N)"


UNET_SOURCES = {
    "paper": "MONAI 3D DDPM tutorial (channels 64,64,128, attention at the last level with one head over its width, "
    "2 res blocks, 32 norm groups) with use_flash_attention=True (torch SDPA)",
    "small": "parameter-matched (±5 %) to the other models' small preset; use_flash_attention=True (torch SDPA)",
    "tiny": "test size; use_flash_attention=True (torch SDPA)",
}

UNET_SPEC = ModelSpec(
    name="unet",
    build=build_unet,
    presets=UNET_PRESETS,
    divisor=unet_divisor,
    recipe="full",
    description="MONAI DiffusionModelUNet (3D), plain autograd, SDPA attention: the standard 3D diffusion UNet",
    family="unet",
    extra={"library": "monai.networks.nets.DiffusionModelUNet"},
    attention=unet_attention,
    sources=UNET_SOURCES,
)

UNET_CKPT_SPEC = ModelSpec(
    name="unet-ckpt",
    build=build_unet_ckpt,
    presets={k: dict(v) for k, v in UNET_PRESETS.items()},
    divisor=unet_divisor,
    recipe="full",
    description="the same MONAI UNet with activation checkpointing per down/middle/up block (use_reentrant=False)",
    family="unet",
    extra={"library": "monai.networks.nets.DiffusionModelUNet + torch.utils.checkpoint"},
    attention=unet_attention,
    sources={k: v + "; torch.utils.checkpoint (non-reentrant) around every down/middle/up block and the head" for k, v in UNET_SOURCES.items()},
)

register(UNET_SPEC)
register(UNET_CKPT_SPEC)


def register() -> ModelSpec:
    """The ``unet`` spec (registered on import; usable as an entry-point target too)."""
    return UNET_SPEC


def register_ckpt() -> ModelSpec:
    """The ``unet-ckpt`` spec (registered on import; usable as an entry-point target too)."""
    return UNET_CKPT_SPEC
