"""Worker-process control: start one config's worker, wait for it, kill it on timeout or Ctrl-C, and
turn its death into a labelled :class:`~idmbench.harness.records.WorkerResult`.

Each worker is ``python -m idmbench.harness.worker CONFIG.json`` in its own session (a Ctrl-C in the
terminal reaches the sweep only; the sweep then kills the worker's whole process group), with Linux's
``PR_SET_PDEATHSIG`` so that a killed sweep leaves no orphan. Its stdout and stderr go to the config's log
file in ``DIR/logs/``.

A worker that dies without a result is labelled from evidence, never guessed:

* killed by the sweep after ``--timeout``: ``timeout``;
* killed by SIGKILL while the kernel's OOM-kill counters rose (the cgroup's ``memory.events`` /
  ``memory.oom_control`` ``oom_kill``, or ``/proc/vmstat`` ``oom_kill`` -- the kernel log itself is not
  readable without privileges), or with its peak RSS at the cgroup's memory limit: ``oom``, with that
  evidence in the reason;
* SIGKILL with no such evidence: ``killed`` ("SIGKILL, cause unknown");
* any other signal or exit code without a result: ``error`` with the last line of the worker's log.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

from .. import results as R
from ..registry import get_spec
from ..units import KiB, format_bytes
from .records import WorkerConfig, WorkerResult

logger = logging.getLogger(__name__)

PKG_ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.5  # how often the sweep looks at a running worker (s)
#: peak RSS at or above this fraction of the cgroup memory limit counts as evidence of an OOM kill
RSS_AT_LIMIT = 0.95
#: cgroup v1 reports "no limit" as a number near 2^63 (bytes): anything above this is no limit
_NO_LIMIT = 2**60


class Ticker(Protocol):
    """Anything told, about every :data:`POLL_S` seconds, that the sweep is still waiting (the progress)."""

    def tick(self) -> None: ...


# ------------------------------------------------------------------------------------------ evidence


def _cgroup_dirs() -> list[tuple[str, Path]]:
    """``(version, folder)`` of this process's memory cgroup: ``("v2", ...)`` and/or ``("v1", ...)``."""
    out: list[tuple[str, Path]] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as exc:
        logger.debug("no /proc/self/cgroup (%s): no cgroup OOM evidence", exc)
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, ctrl, path = parts
        rel = path.lstrip("/")
        if ctrl == "" and Path("/sys/fs/cgroup", rel, "memory.events").exists():
            out.append(("v2", Path("/sys/fs/cgroup", rel)))
        elif "memory" in ctrl.split(",") and Path("/sys/fs/cgroup/memory", rel).is_dir():
            out.append(("v1", Path("/sys/fs/cgroup/memory", rel)))
    return out


def _key_value(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError) as exc:
        logger.debug("%s unreadable (%s)", path, exc)
    return None


def oom_kill_counts() -> dict[str, int]:
    """The kernel's OOM-kill counters visible to this process: ``cgroup`` (this memory cgroup) and
    ``system`` (``/proc/vmstat``); absent keys were not readable."""
    out: dict[str, int] = {}
    for version, folder in _cgroup_dirs():
        v = _key_value(folder / ("memory.events" if version == "v2" else "memory.oom_control"), "oom_kill")
        if v is not None:
            out["cgroup"] = out.get("cgroup", 0) + v
    v = _key_value(Path("/proc/vmstat"), "oom_kill")
    if v is not None:
        out["system"] = v
    return out


def cgroup_memory_limit_bytes() -> int | None:
    """This process's memory cgroup limit (bytes), None when unlimited or unreadable."""
    for version, folder in _cgroup_dirs():
        try:
            text = (folder / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).read_text().strip()
        except OSError as exc:
            logger.debug("cgroup memory limit unreadable (%s)", exc)
            continue
        if text != "max" and int(text) < _NO_LIMIT:
            return int(text)
    return None


