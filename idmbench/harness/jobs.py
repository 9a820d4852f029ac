"""Measuring jobs between the sweep and its executor: what a config's worker is asked (:func:`make_job`), one
:class:`Ticket` per world size (:func:`job_tickets`), :func:`run_job` -- a job in fresh processes on this
machine: one worker (:func:`~.runner.run_worker`), or a torchrun group when the job is data-parallel
(:func:`~.torchrun.run_group`), one :class:`~.records.WorkerResult` per rank -- and the rows they become
(:class:`JobRecorder`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
import logging
from typing import Any, Callable, Iterable

from ..results import STATUS_OK
from .console import job_line
from .records import WorkerConfig, WorkerResult, job_rows
from .runner import Ticker, run_worker
from .torchrun import LaunchSpec, launch_for, run_group

logger = logging.getLogger(__name__)


@dataclass
class Ticket:
    """One measuring job handed to an executor.

    Args:
        index: the sweep's progress item this job belongs to.
        job: what the worker(s) measure.
        log_path: where the job's output goes (``DIR/logs/...``).
        timeout_s: wall-clock limit of the job (s; ``--timeout``).
        context: whatever the sweep needs to turn the results into rows (opaque here).
    """

    index: int
    job: WorkerConfig
    log_path: Path
    timeout_s: float
    context: Any = None

    @property
    def world_size(self) -> int:
        return LaunchSpec.coerce(self.job.launch).world_size if self.job.launch else 1


#: a finished job: its ticket and one result per rank
Done = tuple[Ticket, list[WorkerResult]]


def run_job(job: WorkerConfig, *, timeout_s: float, log_path: Path, progress: Ticker | None = None) -> list[WorkerResult]:
    """Run one job in fresh processes on this machine: one worker, or a torchrun group when ``job.launch``
    asks for more than one process. One result per rank, in rank order."""
    if job.launch and LaunchSpec.coerce(job.launch).world_size > 1:
        return run_group(job, timeout_s=timeout_s, log_path=log_path, progress=progress)
    return [run_worker(job, timeout_s=timeout_s, log_path=log_path, progress=progress)]


def job_tickets(index: int, job: WorkerConfig, world_sizes: list[int], launch: dict[str, Any], log_dir: Path,
                timeout_s: float, context: Any = None) -> list[Ticket]:
    """One ticket per world size of a config (``launch``: the sweep's multi-node settings); logs are
    ``MODEL_PRESET_SIZE_PHASE.log``, with ``_wsN`` for a data-parallel job."""
    from ..results import size_label

    stem = f"{job.model}_{job.preset}_{size_label(job.size)}_{job.phase}"
    out = []
    for ws in world_sizes:
        wjob = WorkerConfig.coerce({**dataclasses.asdict(job), "launch": launch_for(ws, launch)})
        out.append(Ticket(index, wjob, log_dir / (f"{stem}.log" if ws == 1 else f"{stem}_ws{ws}.log"), timeout_s, context))
    return out


def make_job(o: Any, model: str, size: tuple[int, int, int], phase: str, imports: list[list[str]],
             budget_s: float) -> WorkerConfig:
    """What the sweep ``o`` (:class:`~.options.SweepOptions`) asks the worker of one config; ``budget_s``:
    what measuring it may take (s; ``inf``: no limit). On the CPU without ``--cpu-memory-limit`` the
    worker's address space is capped at 90 % of the RAM available now (an ``oom`` row, not swapping)."""
    is_cuda = str(o.device).startswith("cuda")
    safety = None
    if not (is_cuda or o.cpu_memory_limit_bytes):
        from ..measure.env import available_ram_bytes

        safety = int(available_ram_bytes() * 0.9)
    return WorkerConfig(
        model=model, preset=o.presets[model], overrides=o.overrides.get(model, {}), size=list(size),
        phase=phase, batch=o.batch, steps=o.steps, warmup=o.warmup, device=o.device, precision=o.precision,
        seed=o.seed, min_energy_window_s=o.min_energy_window_s, imports=imports,
        cpu_memory_limit_bytes=o.cpu_memory_limit_bytes if not is_cuda else None, safety_cap_bytes=safety,
        time_budget_s=None if (is_cuda or math.isinf(budget_s)) else max(1.0, budget_s),
    )


class JobRecorder:
    """The sweep's side of an executor: turns each finished job into rows (one per rank), appends them,
    lets the policy learn from single-process results, and tells the progress display -- a config is done
    when all its world sizes are.

    Args:
        append: writes one row (``results.csv`` and the sweep's row hook).
        policy: the sweep's :class:`~.policy.Policy` (its time estimates learn from measured configs).
        progress: the sweep's :class:`~.progress.Progress`.
    """

    def __init__(self, append: Callable[[Any], None], policy: Any, progress: Any) -> None:
        self.append, self.policy, self.progress = append, policy, progress
        self.pending: dict[int, int] = {}  # progress item -> its jobs still running

    def expect(self, index: int, jobs: int) -> None:
        """Progress item ``index`` is done after ``jobs`` jobs."""
        self.pending[index] = jobs

    def record(self, finished: Iterable[Done]) -> None:
        """Write the rows of every job in ``finished`` (as they come: an executor's drain waits)."""
        for ticket, results in finished:
            label, base, pred, reason = ticket.context
            model, phase, ws, i = ticket.job.model, ticket.job.phase, ticket.world_size, ticket.index
            rows, skipped = job_rows(base, pred, results, reason)
            for row, res in zip(rows, results):
                self.append(row)
                if row.status == STATUS_OK and ws == 1:  # the time estimates learn from single processes only
                    self.policy.learn_result(model, phase, row.flops_per_step, res)
            if skipped is not None and skipped.warmup_s and pred.flops and ws == 1:
                self.policy.learn(model, phase, pred.flops, float(skipped.warmup_s[-1]))
            line = job_line(label, rows, ws, skipped.error if skipped is not None else None)
            self.pending[i] = self.pending.get(i, 1) - 1
            if self.pending[i] > 0:
                self.progress.log(line)
            else:
                self.progress.finish(i, line)

    def salvage(self, executor: Any) -> None:
        """After Ctrl-C: write the rows of the jobs that had finished; the executor cancels the others."""
        try:
            self.record(executor.salvage())
        except Exception as exc:  # noqa: BLE001 - the rows already written are safe; say what was lost
            logger.warning("rows of jobs finished at the interruption not kept (%s: %s)", type(exc).__name__, exc)
