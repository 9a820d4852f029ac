"""The contract every bijective layer of the invertible UNet core follows, and the recompute helpers.

A layer maps a *state* -- a list of tensors ``[skip_0, ..., skip_l, current]`` -- to a new state with
exactly the same number of elements, conditioned on a time embedding ``temb`` (B, E). It has three
faces:

* ``forward(state, temb)`` / ``inverse(state, temb)``: out-of-place and differentiable, side by side
  (plain autograd -- the ``memory_efficient=False`` twin -- and the reconstruction check use them);
* ``forward_(state, temb, ctx)``: the same map computed *in place* in the state's buffers under
  ``no_grad`` (the memory-saving forward pass and sampling);
* ``backward_pass(out_state, grad_out, temb, ctx)``: rebuild the input state from the output by the
  exact inverse and backpropagate ``grad_out`` through the layer, returning
  ``(in_state, grad_in, grad_temb, param_grads)``. The core owns the buffers it passes in, so the input
  and its gradient are rebuilt in place in them.

:class:`RecomputeContext` carries what the core decides for the whole backward pass: how many bytes a
layer's recompute may hold (``budget_bytes``; layers above it recompute in slabs, see
:mod:`.slabs`), and the stack of level buffers that the resampling layers split and merge in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

State = list  # list[torch.Tensor]


@dataclass
class RecomputeContext:
    """What the memory-saving core passes to every layer of one forward or backward pass.

    Attributes:
        budget_bytes: the most bytes one layer's recompute working set may hold (its sub-network's
            intermediate tensors and their gradients); ``None``: no limit (whole-volume recompute).
        slabs: force this many slabs for every sub-network that can be sliced (tests and
            experiments); ``None``: from ``budget_bytes``.
        min_slab_voxels: the smallest slab (voxels, batch included) the budget may ask for: smaller
            slabs cost more in halos and per-slab overhead than they save (see
            :func:`~.slabs.choose_slabs`).
        parents: the level buffers split by :class:`~.resampling.SplitDownsample` (forward) or
            :class:`~.resampling.UpsampleMerge` (backward) and not merged back yet: ``(state, grad)``
            pairs (``grad`` is None in the forward pass), so the merge rebuilds the level in the same
            storage.
        probe: called with a label at every layer boundary (the per-layer memory breakdown).
    """

    budget_bytes: int | None = None
    slabs: int | None = None
    min_slab_voxels: int = 1
    parents: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    probe: Callable[[str], None] | None = None


def groups_for(channels: int, preferred: int = 8) -> int:
    """Largest group count <= preferred that divides ``channels`` (GroupNorm, never BatchNorm)."""
    for g in range(min(preferred, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def grad_or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def sum_opt(*gs: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of the tensors that are not None (None if all are)."""
    out = None
    for g in gs:
        if g is not None:
            out = g if out is None else out + g
    return out


def detached_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Fresh leaf aliases of ``module``'s trainable parameters (same storage, no hooks).

    The recompute differentiates with respect to these, so a user's gradient hooks on the real
    parameters fire once -- when the Function hands the gradient out -- not also inside backward.
    """
    return {n: p.detach().requires_grad_(True) for n, p in module.named_parameters() if p.requires_grad}


def constant_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s parameters as constants (detached, no grad): a recompute pass that needs none of
    their gradients."""
    return {n: p.detach() for n, p in module.named_parameters()}


def call_with(module: nn.Module, params: dict[str, torch.Tensor], *args: Any) -> Any:
    """``module(*args)`` with its trainable parameters replaced by ``params`` (see :func:`detached_params`)."""
    return torch.func.functional_call(module, params, args, strict=False)


def recompute(
    net: nn.Module, params: dict[str, torch.Tensor], inp: torch.Tensor, temb: torch.Tensor, grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor | None]]:
    """Evaluate ``net(inp, temb)`` once on the whole volume with grad and backpropagate ``grad_out``.

    Returns ``(output, grad of inp, grad of temb, {parameter name: grad})``; the output is detached and
    the graph is freed, so the caller holds only what it keeps.
    """
    with torch.enable_grad():
        x = inp.detach().requires_grad_(True)
        te = temb.detach().requires_grad_(True)
        out = call_with(net, params, x, te)
        gx, gt, *gp = torch.autograd.grad(out, [x, te] + list(params.values()), grad_out, allow_unused=True)
    return out.detach(), gx, gt, dict(zip(params, gp))


def grads_for(module: nn.Module, named: dict[str, torch.Tensor | None], prefix: str = "") -> list[torch.Tensor | None]:
    """Gradients keyed by parameter name, in the order of ``module``'s trainable parameters."""
    return [named.get(prefix + n) for n, p in module.named_parameters() if p.requires_grad]


def prefixed(prefix: str, named: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {prefix + n: g for n, g in named.items()}


class InvertibleLayer(nn.Module):
    """Base class: a bijection on the state list, conditioned on ``temb`` (see the module docstring)."""

    def forward(self, state: State, temb: torch.Tensor) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, state: State, temb: torch.Tensor) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward_(self, state: State, temb: torch.Tensor, ctx: RecomputeContext | None = None) -> State:
        """In-place forward under ``no_grad`` (default: the out-of-place forward; subclasses do better)."""
        return self.forward(state, temb)

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor, ctx: RecomputeContext | None = None):
        """Generic scheme: inverse (no grad), recompute forward with grad, backpropagate.

        Returns ``(in_state, grad_in, grad_temb, param_grads)``; ``param_grads`` aligns with
        :meth:`trainable`. Subclasses with a cheaper exact scheme override this.
        """
        with torch.no_grad():
            in_state = self.inverse(out_state, temb)
        params = detached_params(self)
        with torch.enable_grad():
            inp = [s.detach().requires_grad_(True) for s in in_state]
            te = temb.detach().requires_grad_(True)
            out = call_with(self, params, inp, te)
            grads = torch.autograd.grad(out, inp + [te] + list(params.values()), grad_out, allow_unused=True)
        n = len(inp)
        grad_in = [grad_or_zeros(g, s) for g, s in zip(grads[:n], in_state)]
        return in_state, grad_in, grads[n], grads_for(self, dict(zip(params, grads[n + 1 :])))