def peak_rss_of(pid: int) -> int | None:
    """Peak resident set size of a live process (``VmHWM``, bytes); None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError):  # gone between two polls, or no procfs: no evidence, not an error
        return None
    return None


def sigkill_result(before: Mapping[str, int], after: Mapping[str, int], peak_rss: int | None,
                   limit: int | None, wall_s: float) -> WorkerResult:
    """The label of a worker that died of SIGKILL without a result, from the evidence (see the module
    docstring): OOM-kill counters ``before`` / ``after`` its run, its last seen peak RSS and the cgroup
    memory ``limit`` (bytes)."""
    rose = [k for k in ("cgroup", "system") if k in before and k in after and after[k] > before[k]]
    rss = f"; its peak RSS was {format_bytes(peak_rss)}" if peak_rss else ""
    if rose:
        where = " and ".join({"cgroup": "this cgroup's memory.events oom_kill", "system": "/proc/vmstat oom_kill"}[k] for k in rose)
        return WorkerResult(status=R.STATUS_OOM, wall_s=wall_s,
                            error=f"killed by the kernel's out-of-memory killer (SIGKILL while {where} rose){rss}")
    if limit and peak_rss and peak_rss >= RSS_AT_LIMIT * limit:
        return WorkerResult(status=R.STATUS_OOM, wall_s=wall_s,
                            error=f"SIGKILL with its peak RSS {format_bytes(peak_rss)} at the cgroup memory limit "
                                  f"{format_bytes(limit)}")
    unreadable = "" if before else " (no OOM-kill counter readable here)"
    return WorkerResult(status=R.STATUS_KILLED, wall_s=wall_s,
                        error=f"worker killed by SIGKILL without a result: SIGKILL, cause unknown{unreadable}{rss}")


# ------------------------------------------------------------------------------------------ process


_PRCTL: Any = None


def _load_prctl() -> Any:
    """``prctl`` from libc, looked up in the parent (no dynamic loading between fork and exec)."""
    global _PRCTL
    if _PRCTL is None and sys.platform.startswith("linux"):
        try:
            _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError) as exc:
            logger.warning("prctl unavailable (%s): a killed sweep may leave its worker running", exc)
            _PRCTL = False
    return _PRCTL or None


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Worker dies with its parent (Linux ``PR_SET_PDEATHSIG``), so a killed sweep leaves no orphan."""
    if _PRCTL:
        _PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


def plugin_imports(models: list[str]) -> list[list[str]]:
    """``[module, sys.path entry]`` pairs a worker imports so that models registered at run time with
    :func:`idmbench.register` (not through an entry point) exist there too."""
    out: list[list[str]] = []
    for m in models:
        spec = get_spec(m)
        mod = getattr(spec.build, "__module__", "") or ""
        if spec.source != "builtin" or not mod or mod == "__main__" or mod.startswith("idmbench."):
            continue
        path = ""
        module = sys.modules.get(mod)
        file = getattr(module, "__file__", None)
        if file:
            root = Path(file).resolve().parent
            for _ in range(mod.count(".")):
                root = root.parent
            path = str(root)
        if [mod, path] not in out:
            out.append([mod, path])
    return out


def _descendants(pid: int) -> list[Any]:
    """Every live descendant of ``pid`` (``psutil.Process`` objects), e.g. the ranks a torchrun launcher
    started in sessions of their own, which the launcher's process group does not reach."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group, and every descendant in a session of its own, and reap it."""
    import psutil

    kids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    for kid in kids:
        try:
            kid.kill()
        except psutil.Error:  # gone already
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logger.warning("worker %d did not exit within 10 s of SIGKILL", proc.pid)


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError as exc:
        logger.debug("worker log %s unreadable (%s)", path, exc)
        return ""
    return lines[-1][:300] if lines else ""


def worker_env() -> dict[str, str]:
    """The environment of a worker process: this one's, with the package importable and output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PKG_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class ProcessOutcome:
    """How a worker process (or a launcher and its ranks) ended: its exit code (negative: the signal),
    whether the sweep killed it at ``--timeout``, its wall time (s), its last seen peak RSS (bytes) and the
    kernel's OOM-kill counters before it started (for :func:`death_result`)."""

    returncode: int | None
    timed_out: bool
    wall_s: float
    peak_rss: int | None
    oom_before: dict[str, int]


