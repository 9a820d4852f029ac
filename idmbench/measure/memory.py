"""Live-tensor memory accounting: the peak of tensor bytes alive during a piece of work.

Built on PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` (a dispatch mode that follows
every tensor storage and splits the total into parameters, buffers, gradients, optimiser state,
activations and temporaries). Works the same on real tensors (a measurement) and on fake tensors under
``FakeTensorMode`` (a prediction: no allocation, any size).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class MemoryPeak:
    """Breakdown of live tensor bytes at the moment of the peak (bytes)."""

    total_bytes: int
    param_bytes: int = 0
    grad_bytes: int = 0
    opt_bytes: int = 0
    buffer_bytes: int = 0
    #: bytes of the gradients the step ends up holding (all trainable parameters), when known
    grad_full_bytes: int = 0

    @property
    def activation_bytes(self) -> int:
        """Peak minus parameters, their gradients, optimiser state and buffers: what the step itself needs.

        Gradients count in full (``grad_full_bytes``) when known, whether or not they were all
        allocated at the moment of the peak: a model whose backward hands parameter gradients out late
        (IDM's memory-saving Function holds them as temporaries until it returns) and one that
        accumulates them early are then charged alike.
        """
        grads = max(self.grad_bytes, self.grad_full_bytes)
        return self.total_bytes - self.param_bytes - grads - self.opt_bytes - self.buffer_bytes


def _category_bytes(snap: dict, name: str) -> int:
    for k, v in snap.items():
        kn = getattr(k, "value", str(k))
        if kn == name:
            return int(v)
    return 0


class NoModuleHooks:
    """Stands in for MemTracker's ``ModTracker`` (and FlopCounterMode's) without registering any hooks.

    The module hooks only feed MemTracker's per-module breakdown (unused here), cost most of its overhead,
    and their multi-grad hooks raise inside ``torch.autograd.grad`` called from a custom
    ``autograd.Function``'s backward (IDM's memory-saving backward) under fake tensors. Totals and the
    parameter / gradient / optimiser-state split do not depend on them.
    """

    def __init__(self) -> None:
        self.parents = {"Global"}

    @property
    def is_bw(self) -> bool:
        return torch._C._current_graph_task_id() != -1

    def register_user_hooks(self, *args: Any, **kwargs: Any) -> None:
        pass

    def clear_user_hooks(self) -> None:
        pass

    def get_known_fqn(self, mod: Any) -> None:
        return None

    def __enter__(self) -> "NoModuleHooks":
        return self

    def __exit__(self, *args: Any) -> None:
        pass


def track_peak(
    fn: Callable[[], Any],
    *track: Any,
    device: str | torch.device | None = None,
    module_hooks: bool = True,
) -> tuple[Any, MemoryPeak]:
    """Run ``fn()`` under a MemTracker and return ``(fn's result, MemoryPeak)``.

    ``track`` are objects created before the call that should count (modules, optimisers, input
    tensors). Tensors created inside ``fn`` are always counted. Parameters, gradients and optimiser
    state are reported separately so ``activation_bytes`` is what the step itself needs.

    ``module_hooks=False`` skips MemTracker's per-module hooks: same totals and split, several times
    faster, and safe with custom autograd Functions that call ``torch.autograd.grad`` in backward
    (the benchmark harness uses it for both measurement and prediction).
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    if not module_hooks:
        mt._mod_tracker = NoModuleHooks()  # type: ignore[assignment]
    tr = [t for t in track if t is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tr:
            mt.track_external(*tr)
        with mt:
            out = fn()
    snaps = mt.get_tracker_snapshot("peak")
    if not snaps:
        return out, MemoryPeak(0)
    if device is None:
        dev_key = max(snaps, key=lambda d: snaps[d].get("Total", 0))
    else:
        dev_key = torch.device(device)
        if dev_key not in snaps:
            dev_key = next(iter(snaps))
    snap = snaps[dev_key]
    peak = MemoryPeak(
        total_bytes=int(snap.get("Total", 0)),
        param_bytes=_category_bytes(snap, "Parameter"),
        grad_bytes=_category_bytes(snap, "Gradient"),
        opt_bytes=_category_bytes(snap, "Optstate"),
        buffer_bytes=_category_bytes(snap, "Buffer"),
    )
    return out, peak


def training_activation_bytes(model: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor, **kw: Any) -> MemoryPeak:
    """Peak live tensor bytes of one forward + backward of ``model(x, timesteps)`` with an MSE-style loss.

    Gradients are zeroed (set to None) first, so ``grad_bytes`` counts the gradients this step makes.
    """
    model.zero_grad(set_to_none=True)

    def step():
        out = model(x=x, timesteps=timesteps, **kw)
        loss = out.float().square().mean()
        loss.backward()
        return float(loss.detach()) if not _is_fake(loss) else 0.0

    _, peak = track_peak(step, model, x, timesteps, module_hooks=False)
    peak.grad_full_bytes = trainable_bytes(model)
    return peak


def trainable_bytes(model: torch.nn.Module) -> int:
    """Bytes of the trainable parameters (= bytes of their gradients)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def fake_mode():
    """``FakeTensorMode`` that also accepts real tensors created outside it (they are faked on entry)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as m:
        yield m
