"""Time-conditioned additive coupling blocks (RevNet / iUNets), the workhorse of the invertible core.

``y1 = x1 + F(x2, t)``, ``y2 = x2 + G(y1, t)``; inverse ``x2 = y2 - G(y1, t)``, ``x1 = y1 - F(x2, t)``.
Each sub-network is ``conv3 -> GroupNorm -> time scale/shift -> SiLU -> conv3`` with the last conv
zero-initialised, so every block starts as the identity.

The memory-saving backward evaluates each half once with grad (the Rev-ViT / RevLib scheme): that one
evaluation gives both the input (``x2 = y2 - G(y1)``, written in place into the output buffer) and the
graph to backpropagate through. The two halves are recomputed one after the other, each on the whole
volume when its working set fits the core's budget, else in slabs (:mod:`.slabs`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import InvertibleLayer, RecomputeContext, State, grads_for, groups_for, prefixed, sum_opt
from .conv import conv3d_input_grad
from .slabs import Params, SlabNet, conv3d_slab, recompute_half


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class TimeConditionedNet(SlabNet):
    """Coupling sub-network: conv3 -> GroupNorm -> time scale/shift -> SiLU -> conv3 (zero-initialised).

    Args:
        c_in / c_out: channels in and out. hidden: channels in between. temb_dim: width of the time
            embedding (B, temb_dim).

    Shapes: (B, c_in, D, H, W) -> (B, c_out, D, H, W). Each conv needs one column of halo, so the net
    can be recomputed in slabs (:class:`~.slabs.SlabNet`).
    """

    PRE = ("conv1",)
    MOD = ("time",)
    POST = ("conv2",)
    pre_halo = 1
    post_halo = 1

    def __init__(self, c_in: int, c_out: int, hidden: int, temb_dim: int):
        super().__init__()
        self.c_in, self.c_out, self.hidden = c_in, c_out, hidden
        self.conv1 = nn.Conv3d(c_in, hidden, 3, padding=1, bias=False)  # GroupNorm follows: a bias would get no gradient
        self.norm = nn.GroupNorm(groups_for(hidden), hidden)
        self.time = nn.Linear(temb_dim, 2 * hidden)
        self.conv2 = nn.Conv3d(hidden, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def pre(self, x: torch.Tensor, col0: int, pad: tuple[int, int], p: Params) -> torch.Tensor:
        return conv3d_slab(x, p["conv1.weight"], None, pad)

    def modulation(self, temb: torch.Tensor, p: Params) -> torch.Tensor:
        return F.linear(F.silu(temb), p["time.weight"], p["time.bias"])[:, :, None, None, None]

    def post(self, n: torch.Tensor, mod: torch.Tensor, col0: int, pad: tuple[int, int], p: Params,
             shape: Sequence[int]) -> torch.Tensor:
        scale, shift = mod.to(n.dtype).chunk(2, dim=1)
        if torch.is_grad_enabled():
            h = F.silu(n * (1 + scale) + shift)
        else:  # n is this call's own temporary: modulate and activate it in place
            h = F.silu(n.mul_(1 + scale).add_(shift), inplace=True)
        return conv3d_slab(h, p["conv2.weight"], p["conv2.bias"], pad)

    def post_input_vjp(self, n: torch.Tensor, mod: torch.Tensor, col0: int, pad: tuple[int, int], p: Params,
                       shape: Sequence[int], dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """conv2 is linear: its input gradient is its adjoint applied to ``dout``, so the input pass
        backpropagates that from the activation instead of running conv2 and its backward."""
        scale, shift = mod.to(n.dtype).chunk(2, dim=1)
        h = F.silu(n * (1 + scale) + shift)
        with _no_autocast(dout.device.type):
            w = p["conv2.weight"]
            g = conv3d_input_grad(dout.to(w.dtype), w, (1, 1, 0))  # the columns of conv2's padded input
        lo = pad[0]
        return h, g[:, :, :, :, lo : lo + h.shape[4]].to(h.dtype)

    def recompute_bytes(self, x: torch.Tensor, width: int | None) -> int:
        """Estimated working set (bytes) of recomputing this net on ``x`` (whole volume, or slabs ``width``
        columns wide).

        Whole volume: autograd keeps the conv1 output, the normalised, modulated and activated tensors
        (``hidden`` channels each, plus a little) and the output (``c_out``), then the input gradient
        (``c_in``). A slab
        holds about ``6 hidden + 2 c_out + c_in`` channels per column over its width plus one. Calibrated
        against the live-tensor tracker (``tests/test_idm_memory.py`` checks the estimate is not low).
        """
        B, _, D, H, W = x.shape
        plane = B * D * H * max(x.element_size(), 4)
        if width is None:
            return int((4.25 * self.hidden + self.c_out + self.c_in) * W * plane)
        return (6 * self.hidden + 2 * self.c_out + self.c_in) * min(width + 1, W) * plane


class AdditiveCoupling(InvertibleLayer):
    """Time-conditioned additive coupling on the current tensor (state[-1]) of ``channels`` channels.

    ``y1 = x1 + F(x2, t)``, ``y2 = x2 + G(y1, t)``; inverse ``x2 = y2 - G(y1, t)``, ``x1 = y1 - F(x2, t)``.

    Args:
        channels: channels of the current tensor (even). temb_dim: width of the time embedding.
        hidden: width of each sub-network (default ``channels // 2``).
    """

    def __init__(self, channels: int, temb_dim: int, hidden: int | None = None):
        super().__init__()
        if channels % 2:
            raise ValueError(f"AdditiveCoupling needs an even channel count; got {channels}")
        half = channels // 2
        hidden = hidden or half
        self.channels = channels
        self.F = TimeConditionedNet(half, half, hidden, temb_dim)
        self.G = TimeConditionedNet(half, half, hidden, temb_dim)

    def forward(self, state: State, temb: torch.Tensor) -> State:
        x1, x2 = state[-1].chunk(2, dim=1)
        y1 = x1 + self.F(x2, temb)
        y2 = x2 + self.G(y1, temb)
        return state[:-1] + [torch.cat([y1, y2], dim=1)]

    def inverse(self, state: State, temb: torch.Tensor) -> State:
        y1, y2 = state[-1].chunk(2, dim=1)
        x2 = y2 - self.G(y1, temb)
        x1 = y1 - self.F(x2, temb)
        return state[:-1] + [torch.cat([x1, x2], dim=1)]

    def forward_(self, state: State, temb: torch.Tensor, ctx: RecomputeContext | None = None) -> State:
        """In place in ``state[-1]`` (no grad): ``x1 += F(x2)``, then ``x2 += G(x1)``."""
        x1, x2 = state[-1].chunk(2, dim=1)
        x1.add_(self.F(x2, temb))
        x2.add_(self.G(x1, temb))
        return state

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor, ctx: RecomputeContext | None = None):
        """Each sub-network is evaluated once with grad (whole volume or slabs): it yields both the input and
        the graph. The halves are recomputed one after the other, so the working set is one sub-network's,
        and the input and its gradient are written in place into the (core-owned) output buffers."""
        y, dy = out_state[-1], grad_out[-1]
        y1, y2 = y.chunk(2, dim=1)
        dy1, dy2 = dy.chunk(2, dim=1)
        gte1, gG = recompute_half(self.G, y1, y2, dy2, dy1, temb, ctx)  # y2 -> x2, dy1 += G's input grad
        gte2, gF = recompute_half(self.F, y2, y1, dy1, dy2, temb, ctx)  # y1 -> x1, dy2 += F's input grad
        named = {**prefixed("F.", gF), **prefixed("G.", gG)}
        return out_state, grad_out, sum_opt(gte1, gte2), grads_for(self, named)