def run_process(argv: list[str], *, timeout_s: float, log_path: Path, progress: Ticker | None = None,
                env: Mapping[str, str] | None = None) -> ProcessOutcome:
    """Run ``argv`` in its own session with its output in ``log_path``; kill it (and every descendant) after
    ``timeout_s`` seconds, or on Ctrl-C / any exception while waiting (then re-raised)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = oom_kill_counts()
    peak_rss: int | None = None
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else worker_env(),
            start_new_session=True, preexec_fn=_set_pdeathsig if _load_prctl() else None,
        )
        try:
            while True:
                try:
                    proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    peak_rss = peak_rss_of(proc.pid) or peak_rss
                    if progress is not None:
                        progress.tick()
                    if time.monotonic() - t0 > timeout_s:
                        timed_out = True
                        _kill(proc)
                        break
        except BaseException:
            _kill(proc)
            raise
    return ProcessOutcome(proc.returncode, timed_out, time.monotonic() - t0, peak_rss, before)


def timeout_result(timeout_s: float, wall_s: float) -> WorkerResult:
    return WorkerResult(status=R.STATUS_TIMEOUT, error=f"exceeded --timeout {timeout_s:g} s; worker killed", wall_s=wall_s)


def death_result(outcome: ProcessOutcome, log_path: Path, what: str = "worker") -> WorkerResult:
    """The labelled result of a process that ended without writing one (see the module docstring)."""
    rc, wall = outcome.returncode, outcome.wall_s
    tail = _last_line(log_path)
    if rc is not None and rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        if -rc == signal.SIGKILL:
            return sigkill_result(outcome.oom_before, oom_kill_counts(), outcome.peak_rss, cgroup_memory_limit_bytes(), wall)
        return WorkerResult(status=R.STATUS_ERROR, wall_s=wall, error=f"{what} died of {sig}" + (f": {tail}" if tail else ""))
    return WorkerResult(status=R.STATUS_ERROR, wall_s=wall,
                        error=f"{what} exited with code {rc} without a result" + (f": {tail}" if tail else ""))


def read_result(path: Path, log_path: Path) -> WorkerResult | None:
    """The :class:`WorkerResult` a worker wrote to ``path``; None when absent or unreadable (logged)."""
    if not path.exists():
        return None
    try:
        return WorkerResult.from_json(path.read_text())
    except ValueError as exc:  # json.JSONDecodeError, a malformed field
        logger.warning("worker result %s unreadable (%s); see %s", path, exc, log_path)
        return None


def run_worker(cfg: WorkerConfig | Mapping[str, Any], *, timeout_s: float, log_path: Path,
               progress: Ticker | None = None) -> WorkerResult:
    """Run one config in a fresh worker process and return its :class:`WorkerResult`.

    Args:
        cfg: the job (a :class:`WorkerConfig` or its JSON mapping).
        timeout_s: wall-clock limit (s); then the worker's process group is killed: status ``timeout``.
        log_path: the worker's stdout + stderr (created, overwritten).
        progress: ticked while waiting.

    A worker that dies without a result is labelled as the module docstring says. Ctrl-C (or any
    exception while waiting) kills the worker and re-raises.
    """
    job = WorkerConfig.coerce(cfg)
    with tempfile.TemporaryDirectory(prefix="idmbench-") as tmp:
        cfg_path = Path(tmp) / "config.json"
        job.result_path = str(Path(tmp) / "result.json")
        cfg_path.write_text(job.to_json())
        outcome = run_process([sys.executable, "-m", "idmbench.harness.worker", str(cfg_path)],
                              timeout_s=timeout_s, log_path=log_path, progress=progress)
        if outcome.timed_out:
            return timeout_result(timeout_s, outcome.wall_s)
        res = read_result(Path(job.result_path), log_path)
        if res is not None:
            if res.wall_s is None:
                res.wall_s = outcome.wall_s
            res.phase_s["process"] = outcome.wall_s
            return res
        return death_result(outcome, log_path)
