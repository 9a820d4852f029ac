"""One (model, size, phase) measurement in a fresh process: ``python -m idmbench.harness.worker CONFIG.json``.

The sweep starts one worker per config (:mod:`.runner`), so an out-of-memory, a crash or a hang costs that
config only. CONFIG.json is a :class:`~idmbench.harness.records.WorkerConfig`; the worker writes its
:class:`~idmbench.harness.records.WorkerResult` as JSON to ``result_path`` (and prints it as its last
stdout line). The result always has ``status``: ``ok``, ``oom`` (allocation failed: CUDA OOM, or the CPU
address-space cap of ``--cpu-memory-limit``), ``error`` (any other exception, with a one-line reason) or
``skipped`` (its warm-up step showed that measuring would exceed ``time_budget_s``; the sweep then writes
a ``predicted`` row). ``timeout`` and ``killed`` are decided by the parent.

What is measured (every figure labelled):

* memory (bytes): CUDA -- ``torch.cuda.max_memory_allocated`` over one steady-state step after
  ``reset_peak_memory_stats`` (``cuda-allocator``), ``max_memory_reserved``, NVML device ``used``;
  CPU -- peak live tensor bytes of one steady-state step through the tensor tracker (``cpu-tensors``) and
  the process peak RSS. ``activation_bytes`` is :class:`~idmbench.measure.memory.MemoryPeak`'s one
  definition (peak minus parameters, all trainable parameters' gradients, optimiser state and buffers);
  on CUDA it is applied to the allocator's peak.
* time (s): warm-up excluded, synchronised, median and IQR of the timed steps (which run without the
  tracker); ``voxels_per_s`` = batch x the image voxels the network processes per step
  (:attr:`~idmbench.measure.workload.Workload.voxels`) / median step time.
* energy (J/step): the timed steps run inside an energy meter window (NVML on CUDA, codecarbon on CPU) of
  at least ``min_energy_window_s``; joules / steps in the window.

A data-parallel config (``--nproc N``, ``WorkerConfig.launch``) runs this same module as every rank of a
torchrun group (:mod:`.torchrun`); :mod:`.ddp` adds the process group, DDP around the model, the decisions
the ranks take together and the group's figures. Each rank writes ``result.rankR.json`` and, when it
failed, exits 1 so that torchrun stops the rest of the group instead of leaving it in an all-reduce.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from ..units import GiB, KiB
from .records import STATUS_SKIPPED, WorkerConfig, WorkerResult
from .torchrun import rank_result_path

logger = logging.getLogger(__name__)

OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "bad_alloc",
    "failed to allocate",
    "memoryerror",
)


def set_address_space_limit(limit_bytes: int) -> None:
    """Cap this process's virtual address space (``RLIMIT_AS``, bytes): a larger allocation then fails."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and limit_bytes > hard:
        limit_bytes = hard
    resource.setrlimit(resource.RLIMIT_AS, (int(limit_bytes), hard))


def vm_size_bytes() -> int:
    """This process's current virtual size (``VmSize``, bytes); 0 where ``/proc`` is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * KiB
    except OSError as exc:
        logger.warning("/proc/self/status unreadable (%s): address-space cap taken from 0", exc)
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``; kilobytes on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * KiB)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA OOM, CPU allocator failure, ``MemoryError``)."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(m in text for m in OOM_MARKERS)


def reason_line(exc: BaseException) -> str:
    """One line: ``Type: first line of the message (at file:line)``, at most 300 characters."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    msg = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", msg)  # c10 allocator prefix
    where = ""
    tb = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(tb):
        if "site-packages" not in fr.filename and "/torch/" not in fr.filename:
            where = f" (at {Path(fr.filename).name}:{fr.lineno})"
            break
    text = f"{type(exc).__name__}: {msg}".rstrip(": ")
    return (text[: 300 - len(where)] + where).strip()


