"""The invertible UNet core and its memory-saving forward and backward.

``InvertibleUNetCore`` is a sequence of bijective layers (couplings, orthogonal resampling with
channel splits, checkerboard attention) from a (B, C, D, H, W) tensor to one of the same shape.

With ``memory_efficient=True`` the whole core runs inside one ``torch.autograd.Function``:

* **forward**: under no_grad, every layer works *in place* in one state-sized buffer (a copy of the
  input, or the input itself with ``consume_input``): couplings add into their halves, the resampling
  rewrites a level's channels into the low-resolution tensor in their own storage, and only the output
  is kept.
* **backward**: the layers are walked in reverse; each rebuilds its input from its output by the exact
  inverse, in place in the output buffer (``consume_output``) or a copy of it, while backpropagating the
  gradient in place in a second buffer. So the floor is two state-sized buffers; above it sits one
  layer's recompute working set, which the core bounds by ``recompute_budget``: a sub-network whose
  whole-volume recompute would hold more is recomputed in slabs (:mod:`.slabs`).

Parameter gradients leave through the Function's return values (the parameters are explicit inputs),
never through a ``.backward()`` call inside backward, so DDP and gradient hooks see ordinary gradients.
The recompute runs under the autocast state of the forward pass. ``probe`` (a callable taking a label)
is called at every layer boundary of both passes: :mod:`.breakdown` reads the live-tensor tracker there.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .attention import CheckerboardAttentionCoupling
from .base import InvertibleLayer, RecomputeContext
from .couplings import AdditiveCoupling
from .resampling import SplitDownsample, UpsampleMerge


#: slabs are never smaller than this many voxels (batch included) unless the volume is small (see
#: :meth:`InvertibleUNetCore.recompute_context`): 64^3, a few milliseconds of GPU work per slab
MIN_SLAB_VOXELS = 2**18


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _MemorySavingCore(torch.autograd.Function):
    """Runs ``core`` without storing activations; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, core: "InvertibleUNetCore", x: torch.Tensor, temb: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.core = core
        ctx.autocast = _autocast_state(x.device.type)
        consume = core.consume_input and x.is_contiguous()
        buf = x.detach() if consume else x.detach().clone(memory_format=torch.contiguous_format)
        with torch.no_grad():
            core.run_(buf, temb.detach())
        if consume:
            ctx.mark_dirty(x)
            out = x
        else:
            out = buf
        ctx.save_for_backward(out, temb.detach())
        return out

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        core: InvertibleUNetCore = ctx.core
        y, temb = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        # The layers rebuild inputs and gradients in place in buffers the core owns. With
        # ``consume_output`` the saved output and the incoming gradient themselves become those
        # buffers (two copies of the state less); a second backward through the same graph then
        # fails autograd's in-place check, loudly.
        if core.consume_output and y.is_contiguous():
            # detached aliases: same storage and version counter, but views of them stay out of autograd
            state = [y.detach()]
            grad = [grad_y.detach() if grad_y.is_contiguous() else grad_y.contiguous()]
        else:
            state = [y.clone(memory_format=torch.contiguous_format)]
            grad = [grad_y.clone(memory_format=torch.contiguous_format)]
        del y, grad_y
        rctx = core.recompute_context(state[0])
        grad_temb = torch.zeros_like(temb)
        pgrads: dict[int, torch.Tensor] = {}
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled):
            for i in reversed(range(len(core.layers))):
                layer: InvertibleLayer = core.layers[i]
                state, grad, gt, pg = layer.backward_pass(state, grad, temb, rctx)
                if gt is not None:
                    grad_temb = grad_temb + gt.to(grad_temb.dtype)
                for p, g in zip(layer.trainable(), pg):
                    if g is not None:
                        pid = id(p)
                        pgrads[pid] = g if pid not in pgrads else pgrads[pid] + g
                del gt, pg
                if rctx.probe is not None:
                    rctx.probe(f"backward {core.layer_label(i)}")
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
        attention_min_level: the shallowest level whose skip gets attention (its recompute working set
            grows with the level's voxels).
        attn_head_dim: channels per attention head. attn_window: window side of windowed attention.
        attn_full_max_tokens: full attention over all voxels up to this many, windows above.
        hidden_ratio: width of a coupling sub-network relative to half the level's channels.
        top_hidden_ratio: the same at the top (full-resolution) level, where a sub-network's
            recompute working set dominates the peak; ``None`` means ``hidden_ratio``.
        memory_efficient: recompute by inversion instead of storing activations.
        recompute_budget: the most one layer's recompute may hold, as a fraction of the state
            (C x voxels x element size): sub-networks above it are recomputed in slabs, as few
            as fit. ``None``: always the whole volume (fastest, most memory).
        recompute_slabs: force this many slabs for every sub-network that can be sliced (tests,
            experiments); ``None``: from ``recompute_budget``.
        consume_input: let the memory-saving forward run in place in the input tensor (saves a copy
            of the state). Only for a caller whose input is a temporary nothing else reads (IDM's lift
            output); autograd is told (``mark_dirty``).
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
        attention_min_level: int = 2,
        attn_head_dim: int = 32,
        attn_window: int = 4,
        attn_full_max_tokens: int = 64,
        hidden_ratio: float = 1.0,
        top_hidden_ratio: float | None = None,
        memory_efficient: bool = True,
        recompute_budget: float | None = 0.25,
        recompute_slabs: int | None = None,
        consume_input: bool = False,
        consume_output: bool = False,
    ):
        super().__init__()
        if channels % 4:
            raise ValueError(f"IDM base_channels must be divisible by 4; got {channels}")
        if levels < 0 or blocks_per_level < 1:
            raise ValueError(f"IDM needs levels >= 0 and blocks_per_level >= 1; got {levels}, {blocks_per_level}")
        if recompute_budget is not None and not recompute_budget > 0:
            raise ValueError(f"IDM recompute_budget must be a positive fraction of the state or None; got {recompute_budget}")
        if recompute_slabs is not None and int(recompute_slabs) < 1:
            raise ValueError(f"IDM recompute_slabs must be >= 1 or None; got {recompute_slabs}")
        self.channels, self.levels, self.blocks_per_level = channels, levels, blocks_per_level
        self.memory_efficient = memory_efficient
        self.recompute_budget = recompute_budget
        self.recompute_slabs = recompute_slabs
        self.consume_input = consume_input
        self.consume_output = consume_output
        #: called with a label at every layer boundary of the memory-saving passes (see :mod:`.breakdown`)
        self.probe: Callable[[str], None] | None = None
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

    def layer_label(self, i: int) -> str:
        """``"07 AdditiveCoupling c=32"``: index, kind and the channels it acts on."""
        layer = self.layers[i]
        return f"{i:02d} {type(layer).__name__} c={getattr(layer, 'channels', '?')}"

    def recompute_context(self, state: torch.Tensor) -> RecomputeContext:
        """The budget of one pass over ``state`` (the (B, C, D, H, W) buffer): ``recompute_budget`` of its
        bytes, and slabs of at least a quarter of its voxels or :data:`MIN_SLAB_VOXELS`, whichever is
        smaller (small volumes get at most four slabs of the top level, where per-slab overhead would
        dominate; large ones are sliced as finely as the budget needs)."""
        budget = None
        if self.recompute_budget is not None:
            budget = int(self.recompute_budget * state.numel() * max(state.element_size(), 4))
        voxels = state[:, 0].numel()
        return RecomputeContext(budget_bytes=budget, slabs=self.recompute_slabs,
                                min_slab_voxels=max(1, min(voxels // 4, MIN_SLAB_VOXELS)), probe=self.probe)

    def run(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Plain forward through every layer (autograd stores what it needs)."""
        state = [x]
        for layer in self.layers:
            state = layer(state, temb)
        assert len(state) == 1
        return state[0]

    def run_(self, buf: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The forward computed in place in ``buf`` (contiguous, no grad); returns ``buf`` holding the output."""
        ctx = self.recompute_context(buf)
        state = [buf]
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                state = layer.forward_(state, temb, ctx)
                if ctx.probe is not None:
                    ctx.probe(f"forward {self.layer_label(i)}")
        assert len(state) == 1 and state[0] is buf, "the in-place forward must end in its own buffer"
        return buf

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
        if not self.memory_efficient:
            return self.run(x, temb)
        if needs_grad:
            return _MemorySavingCore.apply(self, x, temb, *self.trainable())
        # sampling: the same in-place forward, nothing to keep for a backward
        consume = self.consume_input and x.is_contiguous() and not x.requires_grad
        buf = x if consume else x.clone(memory_format=torch.contiguous_format)
        return self.run_(buf, temb)
