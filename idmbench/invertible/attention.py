"""Invertible checkerboard attention (iTrans extended to 3D): an additive coupling whose sub-network is
multi-head self-attention over voxels.

``y = x + m * A((1 - m) * x, t)`` then the same with ``1 - m`` and a second network; the exact inverse
runs in reverse order, ``x = y - m * A((1 - m) * y, t)``, because ``(1 - m) * y == (1 - m) * x``. Full
attention over all voxels up to ``full_max_tokens``, non-overlapping windows above, always through
``F.scaled_dot_product_attention``. Windowed attention is local (a window spans ``window`` voxels
per side), so the memory-saving backward can recompute it in window-aligned slabs (:mod:`.slabs`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import InvertibleLayer, RecomputeContext, State, grads_for, groups_for, prefixed, sum_opt
from .slabs import Params, SlabNet, pad_columns, recompute_half


def checkerboard(shape: Sequence[int], *, offset: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Spatial checkerboard mask m (1, 1, D, H, W): 1 where ``d + h + w + offset`` is odd, else 0.

    ``offset`` is the global index of the first column along W, so a slab gets its part of the whole
    volume's mask.
    """
    d, h, w = shape
    idx = (
        torch.arange(d, device=device)[:, None, None]
        + torch.arange(h, device=device)[None, :, None]
        + torch.arange(offset, offset + w, device=device)[None, None, :]
    )
    return (idx % 2).to(dtype)[None, None]


