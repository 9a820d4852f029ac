"""Beyond one process: the sweep's data-parallel and executor settings -- their flags, their checks, and
the world sizes each config is measured at.

``--nproc N`` (or a list, ``1,2,4``) measures every training config data-parallel at each world size
``N x --nnodes`` (:mod:`.torchrun`, :mod:`.ddp`); sampling configs stay single-process (world size 1).
``--executor ray`` runs the configs' workers as Ray tasks (:mod:`.ray_executor`). Every check raises
:class:`~idmbench.argtypes.UsageError` with one line naming the problem and the valid choices.
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import argtypes as T
from ..argtypes import UsageError


def _nproc(text: str) -> list[int]:
    """``--nproc``: one or more process counts, e.g. ``2`` or ``1,2,4``."""
    parts = T.split_list(text)
    if not parts:
        raise argparse.ArgumentTypeError("--nproc is empty; give a process count like 2, or a list like 1,2,4")
    conv = T.whole("--nproc", 1)
    return sorted(set(conv(x) for x in parts))


def _endpoint(text: str) -> str:
    """``--rdzv-endpoint HOST:PORT``."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--rdzv-endpoint must be HOST:PORT (e.g. node0:29500); got {text!r}")
    return f"{host}:{int(port)}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for data-parallel rows (torchrun + DDP) and for running the sweep's workers on Ray."""
    g = p.add_argument_group(
        "beyond one GPU",
        "Data-parallel training rows: every training config runs under DistributedDataParallel in a torchrun\n"
        "group (nccl, one GPU per process on CUDA; gloo on CPU), one row per rank. Sampling rows stay\n"
        "single-process. Several nodes: run the same command on every node with --nnodes and --rdzv-endpoint.",
    )
    a = g.add_argument
    a("--nproc", metavar="N[,N2]", type=_nproc,
      help="processes per node for the train phase (default 1); a list (1,2,4) measures every world size, "
           "for the report's scaling plot")
    a("--nnodes", metavar="N", type=T.whole("--nnodes", 1), help="nodes in each data-parallel group (default 1)")
    a("--node-rank", metavar="R", type=T.whole("--node-rank", 0),
      help="this node's rank, 0..N-1 (torchrun's static rendezvous); leave out to let the c10d rendezvous assign it")
    a("--rdzv-endpoint", metavar="HOST:PORT", type=_endpoint,
      help="rendezvous address every node reaches (with --nnodes > 1), e.g. the first node's host:29500")
    a("--rdzv-id", metavar="ID", help="rendezvous id prefix, the same on every node (default idmbench); each "
                                      "config adds its own suffix")
    a("--rdzv-backend", metavar="B", type=T.one_of("rendezvous backend", ("c10d", "static")),
      help="c10d | static (default: static with --node-rank, else c10d)")
    a("--executor", metavar="E", type=T.one_of("executor", ("local", "ray")),
      help="local (each config's worker on this machine, one at a time; default) | ray (each config's worker "
           "as a Ray task, several at once; needs pip install -e '.[ray]')")
    a("--ray-address", metavar="ADDR",
      help="with --executor ray: the Ray cluster to use (the address 'ray start --head' prints, or 'auto'); "
           "default: a local Ray instance started for this sweep")
    a("--ray-cpus-per-task", metavar="N", type=T.whole("--ray-cpus-per-task", 1),
      help="with --executor ray on CPU: cores a config's task holds per process (default 1; Ray limits its "
           "threads to them)")


def launch_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """torchrun's multi-node settings from the parsed flags (:class:`~.torchrun.LaunchSpec` fields but
    ``nproc_per_node``)."""
    return {"nnodes": ns.nnodes or 1, "node_rank": ns.node_rank, "rdzv_endpoint": ns.rdzv_endpoint or "",
            "rdzv_id": ns.rdzv_id or "idmbench", "rdzv_backend": ns.rdzv_backend or ""}


def check_parallel(nproc: list[int], launch: dict[str, Any], device: str, phases: list[str],
                   executor: str, ray_address: str | None) -> list[str]:
    """Refuse data-parallel and executor settings this machine or combination cannot run; returns notes.

    ``nproc`` per node; ``launch``: ``nnodes``, ``node_rank``, ``rdzv_endpoint``, ``rdzv_id``,
    ``rdzv_backend`` (:class:`~idmbench.harness.torchrun.LaunchSpec`)."""
    from .torchrun import LaunchSpec

    notes: list[str] = []
    if int(launch.get("nnodes", 1) or 1) == 1 and (launch.get("node_rank") is not None or launch.get("rdzv_endpoint")):
        raise UsageError("--node-rank and --rdzv-endpoint are for several nodes: give --nnodes N (N > 1) too")
    try:
        spec = LaunchSpec(nproc_per_node=max(nproc), **launch)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    parallel = max(nproc) > 1 or spec.nnodes > 1
    if device.startswith("cuda") and parallel:
        import torch

        if ":" in device and device != "cuda:0":
            raise UsageError(f"--nproc puts rank r on cuda:r; choose the GPUs with CUDA_VISIBLE_DEVICES, not --device {device}")
        n = torch.cuda.device_count()
        if max(nproc) > n and executor == "local":
            raise UsageError(f"--nproc {max(nproc)} needs one GPU per process; {n} visible here (cuda:0..cuda:{n - 1})")
    if executor == "ray" and spec.nnodes > 1:
        raise UsageError("--executor ray places each config on one node; for data-parallel runs over several nodes "
                         "use torchrun's rendezvous (--nnodes, --rdzv-endpoint) with --executor local")
    if ray_address and executor != "ray":
        raise UsageError(f"--ray-address {ray_address} needs --executor ray")
    if executor == "ray":
        from .ray_executor import require_ray

        try:
            require_ray()
        except ImportError as exc:
            raise UsageError(str(exc)) from None
    if parallel and "train" not in phases:
        notes.append(f"--nproc {','.join(map(str, nproc))} applies to the train phase only; sampling rows stay single-process")
    elif parallel and "sample" in phases:
        notes.append("sampling rows stay single-process (world_size 1); --nproc applies to the train phase")
    return notes


def world_sizes(phase: str, nproc: list[int], launch: dict[str, Any]) -> list[int]:
    """The world sizes a config of ``phase`` is measured at: every ``nproc`` x ``nnodes`` for training,
    1 for sampling (sampling rows stay single-process)."""
    if phase != "train":
        return [1]
    nnodes = int(launch.get("nnodes", 1) or 1)
    return sorted({int(n) * nnodes for n in nproc})


def missing_world_sizes(have: set[int], phase: str, nproc: list[int], launch: dict[str, Any]) -> list[int]:
    """The world sizes a config still needs, given those its rows ``have``
    (:func:`~idmbench.results.done_world_sizes`: 0 for a predicted row, which stands for every world size)."""
    return [] if 0 in have else [w for w in world_sizes(phase, nproc, launch) if w not in have]
