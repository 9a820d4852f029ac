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

The benchmark measures every model on the same kernels: :func:`use_onednn_for_every_conv3d` routes
``F.conv3d`` itself (and so every ``nn.Conv3d`` of MONAI's UNet, the guided-diffusion UNet of
PatchDDM-3D and WDM-3D, and any plugin) through :func:`conv3d_any`, the same eligibility rule for any
stride, dilation and groups. The sweep's worker processes and ``quality`` runs (:func:`onednn_for_every_conv3d`)
switch it on for CPU runs and record it in ``run.json`` (``cpu_conv3d``); a library user's process is left as PyTorch made it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not fake tensors or other subclasses
_F_CONV3D = F.conv3d  # PyTorch's own, kept before any routing
#: what ``run.json`` records as ``cpu_conv3d`` once :func:`use_onednn_for_every_conv3d` ran in a process
ROUTING_NOTE = "oneDNN for every model's float32 3D convolutions (idmbench.invertible.conv)"


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
    return _F_CONV3D(x, weight, bias, padding=padding)


def _triple(v: Any) -> tuple[int, int, int]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * 3  # type: ignore[return-value]


def conv3d_any(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
               padding: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    """``F.conv3d`` with its full signature, on oneDNN under the same rule as :func:`conv3d` (string
    paddings such as ``"same"`` and every ineligible call go to PyTorch's own ``F.conv3d``)."""
    if isinstance(padding, str) or not _onednn_eligible(input, weight):
        return _F_CONV3D(input, weight, bias, stride, padding, dilation, groups)
    return torch.mkldnn_convolution(input, weight, bias, _triple(padding), _triple(stride), _triple(dilation), int(groups))


def use_onednn_for_every_conv3d() -> str:
    """Route ``torch.nn.functional.conv3d`` (hence every ``nn.Conv3d``) through :func:`conv3d_any` for
    the rest of this process, so that baselines and plugins run on the kernels IDM's sub-networks use.
    Idempotent; returns :data:`ROUTING_NOTE` (or why nothing was routed)."""
    if _ONEDNN:
        F.conv3d = conv3d_any  # nn.Conv3d looks F.conv3d up at call time
    return routing_note()


def routing_note() -> str:
    """What ``run.json`` records as ``cpu_conv3d``: the kernels a CPU benchmark process runs every model on."""
    return ROUTING_NOTE if _ONEDNN else "PyTorch's default (oneDNN not available in this build)"


def conv3d_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int, int]) -> torch.Tensor:
    """The input gradient of ``conv3d(x, weight, padding=padding)`` (stride 1, no groups) for ``grad_out``.

    The adjoint of a stride-1 convolution is the convolution of the output gradient with the spatially
    flipped, in/out-transposed kernel and padding ``kernel - 1 - padding`` (the same as
    ``F.conv_transpose3d(grad_out, weight, padding=padding)``, run through :func:`conv3d`).
    """
    k = weight.shape[2:]
    flipped = weight.flip(2, 3, 4).transpose(0, 1).contiguous()
    return conv3d(grad_out, flipped, None, tuple(int(ki) - 1 - int(p) for ki, p in zip(k, padding)))  # type: ignore[arg-type]


@contextmanager
def onednn_for_every_conv3d(enabled: bool = True) -> Iterator[None]:
    """:func:`use_onednn_for_every_conv3d` for the ``with`` block only (``enabled=False``: no change)."""
    previous = F.conv3d
    if enabled:
        use_onednn_for_every_conv3d()
    try:
        yield
    finally:
        F.conv3d = previous
