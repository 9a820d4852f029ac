"""Floating-point operations of a step, counted by ``torch.utils.flop_counter.FlopCounterMode``.

Counted under fake tensors (no allocation, any size): matmuls, convolutions and attention, forward and
backward (a multiply-add counts 2 FLOPs). Element-wise work (norms, activations, the optimiser update) is
not counted, as usual for FLOP figures. They are the FLOPs of the step the network actually runs (a
PatchDDM training step: its patch), the same basis as the voxels of ``voxels_per_s``
(:attr:`idmbench.measure.workload.Workload.voxels`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .memory import NoModuleHooks


@contextlib.contextmanager
def count_flops(module_hooks: bool = False) -> Iterator[Any]:
    """``with count_flops() as fc: ...`` then ``fc.get_total_flops()`` (FLOPs).

    ``module_hooks=True`` keeps FlopCounterMode's per-module breakdown (not safe with IDM's backward).
    """
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    if not module_hooks:
        # no module hooks: their multi-grad hooks raise inside IDM's custom backward; totals don't need them
        fc.mod_tracker = NoModuleHooks()  # type: ignore[assignment]
    with fc:
        yield fc

