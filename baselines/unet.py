"""``unet`` and ``unet-ckpt``: MONAI's 3D diffusion UNet, plain and with per-block activation checkpointing.

``unet`` is ``monai.networks.nets.DiffusionModelUNet(spatial_dims=3, ...)`` -- the network medical-imaging
users actually train -- with input checks in front of it so that a bad volume fails with a one-line
``ValueError`` instead of a tensor-size mismatch deep inside MONAI.

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

from idmbench.registry import ModelSpec

#: Presets. ``attention_levels`` may be ``"last"`` / ``"none"`` / ``"all"`` so that overriding ``channels``
#: with a different number of levels keeps working; an explicit tuple of bools is accepted too.
#: ``num_head_channels`` defaults to one attention head per level over that level's full width.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # tests: ~75 k parameters; a training step at 16^3 takes a few tens of milliseconds on one CPU core
    "tiny": dict(channels=(4, 8, 12), attention_levels="last", num_res_blocks=1, norm_num_groups=4),
    # CPU default: ~1.9 M parameters, like the IDM and PatchDDM small presets
    "small": dict(channels=(24, 32, 48), attention_levels="last", num_res_blocks=2, norm_num_groups=8),
    # MONAI 3D DDPM tutorial: channels (64, 64, 128), attention at the last level only with one head over
    # its full width (the tutorial's num_head_channels (0, 0, C_last)), 2 res blocks, 32 norm groups
    "paper": dict(channels=(64, 64, 128), attention_levels="last", num_res_blocks=2, norm_num_groups=32),
}

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
        network_in_channels: channels the first convolution takes (default ``in_channels``; PatchDDM adds 3
            coordinate channels).
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
        network_in_channels: int | None = None,
        **monai_kwargs: Any,
    ) -> None:
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels if network_in_channels is None else network_in_channels,
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
        name = self.model_name
        if not torch.is_tensor(x) or x.ndim != 5:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name}: x must be a 5-D tensor (B, C, D, H, W); got shape {shape}")
        if x.shape[1] != self.image_channels:
            raise ValueError(
                f"{name}: x must have {self.image_channels} channel(s) (B, {self.image_channels}, D, H, W); "
                f"got shape {tuple(x.shape)}"
            )
        size = tuple(int(s) for s in x.shape[2:])
        d = self.divisor
        if any(s % d for s in size):
            raise ValueError(f"{name} needs every side divisible by {d}; got {size}; valid sides: {d}, {2 * d}, {4 * d}, ...")
        b = x.shape[0]
        t = timesteps if torch.is_tensor(timesteps) else torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.reshape(1)
        if t.ndim != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"{name}: timesteps must have shape ({b},) or (1,); got {tuple(t.shape)}")
        return t.expand(b) if t.shape[0] != b else t

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise: ``x`` (B, C, D, H, W), ``timesteps`` (B,) or (1,) -> (B, out_channels, D, H, W)."""
        timesteps = self.check_input(x, timesteps)
        return self.run_network(x, timesteps, context)

    def run_network(self, h: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet itself on already-checked inputs (``h`` has ``network_in_channels`` channels)."""
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


UNET_SPEC = ModelSpec(
    name="unet",
    build=build_unet,
    presets=UNET_PRESETS,
    divisor=unet_divisor,
    recipe="full",
    description="MONAI DiffusionModelUNet (3D), plain autograd: the standard 3D diffusion UNet",
    family="unet",
    extra={"library": "monai.networks.nets.DiffusionModelUNet"},
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
)


def register() -> ModelSpec:
    """Entry point ``unet``."""
    return UNET_SPEC


def register_ckpt() -> ModelSpec:
    """Entry point ``unet-ckpt``."""
    return UNET_CKPT_SPEC
