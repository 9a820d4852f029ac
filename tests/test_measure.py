"""Measurement probes: memory (measured vs predicted), energy (NVML through a fake pynvml, real codecarbon),
timing statistics, FLOPs, environment capture, byte units."""

from __future__ import annotations

import math
import os
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import idmbench
from idmbench.units import format_bytes, parse_bytes
from idmbench.measure import energy as E
from idmbench.measure.env import capture, cpu_model, git_revision
from idmbench.measure.flops import flops_of
from idmbench.measure.memory import track_peak
from idmbench.measure.predict import Predictor
from idmbench.measure.timing import TimingStats, time_steps
from idmbench.measure.workload import build_state, make_workload

# ---------------------------------------------------------------------------------------- units


def test_parse_bytes_units():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5G") == int(1.5 * 2**30)
    for bad in ("24", "lots", "24XB", "-1GiB", "0GiB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert format_bytes(1.5 * 2**30) == "1.50 GiB"
    assert format_bytes(None) == "-"


# ---------------------------------------------------------------------------------------- timing


def test_timing_stats_median_and_iqr():
    s = TimingStats.from_times([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median_s == 3.0
    assert s.iqr_s == pytest.approx(4.0 - 2.0)
    assert s.n == 5 and s.min_s == 1.0 and s.max_s == 100.0
    synced = []
    times = time_steps(lambda: time.sleep(0.01), 3, lambda: synced.append(1))
    assert len(times) == 3 and all(t >= 0.009 for t in times)
    assert len(synced) == 6  # synchronised before and after every step
    with pytest.raises(ValueError):
        TimingStats.from_times([])


# ---------------------------------------------------------------------------------------- NVML (fake)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def fake_pynvml(clock: FakeClock, watts: float = 250.0, *, supported: bool = True) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's ``pynvml``: the energy counter (mJ) grows at ``watts`` on ``clock``."""
    m = types.ModuleType("pynvml")
    m.calls = []  # type: ignore[attr-defined]

    class NVMLError(Exception):
        pass

    m.NVMLError = NVMLError  # type: ignore[attr-defined]
    m.nvmlInit = lambda: m.calls.append("init")  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: m.calls.append("shutdown")  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)  # type: ignore[attr-defined]
    m.nvmlSystemGetDriverVersion = lambda: b"555.42"  # type: ignore[attr-defined]

    def energy(handle):
        if not supported:
            raise NVMLError("Not Supported")
        return int(round(1_000_000 + clock.t * watts * 1000))  # millijoules

    m.nvmlDeviceGetTotalEnergyConsumption = energy  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)  # type: ignore[attr-defined]
    return m


def test_nvml_energy_window_and_units(monkeypatch):
    clock = FakeClock()
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(clock, watts=250.0))
    meter = E.make_meter("cuda:0")
    assert isinstance(meter, E.NvmlEnergyMeter) and meter.source == "nvml"

    def step():  # a 0.3 s step on the fake clock
        clock.t += 0.3

    res = E.measure_window(step, lambda: None, meter, min_steps=2, min_window_s=1.0, clock=clock)
    # 2 steps (0.6 s) are not enough: the window is extended to >= 1 s -> 4 steps, 1.2 s
    assert res.steps == 4
    assert res.window_s == pytest.approx(1.2)
    # counter delta 1.2 s x 250 W = 300 000 mJ -> 300 J; per step 75 J
    assert res.energy_j == pytest.approx(300.0)
    assert res.j_per_step == pytest.approx(75.0)
    assert res.source == "nvml"
    assert meter.memory_used_bytes() == 3 * 2**30
    assert E.nvml_memory_used_bytes(0) == 3 * 2**30
    meter.close()


def test_nvml_long_steps_need_no_extension(monkeypatch):
    clock = FakeClock()
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(clock, watts=100.0))
    meter = E.NvmlEnergyMeter(0)

    def step():
        clock.t += 2.0

    res = E.measure_window(step, lambda: None, meter, min_steps=3, min_window_s=1.0, clock=clock)
    assert res.steps == 3 and res.window_s == pytest.approx(6.0)
    assert res.j_per_step == pytest.approx(200.0)


def test_nvml_without_energy_counter_is_labelled_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(FakeClock(), supported=False))
    meter = E.make_meter("cuda:0")
    assert isinstance(meter, E.NullEnergyMeter)
    assert meter.source == "none" and "NVML" in meter.note
    res = E.measure_window(lambda: None, lambda: None, meter, min_steps=1, min_window_s=0.0)
    assert res.energy_j is None and res.j_per_step is None and res.source == "none"


def test_nvml_driver_version_through_fake(monkeypatch):
    from idmbench.measure.env import nvidia_driver_version

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(FakeClock()))
    assert nvidia_driver_version() == "555.42"


# ---------------------------------------------------------------------------------------- codecarbon (real)


