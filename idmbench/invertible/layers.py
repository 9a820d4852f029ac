"""Bijective layers of the invertible UNet core, each with ``forward`` and ``inverse`` side by side.

Every layer maps a *state* -- a list of tensors ``[skip_0, ..., skip_l, current]`` -- to a new state
with exactly the same number of elements, and is conditioned on a time embedding ``temb`` (B, E).

Each layer also implements ``backward_pass(out_state, grad_out, temb)``: rebuild the input state from
the output by the exact inverse, recompute the layer with grad and backpropagate, returning
``(in_state, grad_in, grad_temb, param_grads)``. The memory-saving core (``core.py``) chains these
in reverse, so nothing inside the core is stored during the forward pass. The core owns the state and
gradient buffers it passes in, so ``backward_pass`` may rebuild the input in place in them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

State = list  # list[torch.Tensor]


def _groups(channels: int, preferred: int = 8) -> int:
    """Largest group count <= preferred that divides ``channels`` (GroupNorm, never BatchNorm)."""
    for g in range(min(preferred, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _grad_or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def detached_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Fresh leaf aliases of ``module``'s trainable parameters (same storage, no hooks).

    The recompute differentiates with respect to these, so a user's gradient hooks on the real
    parameters fire once -- when the Function hands the gradient out -- not also inside backward.
    """
    return {n: p.detach().requires_grad_(True) for n, p in module.named_parameters() if p.requires_grad}


def call_with(module: nn.Module, params: dict[str, torch.Tensor], *args: Any) -> Any:
    """``module(*args)`` with its trainable parameters replaced by ``params`` (see :func:`detached_params`)."""
    return torch.func.functional_call(module, params, args, strict=False)


def recompute(
    net: nn.Module, params: dict[str, torch.Tensor], inp: torch.Tensor, temb: torch.Tensor, grad_out: torch.Tensor,
    fn: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor | None]]:
    """Evaluate ``net`` (or ``fn(inp, temb, params)``) once with grad and backpropagate ``grad_out``.

    Returns ``(output, grad of inp, grad of temb, {parameter name: grad})``; the output is detached and
    the graph is freed, so the caller holds only what it keeps.
    """
    with torch.enable_grad():
        x = inp.detach().requires_grad_(True)
        te = temb.detach().requires_grad_(True)
        out = call_with(net, params, x, te) if fn is None else fn(x, te, params)
        gx, gt, *gp = torch.autograd.grad(out, [x, te] + list(params.values()), grad_out, allow_unused=True)
    return out.detach(), gx, gt, dict(zip(params, gp))


def grads_for(module: nn.Module, named: dict[str, torch.Tensor | None], prefix: str = "") -> list[torch.Tensor | None]:
    """Gradients keyed by parameter name, in the order of ``module``'s trainable parameters."""
    return [named.get(prefix + n) for n, p in module.named_parameters() if p.requires_grad]


class InvertibleLayer(nn.Module):
    """Base class: a bijection on the state list, conditioned on ``temb``."""

    def forward(self, state: State, temb: torch.Tensor) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, state: State, temb: torch.Tensor) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor):
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
        grad_in = [_grad_or_zeros(g, s) for g, s in zip(grads[:n], in_state)]
        return in_state, grad_in, grads[n], grads_for(self, dict(zip(params, grads[n + 1 :])))


class TimeConditionedNet(nn.Module):
    """Coupling sub-network: conv3 -> GroupNorm -> time scale/shift -> SiLU -> conv3 (zero-initialised).

    Shapes: (B, c_in, D, H, W) -> (B, c_out, D, H, W). The last conv starts at zero, so every
    coupling block starts as the identity.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int, temb_dim: int):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, hidden, 3, padding=1, bias=False)  # GroupNorm follows: a bias would get no gradient
        self.norm = nn.GroupNorm(_groups(hidden), hidden)
        self.time = nn.Linear(temb_dim, 2 * hidden)
        self.conv2 = nn.Conv3d(hidden, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, z: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv1(z))
        scale, shift = self.time(F.silu(temb)).to(h.dtype)[:, :, None, None, None].chunk(2, dim=1)
        h = F.silu(h * (1 + scale) + shift)
        return self.conv2(h)


class AdditiveCoupling(InvertibleLayer):
    """Time-conditioned additive coupling on the current tensor (state[-1]) of ``channels`` channels.

    ``y1 = x1 + F(x2, t)``, ``y2 = x2 + G(y1, t)``; inverse ``x2 = y2 - G(y1, t)``, ``x1 = y1 - F(x2, t)``.
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

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor):
        """Each sub-network is evaluated once with grad: it yields both the input and the graph.

        The two halves are recomputed one after the other, so the working set is one sub-network,
        and the input and its gradient are written in place into the (core-owned) output buffers.
        """
        y, dy = out_state[-1], grad_out[-1]
        y1, y2 = y.chunk(2, dim=1)
        dy1, dy2 = dy.chunk(2, dim=1)
        g, gy1, gte1, gG = recompute(self.G, detached_params(self.G), y1, temb, dy2)
        y2.sub_(g)  # y2 now holds x2
        del g
        if gy1 is not None:
            dy1.add_(gy1)  # dL/dy1 including the path through G
        del gy1
        f, gx2, gte2, gF = recompute(self.F, detached_params(self.F), y2, temb, dy1)
        y1.sub_(f)  # y1 now holds x1
        del f
        if gx2 is not None:
            dy2.add_(gx2)  # dL/dx2
        named = {"F." + n: g for n, g in gF.items()}
        named.update({"G." + n: g for n, g in gG.items()})
        return out_state, grad_out, _sum_opt(gte1, gte2), grads_for(self, named)


