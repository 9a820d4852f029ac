"""The environment a figure was measured in: software versions, device, driver, CPU model, git revision.

Every probe returns a plain value and never raises; a probe that fails returns ``""`` (or a fallback)
and says so once, with the reason, as a warning on this module's logger (the sweep shows warnings on the
terminal and keeps everything in ``DIR/logs/sweep.log``).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

from ..units import KiB

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _say_once(what: str, reason: str) -> None:
    """Log that probe ``what`` failed, once per (probe, reason)."""
    logger.warning("%s unavailable: %s", what, reason)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` "model name", else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError as exc:
        logger.debug("/proc/cpuinfo unreadable (%s); asking py-cpuinfo", _why(exc))
    try:
        import cpuinfo  # py-cpuinfo, a codecarbon dependency

        name = cpuinfo.get_cpu_info().get("brand_raw", "")
        if name:
            return str(name)
    except Exception as exc:  # noqa: BLE001 - py-cpuinfo runs platform tools that fail in many ways
        _say_once("CPU model name (py-cpuinfo)", _why(exc))
    return platform.processor() or platform.machine() or "unknown CPU"


def git_revision(path: str | os.PathLike | None = None) -> str:
    """``git rev-parse --short HEAD`` of the checkout holding ``path`` (this package by default),
    with ``-dirty`` appended if tracked files have uncommitted changes; ``""`` when not a git checkout."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            logger.debug("not a git checkout (%s): no git revision recorded", cwd)
            return ""
        out = rev.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if dirty.returncode == 0 and dirty.stdout.strip():
            out += "-dirty"
        return out
    except (OSError, subprocess.SubprocessError) as exc:
        _say_once("git revision", _why(exc))
        return ""


def total_ram_bytes() -> int:
    """Physical memory of the machine (bytes)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except (ImportError, OSError) as exc:
        _say_once("psutil total RAM", _why(exc) + "; using sysconf")
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def available_ram_bytes() -> int:
    """Memory available to a new process without swapping (``MemAvailable``, bytes)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError) as exc:
        _say_once("psutil available RAM", _why(exc) + "; reading /proc/meminfo")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KiB
    except OSError as exc:
        _say_once("/proc/meminfo", _why(exc) + "; using sysconf free pages")
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def nvidia_driver_version() -> str:
    """The NVIDIA driver version through NVML (``pynvml`` from nvidia-ml-py), ``""`` without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - ImportError or an NVMLError (no common base without pynvml)
        _say_once("NVIDIA driver version (NVML)", _why(exc))
        return ""


def device_name(device: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a CUDA device, the CPU model for ``cpu``."""
    if str(device).startswith("cuda"):
        import torch

        try:
            return torch.cuda.get_device_name(torch.device(device))
        except (RuntimeError, AssertionError) as exc:  # no CUDA build / no such device
            _say_once(f"name of {device}", _why(exc))
            return "unknown CUDA device"
    return cpu_model()


def capture(device: str = "cpu") -> dict[str, Any]:
    """Everything a report needs to say what a figure was measured on (plain JSON-able data)."""
    import torch

    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "cudnn_version": "",
        "driver": "",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": total_ram_bytes(),
        "git_rev": git_revision(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }
    if not str(device).startswith("cuda"):  # what the benchmark processes do on CPU, for every model alike
        from ..invertible.conv import routing_note

        env["cpu_conv3d"] = routing_note()
    from importlib import metadata

    for mod, dist in (("monai", "monai"), ("codecarbon", "codecarbon"), ("numpy", "numpy"), ("rich", "rich")):
        try:
            env[f"{mod}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError as exc:
            _say_once(f"{dist} version", _why(exc))
            env[f"{mod}_version"] = ""
    if str(device).startswith("cuda"):
        env["driver"] = nvidia_driver_version()
        try:
            env["cudnn_version"] = str(torch.backends.cudnn.version() or "")
            props = torch.cuda.get_device_properties(torch.device(device))
            env["device_memory_bytes"] = int(props.total_memory)
        except (RuntimeError, AssertionError) as exc:
            _say_once(f"properties of {device}", _why(exc))
    return env
