"""Energy of a window of steps, labelled with where the figure came from.

* GPU: NVML's cumulative energy counter ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the
  driver loaded; Volta and newer), read before and after a *synchronised* window. The counter updates
  about every 100 ms, so the window is extended until it lasts at least ``min_window_s`` (1 s): the
  quantisation error is then at most ~10 %. Source ``nvml``. NVML is imported as ``pynvml`` from the
  ``nvidia-ml-py`` distribution.
* Elsewhere: codecarbon's ``OfflineEmissionsTracker`` (no network), CPU energy only. Where the CPU has a
  readable RAPL power counter, codecarbon reads it: source ``codecarbon-rapl``. Without one it estimates
  power as TDP x CPU load of this process: source ``codecarbon-estimate``. An estimate is never labelled
  a measurement.
* Neither available: source ``none``, no figure.

Every meter has ``start()``, ``stop() -> joules``, ``source`` and ``note``; :func:`measure_window` runs
steps inside one.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

MJ_PER_J = 1000.0  # NVML energy counter unit: millijoules
J_PER_KWH = 3.6e6  # codecarbon reports kWh
MIN_WINDOW_S = 1.0  # shortest energy window (seconds): NVML updates its counter about every 100 ms

#: codecarbon CPU modes that read a hardware energy counter (everything else is an estimate)
_CODECARBON_COUNTER_MODES = {"intel_rapl"}


class NullEnergyMeter:
    """No energy figure: source ``none`` with the reason in ``note``."""

    source = "none"

    def __init__(self, note: str = "no energy meter available") -> None:
        self.note = note

    def start(self) -> None:
        pass

    def stop(self) -> float | None:
        return None

    def close(self) -> None:
        pass


def nvml_handle(pynvml: Any, device_index: int = 0) -> Any:
    """The NVML handle of CUDA device ``device_index`` as torch numbers it.

    CUDA and NVML may order devices differently (and ``CUDA_VISIBLE_DEVICES`` renumbers them), so the
    handle is found by PCI bus id when torch reports it; else through ``CUDA_VISIBLE_DEVICES``; else by index.
    """
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(device_index)
            bus = f"{int(p.pci_domain_id):08X}:{int(p.pci_bus_id):02X}:{int(p.pci_device_id):02X}.0"
            getter = getattr(pynvml, "nvmlDeviceGetHandleByPciBusId_v2", None) or pynvml.nvmlDeviceGetHandleByPciBusId
            return getter(bus)
    except Exception:
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if device_index < len(ids) and ids[device_index].isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(ids[device_index]))
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def nvml_memory_used_bytes(device_index: int = 0) -> int | None:
    """NVML device memory in use now (bytes, all processes, including CUDA contexts); None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(nvml_handle(pynvml, device_index)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


class NvmlEnergyMeter:
    """GPU energy from NVML's total-energy counter (millijoules), source ``nvml``.

    Raises at construction if NVML is missing or the GPU has no energy counter (pre-Volta).
    """

    source = "nvml"

    def __init__(self, device_index: int = 0) -> None:
        import pynvml  # nvidia-ml-py

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = nvml_handle(pynvml, device_index)
        self.read_mj()  # probe: NVMLError_NotSupported on GPUs without the counter
        self._e0: int | None = None
        self.note = "NVML total energy counter delta (mJ -> J), GPU board only, window >= 1 s"

    def read_mj(self) -> int:
        """The counter now (millijoules since the driver loaded)."""
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def start(self) -> None:
        self._e0 = self.read_mj()

    def stop(self) -> float:
        """Joules since :meth:`start`."""
        if self._e0 is None:
            raise RuntimeError("NvmlEnergyMeter.stop() without start()")
        delta_mj = self.read_mj() - self._e0
        self._e0 = None
        return delta_mj / MJ_PER_J

    def memory_used_bytes(self) -> int:
        """NVML device memory in use (bytes, every process, including CUDA contexts)."""
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


class CodecarbonEnergyMeter:
    """CPU energy through codecarbon's ``OfflineEmissionsTracker`` (offline: no network, nothing saved).

    ``source`` is ``codecarbon-rapl`` when codecarbon reads the RAPL counter, else ``codecarbon-estimate``
    (TDP x this process's CPU load); ``note`` says which mode and TDP it used. Only CPU energy is
    reported (codecarbon's RAM figure is a fixed per-GB constant, not a measurement).
    """

    def __init__(self, country_iso_code: str = "USA", tracking_mode: str = "process", measure_power_secs: float = 5.0) -> None:
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        import codecarbon
        from codecarbon import OfflineEmissionsTracker

        import inspect

        # nothing written anywhere: output_methods=[] (codecarbon >= 3), save_to_file=False before that
        quiet: dict[str, Any] = (
            {"output_methods": []}
            if "output_methods" in inspect.signature(OfflineEmissionsTracker.__init__).parameters
            or "output_methods" in inspect.signature(codecarbon.EmissionsTracker.__init__).parameters
            else {"save_to_file": False}
        )
        self._tracker = OfflineEmissionsTracker(
            country_iso_code=country_iso_code,
            **quiet,
            log_level="error",
            tracking_mode=tracking_mode,
            measure_power_secs=measure_power_secs,
            allow_multiple_runs=True,
        )
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        # Detect the hardware now, so start() does not spend the measured window on it.
        try:
            self._tracker.get_detected_hardware()
        except Exception:
            pass
        self.mode, self.tdp_w, self.generic_tdp = self._cpu_mode()
        self.source = "codecarbon-rapl" if self.mode in _CODECARBON_COUNTER_MODES else "codecarbon-estimate"
        how = "RAPL energy counter" if self.source == "codecarbon-rapl" else (
            f"estimate: TDP {self.tdp_w} W{' (generic, CPU not in its database)' if self.generic_tdp else ''} "
            f"x CPU load of this process"
        )
        self.note = f"codecarbon {codecarbon.__version__} CPU mode {self.mode or 'unknown'} ({how}); CPU energy only"
        self.last: Any = None

    def _cpu_mode(self) -> tuple[str, Any, bool]:
        for hw in getattr(self._tracker, "_hardware", []) or []:
            if type(hw).__name__ == "CPU":
                return str(getattr(hw, "_mode", "")), getattr(hw, "_tdp", None), bool(getattr(hw, "_is_generic_tdp", False))
        return "", None, False

    def start(self) -> None:
        self._tracker.start()

    def stop(self) -> float | None:
        """CPU joules since :meth:`start` (codecarbon's kWh x 3.6e6)."""
        self._tracker.stop()
        data = getattr(self._tracker, "final_emissions_data", None)
        self.last = data
        if data is None:
            return None
        return float(data.cpu_energy) * J_PER_KWH

    def close(self) -> None:
        pass


def make_meter(device: str) -> Any:
    """The meter for ``device``: NVML on CUDA, codecarbon on CPU; :class:`NullEnergyMeter` (whose ``note``
    says why) when that is unavailable. A GPU run never falls back to codecarbon's CPU figure: that would
    label CPU joules as the GPU's."""
    if str(device).startswith("cuda"):
        import torch

        idx = torch.device(device).index or 0
        try:
            return NvmlEnergyMeter(idx)
        except Exception as exc:
            return NullEnergyMeter(f"NVML energy counter unavailable ({type(exc).__name__}: {exc})")
    try:
        return CodecarbonEnergyMeter()
    except Exception as exc:
        return NullEnergyMeter(f"codecarbon unavailable ({type(exc).__name__}: {exc})")


@dataclass
class WindowResult:
    """A measured window: step times (s), its length (s), joules in it (``None`` without a meter)."""

    times_s: list[float]
    window_s: float
    energy_j: float | None
    source: str
    note: str

    @property
    def steps(self) -> int:
        return len(self.times_s)

    @property
    def j_per_step(self) -> float | None:
        """Joules per step: window energy / steps in the window."""
        if self.energy_j is None or not self.times_s:
            return None
        return self.energy_j / len(self.times_s)


def measure_window(
    step: Callable[[], Any],
    sync: Callable[[], None],
    meter: Any,
    *,
    min_steps: int = 1,
    min_window_s: float = MIN_WINDOW_S,
    max_steps: int = 100_000,
    clock: Callable[[], float] = time.perf_counter,
) -> WindowResult:
    """Run ``step`` at least ``min_steps`` times and until ``min_window_s`` seconds have passed, inside
    ``meter``; every step is synchronised and timed. Returns the step times and the window's energy."""
    sync()
    meter.start()
    t_start = clock()
    times: list[float] = []
    while True:
        t0 = clock()
        step()
        sync()
        t1 = clock()
        times.append(t1 - t0)
        if len(times) >= min_steps and (t1 - t_start) >= min_window_s:
            break
        if len(times) >= max_steps:
            break
    window = t1 - t_start
    energy = meter.stop()
    return WindowResult(times, window, energy, meter.source if energy is not None else "none", getattr(meter, "note", ""))