def _sum_opt(*gs):
    out = None
    for g in gs:
        if g is not None:
            out = g if out is None else out + g
    return out


def checkerboard(shape: Sequence[int], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Spatial checkerboard mask m (1, 1, D, H, W): 1 where d + h + w is odd, else 0."""
    d, h, w = shape
    idx = (
        torch.arange(d, device=device)[:, None, None]
        + torch.arange(h, device=device)[None, :, None]
        + torch.arange(w, device=device)[None, None, :]
    )
    return (idx % 2).to(dtype)[None, None]


class MaskedAttentionNet(nn.Module):
    """Multi-head self-attention over voxels, fed only the unmasked voxels ``(1 - m) * x``.

    A depthwise 3x3x3 conv first spreads each voxel's neighbours into the masked positions (local
    mixing and relative position), then GroupNorm with time scale/shift, q/k/v by 1x1x1 conv,
    ``F.scaled_dot_product_attention`` over all voxels when there are at most ``full_max_tokens``,
    else within non-overlapping windows of ``window`` voxels per side; q/k/v and the output
    projection (zero-initialised) are linear maps applied in token layout.
    """

    def __init__(self, channels: int, temb_dim: int, head_dim: int = 8, window: int = 4, full_max_tokens: int = 4096):
        super().__init__()
        self.channels = channels
        self.heads = channels // head_dim if channels % head_dim == 0 and channels >= head_dim else 1  # one head when it does not divide
        self.window = window
        self.full_max_tokens = full_max_tokens
        self.pos = nn.Conv3d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm = nn.GroupNorm(_groups(channels), channels)
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

    def forward(self, z: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        B, C, D, H, W = z.shape
        h = self.norm(z + self.pos(z))
        scale, shift = self.time(F.silu(temb)).to(h.dtype)[:, :, None, None, None].chunk(2, dim=1)
        h = h * (1 + scale) + shift
        wd, wh, ww = self.windows((D, H, W))
        nd, nh_, nw = D // wd, H // wh, W // ww
        T = wd * wh * ww
        # tokens: (B, C, nd, wd, nh, wh, nw, ww) -> (B * windows, T, C); q/k/v/proj work in this layout
        tok = h.reshape(B, C, nd, wd, nh_, wh, nw, ww).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(-1, T, C)
        del h
        heads, hd = self.heads, C // self.heads
        q, k, v = self.qkv(tok).view(-1, T, 3, heads, hd).permute(2, 0, 3, 1, 4)
        del tok
        o = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, hd)
        del q, k, v
        o = self.proj(o.transpose(1, 2).reshape(-1, T, C))
        o = o.reshape(B, nd, nh_, nw, wd, wh, ww, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return o.reshape(B, C, D, H, W)


class CheckerboardAttentionCoupling(InvertibleLayer):
    """Invertible attention (iTrans, 3D, checkerboard split) on ``state[index]``.

    ``y = x + m * A((1 - m) * x, t)`` then the same with ``1 - m`` (a second network), exact inverse
    in reverse order: ``x = y - m * A((1 - m) * y, t)`` because ``(1 - m) * y == (1 - m) * x``.
    """

    def __init__(self, channels: int, temb_dim: int, index: int = -1, **attn_kw):
        super().__init__()
        self.index = index
        self.channels = channels
        self.A = MaskedAttentionNet(channels, temb_dim, **attn_kw)  # writes the odd voxels
        self.B = MaskedAttentionNet(channels, temb_dim, **attn_kw)  # writes the even voxels

    @staticmethod
    def _half(net: nn.Module, x: torch.Tensor, m: torch.Tensor, temb: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        z = (1 - m) * x
        a = net(z, temb) if params is None else call_with(net, params, z, temb)
        return m * a.to(x.dtype)

    def _masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = checkerboard(x.shape[2:], device=x.device, dtype=x.dtype)
        return m, 1 - m

    def forward(self, state: State, temb: torch.Tensor) -> State:
        x = state[self.index]
        m, mc = self._masks(x)
        x = x + self._half(self.A, x, m, temb)
        x = x + self._half(self.B, x, mc, temb)
        out = list(state)
        out[self.index] = x
        return out

    def inverse(self, state: State, temb: torch.Tensor) -> State:
        y = state[self.index]
        m, mc = self._masks(y)
        y = y - self._half(self.B, y, mc, temb)
        y = y - self._half(self.A, y, m, temb)
        out = list(state)
        out[self.index] = y
        return out

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor):
        """One evaluation with grad per half gives both the inverse and the backprop graph (in place)."""
        y, dy = out_state[self.index], grad_out[self.index]
        m, mc = self._masks(y)
        gte = None
        named: dict[str, torch.Tensor | None] = {}
        for prefix, net, mask in (("B.", self.B, mc), ("A.", self.A, m)):
            half = lambda x, te, params, net=net, mask=mask: self._half(net, x, mask, te, params)  # noqa: E731
            a, gy, gt, gp = recompute(net, detached_params(net), y, temb, dy, fn=half)
            y.sub_(a)
            del a
            if gy is not None:
                dy.add_(gy)
            del gy
            gte = _sum_opt(gte, gt)
            named.update({prefix + n: g for n, g in gp.items()})
        return out_state, grad_out, gte, grads_for(self, named)


def haar_matrix(channels: int, *, dtype=torch.float64) -> torch.Tensor:
    """The orthogonal 2x2x2 Haar transform for ``channels`` channels, (8c, 8c).

    Row ``8 * j + k`` is Haar filter k applied to input channel j; column ``8 * j + (4a + 2b + c)``
    is voxel (a, b, c) of channel j's 2x2x2 block -- the layout of a (8c, c, 2, 2, 2) conv kernel.
    """
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype) / math.sqrt(2.0)
    h8 = torch.kron(torch.kron(h2, h2), h2)
    return torch.kron(torch.eye(channels, dtype=dtype), h8)


class _OrthogonalKernel(nn.Module):
    """The learnable (8c, 8c) orthogonal matrix ``W = matrix_exp(A - A^T) @ Haar``.

    ``A`` starts at zero, so ``W`` is exactly the Haar transform at initialisation; the exponential of
    a skew-symmetric matrix is orthogonal, and autograd differentiates ``torch.linalg.matrix_exp``
    (no hand-written gradient). The Haar factor is rebuilt in the working float type on every call,
    so the matrix is orthogonal to the precision of that type (float64 included).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.skew = nn.Parameter(torch.zeros(8 * channels, 8 * channels))

    @property
    def weight(self) -> torch.Tensor:
        a = self.skew
        h = haar_matrix(self.channels, dtype=a.dtype).to(a.device)
        return torch.linalg.matrix_exp(a - a.transpose(0, 1)) @ h

    def kernel(self) -> torch.Tensor:
        c = self.channels
        return self.weight.reshape(8 * c, c, 2, 2, 2)


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class OrthogonalDownsample(nn.Module):
    """Learnable orthogonal 2x2x2 invertible downsampling: (B, c, D, H, W) <-> (B, 8c, D/2, H/2, W/2).

    Initialised as the Haar transform; ``up`` is the exact inverse (the transposed kernel). Runs in
    the input's floating type with autocast off, so the inverse stays exact under mixed precision.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.ortho = _OrthogonalKernel(channels)

    def matrix(self) -> torch.Tensor:
        return self.ortho.weight

    def forward(self, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """``down(x)``, or ``up(x)`` when ``transposed``."""
        return self.up(x) if transposed else self.down(x)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        with _no_autocast(x.device.type):
            return F.conv3d(x, self.ortho.kernel().to(x.dtype), stride=2)

    def up(self, y: torch.Tensor) -> torch.Tensor:
        with _no_autocast(y.device.type):
            return F.conv_transpose3d(y, self.ortho.kernel().to(y.dtype), stride=2)

    def weight_grad(self, inp: torch.Tensor, grad_out: torch.Tensor, *, transposed: bool) -> list[torch.Tensor | None]:
        """Gradient of the learnable parameters for ``down(inp)`` (or ``up(inp)`` if ``transposed``)
        receiving ``grad_out``; the input needs no gradient, so only the kernel's is computed."""
        params = detached_params(self)
        if not params:
            return []
        with torch.enable_grad():
            out = call_with(self, params, inp.detach(), transposed)
            grads = torch.autograd.grad(out, list(params.values()), grad_out, allow_unused=True)
        return grads_for(self, dict(zip(params, grads)))


