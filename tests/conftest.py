"""Shared test helpers: the repository root, running the real command line, the models and sizes the
harness tests use, waiting on a running sweep, and a stand-in for NVML.

Import them as ``from conftest import ...`` (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable

import pytest

import idmbench

REPO = Path(__file__).resolve().parents[1]
#: flags that make a measured sweep as short as it can be (tiny preset, one timed step, short window)
FAST = ["--preset", "tiny", "--steps", "1", "--warmup", "1", "--min-energy-window", "0.2", "--no-report"]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python run_bench.py ARGS`` in the repository, output captured as text."""
    return subprocess.run([sys.executable, "run_bench.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _sigint_default() -> None:
    """In a child before exec: SIGINT back to its default, so Python raises KeyboardInterrupt for it even
    when the test run itself was started with SIGINT ignored (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(*args: str) -> subprocess.Popen:
    """``python run_bench.py ARGS`` started in the background (stdout and stderr piped); SIGINT reaches it
    as Ctrl-C would."""
    return subprocess.Popen([sys.executable, "run_bench.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this process during the test (Python's own handler), as at a
    terminal, even when the test run was started with SIGINT ignored; the previous handler afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def bench_models() -> list[str]:
    """The two models the sweep tests use: ``idm`` and a baseline (the first two registered otherwise)."""
    names = idmbench.list_models()
    if "idm" in names:
        other = "unet" if "unet" in names else next(n for n in names if n != "idm")
        return ["idm", other]
    return names[:2]


def small_sides(models: list[str], preset: str = "tiny") -> list[int]:
    """The two smallest cube sides <= 32 (and >= 8) every model accepts at ``preset``."""
    lcm = 1
    for m in models:
        spec = idmbench.get_spec(m)
        v = spec.valid_sides(spec.config(preset))
        lcm = lcm * v // math.gcd(lcm, v)
    sides = [k * lcm for k in range(1, 33) if 8 <= k * lcm <= 32][:2]
    assert len(sides) == 2, f"no two sides <= 32 fit {models}"
    return sides


def data_lines(path: Path) -> list[str]:
    """The data lines of a CSV (header dropped); ``[]`` when the file does not exist."""
    if not path.exists():
        return []
    return [ln for ln in path.read_text().splitlines()[1:] if ln.strip()]


def wait_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``path`` holds ``n`` data lines while ``proc`` (a sweep) keeps running."""
    t0 = time.monotonic()
    while len(data_lines(path)) < n:
        assert proc.poll() is None, f"sweep ended early: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() - t0 < timeout, "no row landed in time"
        time.sleep(0.2)


class FakeClock:
    """A clock the test advances by hand (seconds)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_fake_pynvml(clock: FakeClock, watts: float = 250.0, *, supported: bool = True) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's ``pynvml``: the energy counter (mJ) grows at ``watts`` on ``clock``;
    without ``supported`` the energy query raises NVML's "Not Supported"."""
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


@pytest.fixture
def fake_nvml(monkeypatch):
    """``(clock, pynvml)``: a fake NVML installed as ``pynvml`` for the test, on a hand-driven clock."""
    clock = FakeClock()
    mod = make_fake_pynvml(clock)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return clock, mod


#: a plugin module registering, at run time, two models whose forward raises: ``fails-always`` on every call,
#: ``fails-on-rank1`` only in the process torchrun gave RANK=1 (so that rank's group partners are stopped)
FAILING_PLUGIN = '''
import os

import torch
from idmbench.registry import ModelSpec, register


class Failing(torch.nn.Module):
    def __init__(self, in_channels=1, out_channels=1, width=4, only_rank=None):
        super().__init__()
        self.conv = torch.nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.only_rank = only_rank

    def forward(self, x, timesteps, context=None):
        if self.only_rank is None or os.environ.get("RANK") == str(self.only_rank):
            raise RuntimeError("this test model always fails in forward")
        return self.conv(x)


for name, rank in (("fails-always", None), ("fails-on-rank1", 1)):
    register(ModelSpec(
        name=name, build=lambda in_channels=1, out_channels=1, _r=rank, **cfg: Failing(in_channels, out_channels, only_rank=_r, **cfg),
        presets={"tiny": {"width": 4}, "small": {"width": 4}, "paper": {"width": 4}}, divisor=lambda cfg: 1))
'''


def register_failing_models(folder: Path) -> Callable[[], None]:
    """Write :data:`FAILING_PLUGIN` to ``folder/failing_models.py``, put ``folder`` on ``sys.path`` and import
    it: ``fails-always`` and ``fails-on-rank1`` are registered here, and worker processes import the module
    too. Returns the function that undoes it all."""
    import importlib

    from idmbench.registry import unregister

    (folder / "failing_models.py").write_text(FAILING_PLUGIN)
    sys.path.insert(0, str(folder))
    importlib.import_module("failing_models")

    def undo() -> None:
        for name in ("fails-always", "fails-on-rank1"):
            unregister(name)
        sys.modules.pop("failing_models", None)
        if str(folder) in sys.path:
            sys.path.remove(str(folder))

    return undo


@pytest.fixture
def failing_models(tmp_path):
    """``fails-always`` and ``fails-on-rank1`` registered for one test (:func:`register_failing_models`)."""
    undo = register_failing_models(tmp_path)
    try:
        yield "failing_models"
    finally:
        undo()
