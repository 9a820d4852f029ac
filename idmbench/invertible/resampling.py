"""Learnable orthogonal 2x2x2 resampling and the level transitions of the invertible UNet.

``OrthogonalDownsample`` is the invertible downsampling of iUNets (Etmann et al. 2020): a stride-2
2x2x2 convolution with the (8c, 8c) orthogonal matrix ``W = matrix_exp(A - A^T) @ Haar``
(channels x8, voxels /8); its exact inverse is the transposed convolution.

``SplitDownsample`` (encoder) keeps 3/4 of a level's channels as the skip and sends 1/4 down, so widths
double per level; ``UpsampleMerge`` (decoder) is its mirror. Both are linear and orthogonal, so the
memory-saving backward needs no recompute: the input is ``up(low)``, its gradient ``up(d low)``.

In place (the memory-saving forward and backward): the 1/4 sent down occupies as many elements as the
low-resolution tensor, so ``down_`` writes the result *into the storage of the channels it reads* --
first the Haar transform channel by channel (channel ``j``'s eight sub-bands fill exactly channel
``j``'s elements), then the rotation ``matrix_exp(A - A^T)`` voxel block by voxel block -- and ``up_``
undoes it. The level's buffer thus holds ``[skip, low]`` with no copy and nothing left behind, and the
temporaries are one channel's size. The gradient of ``A`` comes from the low-resolution tensors alone:
for ``low = W x`` the weight gradient is ``(d low @ low^T) @ W`` (``x = W^T low``), a small matrix,
backpropagated through ``matrix_exp`` by autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import InvertibleLayer, RecomputeContext, State


def haar_matrix(channels: int, *, dtype=torch.float64) -> torch.Tensor:
    """The orthogonal 2x2x2 Haar transform for ``channels`` channels, (8c, 8c).

    Row ``8 * j + k`` is Haar filter k applied to input channel j; column ``8 * j + (4a + 2b + c)``
    is voxel (a, b, c) of channel j's 2x2x2 block -- the layout of a (8c, c, 2, 2, 2) conv kernel.
    """
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype) / math.sqrt(2.0)
    h8 = torch.kron(torch.kron(h2, h2), h2)
    return torch.kron(torch.eye(channels, dtype=dtype), h8)


def orthogonal_matrix(skew: torch.Tensor, channels: int) -> torch.Tensor:
    """``matrix_exp(A - A^T) @ Haar`` (8c, 8c), in ``skew``'s floating type (differentiable in ``skew``)."""
    h = haar_matrix(channels, dtype=skew.dtype).to(skew.device)
    return torch.linalg.matrix_exp(skew - skew.transpose(0, 1)) @ h


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
        return orthogonal_matrix(self.skew, self.channels)

    def rotation(self) -> torch.Tensor:
        """The factor ``matrix_exp(A - A^T)`` alone (8c, 8c)."""
        a = self.skew
        return torch.linalg.matrix_exp(a - a.transpose(0, 1))

    def kernel(self) -> torch.Tensor:
        c = self.channels
        return self.weight.reshape(8 * c, c, 2, 2, 2)


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def _haar8(like: torch.Tensor) -> torch.Tensor:
    """The eight 2x2x2 Haar filters of one channel, (8, 2, 2, 2): filter k, voxel (a, b, c) of the block."""
    return haar_matrix(1, dtype=like.dtype).to(like.device).reshape(8, 2, 2, 2)


