"""The memory-regression gate: passes on the committed baseline, fails on growth and on a disabled
memory-saving backward (even after --update), exits 2 on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from idmbench import check
from idmbench.invertible.core import InvertibleUNetCore

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "reports" / "baseline" / "memory.json"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_bench.py", "check", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_check_passes_on_committed_code_and_baseline():
    proc = run_cli()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "check passed" in proc.stdout
    assert proc.stdout.count("[pass]") == 3
    # the table names every registered model
    for name in ("idm", "unet", "unet-ckpt", "patchddm"):
        assert f"\n{name} " in proc.stdout


@pytest.fixture(scope="module")
def idm_figures():
    figures = check.compute_figures(["idm"])
    return figures, check.invariants(figures)


def test_lowered_baseline_fails_and_names_the_rows(tmp_path, capsys, idm_figures):
    figures, inv = idm_figures
    data = json.loads(COMMITTED.read_text())
    data["figures"] = [f for f in data["figures"] if f["model"] == "idm"]
    for f in data["figures"]:
        f["value"] = int(f["value"] * 0.8)
    path = tmp_path / "low.json"
    path.write_text(json.dumps(data))
    baseline = check.load_baseline(path)
    code = check.evaluate(figures, inv, baseline, path=path, tol=0.05, models=["idm"], subset=True)
    out = capsys.readouterr().out
    assert code == 1
    lines = [ln for ln in out.splitlines() if ln.startswith("REGRESSION: idm ")]
    assert len(lines) == len(data["figures"])  # every figure grew by 25 % > 5 %
    assert "REGRESSION: idm small 128^3 train predicted_peak_bytes grew" in out
    assert "check FAILED" in out
    # a generous tolerance lets the same growth through; the committed baseline itself passes
    assert check.evaluate(figures, inv, baseline, path=path, tol=0.30, models=["idm"], subset=True) == 0
    committed = check.load_baseline(COMMITTED)
    assert check.evaluate(figures, inv, committed, path=COMMITTED, tol=0.05, models=["idm"], subset=True) == 0
    # shrinking beyond the tolerance passes with a hint to update
    raised = {k: int(v * 1.5) for k, v in committed.items()}
    capsys.readouterr()
    assert check.evaluate(figures, inv, raised, path=COMMITTED, tol=0.05, models=["idm"], subset=True) == 0
    assert "shrank beyond 5 %: run `python run_bench.py check --update`" in capsys.readouterr().out


def test_disabled_memory_saving_fails_even_after_update(tmp_path, monkeypatch, capsys):
    # simulate a change that quietly turns the inversion-based backward off
    monkeypatch.setattr(InvertibleUNetCore, "forward", lambda self, x, temb: self.run(x, temb))
    path = tmp_path / "fresh.json"
    assert check.main(["--baseline", str(path), "--models", "idm", "--update"]) == 1
    assert path.exists()  # the figures were written ...
    out = capsys.readouterr().out
    assert "INVARIANT FAILED: idm activations flat in blocks_per_level" in out
    # ... and checking against that fresh baseline still fails on the invariants
    assert check.main(["--baseline", str(path), "--models", "idm"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" not in out
    assert "INVARIANT FAILED: idm <= 1/3 of plain autograd" in out


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ('{"schema": 1}', "expected an object with a 'figures' list"),
        ('{"schema": 99, "figures": []}', "has schema 99"),
        ('{"schema": 1, "figures": [{"model": "idm"}]}', "needs model, preset, size, phase, kind and an integer value"),
        ('{"schema": 1, "figures": [{"model": "nosuchnet", "preset": "small", "size": "64", "phase": "train", '
         '"kind": "predicted_peak_bytes", "value": 5}]}', "unknown model 'nosuchnet'"),
    ],
)
def test_malformed_baselines_exit_2(tmp_path, content, message):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    proc = run_cli("--baseline", str(path))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("tol", ["five", "-3%", "5%%"])
def test_bad_tolerance_exits_2(tol):
    proc = run_cli(f"--tolerance={tol}")
    assert proc.returncode == 2
    assert "bad --tolerance" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_flag_and_model_exit_2():
    proc = run_cli("--frobnicate")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
    proc = run_cli("--models", "idm,nope")
    assert proc.returncode == 2 and "unknown model 'nope'; valid models:" in proc.stderr


def test_committed_baseline_is_human_readable():
    data = json.loads(COMMITTED.read_text())
    assert data["schema"] == check.SCHEMA
    assert all("human" in f and f["value"] > 0 for f in data["figures"])
