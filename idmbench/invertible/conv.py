"""3x3x3 convolutions of the coupling sub-networks, on oneDNN wherever PyTorch's CPU would fall back.

On CPU, ``F.conv3d`` picks oneDNN (MKL-DNN) only when the input is batched, grouped, or large in its
first four dimensions (``N * C * D * H > 20480``, a heuristic tuned for 2D images); otherwise it runs
the im2col fallback (``slow_conv3d``), which for the narrow, batch-1 volumes of IDM's sub-networks is
5-15x slower than oneDNN on the same input (measured in this project on a 2-core EPYC: 4 -> 8 channels
at 64^3, 0.45 s vs 0.03 s). :func:`conv3d` calls oneDNN's convolution directly for real float32 CPU
tensors, so the same network (and its plain-autograd twin) runs its forward convolutions at library
speed; the backward is PyTorch's ``convolution_backward`` either way (and :func:`conv3d_input_grad`, the
input gradient the slab-wise recompute needs on its own, is the adjoint convolution). Everywhere else -- CUDA, float64,
autocast, and under any dispatch mode (fake tensors for predictions, the memory tracker, the FLOP
counter) -- it is ``F.conv3d``, so predictions, tensor accounting and FLOP counts are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not fake tensors or other subclasses


def _onednn_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 5
        and not torch.is_autocast_enabled("cpu")
        and _get_current_dispatch_mode() is None
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
    )


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int, int]) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=padding)`` (stride 1, no groups), on oneDNN for real float32
    CPU tensors (see the module docstring). Differentiable either way."""
    if _onednn_eligible(x, weight):
        return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, padding=padding)


def conv3d_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int, int]) -> torch.Tensor:
    """The input gradient of ``conv3d(x, weight, padding=padding)`` (stride 1, no groups) for ``grad_out``.

    The adjoint of a stride-1 convolution is the convolution of the output gradient with the spatially
    flipped, in/out-transposed kernel and padding ``kernel - 1 - padding`` (the same as
    ``F.conv_transpose3d(grad_out, weight, padding=padding)``, run through :func:`conv3d`).
    """
    k = weight.shape[2:]
    flipped = weight.flip(2, 3, 4).transpose(0, 1).contiguous()
    return conv3d(grad_out, flipped, None, tuple(int(ki) - 1 - int(p) for ki, p in zip(k, padding)))  # type: ignore[arg-type]
