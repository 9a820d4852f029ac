"""Data-parallel configs (``run_bench.py --nproc N``): one config's training step measured by a group of
processes under PyTorch's ``DistributedDataParallel``, launched by torchrun's elastic launcher.

The sweep runs ``python -m torch.distributed.run --nproc-per-node N [rendezvous flags] -m
idmbench.harness.worker CONFIG.json`` -- exactly what ``torchrun --nproc-per-node N`` runs -- as that
config's one worker process (:func:`~.runner.run_process`: its own session, killed together with every rank
at ``--timeout`` or Ctrl-C). Each rank is the ordinary worker (:mod:`.worker`) with DDP around the model
(:mod:`.ddp`); it writes its own ``result.rankR.json``. One node: torchrun's ``--standalone`` rendezvous
on a free local port. Several nodes: every node runs the same sweep command with ``--nnodes``,
``--rdzv-endpoint HOST:PORT`` and either ``--node-rank R`` (torchrun's static rendezvous) or nothing more
(the ``c10d`` rendezvous assigns node ranks); each config gets its own rendezvous id
(``--rdzv-id`` plus the config), so consecutive configs never join each other's round.

A group answers one :class:`~.records.WorkerResult` per rank. A rank that left no result is labelled from
the others: when a rank failed (``oom``, ``error``) torchrun stops the rest of the group, and those rows
carry the failing rank's status and say so; a group killed at ``--timeout`` is ``timeout`` on every rank;
a launcher that failed before any rank answered (a rendezvous that never completed) is labelled as a
single worker's death would be (:func:`~.runner.death_result`).

On the CPU each rank gets ``cores // N`` threads (``OMP_NUM_THREADS``, unless set): torchrun's own
default of 1 thread per rank would understate what N processes on that machine can do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .. import results as R
from .records import WorkerConfig, WorkerResult
from .runner import Ticker, death_result, read_result, run_process, timeout_result, worker_env

logger = logging.getLogger(__name__)

RDZV_BACKENDS = ("c10d", "static")


@dataclass
class LaunchSpec:
    """How torchrun starts a config's group (its command-line flags of the same names).

    Args:
        nproc_per_node: processes on this node (one per GPU on CUDA).
        nnodes: nodes in the group; world size = ``nproc_per_node x nnodes``.
        node_rank: this node's rank (static rendezvous), or None to let the ``c10d`` rendezvous assign it.
        rdzv_endpoint: ``HOST:PORT`` of the rendezvous (required with ``nnodes > 1``).
        rdzv_id: prefix of each config's rendezvous id (the same on every node).
        rdzv_backend: ``c10d`` or ``static``; empty: ``static`` with a node rank, else ``c10d``.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str = ""
    rdzv_id: str = "idmbench"
    rdzv_backend: str = ""

    def __post_init__(self) -> None:
        if int(self.nproc_per_node) < 1 or int(self.nnodes) < 1:
            raise ValueError(f"--nproc and --nnodes must be >= 1; got {self.nproc_per_node}, {self.nnodes}")
        if self.rdzv_backend and self.rdzv_backend not in RDZV_BACKENDS:
            raise ValueError(f"unknown --rdzv-backend {self.rdzv_backend!r}; valid: {', '.join(RDZV_BACKENDS)}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (a host every node reaches)")
        if self.node_rank is not None and not 0 <= int(self.node_rank) < int(self.nnodes):
            raise ValueError(f"--node-rank {self.node_rank} is outside 0..{int(self.nnodes) - 1} (--nnodes {self.nnodes})")

    @property
    def world_size(self) -> int:
        return int(self.nproc_per_node) * int(self.nnodes)

    def backend(self) -> str:
        """The rendezvous backend torchrun is given (see ``rdzv_backend``)."""
        if self.rdzv_backend:
            return self.rdzv_backend
        return "static" if self.node_rank is not None else "c10d"

    def torchrun_args(self, run_id: str) -> list[str]:
        """torchrun's flags for one config whose rendezvous id is ``run_id`` (multi-node only)."""
        args = [f"--nproc-per-node={int(self.nproc_per_node)}", "--max-restarts=0"]
        if self.nnodes == 1 and not self.rdzv_endpoint:
            return args + ["--standalone"]  # a local c10d rendezvous on a free port
        backend = self.backend()
        args += [f"--nnodes={int(self.nnodes)}", f"--rdzv-backend={backend}", f"--rdzv-endpoint={self.rdzv_endpoint}",
                 f"--rdzv-id={run_id}"]
        if backend == "static":
            args.append(f"--node-rank={int(self.node_rank or 0)}")
        return args

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, data: "LaunchSpec | Mapping[str, Any]") -> "LaunchSpec":
        if isinstance(data, LaunchSpec):
            return data
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def launch_for(world_size: int, launch: dict[str, Any]) -> dict[str, Any]:
    """``WorkerConfig.launch`` of a job of ``world_size`` processes (``{}``: a single process)."""
    if world_size == 1:
        return {}
    nnodes = int(launch.get("nnodes", 1) or 1)
    return {**launch, "nproc_per_node": world_size // nnodes, "nnodes": nnodes}


def rank_result_path(result_path: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` writes its result: ``result.rankR.json`` beside ``result_path``."""
    p = Path(result_path)
    return p.with_name(f"{p.stem}.rank{int(rank)}{p.suffix or '.json'}")


def run_id(job: WorkerConfig, spec: LaunchSpec) -> str:
    """The rendezvous id of one config: ``--rdzv-id`` + model, preset, size, phase and world size (the
    same on every node, different for every config)."""
    raw = f"{spec.rdzv_id}-{job.model}-{job.preset}-{R.size_label(job.size)}-{job.phase}-ws{spec.world_size}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def cpu_threads_per_rank(nproc_per_node: int) -> int:
    """CPU threads for each of ``nproc_per_node`` ranks sharing this machine's cores (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(nproc_per_node)))


def group_argv(cfg_path: Path, spec: LaunchSpec, rid: str) -> list[str]:
    """The launcher's command line: ``python -m torch.distributed.run FLAGS -m idmbench.harness.worker CFG``."""
    return [sys.executable, "-m", "torch.distributed.run", *spec.torchrun_args(rid),
            "-m", "idmbench.harness.worker", str(cfg_path)]


#: words of an error that only says a rank lost its partners (the cause is another rank's failure)
PEER_LOSS_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo", "nccl",
                     "distbackenderror", "watchdog", "collective operation timeout")


def lost_peer(res: WorkerResult) -> bool:
    """Whether ``res`` is an ``error`` that only says its rank lost the group (see :data:`PEER_LOSS_MARKERS`)."""
    return res.status == R.STATUS_ERROR and any(m in res.error.lower() for m in PEER_LOSS_MARKERS)


def label_group(found: dict[int, WorkerResult], world_size: int, death: WorkerResult) -> list[WorkerResult]:
    """One result per rank 0..world_size-1: the ranks' own, and for a rank without one -- or whose error only
    says it lost its partners -- a result labelled from the rank that failed first-hand (its status, its
    reason); ``death`` is how the launcher itself ended, used when no rank answered."""
    failed = [(r, res) for r, res in sorted(found.items()) if res.status in R.FAILED_STATUSES]
    causes = [(r, res) for r, res in failed if not lost_peer(res)] or failed
    worst = next(((r, res) for r, res in causes if res.status == R.STATUS_OOM), causes[0] if causes else None)
    out: list[WorkerResult] = []
    for rank in range(world_size):
        res = found.get(rank)
        if res is not None and worst is not None and worst[0] != rank and lost_peer(res):
            r, bad = worst
            res.status = bad.status
            res.error = (f"rank {rank} lost its group after rank {r} ended with {bad.status} ({bad.error}); "
                         f"here: {res.error}")[:600]
        if res is None:
            if worst is not None:
                r, bad = worst
                res = WorkerResult(status=bad.status, wall_s=death.wall_s,
                                   error=f"rank {rank} left no result: the launcher stopped the group after rank {r} "
                                         f"ended with {bad.status} ({bad.error})")
            elif found:
                res = WorkerResult(status=R.STATUS_ERROR, wall_s=death.wall_s,
                                   error=f"rank {rank} left no result on this node (its own node's folder may hold it); "
                                         f"launcher: {death.error}")
            else:
                res = dataclasses.replace(death, phase_s=dict(death.phase_s), warmup_s=list(death.warmup_s),
                                          step_times_s=list(death.step_times_s))
        res.world_size, res.rank = world_size, rank
        out.append(res)
    return out


def run_group(cfg: WorkerConfig | Mapping[str, Any], *, timeout_s: float, log_path: Path,
              progress: Ticker | None = None) -> list[WorkerResult]:
    """Run one config data-parallel as ``cfg.launch`` says; one :class:`WorkerResult` per rank, in rank order.

    Args:
        cfg: the job; ``cfg.launch`` is a :class:`LaunchSpec` (or its mapping).
        timeout_s: wall-clock limit of the whole group (s): then launcher and ranks are killed (``timeout``).
        log_path: the launcher's and every rank's output (created, overwritten).
        progress: ticked while waiting.
    """
    job = WorkerConfig.coerce(cfg)
    spec = LaunchSpec.coerce(job.launch)
    ws = spec.world_size
    with tempfile.TemporaryDirectory(prefix="idmbench-") as tmp:
        cfg_path = Path(tmp) / "config.json"
        job.result_path = str(Path(tmp) / "result.json")
        cfg_path.write_text(job.to_json())
        env = worker_env()
        if not str(job.device).startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(cpu_threads_per_rank(spec.nproc_per_node))
        outcome = run_process(group_argv(cfg_path, spec, run_id(job, spec)), timeout_s=timeout_s,
                              log_path=log_path, progress=progress, env=env)
        if outcome.timed_out:
            return label_group({}, ws, timeout_result(timeout_s, outcome.wall_s))
        found: dict[int, WorkerResult] = {}
        for rank in range(ws):
            res = read_result(rank_result_path(job.result_path, rank), log_path)
            if res is not None:
                if res.wall_s is None:
                    res.wall_s = outcome.wall_s
                res.phase_s["process"] = outcome.wall_s
                found[rank] = res
        death = death_result(outcome, log_path, what="torchrun") if len(found) < ws else WorkerResult()
        return label_group(found, ws, death)
