"""Inside one rank of a data-parallel config (``--nproc N``, started by :mod:`.torchrun`): the process group,
``DistributedDataParallel`` around the model, the decisions every rank must take together, and the
figures only a group has.

The worker (:mod:`.worker`) measures a rank exactly as it measures a single process; this module adds:

* the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): ``nccl`` on
  CUDA with one GPU per rank (``cuda:LOCAL_RANK``), ``gloo`` on the CPU;
* ``DistributedDataParallel(model, find_unused_parameters=False)`` with PyTorch's defaults otherwise
  (25 MiB buckets, gradients copied into the buckets), built from the same seed on every rank (DDP
  broadcasts rank 0's weights anyway); each rank draws its own volumes, noise and timesteps
  (seed + rank), as data-parallel training does;
* collective decisions, so no rank waits in an all-reduce the others never reach: the time-budget
  give-up after the warm-up step (any rank's verdict is everyone's) and the number of timed steps (the
  largest any rank needs for its energy window);
* memory: DDP's gradient buckets (their sizes from DDP's own logging data, ``bucket_sizes``) live from
  construction on, outside the step the CPU tensor tracker follows, so on the CPU they are added to the
  tracked peak (``ddp_bucket_bytes``); on CUDA the allocator's peak already holds them and they are taken
  out of ``activation_bytes`` instead;
* the all-reduce share of a step: after the timed steps, synced steps and steps inside DDP's
  ``no_sync()`` (no gradient communication; the optimiser still steps) alternate, ``max(3, --steps)`` of
  each; ``allreduce_share = 1 - median(no_sync) / median(synced)`` is the part of a step its
  communication costs beyond what overlaps with the backward pass (0 when the difference is within noise);
* group throughput: ``world_size x batch x voxels / the slowest rank's median step time``, since a
  synchronous step ends for everyone when the slowest rank's gradients arrive;
* energy: NVML per GPU on CUDA; none on the CPU, where codecarbon measures the whole package that all
  ranks share, so no figure could be attributed to one rank (the row's notes say so).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from datetime import timedelta
from typing import Any, Callable

from .records import WorkerConfig, WorkerResult
from .torchrun import LaunchSpec, rank_result_path

logger = logging.getLogger(__name__)

#: how long a collective may wait for the other ranks (s); the sweep's --timeout usually ends a stuck group first
COLLECTIVE_TIMEOUT_S = 1800
CPU_ENERGY_NOTE = ("not measured per rank: the ranks share one CPU package, whose codecarbon figure cannot be "
                   "attributed to one of them")


def _env_int(name: str, default: int | None = None) -> int:
    v = os.environ.get(name)
    if v is None:
        if default is None:
            raise RuntimeError(f"{name} is not set: a data-parallel worker runs under torchrun (python -m torch.distributed.run)")
        return default
    return int(v)


class RankContext:
    """One rank of a config's group (see the module docstring).

    Args:
        job: the worker's job; ``job.launch`` is the group's :class:`~.torchrun.LaunchSpec`.
    """

    def __init__(self, job: WorkerConfig) -> None:
        self.spec = LaunchSpec.coerce(job.launch)
        self.rank = _env_int("RANK")
        self.world_size = _env_int("WORLD_SIZE")
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self.local_world_size = _env_int("LOCAL_WORLD_SIZE", self.spec.nproc_per_node)
        self.is_cuda = str(job.device).startswith("cuda")
        self.device = f"cuda:{self.local_rank}" if self.is_cuda else "cpu"
        self.ddp: Any = None
        self._pg = False

    @classmethod
    def from_job(cls, job: WorkerConfig) -> "RankContext | None":
        """The rank's context when ``job`` is data-parallel and this process runs under torchrun, else None."""
        if not job.launch or "RANK" not in os.environ:
            return None
        return cls(job)

    # -- setup ---------------------------------------------------------------------------------------------
    def init(self) -> None:
        """Join the process group (``nccl`` on CUDA, ``gloo`` on the CPU) from torchrun's environment."""
        import torch
        import torch.distributed as dist

        if self.is_cuda:
            torch.cuda.set_device(torch.device(self.device))
        dist.init_process_group("nccl" if self.is_cuda else "gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        self._pg = True
        logger.info("rank %d of %d (local %d of %d) on %s, %d CPU threads", self.rank, self.world_size,
                    self.local_rank, self.local_world_size, self.device, torch.get_num_threads())

    def wrap(self, state: Any, seed: int) -> None:
        """Put DDP around ``state.model`` (in place) and seed this rank's own data draws (``seed + rank``)."""
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if self.is_cuda else None
        state.model = self.ddp = DDP(state.model, device_ids=ids, find_unused_parameters=False)
        torch.manual_seed(int(seed) + self.rank)

    def result_path(self, result_path: str) -> str:
        return str(rank_result_path(result_path, self.rank))

    # -- collectives ---------------------------------------------------------------------------------------
    def _reduce(self, value: float, op: str) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return float(t.item())

    def agree_max(self, value: float) -> float:
        """The largest ``value`` over all ranks."""
        return self._reduce(value, "MAX")

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (e.g. the time-budget give-up: one rank's verdict is everyone's)."""
        return self.agree_max(1.0 if flag else 0.0) > 0

    def window_steps(self, job: WorkerConfig, step_s: float) -> int:
        """Timed steps every rank runs: ``--steps``, or enough to fill the energy window at ``step_s``
        seconds a step, whichever is more -- the largest over the ranks."""
        n = max(1, int(job.steps))
        if job.min_energy_window_s > 0 and step_s > 0:
            n = max(n, math.ceil(job.min_energy_window_s / step_s))
        return int(self.agree_max(n))

    # -- figures ---------------------------------------------------------------------------------------------
    def bucket_bytes(self) -> int | None:
        """Bytes of DDP's gradient buckets, from DDP's logging data (``bucket_sizes``); None if unavailable."""
        try:
            sizes = str(self.ddp._get_ddp_logging_data().get("bucket_sizes", ""))
            return sum(int(s) for s in sizes.replace(",", " ").split()) or None
        except Exception as exc:  # noqa: BLE001 - a private API: say so and leave the figure out
            logger.warning("DDP bucket sizes unavailable (%s: %s)", type(exc).__name__, exc)
            return None

    def account_buckets(self, result: WorkerResult, peak_from_allocator: bool) -> str:
        """Fold DDP's buckets into the memory figures (see the module docstring); returns the row's note."""
        b = self.bucket_bytes()
        result.ddp_bucket_bytes = b
        if not b:
            return "DDP gradient bucket bytes unavailable: not in the figures"
        if peak_from_allocator:
            if result.activation_bytes is not None:
                result.activation_bytes = max(0, int(result.activation_bytes) - b)
            return f"the allocator's peak includes DDP's gradient buckets ({b} B)"
        if result.peak_mem_bytes is not None:
            result.peak_mem_bytes = int(result.peak_mem_bytes) + b
        return f"peak = tracked step + DDP's gradient buckets ({b} B, allocated at DDP's construction)"

    def time_comm(self, step: Callable[[], Any], sync: Callable[[], None], pairs: int) -> tuple[list[float], list[float]]:
        """``pairs`` alternating synced steps and ``no_sync()`` steps: ``(synced_s, local_s)`` lists."""
        from ..measure.timing import timed_call

        synced: list[float] = []
        local: list[float] = []
        for _ in range(max(1, int(pairs))):
            synced.append(timed_call(step, sync)[1])
            with self.ddp.no_sync():
                local.append(timed_call(step, sync)[1])
        return synced, local

    def finish(self, job: WorkerConfig, result: WorkerResult, step: Callable[[], Any], sync: Callable[[], None],
               voxels: int) -> None:
        """The group's figures for ``result`` (this rank's, its timed steps done): the all-reduce share and
        the group throughput."""
        synced, local = self.time_comm(step, sync, max(3, int(job.steps)))
        ms, ml = statistics.median(synced), statistics.median(local)
        result.nosync_step_time_s = ml
        result.allreduce_share = max(0.0, 1.0 - ml / ms) if ms > 0 else None
        slowest = self.agree_max(result.step_time_s or 0.0)
        result.group_voxels_per_s = self.world_size * job.batch * voxels / slowest if slowest > 0 else None
        result.world_size, result.rank = self.world_size, self.rank

    def gather(self, result: WorkerResult) -> list[WorkerResult]:
        """Every rank's finished result (a collective; all ranks must call it)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, result.to_json())
        return [WorkerResult.from_json(t) for t in out]

    def close(self) -> None:
        if self._pg:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - the process ends next; the result is written
                logger.debug("destroy_process_group failed (%s)", exc)
            self._pg = False