class SkipMeasurement(Exception):
    """Measuring would exceed the per-config time budget (``--max-measure-s``): give up early."""


def _check_time_budget(cfg: WorkerConfig | Mapping[str, Any], step_s: float, elapsed_s: float = 0.0) -> None:
    """After the warm-up step: project the rest of the measurement from that step's real duration
    (:func:`~idmbench.harness.estimate.remaining_measure_s`) and raise :class:`SkipMeasurement` if, with the
    ``elapsed_s`` seconds already spent, it would exceed ``time_budget_s`` by more than 15 %."""
    from .estimate import remaining_measure_s

    c = cfg if isinstance(cfg, Mapping) else dataclasses.asdict(cfg)
    budget = c.get("time_budget_s")
    if not budget:
        return
    projected = remaining_measure_s(step_s, steps=max(1, int(c.get("steps", 3))),
                                    min_window_s=float(c.get("min_energy_window_s", 1.0)))
    if elapsed_s + projected > float(budget) * 1.15:
        raise SkipMeasurement(
            f"the warm-up step took {step_s:.1f} s, so measuring would take ~{elapsed_s + projected:.0f} s "
            f"> the {float(budget):.0f} s it may take (--max-measure-s / --max-sweep-s)"
        )


def run(job: WorkerConfig, result: WorkerResult, t0: float | None = None, group: Any = None) -> None:
    """Measure ``job`` and fill ``result`` in place (so a failure keeps what was already measured).

    ``t0``: ``time.perf_counter()`` at the worker's start (the time budget counts from it).
    ``group``: this rank's :class:`~.ddp.RankContext` in a data-parallel config, else None.
    """
    t0 = time.perf_counter() if t0 is None else t0
    clock = time.perf_counter()
    import torch

    from ..measure.energy import make_meter, measure_window, nvml_memory_used_bytes
    from ..measure.memory import track_peak
    from ..measure.timing import TimingStats, synchronizer, timed_call
    from ..measure.workload import build_state, make_workload

    for mod, path in job.imports:  # modules that register models added at run time
        if path and path not in sys.path:
            sys.path.insert(0, path)
        __import__(mod)
    result.phase_s["import"] = time.perf_counter() - clock
    clock = time.perf_counter()
    device = job.device if group is None else group.device
    is_cuda = device.startswith("cuda")
    if is_cuda:
        torch.cuda.set_device(torch.device(device))
    else:  # every model on the kernels IDM's sub-networks use (run.json: cpu_conv3d)
        from ..invertible.conv import use_onednn_for_every_conv3d

        use_onednn_for_every_conv3d()
    if group is not None:
        group.init()
    size = tuple(int(s) for s in job.size)
    state = build_state(job.model, job.preset, job.phase, device=device, precision=job.precision,
                        overrides=job.overrides or {}, seed=job.seed)
    result.params = state.params
    if group is not None:
        group.wrap(state, job.seed)
    wl = make_workload(state, size, job.batch)  # type: ignore[arg-type]
    result.net_shape = "x".join(map(str, wl.net_shape))
    sync = synchronizer(device)
    notes: list[str] = []
    result.phase_s["build"] = time.perf_counter() - clock

    # warm-up: allocator, kernels, and (train) the AdamW state -- excluded from every figure
    for _ in range(max(1, job.warmup)):
        out, dt = timed_call(wl.step, sync)
        result.warmup_s.append(dt)
        result.warmup += 1
        if isinstance(out, float):
            result.loss = out
    result.phase_s["warmup"] = sum(result.warmup_s)
    if group is None:
        _check_time_budget(job, result.warmup_s[-1], time.perf_counter() - t0)
    else:  # decided together: no rank may wait in an all-reduce the others never reach
        reason = ""
        try:
            _check_time_budget(job, result.warmup_s[-1], time.perf_counter() - t0)
        except SkipMeasurement as exc:
            reason = str(exc)
        if group.any_rank(bool(reason)):
            raise SkipMeasurement(reason or "another rank's warm-up step showed that measuring would exceed the time budget")

    # memory of one steady-state step
    clock = time.perf_counter()
    if is_cuda:
        dev = torch.device(device)
        torch.cuda.reset_peak_memory_stats(dev)
        sync()
        wl.step()
        sync()
        result.peak_mem_bytes = int(torch.cuda.max_memory_allocated(dev))
        result.reserved_bytes = int(torch.cuda.max_memory_reserved(dev))
        result.mem_source = "cuda-allocator"
        result.nvml_used_bytes = nvml_memory_used_bytes(dev.index or 0)
        if result.nvml_used_bytes is None:
            notes.append("NVML memory figure unavailable")
        # the parameter/gradient/optimiser split comes from the live-tensor tracker on the same step
        _, mp = track_peak(wl.step, *wl.track, module_hooks=False)
        result.activation_bytes = int(mp.activation_bytes_of(result.peak_mem_bytes))
        result.tracker_peak_bytes = int(mp.total_bytes)
        notes.append(f"live-tensor peak {mp.total_bytes} B on the same step (the allocator adds block rounding and workspaces)")
    else:
        _, mp = track_peak(wl.step, *wl.track, module_hooks=False)
        result.peak_mem_bytes = int(mp.total_bytes)
        result.activation_bytes = int(mp.activation_bytes)
        result.mem_source = "cpu-tensors"
    result.param_bytes = int(mp.param_bytes)
    result.grad_bytes = int(mp.grad_bytes)
    result.opt_bytes = int(mp.opt_bytes)
    if group is not None:
        notes.append(group.account_buckets(result, peak_from_allocator=is_cuda))
    result.phase_s["track"] = time.perf_counter() - clock

    # time and energy: the timed steps, without the tracker, inside the energy meter
    clock = time.perf_counter()
    if group is not None and not is_cuda:
        from ..measure.energy import NullEnergyMeter
        from .ddp import CPU_ENERGY_NOTE

        meter = NullEnergyMeter(CPU_ENERGY_NOTE)
    else:
        meter = make_meter(device)
    result.phase_s["meter"] = time.perf_counter() - clock
    clock = time.perf_counter()
    try:
        if group is None:
            win = measure_window(wl.step, sync, meter, min_steps=max(1, job.steps), min_window_s=job.min_energy_window_s)
        else:  # every rank runs the same number of synced steps
            n = group.window_steps(job, min(result.warmup_s[-1], result.phase_s["track"]))
            win = measure_window(wl.step, sync, meter, min_steps=n, max_steps=n, min_window_s=0.0)
    finally:
        meter.close()
    result.phase_s["window"] = time.perf_counter() - clock
    stats = TimingStats.from_times(win.times_s)
    result.step_time_s = stats.median_s
    result.step_time_iqr_s = stats.iqr_s
    result.step_times_s = list(win.times_s)
    result.steps = stats.n
    result.voxels_per_s = job.batch * wl.voxels / stats.median_s if stats.median_s > 0 else None
    result.energy_window_s = win.window_s
    result.energy_source = win.source
    if win.energy_j is not None:
        result.energy_j_per_step = win.j_per_step
    notes.append(win.note if win.energy_j is not None else f"energy: {meter.note or 'none'}")
    if group is not None:
        clock = time.perf_counter()
        group.finish(job, result, wl.step, sync, wl.voxels)
        result.phase_s["allreduce_share"] = time.perf_counter() - clock
    elif result.voxels_per_s is not None:
        result.group_voxels_per_s = result.voxels_per_s  # a group of one
    if not is_cuda:
        result.rss_peak_bytes = peak_rss_bytes()
        notes.append(f"{torch.get_num_threads()} CPU threads")
    result.notes = "; ".join(n for n in notes if n)


