"""Where a config's measuring job runs: ``local`` -- a worker process on this machine, one config at a time --
or ``ray`` -- a Ray task on any node of a Ray cluster, as many at once as the cluster has room for
(:mod:`.ray_executor`).

The sweep's policy loop (:mod:`.sweep`) predicts and decides every config itself, then hands each config it
measures to its executor as a :class:`Ticket`; the executor hands back ``(ticket, results)`` pairs, one
:class:`~.records.WorkerResult` per rank (one for a single-process job), in the order the jobs finish.
Both executors run the same thing for a job, :func:`~.jobs.run_job`: a fresh worker process, or a torchrun
group for a data-parallel job, so an out-of-memory, a crash, a timeout or a Ctrl-C costs that config only
and becomes its rows.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from .jobs import Done, Ticket, run_job
from .runner import Ticker

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


class LocalExecutor:
    """Runs each job at once, in a worker process on this machine (:func:`run_job`), and hands it back."""

    name = "local"
    #: whether jobs run concurrently (the progress display then shows submissions, not one running config)
    concurrent = False

    def submit(self, ticket: Ticket, progress: Ticker | None = None) -> list[Done]:
        """Run ``ticket``'s job; returns the jobs finished meanwhile (here: that one)."""
        return [(ticket, run_job(ticket.job, timeout_s=ticket.timeout_s, log_path=ticket.log_path, progress=progress))]

    def drain(self, progress: Ticker | None = None) -> Iterator[Done]:
        """The jobs still running, as they finish (none here)."""
        return iter(())

    def salvage(self) -> list[Done]:
        """After Ctrl-C: the jobs that finished but were not handed back yet; the rest are cancelled."""
        return []

    def close(self) -> None:
        """Release what the executor holds (cancel what still runs)."""


def close_quietly(executor: Any) -> None:
    """Close ``executor`` (None: nothing); a failure is logged, never raised -- the rows are written."""
    if executor is not None:
        try:
            executor.close()
        except Exception as exc:  # noqa: BLE001 - the executor is going away anyway
            logger.warning("closing the %s executor failed (%s: %s)", executor.name, type(exc).__name__, exc)
    return None


def make_executor(name: str, *, device: str, ray_address: str | None = None, ray_cpus_per_task: int = 1) -> Any:
    """The executor called ``name`` (one of :data:`EXECUTORS`) for a sweep on ``device``.

    Raises:
        ValueError: an unknown name.
        ImportError: ``ray`` without Ray installed (the message holds the install command).
    """
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(device=device, address=ray_address, cpus_per_task=ray_cpus_per_task)
    raise ValueError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
