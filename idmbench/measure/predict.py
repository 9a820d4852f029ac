"""Predicted peak memory and FLOPs of a step, from the same step run on fake tensors.

The model is built inside ``FakeTensorMode`` (fake CPU tensors: the CPU wheel of torch cannot fake CUDA
tensors), then the step of :mod:`idmbench.measure.workload` runs under the live-tensor tracker
(:func:`idmbench.measure.memory.track_peak`) and ``FlopCounterMode``. Nothing is allocated, so any volume
size takes a second or so. A training prediction first creates the AdamW state directly
(:func:`init_adam_state`; other optimisers get one fake step), as it exists in the measured
steady-state step. The tracker gives reduced losses the input-sized storage their eager kernels keep,
so the prediction counts what the measurement counts (exactly, on CPU tensors).
``activation_bytes`` follows :class:`~idmbench.measure.memory.MemoryPeak`'s one definition.

What it does not see: allocator rounding/fragmentation, kernel workspaces (cuDNN) and the CUDA context.
Budgets on GPUs add :data:`CUDA_CONTEXT_BYTES`, a labelled *constant*, not a measurement.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .flops import count_flops
from .memory import track_peak
from .workload import ModelState, build_state, make_workload

#: CUDA context + library workspaces assumed on a GPU (bytes). A constant, labelled as such wherever used.
CUDA_CONTEXT_BYTES = 512 * 2**20
CUDA_CONTEXT_LABEL = "CUDA context/workspace constant 0.5 GiB (assumed, not measured)"


@dataclass
class Prediction:
    """Predicted figures of one step (bytes, FLOPs); ``error`` is a one-line reason when it failed."""

    model: str
    preset: str
    size: tuple[int, int, int]
    phase: str
    batch: int = 1
    precision: str = "fp32"
    peak_bytes: int | None = None
    activation_bytes: int | None = None
    param_bytes: int | None = None
    grad_bytes: int | None = None
    opt_bytes: int | None = None
    buffer_bytes: int | None = None
    flops: int | None = None
    params: int | None = None
    net_shape: tuple[int, ...] = ()
    #: image voxels the network processes per step per volume (the basis of ``flops`` and throughput)
    voxels: int | None = None
    seconds: float = 0.0  # how long predicting took (wall, s)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.peak_bytes is not None


def one_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (at most 300 characters)."""
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")
    return text[:300]


