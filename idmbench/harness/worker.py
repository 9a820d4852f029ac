"""One (model, size, phase) measurement in a fresh process: ``python -m idmbench.harness.worker CONFIG.json``.

The sweep starts one worker per config, so an out-of-memory, a crash or a hang costs that config only.
CONFIG.json holds the job (see :func:`run`); the worker writes its result as JSON to ``result_path`` (and
prints it as its last stdout line). The result always has ``status``: ``ok``, ``oom`` (allocation failed:
CUDA OOM, or the CPU address-space cap of ``--cpu-memory-limit``), ``error`` (any other exception, with a
one-line reason) or ``skipped`` (its warm-up step showed that measuring would exceed ``time_budget_s``; the
sweep then writes a ``predicted`` row). ``timeout`` is decided by the parent, which kills an over-time worker.

What is measured (every figure labelled):

* memory (bytes): CUDA -- ``torch.cuda.max_memory_allocated`` over one steady-state step after
  ``reset_peak_memory_stats`` (``cuda-allocator``), ``max_memory_reserved``, NVML device ``used``;
  CPU -- peak live tensor bytes of one steady-state step through the tensor tracker (``cpu-tensors``) and
  the process peak RSS. ``activation_bytes`` = peak minus parameters, gradients and optimiser state.
* time (s): warm-up excluded, synchronised, median and IQR of the timed steps (which run without the
  tracker); ``voxels_per_s`` = batch x volume voxels / median step time.
* energy (J/step): the timed steps run inside an energy meter (NVML on CUDA, codecarbon on CPU) for a
  window of at least ``min_energy_window_s``; joules / steps in the window.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

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
    """This process's current virtual size (``VmSize``, bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``; kilobytes on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA OOM, CPU allocator failure, ``MemoryError``)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except Exception:
        pass
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


def _check_time_budget(cfg: dict[str, Any], step_s: float) -> None:
    """After the warm-up step: project the rest of the measurement from that step's real duration and
    raise :class:`SkipMeasurement` if it would exceed ``cfg["time_budget_s"]`` (seconds since start)."""
    budget = cfg.get("time_budget_s")
    if not budget:
        return
    from .policy import METER_OVERHEAD_S, TRACKED_STEP_FACTOR

    steps = max(1, int(cfg.get("steps", 3)))
    window = float(cfg.get("min_energy_window_s", 1.0))
    timed = max(steps, math.ceil(window / step_s)) if step_s > 0 else steps
    projected = step_s * (TRACKED_STEP_FACTOR + timed) + METER_OVERHEAD_S
    elapsed = time.perf_counter() - float(cfg.get("_t0", time.perf_counter()))
    if elapsed + projected > float(budget) * 1.15:
        raise SkipMeasurement(
            f"the warm-up step took {step_s:.1f} s, so measuring would take ~{elapsed + projected:.0f} s "
            f"> the {float(budget):.0f} s it may take (--max-measure-s / --max-sweep-s)"
        )


