"""Live-tensor memory accounting: the peak of tensor bytes alive during a piece of work.

Built on PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` (a dispatch mode that follows
every tensor storage and reports parameters, buffers and optimiser state inside the total). Works the
same on real tensors (a measurement, ``cpu-tensors``) and on fake tensors under ``FakeTensorMode`` (a
prediction: no allocation, any size).

``activation_bytes`` has one definition everywhere (:class:`MemoryPeak`): the peak minus the step's
persistent state -- parameters, the gradients of all trainable parameters (training steps), optimiser
state and buffers. The gradients are counted from the parameters themselves, not from the tracker's
category (which only sees gradients that existed before the step). On fake tensors the tracker gives
reduced losses the input-sized storage their eager kernels keep (:func:`_as_eager_kernel`), so a
prediction counts what a measurement counts.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class MemoryPeak:
    """Live tensor bytes at the peak of one step, and the persistent state inside that peak (bytes).

    Attributes:
        total_bytes: the peak of live tensor bytes over the step (everything the step holds).
        param_bytes: bytes of the tracked modules' parameters.
        grad_bytes: bytes of the gradients of *all* trainable parameters of the tracked modules when the
            step runs a backward pass (a training step), whether or not every gradient was allocated at
            the moment of the peak; 0 for a step without backward (sampling).
        opt_bytes: bytes of the optimiser's state tensors (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``);
            the update's temporaries are not state (:func:`optimizer_state_bytes`).
        buffer_bytes: bytes of the tracked modules' buffers.
    """

    total_bytes: int
    param_bytes: int = 0
    grad_bytes: int = 0
    opt_bytes: int = 0
    buffer_bytes: int = 0

    @property
    def state_bytes(self) -> int:
        """The persistent state of the step: parameters + gradients + optimiser state + buffers (bytes)."""
        return self.param_bytes + self.grad_bytes + self.opt_bytes + self.buffer_bytes

    @property
    def activation_bytes(self) -> int:
        """THE activation figure of the suite (bytes): ``total_bytes - state_bytes``.

        Training step: peak - parameters - the gradients of all trainable parameters - optimiser state -
        buffers; sampling step: peak - parameters - buffers. It is what the step needs beyond its
        persistent state: activations and temporaries (including the optimiser update's temporaries
        when the peak falls in the update). Measured and predicted rows, the gate and
        the tests all use this one definition. A model whose backward hands parameter gradients out late
        (IDM's memory-saving Function) and one that accumulates them early are charged alike. After
        backward every gradient and the optimiser state exist at once, so the figure is never negative
        for a step whose parameters all receive gradients.
        """
        return self.activation_bytes_of(self.total_bytes)

    def activation_bytes_of(self, peak_bytes: int) -> int:
        """The same definition applied to another reading of the same step's peak (bytes), e.g. the CUDA
        allocator's ``max_memory_allocated``: ``peak_bytes - state_bytes``."""
        return int(peak_bytes) - self.state_bytes


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
    training: bool | None = None,
) -> tuple[Any, MemoryPeak]:
    """Run ``fn()`` under a MemTracker and return ``(fn's result, MemoryPeak)``.

    Args:
        fn: the step (no arguments).
        track: objects created before the call that count towards its memory (modules, optimisers, input
            tensors). Tensors created inside ``fn`` are always counted.
        device: the device whose peak is reported (default: the one with the largest peak).
        module_hooks: ``False`` skips MemTracker's per-module hooks: same totals and split, several times
            faster, and safe with custom autograd Functions that call ``torch.autograd.grad`` in backward
            (the harness uses it for both measurement and prediction).
        training: whether ``fn`` runs a backward pass, so that ``grad_bytes`` holds the gradients of every
            trainable parameter of the tracked modules. ``None`` infers it: a step that tracks an optimiser,
            or during which a gradient is accumulated into a tracked parameter, is a training step.

    Returns:
        ``fn``'s result and the :class:`MemoryPeak` (``activation_bytes`` is the suite's one definition).
    """
    mt = _tracker()
    if not module_hooks:
        mt._mod_tracker = NoModuleHooks()  # type: ignore[assignment]
    tr = [t for t in track if t is not None]
    modules = [t for t in tr if isinstance(t, torch.nn.Module)]
    accumulated = [False]
    hooks = []
    if training is None:
        # a gradient accumulated into a tracked parameter during fn means it ran a backward pass
        for p in _trainable(*modules):
            hooks.append(p.register_post_accumulate_grad_hook(lambda _p: accumulated.__setitem__(0, True)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tr:
                mt.track_external(*tr)
            with mt:
                out = fn()
    finally:
        for h in hooks:
            h.remove()
    if training is None:
        training = accumulated[0] or any(isinstance(t, torch.optim.Optimizer) for t in tr)
    grads = trainable_bytes(*modules) if training else 0
    opt_state = optimizer_state_bytes(*(t for t in tr if isinstance(t, torch.optim.Optimizer)))
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
        grad_bytes=grads,
        opt_bytes=opt_state,
        buffer_bytes=_category_bytes(snap, "Buffer"),
    )
    return out, peak


def training_activation_bytes(model: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor, **kw: Any) -> MemoryPeak:
    """Peak live tensor bytes of one forward + backward of ``model(x=x, timesteps=timesteps, **kw)`` with an
    MSE-style loss (no optimiser), split as in :class:`MemoryPeak`.

    Args:
        model: any registered model. x: (B, C, D, H, W). timesteps: (B,) or (1,) long.
        kw: extra forward keywords (``coords`` for a patch model).

    Gradients are set to None first, so the step makes every gradient itself.
    """
    model.zero_grad(set_to_none=True)

    def step():
        out = model(x=x, timesteps=timesteps, **kw)
        loss = out.float().square().mean()
        loss.backward()
        return float(loss.detach()) if not _is_fake(loss) else 0.0

    _, peak = track_peak(step, model, x, timesteps, module_hooks=False, training=True)
    return peak


def _trainable(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of ``modules``, each once."""
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def optimizer_state_bytes(*optimizers: torch.optim.Optimizer) -> int:
    """Bytes of the state tensors the optimisers hold (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``).

    Counted from the optimiser, not from the tracker's "optimiser" category, which also holds the update's
    temporaries (multi-tensor ``foreach`` intermediates) when the peak falls inside ``optimizer.step()``:
    those are working memory of the step, not state.
    """
    seen: set[int] = set()
    total = 0
    for opt in optimizers:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    total += v.untyped_storage().nbytes()
    return total


def trainable_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the trainable parameters of ``modules`` (= bytes of their gradients); shared ones once."""
    return sum(p.numel() * p.element_size() for p in _trainable(*modules))


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


#: ATen losses whose eager kernel returns a reduced (scalar) loss that keeps an input-sized storage:
#: op -> position of its ``reduction`` argument (0 none, 1 mean, 2 sum). See :func:`_as_eager_kernel`.
EAGER_SCALAR_KEEPS_INPUT = {
    torch.ops.aten.mse_loss.default: 2,
    torch.ops.aten.smooth_l1_loss.default: 2,
    torch.ops.aten.binary_cross_entropy.default: 3,
    torch.ops.aten.soft_margin_loss.default: 2,
}


def _as_eager_kernel(func: Any) -> Any:
    """``func``, or for a loss of :data:`EAGER_SCALAR_KEEPS_INPUT` on fake tensors a wrapper whose reduced
    result holds the storage the eager kernel gives it.

    ATen's eager ``mse_loss``, ``smooth_l1_loss``, ``binary_cross_entropy`` and ``soft_margin_loss`` with
    ``reduction='mean'`` or ``'sum'`` compute the element-wise loss into their output tensor and then
    ``resize_`` it to a scalar; a resize never shrinks a storage, so the scalar loss keeps a storage the
    size of its (broadcast) input alive until it is freed -- through the whole backward of a training
    step. Their fake (meta) kernels allocate 4 bytes. Without this, a prediction misses exactly one
    input-sized tensor wherever the peak falls after the loss (the shared step's MSE: one fp32 volume).
    """
    pos = EAGER_SCALAR_KEEPS_INPUT.get(func)
    if pos is None:
        return func

    def kernel(*args: Any, **kwargs: Any) -> Any:
        out = func(*args, **kwargs)
        reduction = kwargs.get("reduction", args[pos] if len(args) > pos else 1)
        if reduction == 0 or not _is_fake(out) or out.dim() != 0:
            return out
        kept = torch.empty(torch.broadcast_shapes(args[0].shape, args[1].shape), dtype=out.dtype, device=out.device)
        kept.resize_(())  # the scalar keeps the input-sized storage, as in eager mode
        return kept

    return kernel


@functools.lru_cache(maxsize=None)
def _tracker_class() -> type:
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        """``MemTracker`` that counts a fake step's storages as the eager kernels allocate them."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return super().__torch_dispatch__(_as_eager_kernel(func), types, args, kwargs)

    return Tracker


def _tracker() -> Any:
    """A new ``MemTracker`` that counts a fake step's storages as the eager kernels allocate them."""
    return _tracker_class()()


@contextlib.contextmanager
def fake_mode():
    """``FakeTensorMode`` that also accepts real tensors created outside it (they are faked on entry)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as m:
        yield m