@contextlib.contextmanager
def _concrete_small_randint() -> Iterator[None]:
    """Inside fake mode, let ``torch.randint`` of a handful of values return a *real* tensor with a working
    ``.item()``.

    The patch recipe draws its crop origin with ``torch.randint(0, n, (1,)).item()``; a fake tensor has no
    value, and even a real tensor's ``.item()`` would be dispatched through the fake mode. So the draw is
    made outside fake mode and its value is pinned on the tensor's ``item``. These draws are a few bytes
    (the measured step allocates the same few bytes), so no figure changes. Larger draws stay fake.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    orig = torch.randint

    def randint(*args: Any, **kw: Any) -> torch.Tensor:
        size = kw.get("size")
        if size is None:
            size = next((a for a in args if isinstance(a, (tuple, list, torch.Size))), None)
        if size is not None and math.prod(int(s) for s in size) <= 64:
            with unset_fake_temporarily():
                out = orig(*args, **kw)
                if out.numel() == 1:
                    value = out.item()
                    out.item = lambda: value  # type: ignore[method-assign]
            return out
        return orig(*args, **kw)

    torch.randint = randint  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.randint = orig  # type: ignore[assignment]


class Predictor:
    """Predicts steps of one model at one preset, any size; results are cached by (size, phase).

    Args:
        model_name / preset / overrides: what to build (see :func:`idmbench.create_model`).
        batch: volumes per step. precision: ``fp32`` | ``bf16`` | ``fp16`` (CPU autocast rules).
        flops: also count FLOPs (a little slower).
    """

    def __init__(
        self,
        model_name: str,
        preset: str,
        *,
        batch: int = 1,
        precision: str = "fp32",
        overrides: dict[str, Any] | None = None,
        seed: int = 0,
        flops: bool = True,
    ) -> None:
        self.model_name = model_name
        self.preset = preset
        self.batch = int(batch)
        self.precision = precision
        self.overrides = dict(overrides or {})
        self.seed = seed
        self.count_flops = flops
        self._modes: dict[str, Any] = {}
        self._states: dict[str, ModelState] = {}
        self._warm: set[str] = set()
        self._cache: dict[tuple[tuple[int, int, int], str], Prediction] = {}

    def _mode(self, phase: str) -> Any:
        from torch._subclasses.fake_tensor import FakeTensorMode

        if phase not in self._modes:
            self._modes[phase] = FakeTensorMode(allow_non_fake_inputs=True)
        return self._modes[phase]

    def predict(self, size: tuple[int, int, int] | int, phase: str = "train", *, flops: bool | None = None) -> Prediction:
        """Predicted peak live-tensor bytes (and FLOPs) of one ``phase`` step on a volume of ``size``.

        ``flops=False`` skips the FLOP count (faster; the budget search uses it). Never raises: a failure
        comes back with ``error`` set (one line).
        """
        if isinstance(size, int):
            size = (size, size, size)
        size = tuple(int(s) for s in size)  # type: ignore[assignment]
        want_flops = self.count_flops if flops is None else bool(flops)
        key = (size, phase)
        hit = self._cache.get(key)
        if hit is not None and (hit.flops is not None or not want_flops or not hit.ok):
            return hit
        t0 = time.perf_counter()
        pred = Prediction(self.model_name, self.preset, size, phase, self.batch, self.precision)  # type: ignore[arg-type]
        try:
            self._predict_into(pred, want_flops)
        except Exception as exc:  # noqa: BLE001 - a prediction failure is a result, not a crash
            pred.error = one_line(exc)
        pred.seconds = time.perf_counter() - t0
        self._cache[key] = pred
        return pred

    def _predict_into(self, pred: Prediction, flops: bool = True) -> None:
        from torch._subclasses.fake_tensor import DataDependentOutputException

        phase = pred.phase
        mode = self._mode(phase)
        with warnings.catch_warnings(), mode, _concrete_small_randint():
            warnings.simplefilter("ignore")
            if phase not in self._states:
                self._states[phase] = build_state(
                    self.model_name, self.preset, phase, device="cpu", precision=self.precision,
                    overrides=self.overrides, seed=self.seed,
                )
            state = self._states[phase]
            wl = make_workload(state, pred.size, self.batch)
            stepped = {"n": 0}
            if state.optimizer is not None and not getattr(state.optimizer, "_idmbench_hooked", False):
                state.optimizer.register_step_post_hook(lambda *a, **k: stepped.__setitem__("n", stepped["n"] + 1))
                state.optimizer._idmbench_hooked = True  # type: ignore[attr-defined]
                state.optimizer._idmbench_counter = stepped  # type: ignore[attr-defined]
            counter = getattr(state.optimizer, "_idmbench_counter", stepped)

            def fake_step() -> None:
                before = counter["n"]
                try:
                    wl.step()
                except DataDependentOutputException:
                    # training_step ends with float(loss): fake tensors have no value. Fine once the
                    # optimiser has stepped (the whole step ran); anything earlier is a real failure.
                    if state.optimizer is None or counter["n"] == before:
                        raise

            if phase == "train" and phase not in self._warm:
                # steady state: AdamW's state exists, as after the measured run's warm-up step
                if not init_adam_state(state.optimizer):
                    fake_step()  # another optimiser: a real warm-up step creates its state
                self._warm.add(phase)
            if flops:
                # one pass for both: neither installs module hooks, so they do not disturb each other
                with count_flops() as fc:
                    _, peak = track_peak(fake_step, *wl.track, module_hooks=False)
                pred.flops = int(fc.get_total_flops())
            else:
                _, peak = track_peak(fake_step, *wl.track, module_hooks=False)
        pred.peak_bytes = int(peak.total_bytes)
        pred.activation_bytes = int(peak.activation_bytes)
        pred.param_bytes = int(peak.param_bytes)
        pred.grad_bytes = int(peak.grad_bytes)
        pred.opt_bytes = int(peak.opt_bytes)
        pred.buffer_bytes = int(peak.buffer_bytes)
        pred.params = int(state.params)
        pred.net_shape = tuple(int(s) for s in wl.net_shape)
        pred.voxels = int(wl.voxels)


def init_adam_state(optimizer: torch.optim.Optimizer | None) -> bool:
    """Create Adam/AdamW state exactly as their first ``step()`` does (``step`` counter, ``exp_avg``,
    ``exp_avg_sq``; ``max_exp_avg_sq`` with amsgrad), without running a step. Returns False for other
    optimisers (the caller then runs a warm-up step). Much cheaper than a warm-up step under fake
    tensors; the 10 % prediction-vs-measurement test covers that the state matches a real step's."""
    if optimizer is None or type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    for group in optimizer.param_groups:
        if group.get("fused") or group.get("capturable"):
            return False
        for p in group["params"]:
            if not p.requires_grad or optimizer.state.get(p):
                continue
            st = optimizer.state[p]
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return True


_PREDICTORS: dict[tuple, Predictor] = {}


def predictor(model_name: str, preset: str, *, batch: int = 1, precision: str = "fp32",
              overrides: dict[str, Any] | None = None, seed: int = 0) -> Predictor:
    """A shared :class:`Predictor` per (model, preset, batch, precision, overrides, seed)."""
    key = (model_name, preset, int(batch), precision, tuple(sorted((overrides or {}).items())), seed)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = Predictor(model_name, preset, batch=batch, precision=precision, overrides=overrides, seed=seed)
    return _PREDICTORS[key]