def _cap_address_space(job: WorkerConfig, share: int = 1) -> str:
    """Apply ``--cpu-memory-limit`` or the safety cap (see :class:`WorkerConfig`); returns the note.
    ``share``: processes of this config on this machine (data-parallel ranks split the safety cap)."""
    if job.cpu_memory_limit_bytes:
        base = vm_size_bytes()
        set_address_space_limit(int(job.cpu_memory_limit_bytes))
        return (f"--cpu-memory-limit address-space cap {job.cpu_memory_limit_bytes / GiB:.2f} GiB "
                f"(worker baseline {base / GiB:.2f} GiB)")
    if job.safety_cap_bytes:
        # no user limit: cap the address space at what this machine can give, so a misprediction
        # ends as an 'oom' row instead of swapping or the kernel's OOM killer
        base = vm_size_bytes()
        cap = base + int(job.safety_cap_bytes) // max(1, int(share))
        set_address_space_limit(cap)
        return f"safety address-space cap {cap / GiB:.2f} GiB (available RAM + worker baseline {base / GiB:.2f} GiB)"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Entry point. Exit code 0 whenever a result file was written (even for ``oom``/``error``), except a
    data-parallel rank that failed: 1, so that torchrun stops the rest of its group."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m idmbench.harness.worker CONFIG.json", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    job = WorkerConfig.coerce(json.loads(Path(argv[0]).read_text()))
    group = None
    if job.launch:
        from .ddp import RankContext

        group = RankContext.from_job(job)
        if group is not None:
            _die_with_parent()  # the launcher's SIGKILL does not reach ranks in their own sessions otherwise
    who = f" rank{group.rank}" if group is not None else ""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"%(levelname)s{who} %(name)s: %(message)s")
    result = WorkerResult(pid=os.getpid())
    if group is not None:
        result.world_size, result.rank = group.world_size, group.rank
    cap_note = _cap_address_space(job, share=group.local_world_size if group is not None else 1)
    try:
        if job.launch and group is None:
            raise RuntimeError("a data-parallel job runs under torchrun (RANK is not set)")
        run(job, result, t0, group)
        result.status = "ok"
    except SkipMeasurement as exc:
        result.status = STATUS_SKIPPED
        result.error = str(exc)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a result row; the traceback goes to the log
        oom = is_oom(exc)
        result.status = "oom" if oom else "error"
        reason = reason_line(exc)
        if oom and cap_note:
            reason = f"{reason} [under {cap_note}]"
        result.error = "interrupted" if isinstance(exc, KeyboardInterrupt) else reason
        traceback.print_exc(file=sys.stderr)
    result.wall_s = time.perf_counter() - t0
    if cap_note:
        result.notes = "; ".join(x for x in (result.notes, cap_note) if x)
    failed = result.status not in ("ok", STATUS_SKIPPED)
    everyone = [result]
    if group is not None and result.status == "ok":
        try:
            everyone = group.gather(result)  # so that every node holds every rank's row
        except Exception as exc:  # noqa: BLE001 - this rank's own result is still written
            logger.warning("could not gather the other ranks' results (%s: %s)", type(exc).__name__, exc)
    if group is None:
        _write_result(job.result_path, result)
    else:
        _write_result(group.result_path(job.result_path), result)
        if group.local_rank == 0:
            for other in everyone:
                if other.rank != group.rank:
                    _write_result(str(rank_result_path(job.result_path, other.rank)), other)
        if not failed:
            group.close()
    sys.stdout.write(result.to_json() + "\n")
    sys.stdout.flush()
    return 1 if (failed and group is not None) else 0


def _write_result(path: str, result: WorkerResult) -> None:
    """``result`` as JSON at ``path`` (atomically; nothing when ``path`` is empty)."""
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(result.to_json())
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the torchrun launcher) dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError) as exc:
        logger.debug("PR_SET_PDEATHSIG unavailable (%s)", exc)


if __name__ == "__main__":
    sys.exit(main())
