"""Energy of a window of steps, labelled with where the figure came from.

Every meter has one interface (:class:`EnergyMeter`, after Zeus' ``ZeusMonitor``):
``begin_window(name)`` / ``end_window(name) -> EnergyMeasurement``, a ``source`` label and a ``note``.

* GPU: NVML's cumulative energy counter ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the
  driver loaded; Volta and newer), read before and after a *synchronised* window. The counter updates
  about every 100 ms, so the window is extended until it lasts at least ``min_window_s`` (1 s): the
  quantisation error is then at most ~10 %. Source ``nvml``. NVML is imported as ``pynvml`` from the
  ``nvidia-ml-py`` distribution.
* Elsewhere: codecarbon's ``OfflineEmissionsTracker`` (no network, nothing written), CPU energy only.
  Where the CPU has a readable RAPL power counter (codecarbon's own public test,
  ``codecarbon.core.cpu.is_rapl_available``), codecarbon reads it: source ``codecarbon-rapl``. Without
  one it estimates power as TDP x CPU load of this process: source ``codecarbon-estimate``, with the
  average watts it assumed in the note. An estimate is never labelled a measurement.
* Neither available: source ``none``, no figure, and the note (and the log) say why.

:func:`measure_window` runs timed steps inside one window.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

MJ_PER_J = 1000.0  # NVML energy counter unit: millijoules
J_PER_KWH = 3.6e6  # codecarbon reports kWh
MIN_WINDOW_S = 1.0  # shortest energy window (seconds): NVML updates its counter about every 100 ms


@dataclass(frozen=True)
class EnergyMeasurement:
    """One closed window.

    Attributes:
        name: the window's name.
        time_s: its length (s, the meter's clock).
        energy_j: joules in it; ``None`` when the meter has no figure.
        source: where the figure came from (``nvml``, ``codecarbon-rapl``, ``codecarbon-estimate``, ``none``).
        note: one line on how it was obtained.
        power_w: average power over the window (W), when known.
    """

    name: str
    time_s: float
    energy_j: float | None
    source: str
    note: str = ""
    power_w: float | None = None


class EnergyMeter(ABC):
    """The interface every meter follows: named windows, a ``source`` label and a ``note``.

    Subclasses implement :meth:`_begin` (returns whatever :meth:`_end` needs) and :meth:`_end` (returns
    joules, or None). A window's name must be unique among the open ones.
    """

    source: str = "none"
    note: str = ""

    def __init__(self) -> None:
        self._open: dict[str, tuple[float, Any]] = {}

    def begin_window(self, name: str) -> None:
        """Start window ``name``."""
        if name in self._open:
            raise ValueError(f"energy window {name!r} is already open")
        self._open[name] = (time.perf_counter(), self._begin())

    def end_window(self, name: str) -> EnergyMeasurement:
        """Close window ``name`` and return its :class:`EnergyMeasurement`."""
        if name not in self._open:
            raise ValueError(f"energy window {name!r} was not begun; open: {', '.join(self._open) or 'none'}")
        t0, state = self._open.pop(name)
        joules = self._end(state)
        dt = time.perf_counter() - t0
        power = joules / dt if joules is not None and dt > 0 else None
        return EnergyMeasurement(name, dt, joules, self.source if joules is not None else "none", self.note, power)

    @abstractmethod
    def _begin(self) -> Any: ...

    @abstractmethod
    def _end(self, state: Any) -> float | None: ...

    def close(self) -> None:
        """Release the meter's resources (NVML handle); safe to call twice."""


class NullEnergyMeter(EnergyMeter):
    """No energy figure: source ``none`` with the reason in ``note``."""

    source = "none"

    def __init__(self, note: str = "no energy meter available") -> None:
        super().__init__()
        self.note = note

    def _begin(self) -> None:
        return None

    def _end(self, state: Any) -> None:
        return None


def nvml_handle(pynvml: Any, device_index: int = 0) -> Any:
    """The NVML handle of CUDA device ``device_index`` as torch numbers it.

    CUDA and NVML may order devices differently (and ``CUDA_VISIBLE_DEVICES`` renumbers them), so the
    handle is found by PCI bus id when torch reports it; else through ``CUDA_VISIBLE_DEVICES``; else by index.
    """
    import torch

    if torch.cuda.is_available():
        try:
            p = torch.cuda.get_device_properties(device_index)
            bus = f"{int(p.pci_domain_id):08X}:{int(p.pci_bus_id):02X}:{int(p.pci_device_id):02X}.0"
            getter = getattr(pynvml, "nvmlDeviceGetHandleByPciBusId_v2", None) or pynvml.nvmlDeviceGetHandleByPciBusId
            return getter(bus)
        except Exception as exc:  # noqa: BLE001 - NVML errors have no common base we can name without pynvml
            logger.warning("NVML handle by PCI bus id failed for cuda:%d (%s: %s); falling back to the device index",
                           device_index, type(exc).__name__, exc)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if device_index < len(ids) and ids[device_index].isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(ids[device_index]))
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def nvml_memory_used_bytes(device_index: int = 0) -> int | None:
    """NVML device memory in use now (bytes, all processes, including CUDA contexts); None without NVML
    (the reason is logged)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(nvml_handle(pynvml, device_index)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - ImportError or any NVMLError: the figure is simply absent
        logger.warning("NVML device memory unavailable (%s: %s)", type(exc).__name__, exc)
        return None


class NvmlEnergyMeter(EnergyMeter):
    """GPU energy from NVML's total-energy counter (millijoules), source ``nvml``.

    Raises at construction if NVML is missing or the GPU has no energy counter (pre-Volta).
    """

    source = "nvml"

    def __init__(self, device_index: int = 0) -> None:
        super().__init__()
        import pynvml  # nvidia-ml-py

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._closed = False
        self._handle = nvml_handle(pynvml, device_index)
        self.read_mj()  # probe: NVMLError_NotSupported on GPUs without the counter
        self.note = "NVML total energy counter delta (mJ -> J), GPU board only, window >= 1 s"

    def read_mj(self) -> int:
        """The counter now (millijoules since the driver loaded)."""
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def _begin(self) -> int:
        return self.read_mj()

    def _end(self, state: int) -> float:
        return (self.read_mj() - state) / MJ_PER_J

    def memory_used_bytes(self) -> int:
        """NVML device memory in use (bytes, every process, including CUDA contexts)."""
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001 - an NVMLError; nothing depends on the shutdown
            logger.warning("nvmlShutdown failed (%s: %s)", type(exc).__name__, exc)


def _rapl_readable() -> bool:
    """Whether codecarbon will read a RAPL energy counter here (its own public test, Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    from codecarbon.core.cpu import is_rapl_available

    return bool(is_rapl_available())


class CodecarbonEnergyMeter(EnergyMeter):
    """CPU energy through codecarbon's ``OfflineEmissionsTracker`` (offline: no network, nothing saved).

    ``source`` is ``codecarbon-rapl`` when codecarbon reads the RAPL counter (``mode`` ``intel_rapl``),
    else ``codecarbon-estimate`` (``mode`` ``cpu_load``: TDP x this process's CPU load). Only CPU energy
    is reported (codecarbon's RAM figure is a fixed per-GB constant, not a measurement). One window at a
    time (the tracker is started and stopped per window). Reads only codecarbon's public API.
    """

    def __init__(self, country_iso_code: str = "USA", tracking_mode: str = "process", measure_power_secs: float = 5.0) -> None:
        super().__init__()
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        import codecarbon
        from codecarbon import OfflineEmissionsTracker

        # nothing written anywhere: output_methods=[] (codecarbon >= 3), save_to_file=False before that
        params = inspect.signature(OfflineEmissionsTracker.__init__).parameters
        params_base = inspect.signature(codecarbon.EmissionsTracker.__init__).parameters
        quiet: dict[str, Any] = (
            {"output_methods": []} if "output_methods" in params or "output_methods" in params_base else {"save_to_file": False}
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
        # detect the hardware now, so that begin_window() does not spend the measured window on it
        hw = self._tracker.get_detected_hardware()
        self.mode = "intel_rapl" if _rapl_readable() else "cpu_load"
        self.source = "codecarbon-rapl" if self.mode == "intel_rapl" else "codecarbon-estimate"
        how = "RAPL energy counter" if self.mode == "intel_rapl" else "estimate: TDP x CPU load of this process"
        self.note = (f"codecarbon {codecarbon.__version__} CPU mode {self.mode} ({how}); CPU energy only; "
                     f"CPU {hw.get('cpu_model') or 'unknown'}")
        self.last: Any = None
        self._running = False

    def _begin(self) -> None:
        if self._running:
            raise ValueError("codecarbon measures one window at a time")
        self._tracker.start()
        self._running = True

    def _end(self, state: Any) -> float | None:
        """CPU joules of the window (codecarbon's kWh x 3.6e6)."""
        self._tracker.stop()
        self._running = False
        data = self._tracker.final_emissions_data
        self.last = data
        if data is None:
            logger.warning("codecarbon returned no emissions data for the window")
            return None
        if self.mode != "intel_rapl" and data.cpu_power:
            self.note = self.note.split("; assumed")[0] + f"; assumed {float(data.cpu_power):.1f} W on average"
        return float(data.cpu_energy) * J_PER_KWH


def make_meter(device: str) -> EnergyMeter:
    """The meter for ``device``: NVML on CUDA, codecarbon on CPU; :class:`NullEnergyMeter` (whose ``note``
    says why, also logged once as a warning) when that is unavailable. A GPU run never falls back to
    codecarbon's CPU figure: that would label CPU joules as the GPU's."""
    if str(device).startswith("cuda"):
        import torch

        idx = torch.device(device).index or 0
        try:
            return NvmlEnergyMeter(idx)
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_NotSupported, ...: no GPU energy
            note = f"NVML energy counter unavailable ({type(exc).__name__}: {exc})"
            logger.warning(note)
            return NullEnergyMeter(note)
    try:
        return CodecarbonEnergyMeter()
    except Exception as exc:  # noqa: BLE001 - codecarbon missing or its hardware probe failed: no CPU energy
        note = f"codecarbon unavailable ({type(exc).__name__}: {exc})"
        logger.warning(note)
        return NullEnergyMeter(note)


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
    meter: EnergyMeter,
    *,
    min_steps: int = 1,
    min_window_s: float = MIN_WINDOW_S,
    max_steps: int = 100_000,
    clock: Callable[[], float] = time.perf_counter,
    name: str = "timed-steps",
) -> WindowResult:
    """Run ``step`` at least ``min_steps`` times and until ``min_window_s`` seconds have passed, inside
    ``meter``'s window ``name``; every step is synchronised and timed (``clock``, seconds). Returns the
    step times and the window's energy."""
    sync()
    meter.begin_window(name)
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
    m = meter.end_window(name)
    return WindowResult(times, window, m.energy_j, m.source, m.note)
