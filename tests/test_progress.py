"""The sweep's terminal output: progress as plain lines off a terminal and as a rich bar on one; the ETA
from per-config estimates and the measured speed-up, marked as a guess while it rests on priors; tables;
warnings routed to the terminal and everything to the log file."""

from __future__ import annotations

import io
import logging
import re

import pytest

from idmbench import results as R
from idmbench.harness import progress as P
from idmbench.harness.console import print_summary, render_table, route_logs

ANSI = re.compile(r"\x1b\[")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(P.time, "monotonic", c)
    return c


def test_plain_lines_off_a_terminal(clock):
    buf = io.StringIO()
    pr = P.Progress([10.0, 10.0, 10.0], stream=buf, tty=False, guesses=[False, False, False])
    pr.begin(0, "idm 16^3 train", "measuring (~10 s)")
    clock.t += 20.0  # twice as long as estimated
    pr.finish(0, "idm 16^3 train: ok")
    # the measured speed-up (2x) applies to what is left: 2 x 10 s x 2
    assert pr.speedup() == pytest.approx(2.0)
    assert pr.eta_s() == pytest.approx(40.0)
    assert not pr.is_guess() and pr.eta_text() == "0:40"
    pr.begin(1, "idm 32^3 train")
    clock.t += 5.0
    assert pr.eta_s() == pytest.approx(35.0)  # the running config counts what it has spent
    clock.t += 5.0
    pr.finish(1, "idm 32^3 train: ok")  # 30 s for 20 s estimated: 1.5x
    pr.close()
    lines = buf.getvalue().splitlines()
    assert lines == [
        "[1/3] idm 16^3 train: measuring (~10 s)",
        "[1/3] idm 16^3 train: ok  elapsed 0:20  ETA 0:40",
        "[2/3] idm 32^3 train: ok  elapsed 0:30  ETA 0:15",
    ]
    assert not ANSI.search(buf.getvalue()) and "\r" not in buf.getvalue()


def test_eta_says_when_it_is_a_guess(clock):
    buf = io.StringIO()
    pr = P.Progress([10.0, 60.0], stream=buf, tty=False, guesses=[True, True])
    pr.begin(0, "a")
    clock.t += 30.0
    pr.finish(0, "a: ok")
    # a guessed estimate does not calibrate the speed-up, and the ETA says it is a guess
    assert pr.speedup() == 1.0 and pr.is_guess()
    assert buf.getvalue().rstrip().endswith("ETA ~1:00 (guess)")
    pr.set_estimate(1, 45.0, guess=False)  # re-estimated from a measured rate
    assert not pr.is_guess() and pr.eta_text() == "0:45"


def test_bar_on_a_terminal():
    buf = io.StringIO()
    buf.isatty = lambda: True  # type: ignore[method-assign]
    pr = P.Progress([1.0, 1.0], stream=buf)
    assert pr.tty
    pr.begin(0, "unet 32^3 sample", "measuring")
    pr.tick()
    pr.finish(0, "unet 32^3 sample: ok")
    pr._rich.refresh()  # type: ignore[union-attr]
    drawn = buf.getvalue()
    pr.close()
    assert ANSI.search(drawn), "a terminal gets escape sequences (colours, cursor movement)"
    assert "1/2" in drawn and "ETA" in drawn and "sweep" in drawn  # the bar: done/total, ETA, title
    assert "[1/2] unet 32^3 sample: ok" in buf.getvalue()  # finished configs scroll above it


def test_render_table_columns_and_alignment():
    text = render_table(["model", "peak"], [["idm", "1.00 MiB"], ["unet-ckpt", "16.00 GiB"]], align="lr")
    lines = text.splitlines()
    assert lines[0].split() == ["model", "peak"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("idm ") and lines[3].startswith("unet-ckpt ")
    assert lines[2].endswith(" 1.00 MiB") and lines[3].endswith("16.00 GiB")
    assert len(lines[2]) == len(lines[3])  # right-aligned column
    assert all(line == line.rstrip() for line in lines)


def test_summary_groups_and_never_names_a_missing_file(tmp_path):
    out = io.StringIO()
    print_summary(out, [], [], tmp_path / "results.csv")
    assert "no config finished" in out.getvalue() and "results.csv" not in out.getvalue().replace("(nothing was written)", "")
    rows = [R.ResultRow("idm", "tiny", str(s), "train", status="predicted", predicted_peak_bytes=2**20,
                        notes="not measured: --predict: prediction only") for s in (16, 32, 64)]
    rows.append(R.ResultRow("unet", "tiny", "16", "train", status="killed", error="SIGKILL, cause unknown"))
    out = io.StringIO()
    print_summary(out, rows, [], tmp_path / "results.csv")
    text = out.getvalue()
    # one line for every config predicted for the same reason (not one line per config)
    assert text.count("--predict: prediction only") == 1 and "idm 16^3 train, idm 32^3 train, idm 64^3 train" in text
    assert "unet 16^3 train: killed: SIGKILL, cause unknown" in text
    out = io.StringIO()
    print_summary(out, rows[:3], [], tmp_path / "results.csv")
    assert "  --predict: prediction only: all 3 configs\n" in out.getvalue()  # not the list a third time
    slow = [R.ResultRow("idm", "small", str(s), "train", status="predicted", predicted_peak_bytes=2**20,
                        notes=f"not measured: estimated {t}{g} to measure > --max-measure-s 3 min 00 s")
            for s, t, g in ((64, "7 min 32 s", " (a guess)"), (128, "51 min 30 s", ""))]
    out = io.StringIO()
    print_summary(out, slow, [], tmp_path / "results.csv")
    assert ("  estimated time to measure > --max-measure-s 3 min 00 s: idm 64^3 train (~7 min 32 s, a guess), "
            "idm 128^3 train (~51 min 30 s)\n") in out.getvalue()


def test_warnings_on_the_terminal_everything_in_the_log(tmp_path):
    term = io.StringIO()
    log_file = tmp_path / "logs" / "sweep.log"
    routing = route_logs(term, log_file)
    try:
        logging.getLogger("idmbench.measure.env").warning("NVIDIA driver version (NVML) unavailable: NVMLError: x")
        logging.getLogger("idmbench.harness.sweep").info("a progress line")
        logging.getLogger("idmbench.harness.runner").debug("a detail")
    finally:
        routing.close()
    assert term.getvalue() == "warning: NVIDIA driver version (NVML) unavailable: NVMLError: x\n"
    text = log_file.read_text()
    assert "WARNING idmbench.measure.env: NVIDIA driver" in text and "a progress line" in text and "a detail" in text
    assert not logging.getLogger("idmbench").handlers  # detached again