def test_codecarbon_really_runs_and_is_labelled_honestly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meter = E.make_meter("cpu")
    assert isinstance(meter, E.CodecarbonEnergyMeter)
    # an estimate must never be labelled a measurement: 'rapl' only when codecarbon reads the RAPL counter
    assert meter.source in ("codecarbon-rapl", "codecarbon-estimate")
    assert (meter.source == "codecarbon-rapl") == (meter.mode == "intel_rapl")
    rapl_readable = any(
        os.access(p, os.R_OK) for p in Path("/sys/class/powercap").glob("intel-rapl:*/energy_uj")
    ) if Path("/sys/class/powercap").exists() else False
    if not rapl_readable:
        assert meter.source == "codecarbon-estimate"
        assert "estimate" in meter.note

    def busy():
        t0 = time.perf_counter()
        x = 0
        while time.perf_counter() - t0 < 0.15:
            x += 1

    res = E.measure_window(busy, lambda: None, meter, min_steps=2, min_window_s=0.5)
    assert res.steps >= 4 and res.window_s >= 0.5
    assert res.energy_j is not None and res.energy_j > 0
    assert res.source == meter.source and res.j_per_step == pytest.approx(res.energy_j / res.steps)
    assert not list(tmp_path.iterdir()), "codecarbon must not write files (save_to_file=False)"


# ---------------------------------------------------------------------------------------- FLOPs


def test_flops_of_conv3d_matches_formula():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        conv = torch.nn.Conv3d(2, 3, 3, padding=1)
        x = torch.randn(1, 2, 8, 8, 8)
        fl = flops_of(lambda: conv(x))
    assert fl == 2 * 2 * 3 * 27 * 8**3


# ---------------------------------------------------------------------------------------- memory


def test_track_peak_without_module_hooks_gives_the_same_totals():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(), torch.nn.Conv3d(8, 1, 3, padding=1))
    opt = torch.optim.AdamW(net.parameters())
    x = torch.randn(1, 1, 16, 16, 16)

    def step():
        opt.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        opt.step()

    step()
    _, a = track_peak(step, net, opt, x)
    _, b = track_peak(step, net, opt, x, module_hooks=False)
    assert a.total_bytes == b.total_bytes and a.opt_bytes == b.opt_bytes and a.param_bytes == b.param_bytes


def _tiny_size(name: str) -> tuple[int, int, int]:
    spec = idmbench.get_spec(name)
    m = spec.valid_sides(spec.config("tiny"))
    side = m * max(1, math.ceil(16 / m))
    assert side <= 32, f"{name}: smallest tiny side >= 16 is {side}"
    return (side, side, side)


@pytest.mark.parametrize("name", idmbench.list_models())
def test_prediction_within_10_percent_of_measurement(name):
    """For every registered model: the fake-tensor prediction of a training and a sampling step lands
    within 10 % of the live-tensor peak measured on real tensors (the worker's method)."""
    size = _tiny_size(name)
    pred = Predictor(name, "tiny")
    for phase in ("train", "sample"):
        p = pred.predict(size, phase)
        assert p.ok, f"{name} {phase}: prediction failed: {p.error}"
        assert p.flops and p.flops > 0 and p.params and p.params > 0
        torch.manual_seed(0)
        wl = make_workload(build_state(name, "tiny", phase), size)
        wl.step()  # warm-up: AdamW state exists, as in the sweep
        _, peak = track_peak(wl.step, *wl.track, module_hooks=False)
        ratio = peak.total_bytes / p.peak_bytes
        assert 0.9 <= ratio <= 1.1, f"{name} {phase} at {size}: measured {peak.total_bytes} vs predicted {p.peak_bytes}"
        if phase == "train":
            assert peak.opt_bytes > 0 and p.opt_bytes > 0  # AdamW state is part of the steady-state step


def test_prediction_at_huge_sizes_allocates_nothing():
    name = idmbench.list_models()[0]
    spec = idmbench.get_spec(name)
    m = spec.valid_sides(spec.config("tiny"))
    side = m * (512 // m)
    t0 = time.perf_counter()
    p = Predictor(name, "tiny").predict(side, "train", flops=False)
    assert p.ok, p.error
    assert p.peak_bytes > 1 * 2**30  # far more than this test could allocate quickly
    assert time.perf_counter() - t0 < 60
    small = Predictor(name, "tiny").predict(m * max(1, 16 // m), "train", flops=False)
    assert p.peak_bytes > small.peak_bytes


# ---------------------------------------------------------------------------------------- environment


def test_environment_capture():
    env = capture("cpu")
    for k in ("torch_version", "device_name", "cpu_model", "git_rev", "cuda_version", "driver", "python_version"):
        assert k in env
    assert env["torch_version"] == torch.__version__
    assert env["device_name"] == cpu_model() and env["cpu_model"]
    rev = git_revision()
    assert rev == "" or len(rev.split("-")[0]) >= 7


# ---------------------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by scripts/gpu_run.sh)")
def test_cuda_allocator_peak_close_to_prediction_and_nvml_energy():
    name = idmbench.list_models()[0]
    size = _tiny_size(name)
    p = Predictor(name, "tiny").predict(size, "train")
    wl = make_workload(build_state(name, "tiny", "train", device="cuda"), size)
    wl.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    wl.step()
    torch.cuda.synchronize()
    ratio = torch.cuda.max_memory_allocated() / p.peak_bytes
    assert 0.9 <= ratio <= 1.25
    meter = E.make_meter("cuda:0")
    assert meter.source == "nvml"
    res = E.measure_window(wl.step, torch.cuda.synchronize, meter, min_steps=2, min_window_s=1.0)
    assert res.window_s >= 1.0 and res.energy_j and res.energy_j > 0