class MaskedAttentionNet(SlabNet):
    """Multi-head self-attention over voxels that reads one colour of the checkerboard and writes the other.

    ``net(x, t) = m * Attn((1 - m) * x, t)`` with ``m`` the voxels where ``(d + h + w) % 2 == parity``.
    A depthwise 3x3x3 conv first spreads each read voxel into its written neighbours (local mixing and
    relative position), then GroupNorm with time scale/shift, q/k/v by linear maps in token layout,
    ``F.scaled_dot_product_attention`` over all voxels when there are at most ``full_max_tokens``, else
    within non-overlapping windows of ``window`` voxels per side, and a zero-initialised output
    projection.

    Args:
        channels: channels of the tensor it acts on. temb_dim: width of the time embedding.
        parity: which voxels it writes (1: ``d + h + w`` odd).
        head_dim: channels per head (one head when it does not divide ``channels``).
        window: window side above ``full_max_tokens`` tokens. full_max_tokens: largest full attention.
    """

    PRE = ("pos",)
    MOD = ("time",)
    POST = ("qkv", "proj")
    pre_halo = 1
    post_halo = 0

    def __init__(self, channels: int, temb_dim: int, head_dim: int = 8, window: int = 4, full_max_tokens: int = 4096,
                 parity: int = 1):
        super().__init__()
        if parity not in (0, 1):
            raise ValueError(f"MaskedAttentionNet parity must be 0 or 1; got {parity}")
        self.channels = channels
        self.parity = parity
        self.heads = channels // head_dim if channels % head_dim == 0 and channels >= head_dim else 1  # one head when it does not divide
        self.window = window
        self.full_max_tokens = full_max_tokens
        self.pos = nn.Conv3d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm = nn.GroupNorm(groups_for(channels), channels)
        self.time = nn.Linear(temb_dim, 2 * channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def windows(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Window sides used at spatial ``shape`` (the whole volume when it is small enough)."""
        if math.prod(shape) <= self.full_max_tokens:
            return tuple(shape)  # type: ignore[return-value]
        return tuple(math.gcd(s, self.window) for s in shape)  # type: ignore[return-value]

    def align(self, shape: Sequence[int]) -> int:
        return self.windows(shape)[2]

    def written(self, shape: Sequence[int], col0: int, like: torch.Tensor) -> torch.Tensor:
        """The mask of the voxels this net writes, for ``shape`` = (D, H, w) starting at column ``col0``."""
        m = checkerboard(shape, offset=col0, device=like.device, dtype=like.dtype)
        return m if self.parity == 1 else 1 - m

    def pre(self, x: torch.Tensor, col0: int, pad: tuple[int, int], p: Params) -> torch.Tensor:
        z = x * (1 - self.written(x.shape[2:], col0, x))
        lo, hi = pad
        if lo == hi:
            w = z.shape[4] + 2 * lo - 2
            pos = F.conv3d(z, p["pos.weight"], None, padding=(1, 1, lo), groups=self.channels)
            return z[:, :, :, :, 1 - lo : 1 - lo + w] + pos
        zp = pad_columns(z, pad)
        del z
        return zp[:, :, :, :, 1:-1] + F.conv3d(zp, p["pos.weight"], None, padding=(1, 1, 0), groups=self.channels)

    def modulation(self, temb: torch.Tensor, p: Params) -> torch.Tensor:
        return F.linear(F.silu(temb), p["time.weight"], p["time.bias"])[:, :, None, None, None]

    def post(self, n: torch.Tensor, mod: torch.Tensor, col0: int, pad: tuple[int, int], p: Params,
             shape: Sequence[int]) -> torch.Tensor:
        if pad != (0, 0):
            raise ValueError(f"attention's post has no halo; got pad {pad}")
        scale, shift = mod.to(n.dtype).chunk(2, dim=1)
        h = n * (1 + scale) + shift if torch.is_grad_enabled() else n.mul_(1 + scale).add_(shift)
        B, C, D, H, W = h.shape
        wd, wh, ww = self.windows(shape)
        if W % ww:
            raise ValueError(f"attention slab of {W} columns is not a multiple of its window width {ww}")
        nd, nh_, nw = D // wd, H // wh, W // ww
        T = wd * wh * ww
        # tokens: (B, C, nd, wd, nh, wh, nw, ww) -> (B * windows, T, C); q/k/v/proj work in this layout
        tok = h.reshape(B, C, nd, wd, nh_, wh, nw, ww).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(-1, T, C)
        del h
        heads, hd = self.heads, C // self.heads
        q, k, v = F.linear(tok, p["qkv.weight"], p["qkv.bias"]).view(-1, T, 3, heads, hd).permute(2, 0, 3, 1, 4)
        del tok
        o = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, hd)
        del q, k, v
        o = F.linear(o.transpose(1, 2).reshape(-1, T, C), p["proj.weight"], p["proj.bias"])
        o = o.reshape(B, nd, nh_, nw, wd, wh, ww, C).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, C, D, H, W)
        return o * self.written((D, H, W), col0, o)

    def recompute_bytes(self, x: torch.Tensor, width: int | None) -> int:
        """Estimated working set (bytes) of recomputing this net on ``x`` (whole volume, or slabs ``width``
        columns wide): about ten ``channels``-wide tensors per voxel (the masked input, the norm, q/k/v,
        the attention output, the projection and their gradients) plus the attention matrices
        (``heads x tokens`` per voxel, twice); windows make it local, so a slab holds its share.
        Calibrated against the live-tensor tracker."""
        B, _, D, H, W = x.shape
        wd, wh, ww = self.windows((D, H, W))
        per_voxel = 10.5 * self.channels + 2 * self.heads * wd * wh * ww
        w = W if width is None else min(width, W)
        return int(per_voxel * B * D * H * w * max(x.element_size(), 4))


class CheckerboardAttentionCoupling(InvertibleLayer):
    """Invertible attention (iTrans, 3D, checkerboard split) on ``state[index]``.

    ``y = x + m * A((1 - m) * x, t)`` then the same with ``1 - m`` (a second network ``B``), exact inverse
    in reverse order: ``x = y - m * A((1 - m) * y, t)`` because ``(1 - m) * y == (1 - m) * x``.

    Args:
        channels: channels of ``state[index]``. temb_dim: width of the time embedding.
        index: which tensor of the state it acts on (-1 the current one, -2 the newest skip).
        attn_kw: ``head_dim``, ``window``, ``full_max_tokens`` of :class:`MaskedAttentionNet`.
    """

    def __init__(self, channels: int, temb_dim: int, index: int = -1, **attn_kw):
        super().__init__()
        self.index = index
        self.channels = channels
        self.A = MaskedAttentionNet(channels, temb_dim, parity=1, **attn_kw)  # writes the odd voxels
        self.B = MaskedAttentionNet(channels, temb_dim, parity=0, **attn_kw)  # writes the even voxels

    def _with(self, state: State, x: torch.Tensor) -> State:
        out = list(state)
        out[self.index] = x
        return out

    def forward(self, state: State, temb: torch.Tensor) -> State:
        x = state[self.index]
        x = x + self.A(x, temb)
        x = x + self.B(x, temb)
        return self._with(state, x)

    def inverse(self, state: State, temb: torch.Tensor) -> State:
        y = state[self.index]
        y = y - self.B(y, temb)
        y = y - self.A(y, temb)
        return self._with(state, y)

    def forward_(self, state: State, temb: torch.Tensor, ctx: RecomputeContext | None = None) -> State:
        """In place in ``state[index]`` (no grad)."""
        x = state[self.index]
        x.add_(self.A(x, temb))
        x.add_(self.B(x, temb))
        return state

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor, ctx: RecomputeContext | None = None):
        """One evaluation with grad per half gives both the inverse and the backprop graph (in place).

        Each half reads one colour of the checkerboard and writes the other, so rebuilding the written
        voxels in place never changes what the same half (or a later slab of it) reads, and the input
        gradient lands on the read voxels only.
        """
        y, dy = out_state[self.index], grad_out[self.index]
        gte = None
        named: dict[str, torch.Tensor | None] = {}
        for prefix, net in (("B.", self.B), ("A.", self.A)):
            gt, gp = recompute_half(net, y, y, dy, dy, temb, ctx)
            gte = sum_opt(gte, gt)
            named.update(prefixed(prefix, gp))
        return out_state, grad_out, gte, grads_for(self, named)