def run(cfg: dict[str, Any], result: dict[str, Any]) -> None:
    """Measure ``cfg`` and fill ``result`` in place (so a failure keeps what was already measured).

    Config keys: model, preset, overrides, size [D, H, W], phase, batch, steps, warmup, device,
    precision, seed, min_energy_window_s.
    """
    import torch

    from ..measure.energy import make_meter, measure_window, nvml_memory_used_bytes
    from ..measure.memory import track_peak
    from ..measure.timing import TimingStats, synchronizer, timed_call
    from ..measure.workload import build_state, make_workload

    for item in cfg.get("imports", []):  # modules that register models added at run time
        mod, path = (item, "") if isinstance(item, str) else (item[0], item[1])
        if path and path not in sys.path:
            sys.path.insert(0, path)
        __import__(mod)
    device = str(cfg.get("device", "cpu"))
    is_cuda = device.startswith("cuda")
    if is_cuda:
        torch.cuda.set_device(torch.device(device))
    size = tuple(int(s) for s in cfg["size"])
    batch = int(cfg.get("batch", 1))
    state = build_state(
        cfg["model"], cfg["preset"], cfg["phase"], device=device, precision=cfg.get("precision", "fp32"),
        overrides=cfg.get("overrides") or {}, seed=int(cfg.get("seed", 0)),
    )
    result["params"] = state.params
    wl = make_workload(state, size, batch)  # type: ignore[arg-type]
    result["net_shape"] = "x".join(map(str, wl.net_shape))
    sync = synchronizer(device)
    notes: list[str] = []

    # warm-up: allocator, kernels, and (train) the AdamW state -- excluded from every figure
    warm = []
    for _ in range(max(1, int(cfg.get("warmup", 1)))):
        out, dt = timed_call(wl.step, sync)
        warm.append(dt)
        if isinstance(out, float):
            result["loss"] = out
    result["warmup_s"] = warm
    _check_time_budget(cfg, warm[-1])

    # memory of one steady-state step
    if is_cuda:
        dev = torch.device(device)
        torch.cuda.reset_peak_memory_stats(dev)
        sync()
        wl.step()
        sync()
        result["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        result["reserved_bytes"] = int(torch.cuda.max_memory_reserved(dev))
        result["mem_source"] = "cuda-allocator"
        used = nvml_memory_used_bytes(dev.index or 0)
        if used is not None:
            result["nvml_used_bytes"] = used
        else:
            notes.append("NVML memory figure unavailable")
        # the parameter/gradient/optimiser split comes from the live-tensor tracker on the same step
        _, mp = track_peak(wl.step, *wl.track, module_hooks=False)
        result["activation_bytes"] = int(result["peak_mem_bytes"] - mp.param_bytes - mp.grad_bytes - mp.opt_bytes - mp.buffer_bytes)
        result["tracker_peak_bytes"] = int(mp.total_bytes)
        notes.append(f"live-tensor peak {mp.total_bytes} B on the same step (the allocator adds block rounding and workspaces)")
    else:
        _, mp = track_peak(wl.step, *wl.track, module_hooks=False)
        result["peak_mem_bytes"] = int(mp.total_bytes)
        result["activation_bytes"] = int(mp.activation_bytes)
        result["mem_source"] = "cpu-tensors"
    result["param_bytes"] = int(mp.param_bytes)
    result["opt_bytes"] = int(mp.opt_bytes)

    # time and energy: the timed steps, without the tracker, inside the energy meter
    meter = make_meter(device)
    try:
        win = measure_window(
            wl.step, sync, meter, min_steps=max(1, int(cfg.get("steps", 3))),
            min_window_s=float(cfg.get("min_energy_window_s", 1.0)),
        )
    finally:
        try:
            meter.close()
        except Exception:
            pass
    stats = TimingStats.from_times(win.times_s)
    result["step_time_s"] = stats.median_s
    result["step_time_iqr_s"] = stats.iqr_s
    result["step_times_s"] = win.times_s
    result["steps"] = stats.n
    result["voxels_per_s"] = batch * wl.voxels / stats.median_s if stats.median_s > 0 else None
    result["energy_window_s"] = win.window_s
    result["energy_source"] = win.source
    if win.energy_j is not None:
        result["energy_j_per_step"] = win.j_per_step
    notes.append(win.note if win.energy_j is not None else f"energy: {getattr(meter, 'note', 'none')}")
    if not is_cuda:
        result["rss_peak_bytes"] = peak_rss_bytes()
    result["notes"] = "; ".join(n for n in notes if n)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Exit code 0 whenever a result file was written (even for ``oom``/``error``)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m idmbench.harness.worker CONFIG.json", file=sys.stderr)
        return 2
    cfg = json.loads(Path(argv[0]).read_text())
    result: dict[str, Any] = {"status": "error", "error": "", "pid": os.getpid()}
    t0 = time.perf_counter()
    limit = cfg.get("cpu_memory_limit_bytes")
    cap_note = ""
    if limit:
        base = vm_size_bytes()
        set_address_space_limit(int(limit))
        cap_note = f"--cpu-memory-limit address-space cap {int(limit) / 2**30:.2f} GiB (worker baseline {base / 2**30:.2f} GiB)"
    elif cfg.get("safety_cap_bytes"):
        # no user limit: cap the address space at what this machine can give, so a misprediction
        # ends as an 'oom' row instead of swapping or the kernel's OOM killer
        base = vm_size_bytes()
        cap = base + int(cfg["safety_cap_bytes"])
        set_address_space_limit(cap)
        cap_note = f"safety address-space cap {cap / 2**30:.2f} GiB (available RAM + worker baseline {base / 2**30:.2f} GiB)"
    cfg["_t0"] = t0
    try:
        run(cfg, result)
        result["status"] = "ok"
    except SkipMeasurement as exc:
        result["status"] = "skipped"
        result["error"] = str(exc)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a result row
        oom = is_oom(exc)
        result["status"] = "oom" if oom else "error"
        reason = reason_line(exc)
        if oom and cap_note:
            reason = f"{reason} [under {cap_note}]"
        result["error"] = reason
        traceback.print_exc(file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt):
            result["error"] = "interrupted"
    result["wall_s"] = time.perf_counter() - t0
    if cap_note:
        result.setdefault("notes", "")
        result["notes"] = "; ".join(x for x in (result.get("notes", ""), cap_note) if x)
    text = json.dumps(result, default=str)
    out = cfg.get("result_path")
    if out:
        tmp = Path(str(out) + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
