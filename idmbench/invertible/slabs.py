"""Recompute a coupling's sub-network in slabs, exactly, so its working set is a slab's, not a volume's.

Once the memory-saving backward stores nothing, its peak is the two state-sized buffers it rebuilds in
place (the state and its gradient) plus the working set of the largest single recompute: one
sub-network's intermediate tensors and their gradients over the whole volume. At the top level of the
UNet that working set is larger than the state itself. This module bounds it.

A sub-network that can be sliced is a :class:`SlabNet`: ``out = post(GroupNorm(pre(x)), modulation(t))``
where ``pre`` and ``post`` are local (each output column along the slab axis needs ``pre_halo`` /
``post_halo`` columns of input on either side: one per 3x3x3 conv) and GroupNorm is the only global
operation. Slabs cut the *last* spatial axis (W): PyTorch's CPU convolution keeps its oneDNN kernels only
while a tensor's leading sizes (N, C, D, H) stay large, so thin slabs along D would fall back to its
im2col kernels, several times slower; on CUDA the axis makes no difference. Its backward in slabs
``[c0, c1)`` of W takes three passes (:func:`slab_backward`):

1. **statistics** (no grad): ``pre`` slab by slab; per-group mean and variance combined across slabs
   with Chan's parallel formula -- the whole-volume statistics up to summation order;
2. **output pass**: per slab, ``pre`` on the slab with its halo (no grad), normalise with the global
   statistics as leaves, ``post`` with grad; the output rebuilds the coupling's input in place (the
   inverse), and autograd gives the gradients of ``post``'s and the norm's parameters, of the time
   modulation and of the two statistics (summed over slabs);
3. **input pass**: per slab, ``pre`` with grad on the slab plus halo, normalise and ``post`` again (a
   net whose ``post`` ends in a linear map -- the coupling's conv -- applies that map's adjoint to the
   output gradient instead, :meth:`SlabNet.post_input_vjp`), and backpropagate the output gradient of
   the columns this slab influences together with the statistics' gradient (``d mean / N`` and ``d var * 2 (a - mean) / N`` -- GroupNorm's coupling through its
   statistics), giving the input gradient (added over the overlapping halo columns) and ``pre``'s
   parameter gradients.

Every derivative is autograd's (or a convolution's adjoint); the only hand-written step is the chain rule
through the mean and the (biased) variance. Results equal the whole-volume recompute up to floating-point
summation order (tested in float64 against plain autograd, for slab counts that do and do not divide the
side). The price is ``pre`` run three times and ``post`` up to twice instead of once each, plus the halos:
:func:`choose_slabs` therefore slices a layer only when its whole-volume working set exceeds the core's
budget, and then into as few slabs as the budget allows.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import RecomputeContext, constant_params, detached_params, recompute
from .conv import conv3d

Params = Mapping[str, torch.Tensor]

#: the axis slabs cut: W, the last spatial axis (see the module docstring)
AXIS = 4


def columns(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``x[..., start:stop]``: the columns ``[start, stop)`` of a (B, C, D, H, W) tensor along the slab axis."""
    return x[:, :, :, :, start:stop]


