"""Energy meters behind one interface: named windows (``begin_window`` / ``end_window``) returning a labelled
:class:`EnergyMeasurement`; NVML through a stand-in, codecarbon for real and through its public API only;
a meter that cannot measure says why."""

from __future__ import annotations

import logging
import sys

import pytest

from idmbench.measure import energy as E

from conftest import FakeClock, make_fake_pynvml


def test_every_meter_has_the_window_interface():
    for cls in (E.NvmlEnergyMeter, E.CodecarbonEnergyMeter, E.NullEnergyMeter):
        assert issubclass(cls, E.EnergyMeter)
    with pytest.raises(TypeError):
        E.EnergyMeter()  # abstract: a meter must say how it reads energy


def test_nvml_windows_are_named_and_labelled(fake_nvml):
    clock, _ = fake_nvml
    meter = E.make_meter("cuda:0")
    assert isinstance(meter, E.NvmlEnergyMeter)
    meter.begin_window("outer")
    clock.t += 1.0
    meter.begin_window("inner")  # nested windows read the same counter independently
    clock.t += 2.0
    inner = meter.end_window("inner")
    clock.t += 1.0
    outer = meter.end_window("outer")
    # 250 W on the fake counter: 2 s -> 500 J, 4 s -> 1000 J
    assert inner.name == "inner" and inner.energy_j == pytest.approx(500.0) and inner.source == "nvml"
    assert outer.energy_j == pytest.approx(1000.0) and "NVML" in outer.note
    with pytest.raises(ValueError, match="was not begun"):
        meter.end_window("outer")
    meter.begin_window("x")
    with pytest.raises(ValueError, match="already open"):
        meter.begin_window("x")
    meter.close()
    meter.close()  # closing twice is harmless


def test_a_meter_that_cannot_measure_says_why(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml(FakeClock(), supported=False))
    with caplog.at_level(logging.WARNING, logger="idmbench.measure.energy"):
        meter = E.make_meter("cuda:0")
    assert isinstance(meter, E.NullEnergyMeter)
    assert any("NVML energy counter unavailable" in r.getMessage() and "Not Supported" in r.getMessage()
               for r in caplog.records), "the reason is logged, not swallowed"
    meter.begin_window("w")
    m = meter.end_window("w")
    assert m.energy_j is None and m.source == "none" and "Not Supported" in m.note


def test_measure_window_uses_the_interface(fake_nvml):
    clock, _ = fake_nvml
    meter = E.make_meter("cuda:0")

    def step():
        clock.t += 0.25

    res = E.measure_window(step, lambda: None, meter, min_steps=2, min_window_s=1.0, clock=clock)
    assert res.steps == 4 and res.window_s == pytest.approx(1.0)
    assert res.energy_j == pytest.approx(250.0) and res.j_per_step == pytest.approx(62.5)
    assert not meter._open, "the window was closed"


@pytest.mark.slow
def test_codecarbon_meter_reads_only_public_attributes(monkeypatch, tmp_path):
    """Every attribute the meter reads from codecarbon's tracker is public: a spy tracker fails the test on
    any ``_private`` attribute read from idmbench's code (codecarbon's own methods may read theirs)."""
    import codecarbon

    monkeypatch.chdir(tmp_path)
    reads: list[str] = []

    class Spy(codecarbon.OfflineEmissionsTracker):
        def __getattribute__(self, name):
            if name.startswith("_") and not name.startswith("__"):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith("idmbench"):
                    reads.append(name)
            return super().__getattribute__(name)

    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", Spy)
    meter = E.CodecarbonEnergyMeter()
    assert meter.source in ("codecarbon-rapl", "codecarbon-estimate")
    meter.begin_window("busy")
    x = 0
    for i in range(2_000_000):
        x += i
    m = meter.end_window("busy")
    meter.close()
    assert not reads, f"private codecarbon attributes read: {reads}"
    assert m.energy_j is not None and m.energy_j > 0 and m.source == meter.source and m.time_s > 0
    if meter.source == "codecarbon-estimate":
        assert "assumed" in m.note and " W on average" in m.note  # the watts the estimate assumed
    assert not list(tmp_path.iterdir()), "codecarbon must not write files"
