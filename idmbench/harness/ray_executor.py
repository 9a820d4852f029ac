"""``--executor ray``: each measured config's worker runs as a Ray task, spread over the GPUs and nodes of a
Ray cluster (``--ray-address ADDR``), or of a local Ray instance started for the sweep without one.

A task is :func:`run_config_task`: on the node Ray chose it runs exactly what the local executor runs
(:func:`~.jobs.run_job`: a fresh worker process, or a torchrun group for ``--nproc N``), so each config
keeps its isolation, its ``--timeout``, its memory cap and its ``oom`` / ``error`` / ``timeout`` /
``killed`` labels; it returns the results and its worker log, which the sweep writes to ``DIR/logs/``.
Resources per task: ``num_gpus`` = the config's processes (1, or N with ``--nproc N``) on CUDA -- Ray
sets ``CUDA_VISIBLE_DEVICES`` so the task's GPUs are ``cuda:0..`` -- and ``num_cpus`` =
``--ray-cpus-per-task`` per process on the CPU (Ray sets ``OMP_NUM_THREADS`` to what a task holds, so
CPU timings are per that many cores). The sweep keeps at most as many tasks in flight as the cluster
has GPUs (CUDA) or CPU slots, and writes each config's rows the moment its task finishes.

A task Ray itself could not finish becomes rows too: killed by Ray's memory monitor -> ``oom``; its worker
process died -> ``killed``; anything else -> ``error`` with Ray's one-line reason. Tasks are never retried
(``max_retries=0``): an out-of-memory config would only fail again. Ctrl-C cancels the tasks in flight
(their worker processes die with them) after writing the rows of those that had already finished, and
``--resume`` then runs the rest, as with the local executor.

Ray is an optional extra: ``pip install -e '.[ray]'``. Every node of a cluster needs the same idmbench (and
any plugin module that registers models) installed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .. import results as R
from .jobs import Done, Ticket, run_job
from .records import WorkerConfig, WorkerResult
from .runner import POLL_S, Ticker
from .torchrun import LaunchSpec

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[ray]'"
#: the end of a worker log a task sends back (bytes); the log's beginning is cut above this
LOG_TAIL_BYTES = 2 * 1024 * 1024


def require_ray() -> Any:
    """The ``ray`` module; ImportError with the install command when it is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"--executor ray needs Ray, which is not installed here ({exc}); install it with: "
                          f"{INSTALL_HINT}") from None
    return ray