def pad_columns(x: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """``x`` with ``pad[0]`` zero columns before and ``pad[1]`` after along W (no copy when both are 0)."""
    lo, hi = pad
    return x if lo == 0 and hi == 0 else F.pad(x, (lo, hi))


def conv3d_slab(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: tuple[int, int]) -> torch.Tensor:
    """3x3x3 convolution (D, H zero-padded by 1) of the columns of ``x`` with ``pad`` zero columns added along W.

    With ``pad == (1, 1)`` this is ``F.conv3d(x, weight, bias, padding=1)``; a slab passes its halo
    columns in ``x`` and pads only where it touches the volume's edge. Output columns:
    ``columns + pad[0] + pad[1] - 2``.
    """
    lo, hi = pad
    if lo == hi:
        return conv3d(x, weight, bias, (1, 1, lo))
    return conv3d(pad_columns(x, pad), weight, bias, (1, 1, 0))


class SlabNet(nn.Module):
    """A sub-network ``post(GroupNorm(pre(x)), modulation(temb))`` that :func:`slab_backward` can slice.

    Subclasses define ``norm`` (an ``nn.GroupNorm``), ``pre``, ``modulation`` and ``post`` with the
    parameters passed explicitly (a mapping from parameter name to tensor, as ``named_parameters``), and
    name which sub-modules belong to which part in ``PRE``, ``MOD`` and ``POST``. Slabs cut the last axis
    (W); ``col0`` below is the index along W of a tensor's first column in the whole volume.

    Attributes:
        pre_halo: input columns needed on each side per output column of ``pre``.
        post_halo: columns of ``post``'s input needed on each side per output column.
    """

    PRE: tuple[str, ...] = ()
    MOD: tuple[str, ...] = ()
    POST: tuple[str, ...] = ()
    pre_halo: int = 1
    post_halo: int = 1
    norm: nn.GroupNorm

    def pre(self, x: torch.Tensor, col0: int, pad: tuple[int, int], p: Params) -> torch.Tensor:  # pragma: no cover
        """``x`` (B, c_in, D, H, w) starting at column ``col0``, ``pad`` zero columns added at the volume's
        edges -> (B, hidden, D, H, w + pad[0] + pad[1] - 2 * pre_halo)."""
        raise NotImplementedError

    def modulation(self, temb: torch.Tensor, p: Params) -> torch.Tensor:  # pragma: no cover
        """``temb`` (B, E) -> what ``post`` needs from the time embedding (small)."""
        raise NotImplementedError

    def post(self, n: torch.Tensor, mod: torch.Tensor, col0: int, pad: tuple[int, int], p: Params,
             shape: Sequence[int]) -> torch.Tensor:  # pragma: no cover
        """Normalised columns ``n`` (B, hidden, D, H, w) starting at ``col0``; ``pad`` zero columns added to the
        input of ``post``'s local op; ``shape`` the whole volume's (D, H, W)
        -> (B, c_out, D, H, w + pad[0] + pad[1] - 2 * post_halo)."""
        raise NotImplementedError

    def post_input_vjp(self, n: torch.Tensor, mod: torch.Tensor, col0: int, pad: tuple[int, int], p: Params,
                       shape: Sequence[int], dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, g)`` such that backpropagating ``g`` from ``t`` gives ``post``'s gradient with respect to
        ``n`` for the output gradient ``dout`` (the input pass needs only that). Default: ``(post(n, ...),
        dout)``; a net whose ``post`` ends in a linear map overrides it with that map's adjoint, so the input
        pass need not run the map itself."""
        return self.post(n, mod, col0, pad, p, shape), dout

    def align(self, shape: Sequence[int]) -> int:
        """Slab bounds must be multiples of this many columns (1; windowed attention: its window)."""
        return 1

    def recompute_bytes(self, x: torch.Tensor, width: int | None) -> int:  # pragma: no cover
        """Estimated working set (bytes) of recomputing this net for input ``x`` in slabs ``width`` columns
        wide (``None``: the whole-volume recompute)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        p = dict(self.named_parameters())
        a = self.pre(x, 0, (self.pre_halo, self.pre_halo), p)
        n = F.group_norm(a, self.norm.num_groups, p.get("norm.weight"), p.get("norm.bias"), self.norm.eps)
        del a
        return self.post(n, self.modulation(temb, p), 0, (self.post_halo, self.post_halo), p, x.shape[2:])

    def part(self, names: tuple[str, ...], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The entries of ``params`` that belong to the sub-modules ``names``."""
        return {n: t for n, t in params.items() if n.split(".")[0] in names}


def slab_plan(width: int, slabs: int, align: int = 1) -> list[tuple[int, int]]:
    """Split ``width`` columns (a multiple of ``align``) into ``slabs`` near-equal runs ``[c0, c1)`` whose
    bounds are multiples of ``align`` (fewer when there are not enough aligned columns). The first runs
    take the remainder, so counts that do not divide the side work."""
    units = width // align
    slabs = max(1, min(int(slabs), units))
    base, extra = divmod(units, slabs)
    plan, c0 = [], 0
    for i in range(slabs):
        c1 = c0 + (base + (1 if i < extra else 0)) * align
        plan.append((c0, c1))
        c0 = c1
    return plan


def choose_slabs(net: nn.Module, x: torch.Tensor, ctx: RecomputeContext | None) -> int:
    """How many slabs to recompute ``net`` on input ``x`` in.

    1 (the whole volume) when ``net`` cannot be sliced, when there is no budget, or when its estimated
    working set fits ``ctx.budget_bytes``; else the fewest slabs that fit, but none smaller than
    ``ctx.min_slab_voxels``. ``ctx.slabs`` overrides.
    """
    if not isinstance(net, SlabNet) or ctx is None:
        return 1
    width = x.shape[AXIS]
    align = net.align(x.shape[2:])
    units = max(1, width // align)
    if ctx.slabs is not None:
        return max(1, min(int(ctx.slabs), units))
    if ctx.budget_bytes is None or net.recompute_bytes(x, None) <= ctx.budget_bytes:
        return 1
    most = max(1, min(units, x[:, 0].numel() // max(ctx.min_slab_voxels, 1)))
    for n in range(2, most + 1):
        if net.recompute_bytes(x, math.ceil(units / n) * align) <= ctx.budget_bytes:
            return n
    return most


def recompute_half(
    net: nn.Module, x: torch.Tensor, target: torch.Tensor, dout: torch.Tensor, dx: torch.Tensor,
    temb: torch.Tensor, ctx: RecomputeContext | None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor | None]]:
    """Backward of one additive half ``target += net(x, t)``, in place.

    Rebuilds ``target`` (``target -= net(x, t)``), adds ``net``'s input gradient (for the output gradient
    ``dout``) into ``dx`` and returns ``(grad of temb, {parameter name: grad})``. Whole volume or slabs,
    see :func:`choose_slabs`. ``dx`` may alias ``dout`` only where ``net`` reads and writes disjoint
    voxels (the checkerboard attention).
    """
    slabs = choose_slabs(net, x, ctx)
    if slabs > 1:
        return slab_backward(net, x, target, dout, dx, temb, slabs)  # type: ignore[arg-type]
    out, gx, gt, gp = recompute(net, detached_params(net), x, temb, dout)
    target.sub_(out)
    del out
    if gx is not None:
        dx.add_(gx)
    return gt, gp


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _group_view(a: torch.Tensor, groups: int) -> torch.Tensor:
    return a.reshape(a.shape[0], groups, -1)


def _normalise(a: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, groups: int,
               weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """GroupNorm of ``a`` (B, C, ...) with given per-(B, group) ``mean`` and ``rstd``, then the affine map."""
    v = _group_view(a.to(mean.dtype), groups)
    n = ((v - mean[..., None]) * rstd[..., None]).reshape(a.shape)
    shape = (1, -1) + (1,) * (a.ndim - 2)
    if weight is not None:
        n = n * weight.reshape(shape)
    if bias is not None:
        n = n + bias.reshape(shape)
    return n


def _accumulate(acc: dict[str, torch.Tensor], names: Sequence[str], grads: Sequence[torch.Tensor | None]) -> None:
    for n, g in zip(names, grads):
        if g is not None:
            acc[n] = g if n not in acc else acc[n] + g


def pre_columns(net: SlabNet, x: torch.Tensor, c0: int, c1: int, p: Params) -> torch.Tensor:
    """``net.pre`` for output columns ``[c0, c1)``: reads them with their halo, pads at the volume's edges."""
    width, h = x.shape[AXIS], net.pre_halo
    s, e = max(c0 - h, 0), min(c1 + h, width)
    return net.pre(columns(x, s, e), s, (h - (c0 - s), h - (e - c1)), p)


def group_statistics(net: SlabNet, x: torch.Tensor, plan: Sequence[tuple[int, int]], p: Params) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-(B, group) mean and biased variance of ``net.pre(x)`` over the whole volume, computed slab by
    slab (Chan et al.'s pairwise combination of means and sums of squared deviations). Returns
    ``(mean, var, count)``; no grad."""
    groups = net.norm.num_groups
    mean = m2 = None
    count = 0
    with torch.no_grad():
        for c0, c1 in plan:
            a = pre_columns(net, x, c0, c1, p)
            v = _group_view(a, groups)
            v = v.to(_stat_dtype(v))
            var_k, mean_k = torch.var_mean(v, dim=-1, correction=0)
            n_k = v.shape[-1]
            del a, v
            if mean is None:
                mean, m2, count = mean_k, var_k * n_k, n_k
                continue
            total = count + n_k
            delta = mean_k - mean
            mean = mean + delta * (n_k / total)
            m2 = m2 + var_k * n_k + delta.square() * (count * n_k / total)
            count = total
    assert mean is not None and m2 is not None
    return mean, m2 / count, count


def slab_backward(
    net: SlabNet, x: torch.Tensor, target: torch.Tensor, dout: torch.Tensor, dx: torch.Tensor,
    temb: torch.Tensor, slabs: int,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor | None]]:
    """:func:`recompute_half` in ``slabs`` slabs along W (the three passes of the module docstring).

    Args:
        net: the sub-network. x: its input (B, c_in, D, H, W). target: the tensor its output was added
            to (rebuilt in place). dout: the gradient of that output (B, c_out, D, H, W). dx: where the
            input gradient is added (in place). temb: (B, E). slabs: number of slabs (>= 1).
    """
    width = x.shape[AXIS]
    shape = tuple(x.shape[2:])
    plan = slab_plan(width, slabs, net.align(shape))
    hq, hp = net.pre_halo, net.post_halo
    groups, eps = net.norm.num_groups, net.norm.eps
    const = constant_params(net)
    leaves = detached_params(net)
    pre_l, mod_l, post_l = net.part(net.PRE, leaves), net.part(net.MOD, leaves), net.part(net.POST, leaves)
    norm_l = net.part(("norm",), leaves)

    # 1. statistics of pre(x) over the whole volume
    mean, var, count = group_statistics(net, x, plan, const)

    # 2. output pass: rebuild the target, gradients of post, norm, modulation and the statistics
    with torch.enable_grad():
        te = temb.detach().requires_grad_(True)
        mod = net.modulation(te, {**const, **mod_l})
        var_leaf = var.detach().requires_grad_(True)
        rstd = torch.rsqrt(var_leaf + eps)
    mod_leaf = mod.detach().requires_grad_(True)
    mean_leaf = mean.detach().requires_grad_(True)
    rstd_leaf = rstd.detach().requires_grad_(True)
    p_post = {**const, **post_l, **norm_l}
    wrt_names = ["mean", "rstd", "mod"] + list(norm_l) + list(post_l)
    wrt = [mean_leaf, rstd_leaf, mod_leaf] + list(norm_l.values()) + list(post_l.values())
    acc: dict[str, torch.Tensor] = {}
    for c0, c1 in plan:
        s, e = max(c0 - hp, 0), min(c1 + hp, width)  # the normalised columns post reads
        with torch.no_grad():
            a = pre_columns(net, x, s, e, const)
        with torch.enable_grad():
            n = _normalise(a, mean_leaf, rstd_leaf, groups, p_post.get("norm.weight"), p_post.get("norm.bias"))
            del a
            out = net.post(n, mod_leaf, s, (hp - (c0 - s), hp - (e - c1)), p_post, shape)  # columns [c0, c1)
            del n
            grads = torch.autograd.grad(out, wrt, columns(dout, c0, c1), allow_unused=True)
        _accumulate(acc, wrt_names, grads)
        del grads
        with torch.no_grad():
            columns(target, c0, c1).sub_(out)
        del out

    # GroupNorm's statistics: d var from d rstd, then the cotangents of sum(a) and sum((a - mean)^2)
    d_mean = acc.pop("mean", None)
    d_rstd = acc.pop("rstd", None)
    d_mod = acc.pop("mod", None)
    d_var = None
    if d_rstd is not None:
        with torch.enable_grad():
            (d_var,) = torch.autograd.grad(rstd, var_leaf, d_rstd)
    c_sum = torch.zeros_like(mean) if d_mean is None else d_mean / count
    c_sq = torch.zeros_like(mean) if d_var is None else d_var / count

    # 3. input pass: the input gradient and pre's parameter gradients
    mean_c, rstd_c, mod_c = mean.detach(), rstd.detach(), mod.detach()
    p_in = {**const, **pre_l}
    pre_names = list(pre_l)
    for c0, c1 in plan:
        s, e = max(c0 - hq, 0), min(c1 + hq, width)  # the input columns pre reads
        o0, o1 = max(c0 - hp, 0), min(c1 + hp, width)  # the output columns these influence
        with torch.enable_grad():
            xs = columns(x, s, e).detach().requires_grad_(True)
            a = net.pre(xs, s, (hq - (c0 - s), hq - (e - c1)), p_in)  # columns [c0, c1)
            n = _normalise(a, mean_c, rstd_c, groups, const.get("norm.weight"), const.get("norm.bias"))
            # post's output columns [o0, o1) with the columns outside the slab zero: the direct path
            t, g = net.post_input_vjp(n, mod_c, c0, (hp + (c0 - o0), hp + (o1 - c1)), const, shape, columns(dout, o0, o1))
            del n
            v = _group_view(a, groups).to(mean_c.dtype)
            sums = v.sum(-1)
            squares = (v - mean_c[..., None]).square().sum(-1)
            del v
            grads = torch.autograd.grad([t, sums, squares], [xs] + list(pre_l.values()), [g, c_sum, c_sq],
                                        allow_unused=True)
            del t, g, a, sums, squares
        if grads[0] is not None:
            columns(dx, s, e).add_(grads[0])
        _accumulate(acc, pre_names, grads[1:])
        del grads, xs

    # the time modulation, once for the whole volume
    grad_temb = None
    if d_mod is not None:
        with torch.enable_grad():
            g = torch.autograd.grad(mod, [te] + list(mod_l.values()), d_mod, allow_unused=True)
        grad_temb = g[0]
        _accumulate(acc, list(mod_l), g[1:])
    return grad_temb, dict(acc)