class SplitDownsample(InvertibleLayer):
    """Encoder transition: keep 3/4 of the channels as the skip, send 1/4 down (channels x8, voxels /8).

    ``[..., cur (c)] -> [..., skip (3c/4), down(rest) (2c at half resolution)]``.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels % 4:
            raise ValueError(f"SplitDownsample needs channels divisible by 4; got {channels}")
        self.channels = channels
        self.skip = 3 * channels // 4
        self.resample = OrthogonalDownsample(channels - self.skip)

    def forward(self, state: State, temb: torch.Tensor) -> State:
        cur = state[-1]
        return state[:-1] + [cur[:, : self.skip], self.resample.down(cur[:, self.skip :])]

    def inverse(self, state: State, temb: torch.Tensor) -> State:
        skip, low = state[-2], state[-1]
        return state[:-2] + [torch.cat([skip, self.resample.up(low)], dim=1)]

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor):
        """Linear and orthogonal: the input is ``up(low)`` and its gradient ``up(d low)`` (the adjoint);
        only the kernel's gradient needs autograd (conv weight-gradient through ``matrix_exp``)."""
        skip, low = out_state[-2], out_state[-1]
        dskip, dlow = grad_out[-2], grad_out[-1]
        with torch.no_grad():
            rest = self.resample.up(low)
            drest = self.resample.up(dlow)
        pg = self.resample.weight_grad(rest, dlow, transposed=False)
        in_state = out_state[:-2] + [self._join(skip, rest)]
        grad_in = grad_out[:-2] + [self._join(dskip, drest)]
        return in_state, grad_in, None, pg

    def _join(self, skip: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """``cat([skip, rest], 1)``, written into the buffer ``skip`` was sliced from when there is one.

        :meth:`UpsampleMerge.backward_pass` leaves the skip as the leading-channel view of the
        level's buffer; refilling that buffer's remaining channels keeps one buffer per state.
        """
        base = skip._base
        if (
            base is not None
            and base.shape == (skip.shape[0], self.channels) + tuple(skip.shape[2:])
            and base.is_contiguous()
            and skip.storage_offset() == base.storage_offset()
            and skip.stride() == base.stride()
            and base.dtype == rest.dtype
        ):
            base[:, self.skip :].copy_(rest)
            return base
        return torch.cat([skip, rest], dim=1)


class UpsampleMerge(InvertibleLayer):
    """Decoder transition, the mirror of :class:`SplitDownsample` (the transposed orthogonal resampling).

    ``[..., skip (3c/4), cur (2c at half resolution)] -> [..., cat(skip, up(cur)) (c)]``.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels % 4:
            raise ValueError(f"UpsampleMerge needs channels divisible by 4; got {channels}")
        self.channels = channels
        self.skip = 3 * channels // 4
        self.resample = OrthogonalDownsample(channels - self.skip)

    def forward(self, state: State, temb: torch.Tensor) -> State:
        skip, low = state[-2], state[-1]
        return state[:-2] + [torch.cat([skip, self.resample.up(low)], dim=1)]

    def inverse(self, state: State, temb: torch.Tensor) -> State:
        cur = state[-1]
        return state[:-1] + [cur[:, : self.skip], self.resample.down(cur[:, self.skip :])]

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor):
        """The mirror of :meth:`SplitDownsample.backward_pass` (``down`` is the adjoint of ``up``)."""
        cur, dcur = out_state[-1], grad_out[-1]
        with torch.no_grad():
            low = self.resample.down(cur[:, self.skip :])
            dlow = self.resample.down(dcur[:, self.skip :])
        pg = self.resample.weight_grad(low, dcur[:, self.skip :], transposed=True)
        in_state = out_state[:-1] + [cur[:, : self.skip], low]
        grad_in = grad_out[:-1] + [dcur[:, : self.skip], dlow]
        return in_state, grad_in, None, pg
