"""The memory-regression gate: passes on the committed baseline; fails on growth, on baseline figures it no
longer computes (renamed preset, removed model or size) until ``--update``, on figures it cannot compute
(a FAIL line, never a traceback); each invariant fails when what it guards is switched off; bad input
exits 2 with one line."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from idmbench import check
from idmbench.check import guards
from idmbench.invertible.core import InvertibleUNetCore

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "reports" / "baseline" / "memory.json"
PASSING = [check.Invariant("an invariant", True, "holds")]


def committed_figures() -> list[check.Figure]:
    """The committed baseline's figures, as if the current code had computed exactly them."""
    return [check.Figure(*k, v) for k, v in check.load_baseline(COMMITTED).items()]


def write(path: Path, figures: list[dict]) -> Path:
    path.write_text(json.dumps({"schema": check.SCHEMA, "figures": figures}))
    return path


def evaluate(figures, baseline, tmp_path, *, update=False, inv=PASSING, tol=0.05, models=None, subset=False):
    models = models if models is not None else sorted({f.model for f in figures})
    return check.evaluate(figures, inv, baseline, path=tmp_path / "out.json", tol=tol, update=update,
                          models=models, subset=subset)


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_check_passes_on_committed_code_and_baseline():
    if os.environ.get("IDMBENCH_GATE_IS_NEXT_STEP"):  # .ci/run runs the very same command right after pytest
        pytest.skip("the gate itself is CI's next step (.ci/run: python run_bench.py check)")
    proc = run_cli("check", timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "check passed" in out
    assert out.count("[pass]") == 4 and "[FAIL]" not in out
    assert f"baseline {Path('reports/baseline/memory.json')}" in out and "tolerance 5 %" in out
    assert not [ln for ln in out.splitlines() if ln.rstrip().endswith((" new", " MISSING", " FAIL", " GREW"))]
    header = next(ln for ln in out.splitlines() if ln.startswith("model "))
    assert header.split()[-1] == "verdict"
    for name in check._select_models(None):  # every registered model has rows
        assert f"\n{name} " in out


# ---------------------------------------------------------------------------------------- the baseline


def test_growth_fails_and_names_the_figures(tmp_path, capsys):
    figures = committed_figures()
    lowered = {f.key(): int(f.value / 1.25) for f in figures}  # every figure now 25 % above its baseline
    assert evaluate(figures, lowered, tmp_path) == 1
    out = capsys.readouterr().out
    assert len([ln for ln in out.splitlines() if ln.startswith("REGRESSION: ")]) == len(figures)
    assert "REGRESSION: idm small 128^3 train predicted_peak_bytes grew" in out and "check FAILED" in out
    assert evaluate(figures, lowered, tmp_path, tol=0.30) == 0  # a generous tolerance lets it through
    assert evaluate(figures, {f.key(): f.value for f in figures}, tmp_path) == 0
    raised = {f.key(): int(f.value * 1.5) for f in figures}
    capsys.readouterr()
    assert evaluate(figures, raised, tmp_path) == 0  # shrinking passes, with a hint
    assert "shrank beyond 5 %: run `python run_bench.py check --update`" in capsys.readouterr().out


def test_renamed_presets_with_tenfold_values_fail_then_update_accepts(tmp_path, capsys):
    """The reviewer's probe: rename every preset in the baseline and multiply its values by 10."""
    figures = committed_figures()
    data = json.loads(COMMITTED.read_text())
    for f in data["figures"]:
        f["preset"] = f["preset"] + "-renamed"
        f["value"] *= 10
    baseline = check.load_baseline(write(tmp_path / "renamed.json", data["figures"]))
    assert evaluate(figures, baseline, tmp_path) == 1
    out = capsys.readouterr().out
    missing = [ln for ln in out.splitlines() if ln.startswith("MISSING: ")]
    assert len(missing) == len(data["figures"])
    assert "MISSING: baseline figure idm small-renamed 128^3 train predicted_peak_bytes is no longer computed" in out
    assert f"{len(figures)} figure(s) have no baseline yet" in out and "check FAILED" in out
    # --update takes the new figures in and drops the missing ones
    assert evaluate(figures, baseline, tmp_path, update=True) == 0
    out = capsys.readouterr().out
    assert f"{len(figures)} new" in out and f"{len(data['figures'])} dropped" in out
    written = check.load_baseline(tmp_path / "out.json")
    assert written == {f.key(): f.value for f in figures}


@pytest.mark.parametrize("what", ["model", "size"])
def test_a_removed_model_or_size_fails_naming_its_figures(tmp_path, capsys, what):
    figures = committed_figures()
    if what == "model":  # the baseline knows a model that is no longer registered
        extra = {("gone-model", "small", "128", "train", "predicted_peak_bytes"): 123456}
        name = "gone-model small 128^3 train predicted_peak_bytes"
    else:  # a size the current code no longer computes
        extra = {("idm", "small", "512", "train", "predicted_peak_bytes"): 123456}
        name = "idm small 512^3 train predicted_peak_bytes"
    baseline = {f.key(): f.value for f in figures} | extra
    assert evaluate(figures, baseline, tmp_path) == 1
    out = capsys.readouterr().out
    assert f"MISSING: baseline figure {name} is no longer computed" in out
    assert out.count("MISSING: ") == 1
    assert evaluate(figures, baseline, tmp_path, update=True) == 0
    assert check.load_baseline(tmp_path / "out.json") == {f.key(): f.value for f in figures}
    # a --models subset neither misses nor drops the other models' figures
    idm = [f for f in figures if f.model == "idm"]
    assert evaluate(idm, {f.key(): f.value for f in figures}, tmp_path, models=["idm"], subset=True) == 0


def test_load_baseline_keeps_unknown_models(tmp_path):
    path = write(tmp_path / "b.json", [{"model": "nosuchnet", "preset": "small", "size": "64", "phase": "train",
                                        "kind": "predicted_peak_bytes", "value": 5}])
    assert check.load_baseline(path) == {("nosuchnet", "small", "64", "train", "predicted_peak_bytes"): 5}


# ---------------------------------------------------------------------------------------- failures


def test_a_failed_prediction_is_a_fail_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    from idmbench.measure.predict import Predictor

    def broken(self, pred, flops=True):
        raise RuntimeError("the fake step broke")

    monkeypatch.setattr(Predictor, "_predict_into", broken)
    figures = check.predicted_figures(["idm"])
    assert figures and all(f.value is None and "RuntimeError: the fake step broke" in f.error for f in figures)
    # the invariants that need predictions fail with the reason; so do those whose measurement raises
    monkeypatch.setattr(guards, "predicted_activation", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(guards, "measured_activation", lambda *a, **k: 1 / 0)
    inv = check.invariants(figures)
    assert len(inv) == 4 and not any(i.ok for i in inv)
    assert all("could not be computed" in i.detail for i in inv)
    baseline = {f.key(): 1000 for f in figures}
    assert evaluate(figures, baseline, tmp_path, inv=inv) == 1
    out = capsys.readouterr().out
    assert "FAIL: idm small 128^3 train predicted_peak_bytes could not be computed: RuntimeError: the fake step broke" in out
    assert "INVARIANT FAILED: " in out and "ZeroDivisionError" in out and "Traceback" not in out
    # --update keeps the failed figures' baseline values (nothing is lost) and still fails
    assert evaluate(figures, baseline, tmp_path, inv=inv, update=True) == 1
    assert check.load_baseline(tmp_path / "out.json") == baseline


# ---------------------------------------------------------------------------------------- invariants


@pytest.mark.slow
def test_every_invariant_fails_with_the_memory_saving_backward_off(monkeypatch):
    # a change that quietly turns the inversion-based backward off: plain autograd through the core
    monkeypatch.setattr(InvertibleUNetCore, "forward", lambda self, x, temb: self.run(x, temb))
    for inv in (check.twin_invariant(), check.unet_invariant(), check.flat_invariant(), check.measured_twin_invariant()):
        assert not inv.ok, inv
        assert "could not be computed" not in inv.detail, inv.detail


@pytest.mark.slow
def test_activations_stored_per_block_fail_the_flat_invariant(monkeypatch):
    """A core that keeps a copy of every layer's output alive through the step (a cache that forgets to
    drop them): its memory grows with the number of blocks, and the flat-in-depth invariant says so."""
    import torch

    forward = InvertibleUNetCore.forward

    def forward_storing(self, x, temb):
        with torch.no_grad():
            state, kept = [x.detach()], []
            for layer in self.layers:
                state = layer(state, temb)
                kept.append([s.clone() for s in state])
        self.__dict__["_kept"] = kept  # alive until the next forward
        return forward(self, x, temb)

    monkeypatch.setattr(InvertibleUNetCore, "forward", forward_storing)
    inv = check.flat_invariant()
    assert not inv.ok and "could not be computed" not in inv.detail, inv


def test_unet_invariant_needs_matched_parameters(monkeypatch):
    monkeypatch.setattr(guards, "_predicted_train_peak", lambda name, overrides=None: 1 if name == "idm" else 1000)
    monkeypatch.setattr(guards, "_params", lambda name, overrides=None: 100 if name == "idm" else 106)
    inv = check.unet_invariant()
    assert not inv.ok and "NOT parameter-matched" in inv.detail and "limit +-5 %" in inv.detail
    monkeypatch.setattr(guards, "_params", lambda name, overrides=None: 100 if name == "idm" else 104)
    assert check.unet_invariant().ok


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ('{"schema": 1}', "expected an object with a 'figures' list"),
        ('{"schema": 99, "figures": []}', "has schema 99"),
        ('{"schema": 1, "figures": [{"model": "idm"}]}', "needs model, preset, size, phase, kind and an integer value"),
        ('{"schema": 1, "figures": [{"model": "idm", "preset": "small", "size": "64", "phase": "train", '
         '"kind": "predicted_peak_bytes", "value": -5}]}', "non-positive value"),
    ],
)
def test_malformed_baselines_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    assert check.main(["--baseline", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--tolerance", "-5%"], ["--tolerance=-3%"], ["--tolerance", "-0.05"],
                                  ["--tolerance", "five"], ["--tolerance", "5%%"]])
