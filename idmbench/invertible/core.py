"""The invertible UNet core and its memory-saving backward.

``InvertibleUNetCore`` is a sequence of bijective layers (couplings, orthogonal resampling with
channel splits, checkerboard attention) from a (B, C, D, H, W) tensor to one of the same shape.

With ``memory_efficient=True`` the whole core runs inside one ``torch.autograd.Function``: the forward
pass runs under no_grad on detached inputs and keeps only the core's output; the backward pass walks
the layers in reverse, rebuilds each layer's input from its output by the exact inverse, recomputes
that layer with grad and backpropagates through it. Parameter gradients leave through the Function's
return values (the parameters are explicit inputs), never through a ``.backward()`` call inside
backward, so DDP and gradient hooks see ordinary gradients. The recompute runs under the autocast
state of the forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .layers import (
    AdditiveCoupling,
    CheckerboardAttentionCoupling,
    InvertibleLayer,
    SplitDownsample,
    UpsampleMerge,
)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _MemorySavingCore(torch.autograd.Function):
    """Runs ``core`` without storing activations; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, core: "InvertibleUNetCore", x: torch.Tensor, temb: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.core = core
        ctx.autocast = _autocast_state(x.device.type)
        with torch.no_grad():
            y = core.run(x.detach(), temb.detach())
        ctx.save_for_backward(y, temb.detach())
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        core: InvertibleUNetCore = ctx.core
        y, temb = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        # The layers rebuild inputs and gradients in place in buffers the core owns. With
        # ``consume_output`` the saved output and the incoming gradient themselves become those
        # buffers (two copies of the state less); a second backward through the same graph then
        # fails autograd's in-place check, loudly.
        if core.consume_output:
            state = [y]
            grad = [grad_y if grad_y.is_contiguous() else grad_y.contiguous()]
        else:
            state = [y.clone()]
            grad = [grad_y.clone(memory_format=torch.contiguous_format)]
        del y, grad_y
        grad_temb = torch.zeros_like(temb)
        pgrads: dict[int, torch.Tensor] = {}
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled):
            for layer in reversed(core.layers):
                state, grad, gt, pg = layer.backward_pass(state, grad, temb)
                if gt is not None:
                    grad_temb = grad_temb + gt.to(grad_temb.dtype)
                for p, g in zip(layer.trainable(), pg):
                    if g is not None:
                        pid = id(p)
                        pgrads[pid] = g if pid not in pgrads else pgrads[pid] + g
        out_params = [pgrads.get(id(p)) if p.requires_grad else None for p in core.trainable()]
        return (None, grad[0], grad_temb, *out_params)


class InvertibleUNetCore(nn.Module):
    """Invertible UNet (after iUNets, Etmann et al. 2020) with time conditioning and invertible attention.

    Args:
        channels: C, channels at the top level (divisible by 4).
        levels: number of 2x2x2 downsamplings; every side must divide by ``2 ** levels``.
            Width per level: C, 2C, 4C, ... (3/4 of the channels stay as the skip, 1/4 goes down x8).
        blocks_per_level: K additive coupling blocks per level, on both the encoder and decoder path
            (K at the bottleneck).
        temb_dim: width of the time embedding the blocks are conditioned on.
        attention: add checkerboard attention couplings on every skip path (before the decoder
            concatenation) from ``attention_min_level`` down, and at the bottleneck.
        hidden_ratio: width of a coupling sub-network relative to half the level's channels.
        top_hidden_ratio: the same at the top (full-resolution) level, where a sub-network's
            recompute working set dominates the peak; ``None`` means ``hidden_ratio``.
        memory_efficient: recompute by inversion instead of storing activations.
        consume_output: let the memory-saving backward rebuild the input in place in the saved
            output tensor and the incoming gradient (saves two copies of the state). Only for a
            caller that owns both: the output must not be used after backward, its gradient must
            not be shared, and ``retain_graph`` double backward is refused by autograd's in-place
            check. IDM sets it (its core output only feeds the projection conv).
    """

    def __init__(
        self,
        channels: int,
        levels: int,
        blocks_per_level: int,
        temb_dim: int,
        *,
        attention: bool = True,
        attention_min_level: int = 0,
        attn_head_dim: int = 8,
        attn_window: int = 4,
        attn_full_max_tokens: int = 4096,
        hidden_ratio: float = 1.0,
        top_hidden_ratio: float | None = None,
        memory_efficient: bool = True,
        consume_output: bool = False,
    ):
        super().__init__()
        if channels % 4:
            raise ValueError(f"IDM base_channels must be divisible by 4; got {channels}")
        if levels < 0 or blocks_per_level < 1:
            raise ValueError(f"IDM needs levels >= 0 and blocks_per_level >= 1; got {levels}, {blocks_per_level}")
        self.channels, self.levels, self.blocks_per_level = channels, levels, blocks_per_level
        self.memory_efficient = memory_efficient
        self.consume_output = consume_output
        attn_kw = dict(head_dim=attn_head_dim, window=attn_window, full_max_tokens=attn_full_max_tokens)

        top_ratio = hidden_ratio if top_hidden_ratio is None else top_hidden_ratio

        def coupling(c: int) -> AdditiveCoupling:
            ratio = top_ratio if c == channels else hidden_ratio
            return AdditiveCoupling(c, temb_dim, hidden=max(2, int(round(c // 2 * ratio))))

        layers: list[InvertibleLayer] = []
        c = channels
        for _ in range(levels):
            layers += [coupling(c) for _ in range(blocks_per_level)]
            layers.append(SplitDownsample(c))
            c *= 2
        half = (blocks_per_level + 1) // 2
        layers += [coupling(c) for _ in range(half)]
        if attention:
            layers.append(CheckerboardAttentionCoupling(c, temb_dim, index=-1, **attn_kw))
        layers += [coupling(c) for _ in range(blocks_per_level - half)]
        for level in reversed(range(levels)):
            c //= 2
            if attention and level >= attention_min_level:
                layers.append(CheckerboardAttentionCoupling(3 * c // 4, temb_dim, index=-2, **attn_kw))
            layers.append(UpsampleMerge(c))
            layers += [coupling(c) for _ in range(blocks_per_level)]
        self.layers = nn.ModuleList(layers)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def run(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Plain forward through every layer (autograd stores what it needs)."""
        state = [x]
        for layer in self.layers:
            state = layer(state, temb)
        assert len(state) == 1
        return state[0]

    def inverse(self, y: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The exact inverse: ``core.inverse(core(x, t), t) == x`` up to rounding."""
        state = [y]
        for layer in reversed(self.layers):
            state = layer.inverse(state, temb)
        assert len(state) == 1
        return state[0]

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or temb.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if self.memory_efficient and needs_grad:
            return _MemorySavingCore.apply(self, x, temb, *self.trainable())
        return self.run(x, temb)