def _haar_down(x: torch.Tensor, h8: torch.Tensor) -> torch.Tensor:
    """Per-channel Haar analysis: (B, c, D, H, W) -> (B, 8c, D/2, H/2, W/2), channel ``8j + k`` = filter k of j."""
    B, c, D, H, W = x.shape
    v = x.reshape(B, c, D // 2, 2, H // 2, 2, W // 2, 2)
    return torch.einsum("kxyz,ncDxHyWz->nckDHW", h8, v).reshape(B, 8 * c, D // 2, H // 2, W // 2)


def _haar_up(low: torch.Tensor, h8: torch.Tensor) -> torch.Tensor:
    """The inverse (transpose) of :func:`_haar_down`."""
    B, n, d, h, w = low.shape
    v = low.reshape(B, n // 8, 8, d, h, w)
    return torch.einsum("kxyz,nckDHW->ncDxHyWz", h8, v).reshape(B, n // 8, 2 * d, 2 * h, 2 * w)


def _rotate_(low: torch.Tensor, rot: torch.Tensor) -> None:
    """``low[:, :, v] <- rot @ low[:, :, v]`` for every voxel v, in place, an eighth of the voxels at a time."""
    B, n = low.shape[:2]
    flat = low.view(B, n, -1)
    S = flat.shape[-1]
    step = -(-S // 8)
    for s0 in range(0, S, step):
        block = flat[:, :, s0 : s0 + step]
        block.copy_(torch.matmul(rot, block))


#: channels transformed together by the in-place Haar step (temporaries are this many channels' size)
_HAAR_GROUPS = 8


def _viewable(x: torch.Tensor) -> bool:
    """Whether each batch element's (C, D, H, W) block is contiguous (so it can be reinterpreted)."""
    B, C, D, H, W = x.shape
    return x.stride()[1:] == (D * H * W, H * W, W, 1)


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

    def down_(self, x: torch.Tensor) -> torch.Tensor:
        """``down(x)`` written into ``x``'s own elements (no grad): returns the (B, 8c, D/2, H/2, W/2) view.

        ``x``'s (c, D, H, W) block must be contiguous per batch element (a channel slice of a level buffer
        is); otherwise the result is a new tensor.
        """
        B, c, D, H, W = x.shape
        if not _viewable(x) or D % 2 or H % 2 or W % 2:
            return self.down(x)
        with torch.no_grad(), _no_autocast(x.device.type):
            low = x.view(B, 8 * c, D // 2, H // 2, W // 2)
            h8 = _haar8(x)
            step = -(-c // _HAAR_GROUPS)
            for j in range(0, c, step):  # channels j..j+step-1's sub-bands fill exactly their own elements
                k = min(j + step, c)
                low[:, 8 * j : 8 * k].copy_(_haar_down(x[:, j:k], h8))
            _rotate_(low, self.ortho.rotation().to(x.dtype))
        return low

    def up_(self, low: torch.Tensor) -> torch.Tensor:
        """``up(low)`` written into ``low``'s own elements (no grad): the inverse of :meth:`down_`."""
        if not _viewable(low):
            return self.up(low)
        B, n, d, h, w = low.shape
        c = n // 8
        with torch.no_grad(), _no_autocast(low.device.type):
            _rotate_(low, self.ortho.rotation().to(low.dtype).transpose(0, 1))
            x = low.view(B, c, 2 * d, 2 * h, 2 * w)
            h8 = _haar8(low)
            step = -(-c // _HAAR_GROUPS)
            for j in range(0, c, step):
                k = min(j + step, c)
                x[:, j:k].copy_(_haar_up(low[:, 8 * j : 8 * k], h8))
        return x

    def kernel_grad(self, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor | None]:
        """Gradient of the learnable parameter from two low-resolution tensors (B, 8c, d, h, w).

        For ``low = down(x)`` receiving ``d low``: ``a = d low, b = low``. For ``cur = up(low)`` receiving
        ``d cur``: ``a = low, b = down(d cur)``. The weight gradient is ``(sum_v a_v b_v^T) @ W``; autograd
        takes it through ``matrix_exp`` to ``A``.
        """
        skew = self.ortho.skew
        if not skew.requires_grad:
            return []
        n = a.shape[1]
        with torch.no_grad(), _no_autocast(a.device.type):
            m = sum(a[i].reshape(n, -1) @ b[i].reshape(n, -1).transpose(0, 1) for i in range(a.shape[0]))
        leaf = skew.detach().requires_grad_(True)
        with torch.enable_grad(), _no_autocast(a.device.type):
            w = orthogonal_matrix(leaf, self.channels)
            (g,) = torch.autograd.grad(w, leaf, m.to(w.dtype) @ w.detach())
        return [g]


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


class _LevelTransition(InvertibleLayer):
    """What the encoder split and the decoder merge of one level share: a level of ``channels`` channels
    (divisible by 4) whose first ``3/4`` stay as the skip and whose last ``1/4`` go through the orthogonal
    resampling (``channels / 4`` at full resolution <-> ``2 * channels`` at half resolution)."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % 4:
            raise ValueError(f"{type(self).__name__} needs channels divisible by 4; got {channels}")
        self.channels = channels
        self.skip = 3 * channels // 4
        self.resample = OrthogonalDownsample(channels - self.skip)

    # out of place (differentiable)
    def split(self, cur: torch.Tensor) -> list[torch.Tensor]:
        return [cur[:, : self.skip], self.resample.down(cur[:, self.skip :])]

    def merge(self, skip: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return torch.cat([skip, self.resample.up(low)], dim=1)

    # in place (no grad): the level buffer holds [skip, low] in its own storage
    def split_(self, cur: torch.Tensor) -> list[torch.Tensor]:
        return [cur[:, : self.skip], self.resample.down_(cur[:, self.skip :])]

    def merge_(self, cur: torch.Tensor | None, skip: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Merge back into ``cur`` (the buffer :meth:`split_` split) when ``skip`` and ``low`` still live in
        it; otherwise out of place."""
        if cur is not None and self._holds(cur, skip, low):
            self.resample.up_(low)
            return cur
        with torch.no_grad():
            return self.merge(skip, low)

    def _holds(self, cur: torch.Tensor, skip: torch.Tensor, low: torch.Tensor) -> bool:
        rest = cur[:, self.skip :]
        return (
            _root(cur) is _root(skip) is _root(low)
            and tuple(skip.shape) == tuple(cur[:, : self.skip].shape)
            and skip.storage_offset() == cur.storage_offset()
            and skip.stride() == cur.stride()
            and low.storage_offset() == rest.storage_offset()
            and low.numel() == rest.numel()
            and _viewable(rest)
        )


class SplitDownsample(_LevelTransition):
    """Encoder transition: keep 3/4 of the channels as the skip, send 1/4 down (channels x8, voxels /8).

    ``[..., cur (c)] -> [..., skip (3c/4), down(rest) (2c at half resolution)]``.
    """

    def forward(self, state: State, temb: torch.Tensor) -> State:
        return state[:-1] + self.split(state[-1])

    def inverse(self, state: State, temb: torch.Tensor) -> State:
        return state[:-2] + [self.merge(state[-2], state[-1])]

    def forward_(self, state: State, temb: torch.Tensor, ctx: RecomputeContext | None = None) -> State:
        cur = state[-1]
        if ctx is not None:
            ctx.parents.append((cur, None))
        return state[:-1] + self.split_(cur)

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor, ctx: RecomputeContext | None = None):
        """Linear and orthogonal: the input is ``up(low)`` and its gradient ``up(d low)`` (the adjoint),
        rebuilt in the level buffers :class:`UpsampleMerge` split (``ctx.parents``); only the kernel's
        gradient needs autograd (through ``matrix_exp``)."""
        skip, low = out_state[-2], out_state[-1]
        dskip, dlow = grad_out[-2], grad_out[-1]
        pg = self.resample.kernel_grad(dlow, low)
        cur = dcur = None
        if ctx is not None and ctx.parents:
            cur, dcur = ctx.parents.pop()
        in_state = out_state[:-2] + [self.merge_(cur, skip, low)]
        grad_in = grad_out[:-2] + [self.merge_(dcur, dskip, dlow)]
        return in_state, grad_in, None, pg


class UpsampleMerge(_LevelTransition):
    """Decoder transition, the mirror of :class:`SplitDownsample` (the transposed orthogonal resampling).

    ``[..., skip (3c/4), cur (2c at half resolution)] -> [..., cat(skip, up(cur)) (c)]``.
    """

    def forward(self, state: State, temb: torch.Tensor) -> State:
        return state[:-2] + [self.merge(state[-2], state[-1])]

    def inverse(self, state: State, temb: torch.Tensor) -> State:
        return state[:-1] + self.split(state[-1])

    def forward_(self, state: State, temb: torch.Tensor, ctx: RecomputeContext | None = None) -> State:
        cur = ctx.parents.pop()[0] if ctx is not None and ctx.parents else None
        return state[:-2] + [self.merge_(cur, state[-2], state[-1])]

    def backward_pass(self, out_state: State, grad_out: State, temb: torch.Tensor, ctx: RecomputeContext | None = None):
        """The mirror of :meth:`SplitDownsample.backward_pass` (``down`` is the adjoint of ``up``): the level
        buffer and its gradient are split in place and remembered for the matching split."""
        cur, dcur = out_state[-1], grad_out[-1]
        skip, low = self.split_(cur)
        dskip, dlow = self.split_(dcur)
        pg = self.resample.kernel_grad(low, dlow)
        if ctx is not None:
            ctx.parents.append((cur, dcur))
        return out_state[:-1] + [skip, low], grad_out[:-1] + [dskip, dlow], None, pg