def run_config_task(job_json: str, timeout_s: float, log_name: str) -> tuple[list[str], str, str]:
    """The body of one Ray task: run the job on this node (:func:`~.jobs.run_job`).

    Returns ``(results as JSON, the end of the worker log, this node's address)``.
    """
    job = WorkerConfig.coerce(json.loads(job_json))
    nproc = LaunchSpec.coerce(job.launch).nproc_per_node if job.launch else 1
    if str(job.device).startswith("cuda"):
        job.device = "cuda:0"  # Ray's CUDA_VISIBLE_DEVICES holds this task's GPU(s) only
    else:
        if nproc > 1:  # Ray set OMP_NUM_THREADS to the task's CPUs: share them among the ranks
            os.environ["OMP_NUM_THREADS"] = str(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1) // nproc))
        if job.safety_cap_bytes:  # the driver's RAM says nothing about this node's
            from ..measure.env import available_ram_bytes

            job.safety_cap_bytes = int(available_ram_bytes() * 0.9)
    try:
        import ray

        node = str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - outside a Ray worker (a test calling it directly)
        node = socket.gethostname()
    with tempfile.TemporaryDirectory(prefix="idmbench-ray-") as tmp:
        log = Path(tmp) / log_name
        results = run_job(job, timeout_s=timeout_s, log_path=log)
        text = ""
        if log.exists():
            data = log.read_bytes()
            text = data[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace")
    for r in results:
        r.notes = "; ".join(x for x in (r.notes, f"ran as a Ray task on node {node}") if x)
    return [r.to_json() for r in results], text, node


def _task_failure(exc: BaseException, ray: Any) -> WorkerResult:
    """A task Ray could not finish, as a labelled result (see the module docstring)."""
    text = " ".join(str(exc).split())[:300]
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return WorkerResult(status=R.STATUS_OOM, error=f"killed by Ray's memory monitor (node memory above its threshold): {text}")
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return WorkerResult(status=R.STATUS_KILLED, error=f"the Ray worker running this config died: {text}")
    return WorkerResult(status=R.STATUS_ERROR, error=f"Ray task failed ({type(exc).__name__}): {text}")


class RayExecutor:
    """Runs jobs as Ray tasks (see the module docstring); Ray is started at the first job.

    Args:
        device: the sweep's device (``cpu`` or ``cuda[:N]``): GPU or CPU tasks.
        address: a running cluster (``ray start --head`` prints it; ``auto`` finds a local one); None:
            use the Ray session this process already has, else start a local instance.
        cpus_per_task: CPUs a CPU task asks for per process.
    """

    name = "ray"
    concurrent = True

    def __init__(self, *, device: str, address: str | None = None, cpus_per_task: int = 1) -> None:
        self.ray = require_ray()
        if int(cpus_per_task) < 1:
            raise ValueError(f"--ray-cpus-per-task must be >= 1; got {cpus_per_task}")
        self.device = str(device)
        self.address = address
        self.cpus_per_task = int(cpus_per_task)
        self.started = False  # whether this executor started (and so shuts down) the Ray session
        self.slots = 0
        self.remote: Any = None
        self.inflight: dict[Any, Ticket] = {}

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    # -- setup -------------------------------------------------------------------------------------------
    def _ensure(self) -> None:
        ray = self.ray
        if self.remote is not None:
            return
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            else:
                gpus = 0
                if self.is_cuda:
                    import torch

                    gpus = torch.cuda.device_count()
                ray.init(num_cpus=os.cpu_count() or 1, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
            self.started = True
        res = ray.cluster_resources()
        if self.is_cuda:
            self.slots = int(res.get("GPU", 0))
            if self.slots < 1:
                raise RuntimeError(f"the Ray cluster has no GPU (resources: {dict(res)}); use --device cpu or add GPU nodes")
        else:
            self.slots = max(1, int(res.get("CPU", 1)) // self.cpus_per_task)
        self.remote = ray.remote(max_retries=0)(run_config_task)
        logger.info("Ray: %s, %s, up to %d configs at once", "connected to " + self.address if self.address and self.started
                    else ("started a local instance" if self.started else "using this process's session"),
                    ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU", "memory")), self.slots)

    def _options(self, ticket: Ticket) -> dict[str, Any]:
        nproc = LaunchSpec.coerce(ticket.job.launch).nproc_per_node if ticket.job.launch else 1
        if self.is_cuda:
            return {"num_gpus": nproc, "num_cpus": 1}
        return {"num_cpus": self.cpus_per_task * nproc, "num_gpus": 0}

    # -- jobs --------------------------------------------------------------------------------------------
    def submit(self, ticket: Ticket, progress: Ticker | None = None) -> list[Done]:
        """Start ``ticket``'s task once a slot is free; returns the jobs that finished meanwhile."""
        self._ensure()
        done = self._collect_ready(block=False, progress=progress)
        while len(self.inflight) >= self.slots:
            done += self._collect_ready(block=True, progress=progress)
        ref = self.remote.options(**self._options(ticket)).remote(ticket.job.to_json(), float(ticket.timeout_s),
                                                                 ticket.log_path.name)
        self.inflight[ref] = ticket
        return done

    def _collect_ready(self, *, block: bool, progress: Ticker | None = None) -> list[Done]:
        if not self.inflight:
            return []
        while True:
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=POLL_S if block else 0)
            if ready or not block:
                break
            if progress is not None:
                progress.tick()
        if ready:  # everything else that is ready too, without waiting
            more, _ = self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
            ready = list(dict.fromkeys(list(ready) + list(more)))
        return [self._collect(ref) for ref in ready]

    def _collect(self, ref: Any) -> Done:
        ticket = self.inflight.pop(ref)
        ws = ticket.world_size
        try:
            texts, log_text, node = self.ray.get(ref)
            results = [WorkerResult.from_json(t) for t in texts]
            self._write_log(ticket.log_path, f"# ran as a Ray task on node {node}\n" + log_text)
        except self.ray.exceptions.RayError as exc:
            logger.warning("Ray task for %s failed: %s", ticket.log_path.name, " ".join(str(exc).split())[:500])
            one = _task_failure(exc, self.ray)
            results = []
            for rank in range(ws):
                r = WorkerResult.from_json(one.to_json())
                r.world_size, r.rank = ws, rank
                results.append(r)
            self._write_log(ticket.log_path, f"# the Ray task failed\n{exc}\n")
        return ticket, results

    @staticmethod
    def _write_log(path: Path, text: str) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            logger.warning("worker log %s not written (%s)", path, exc)

    def drain(self, progress: Ticker | None = None) -> Iterator[Done]:
        """The jobs in flight, as they finish."""
        while self.inflight:
            yield from self._collect_ready(block=True, progress=progress)

    def salvage(self) -> list[Done]:
        """After Ctrl-C: the jobs already finished (their rows are kept); the others are cancelled."""
        if self.remote is None or not self.inflight:
            return []
        try:
            done = self._collect_ready(block=False)
        except Exception as exc:  # noqa: BLE001 - Ray itself may be going down with the Ctrl-C
            logger.warning("could not collect the finished Ray tasks (%s: %s)", type(exc).__name__, exc)
            done = []
        self._cancel()
        return done

    def _cancel(self) -> None:
        for ref in list(self.inflight):
            try:
                self.ray.cancel(ref, force=True)
            except Exception as exc:  # noqa: BLE001 - already finished or Ray gone
                logger.debug("ray.cancel failed (%s)", exc)
        self.inflight.clear()

    def close(self) -> None:
        """Cancel what still runs; shut Ray down if this executor started it."""
        self._cancel()
        if self.started:
            t0 = time.monotonic()
            try:
                self.ray.shutdown()
            except Exception as exc:  # noqa: BLE001 - nothing left to lose
                logger.debug("ray.shutdown failed (%s)", exc)
            logger.debug("Ray shut down in %.1f s", time.monotonic() - t0)
            self.started = False
        self.remote = None
