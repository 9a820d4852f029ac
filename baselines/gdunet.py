"""A compact guided-diffusion-style 3D UNet: the network of PatchDDM-3D and WDM-3D.

Written from the architecture of the guided-diffusion UNet (Dhariwal & Nichol 2021) as the public
PatchDDM-3D (Bieder et al., MIDL 2023) and WDM-3D (Friedrich et al., DGM4MICCAI 2024) code configures it
in 3D, so that parameter counts match the reference networks exactly for the same settings:

* time: sinusoidal embedding of width ``channels[0]`` (MONAI's ``get_timestep_embedding``: cos | sin,
  zero-padded for an odd width) -> Linear -> SiLU -> Linear, both ``4 * channels[0]`` wide;
* ``conv_in``: 3x3x3 conv from the input channels to ``channels[0]``;
* encoder, per level ``l``: ``num_res_blocks`` ResBlocks to width ``channels[l]`` (each followed by
  self-attention where ``attention_levels[l]``), then a strided 3x3x3 conv (stride 2, same width) except
  at the last level. The output of ``conv_in``, of every ResBlock and of every downsampling conv is kept
  as a skip;
* middle: ResBlock -> self-attention (``bottleneck_attention``; PatchDDM-3D and WDM-3D switch it off) ->
  ResBlock;
* decoder, per level from the deepest: ``num_res_blocks + 1`` ResBlocks, each consuming one skip, then
  nearest-neighbour x2 upsampling + 3x3x3 conv except at level 0. With **additive skips** (the references'
  setting) a skip is merged as ``h = (h + skip) / 2`` and each ResBlock's output width is the width of
  the *next* skip it will meet (so the width changes one block earlier than in a concatenating UNet);
  with concatenated skips (``additive_skips=False``, guided diffusion's default) ``h = cat(h, skip)`` and
  each ResBlock returns to ``channels[l]``;
* ``out``: GroupNorm -> SiLU -> zero-initialised 3x3x3 conv to ``out_channels``.

ResBlock: GroupNorm -> SiLU -> conv3 -> + Linear(SiLU(time embedding)) -> GroupNorm -> SiLU -> dropout ->
zero-initialised conv3, plus the input (through a 1x1x1 conv when the widths differ). No scale-shift
norm (both references run with ``use_scale_shift_norm=False``).

Self-attention (where enabled): GroupNorm -> 1x1 qkv projection -> multi-head attention over all voxels
-> zero-initialised 1x1 projection, residual. ``use_flash_attention=True`` (default) calls
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA);
``False`` materialises the N x N attention matrix (guided diffusion's own einsum path) -- the same
parameters and the same result.

Shapes: ``x`` (B, in_channels, D, H, W), ``timesteps`` (B,) or (1,), output (B, out_channels, D, H, W).
Every side must divide by ``2 ** (len(channels) - 1)``. Attribute names follow MONAI's
``DiffusionModelUNet`` (``conv_in``, ``time_embed``, ``down_blocks``, ``middle_block``, ``up_blocks``,
``out``, ``block_out_channels``, ``attention_levels``, ``num_res_blocks``) so code that inspects one
inspects both.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

from .checks import check_model_input


def conv3d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> Convolution:
    """A plain 3D convolution with bias and 'same' padding (MONAI's ``Convolution``, ``conv_only``)."""
    return Convolution(3, in_channels, out_channels, strides=stride, kernel_size=kernel_size, conv_only=True)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (the block then starts as the identity / a zero output)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Guided-diffusion residual block with an additive time embedding.

    Args:
        in_channels / out_channels: widths in and out.
        emb_channels: width of the time embedding (``4 * channels[0]``).
        norm_num_groups: GroupNorm groups (divides both widths).
        dropout: dropout probability before the second convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, norm_num_groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-5)
        self.conv1 = conv3d(in_channels, out_channels)
        self.time_emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(conv3d(out_channels, out_channels))
        self.skip_connection = nn.Identity() if in_channels == out_channels else conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all voxels, residual, with a zero-initialised output projection.

    Args:
        channels: width C (divisible by ``num_heads``).
        num_heads: attention heads (head width ``C / num_heads``).
        norm_num_groups: GroupNorm groups.
        use_flash_attention: ``torch.nn.functional.scaled_dot_product_attention`` (True) or the explicit
            softmax(q k^T / sqrt(d)) v with the (N, N) matrix materialised (False).
    """

    def __init__(self, channels: int, num_heads: int, norm_num_groups: int, use_flash_attention: bool = True):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not divisible by num_heads={num_heads}")
        self.channels, self.num_heads = int(channels), int(num_heads)
        self.use_flash_attention = bool(use_flash_attention)
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        n = math.prod(spatial)
        qkv = self.qkv(self.norm(x).reshape(b, c, n))  # (B, 3C, N)
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, n).transpose(-1, -2).unbind(1)  # (B, h, N, d)
        if self.use_flash_attention:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            w = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1).to(v.dtype)
            a = w @ v
        a = a.transpose(-1, -2).reshape(b, c, n)
        return x + self.proj_out(a).reshape(x.shape)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3x3 convolution (same width)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One encoder or decoder level: ResBlocks (each with its attention or identity) and a resampler."""

    def __init__(self, resnets: list[ResBlock], attentions: list[nn.Module], resampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.resampler = resampler


class MiddleBlock(nn.Module):
    """ResBlock -> attention (or identity) -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, emb_channels: int, groups: int, dropout: float, attention: nn.Module):
        super().__init__()
        self.resnet_1 = ResBlock(channels, channels, emb_channels, groups, dropout)
        self.attention = attention
        self.resnet_2 = ResBlock(channels, channels, emb_channels, groups, dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.resnet_2(self.attention(self.resnet_1(h, emb)), emb)


def _levels_flags(levels: str | Sequence[bool], n: int, name: str) -> tuple[bool, ...]:
    if isinstance(levels, str):
        table = {"none": (False,) * n, "all": (True,) * n, "last": tuple(i == n - 1 for i in range(n))}
        if levels not in table:
            raise ValueError(f"{name}: attention_levels must be 'none', 'last', 'all' or one bool per level; got {levels!r}")
        return table[levels]
    out = tuple(bool(a) for a in levels)
    if len(out) != n:
        raise ValueError(f"{name}: attention_levels has {len(out)} entries but channels has {n} levels")
    return out


class GDUNet3D(nn.Module):
    """Guided-diffusion-style 3D UNet (see the module docstring for the layout).

    Args:
        in_channels: channels of ``x`` (PatchDDM: image + 3 coordinates; WDM: 8 Haar sub-bands per image channel).
        out_channels: channels of the output.
        channels: width per level, e.g. PatchDDM-3D's base 29 x (1, 3, 4, 4, 4, 4, 4) =
            ``(29, 87, 116, 116, 116, 116, 116)``; every side must divide by ``2 ** (len(channels) - 1)``.
        num_res_blocks: ResBlocks per encoder level (the decoder has one more per level); an int or one per level.
        attention_levels: ``"none"`` (default), ``"last"``, ``"all"`` or one bool per level.
        num_heads: attention heads.
        norm_num_groups: GroupNorm groups; divides every width.
        additive_skips: merge skips as ``(h + skip) / 2`` (PatchDDM-3D, WDM-3D) instead of concatenating.
        bottleneck_attention: self-attention between the two middle ResBlocks.
        use_flash_attention: SDPA (True) or the materialised attention matrix (False).
        dropout: dropout probability inside the ResBlocks.
        name: the registry name, used in error messages.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        channels: Sequence[int] = (32, 64, 128),
        num_res_blocks: int | Sequence[int] = 2,
        attention_levels: str | Sequence[bool] = "none",
        num_heads: int = 1,
        norm_num_groups: int = 32,
        additive_skips: bool = True,
        bottleneck_attention: bool = False,
        use_flash_attention: bool = True,
        dropout: float = 0.0,
        name: str = "gdunet",
    ) -> None:
        super().__init__()
        self.model_name = name
        widths = tuple(int(c) for c in channels)
        if not widths or any(c <= 0 for c in widths):
            raise ValueError(f"{name}: channels must be one positive width per level; got {tuple(channels)}")
        groups = int(norm_num_groups)
        if groups <= 0 or any(c % groups for c in widths):
            raise ValueError(f"{name}: every channel count must be a multiple of norm_num_groups={norm_num_groups}; got channels {widths}")
        n = len(widths)
        nrb = (int(num_res_blocks),) * n if isinstance(num_res_blocks, int) else tuple(int(r) for r in num_res_blocks)
        if len(nrb) != n or any(r < 1 for r in nrb):
            raise ValueError(f"{name}: num_res_blocks must be a positive int or one per level ({n}); got {num_res_blocks!r}")
        attn = _levels_flags(attention_levels, n, name)
        if int(num_heads) < 1:
            raise ValueError(f"{name}: num_heads must be >= 1; got {num_heads}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1); got {dropout}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.block_out_channels = widths
        self.num_res_blocks = nrb
        self.attention_levels = attn
        self.additive_skips = bool(additive_skips)
        self.use_flash_attention = bool(use_flash_attention)
        self.divisor = 2 ** (n - 1)

        c0, emb = widths[0], 4 * widths[0]

        def attention(width: int, on: bool) -> nn.Module:
            return AttentionBlock(width, int(num_heads), groups, self.use_flash_attention) if on else nn.Identity()

        self.time_embed = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = conv3d(self.in_channels, c0)

        skip_widths = [c0]
        ch = c0
        down = []
        for level, width in enumerate(widths):
            resnets, attns = [], []
            for _ in range(nrb[level]):
                resnets.append(ResBlock(ch, width, emb, groups, dropout))
                attns.append(attention(width, attn[level]))
                ch = width
                skip_widths.append(ch)
            sampler = None
            if level != n - 1:
                sampler = conv3d(ch, ch, stride=2)
                skip_widths.append(ch)
            down.append(Level(resnets, attns, sampler))
        self.down_blocks = nn.ModuleList(down)
        self.middle_block = MiddleBlock(ch, emb, groups, dropout, attention(ch, bool(bottleneck_attention)))

        up = []
        for level in reversed(range(n)):
            resnets, attns = [], []
            for _ in range(nrb[level] + 1):
                skip = skip_widths.pop()
                if self.additive_skips:
                    out = skip_widths[-1] if skip_widths else c0  # the width of the next skip to merge
                    resnets.append(ResBlock(ch, out, emb, groups, dropout))
                else:
                    out = widths[level]
                    resnets.append(ResBlock(ch + skip, out, emb, groups, dropout))
                attns.append(attention(out, attn[level]))
                ch = out
            up.append(Level(resnets, attns, Upsample(ch) if level > 0 else None))
        self.up_blocks = nn.ModuleList(up)
        self.out = nn.Sequential(nn.GroupNorm(groups, ch, eps=1e-5), nn.SiLU(), zero_init(conv3d(ch, self.out_channels)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, in_channels, D, H, W), ``timesteps`` (B,) or (1,) -> (B, out_channels, D, H, W); ``context`` is ignored."""
        t = check_model_input(self.model_name, x, timesteps, channels=self.in_channels, divisor=self.divisor)
        return self.run_network(x, t)

    def run_network(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet on already-checked inputs (``timesteps`` of shape (B,))."""
        emb = self.time_embed(get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for res, att in zip(level.resnets, level.attentions):
                h = att(res(h, emb))
                skips.append(h)
            if level.resampler is not None:
                h = level.resampler(h)
                skips.append(h)
        h = self.middle_block(h, emb)
        for level in self.up_blocks:
            for res, att in zip(level.resnets, level.attentions):
                skip = skips.pop()
                h = (h + skip) / 2 if self.additive_skips else torch.cat([h, skip], dim=1)
                h = att(res(h, emb))
            if level.resampler is not None:
                h = level.resampler(h)
        return self.out(h)


#: the keyword options of :class:`GDUNet3D` a preset config may set
GD_OPTIONS = ("channels", "num_res_blocks", "attention_levels", "num_heads", "norm_num_groups", "additive_skips",
              "bottleneck_attention", "use_flash_attention", "dropout")


def check_options(cfg: dict, name: str, options: Sequence[str]) -> None:
    """Reject unknown config keys with one line naming the valid ones."""
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(options))}")


def gd_attention(cfg: dict, defaults: dict) -> str:
    """The attention a :class:`GDUNet3D` config runs (``"none"``, ``"sdpa"``, ``"naive (materialised N×N)"``), for the report."""
    merged = {**defaults, **cfg}
    levels = merged.get("attention_levels", "none")
    on = (levels != "none") if isinstance(levels, str) else any(levels)
    if not on and not merged.get("bottleneck_attention", False):
        return "none"
    return "sdpa" if merged.get("use_flash_attention", True) else "naive (materialised N×N)"