def test_bad_tolerance_exits_2_with_one_line(capsys, argv):
    assert check.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad --tolerance") and len(err.splitlines()) == 1, err
    assert "expected one argument" not in err


def test_unknown_flag_and_model_exit_2(capsys):
    assert check.main(["--frobnicate"]) == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err
    assert check.main(["--models", "idm,nope"]) == 2
    assert "unknown model 'nope'; valid models:" in capsys.readouterr().err


def test_check_as_a_subcommand_parser(tmp_path, capsys, monkeypatch):
    """``add_arguments`` + ``run`` as the CLI wires them: a subparser, options parsed there, the gate run."""
    parser = argparse.ArgumentParser(prog="run_bench.py")
    sub = parser.add_subparsers(dest="command")
    check.add_arguments(sub.add_parser("check"))
    ns = parser.parse_args(["check", "--tolerance", "-5%"])
    assert ns.tolerance == "-5%"
    assert check.run(ns) == 2
    assert "bad --tolerance '-5%'" in capsys.readouterr().err
    # a good run says which baseline and tolerance it used, and the table's last column has a header
    figures = committed_figures()
    monkeypatch.setattr(check, "compute", lambda models: (figures, PASSING))
    ns = parser.parse_args(["check", "--baseline", str(COMMITTED), "--tolerance", "7%"])
    assert check.run(ns) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"check: baseline {COMMITTED} ({len(figures)} figures), tolerance 7 % per figure")
    header = next(ln for ln in out.splitlines() if ln.startswith("model "))
    assert header.split()[-1] == "verdict"
    assert f"(baseline {COMMITTED}, tolerance 7 %)" in out.splitlines()[-1]


def test_committed_baseline_is_human_readable():
    data = json.loads(COMMITTED.read_text())
    assert data["schema"] == check.SCHEMA
    assert all("human" in f and f["value"] > 0 for f in data["figures"])
