"""The harness: a real sweep through the CLI writes every contract column; an out-of-memory config becomes
an ``oom`` row and the sweep goes on; a killed or interrupted sweep keeps its rows and ``--resume`` finishes
it without redoing them; timeouts, crashes, the measure-or-predict policy, the budget search, progress."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

import idmbench
from idmbench import results as R
from idmbench.harness import budget as B
from idmbench.harness.policy import Policy
from idmbench.harness.console import summary_table
from idmbench.harness.progress import Progress
from idmbench.harness.runner import run_worker
from idmbench.results import done_keys, repair_csv

from conftest import FAST, REPO, data_lines, popen, wait_rows
from conftest import bench_models as _models
from conftest import run_cli as cli
from conftest import small_sides as _sides
from idmbench.harness.worker import is_oom, reason_line

# ---------------------------------------------------------------------------------------- real sweeps


@pytest.mark.slow
def test_sweep_writes_every_contract_column(tmp_path):
    models = _models()
    sides = _sides(models)
    out = tmp_path / "run"
    r = cli("--models", ",".join(models), "--sizes", ",".join(map(str, sides)), "--phases", "train",
            "--budget", "1GiB", "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    with open(out / "results.csv", newline="") as fh:
        recs = list(csv.DictReader(fh))
    header = list(recs[0].keys())
    for col in R.CONTRACT_COLUMNS:
        assert col in header, col
    assert len(recs) == 4
    assert {(x["model"], x["size"]) for x in recs} == {(m, str(s)) for m in models for s in sides}
    for x in recs:
        assert x["status"] == "ok", x
        assert x["preset"] == "tiny" and x["phase"] == "train" and x["device"] == "cpu"
        assert x["mem_source"] == "cpu-tensors"
        assert x["energy_source"] != "nvml" and x["energy_source"] in R.ENERGY_SOURCES
        for col in ("params", "peak_mem_bytes", "predicted_peak_bytes", "step_time_s", "step_time_iqr_s",
                    "voxels_per_s", "flops_per_step", "activation_bytes", "rss_peak_bytes"):
            assert x[col] not in ("", None), (col, x)
        if x["energy_source"] != "none":
            assert float(x["energy_j_per_step"]) > 0
        # prediction checked against measurement: the ratio is recorded and within 10 %
        assert 0.9 <= float(x["prediction_ratio"]) <= 1.1, x
        assert float(x["voxels_per_s"]) == pytest.approx(int(x["size"]) ** 3 / float(x["step_time_s"]), rel=1e-6)
        assert int(x["peak_mem_bytes"]) > int(x["activation_bytes"]) > 0
    meta = json.loads((out / "run.json").read_text())
    for k in ("command", "models", "presets", "sizes", "phases", "steps", "warmup", "batch", "precision", "device",
              "device_name", "torch_version", "cuda_version", "driver", "cpu_model", "git_rev", "started", "finished",
              "params", "cuda_context_overhead_bytes"):
        assert k in meta, k
    assert meta["status"] == "complete" and meta["finished"]
    assert meta["presets"] == {m: "tiny" for m in models} and set(meta["params"]) == set(models)
    with open(out / "budgets.csv", newline="") as fh:
        budgets = list(csv.DictReader(fh))
    assert [b["model"] for b in budgets] == models
    for b in budgets:
        assert b["budget"] == "1GiB" and int(b["budget_bytes"]) == 2**30
        assert int(b["largest_side"]) > 0 and int(b["peak_at_largest_bytes"]) <= 2**30
        assert "constant" in b["source"]
    # the terminal summary
    assert "peak memory (source)" in r.stdout and "cpu-tensors" in r.stdout
    assert "largest trainable cube" in r.stdout and "1GiB" in r.stdout
    assert "ETA" in r.stderr  # progress


@pytest.mark.slow
def test_oom_row_and_the_sweep_goes_on(tmp_path):
    """An oversized config under --cpu-memory-limit ends as an 'oom' row; the next configs still run."""
    models = _models()
    small = _sides(models)[0]
    from idmbench.measure.predict import Predictor

    def accepted(side: int) -> bool:
        return all(side % idmbench.get_spec(m).valid_sides(idmbench.get_spec(m).config("tiny")) == 0 for m in models)

    # the smallest side from 128 up at which one model's predicted training peak exceeds the limit
    for big in (s for s in (128, 160, 192, 256) if accepted(s)):
        big_peaks = {m: Predictor(m, "tiny").predict(big, "train", flops=False).peak_bytes for m in models}
        if max(big_peaks.values()) > 1500 * 2**20:
            break
    limit = "1500MiB"
    models.sort(key=lambda m: -big_peaks[m])  # the model that overflows first, then the other one
    assert big_peaks[models[0]] > 1500 * 2**20, "one model's big config must exceed the limit"
    out = tmp_path / "oom"
    r = cli("--models", ",".join(models), "--sizes", f"{small},{big}", "--phases", "train", "--budget", "none",
            "--cpu-memory-limit", limit, "--timeout", "240", "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    rows = R.read_rows(out / "results.csv")
    by = {(x.model, x.size): x for x in rows}
    assert len(rows) == 4
    oom = by[(models[0], str(big))]
    assert oom.status == "oom", oom
    assert "memory" in oom.error.lower() and "cpu-memory-limit" in oom.error
    assert "\n" not in oom.error
    assert oom.predicted_peak_bytes and oom.peak_mem_bytes is None
    # configs after the OOM still ran
    assert by[(models[1], str(small))].status == "ok"
    assert by[(models[0], str(small))].status == "ok"
    assert by[(models[1], str(big))].status in ("ok", "oom", "predicted")
    assert "oom" in r.stdout and "failures:" in r.stdout


@pytest.mark.slow
def test_killed_sweep_keeps_rows_and_resume_completes_without_redoing(tmp_path):
    models = _models()[1:]  # one model, 2 sizes x 2 phases = 4 configs
    sides = _sides(models)
    out = tmp_path / "resume"
    csv_path = out / "results.csv"
    args = ["--models", models[0], "--sizes", ",".join(map(str, sides)), "--phases", "train,sample",
            "--budget", "none", "--out", str(out), *FAST]

    # 1. SIGKILL the sweep after its first row: the row stays, the worker does not outlive it
    p = popen(*args)
    wait_rows(csv_path, 1, p)
    children = psutil.Process(p.pid).children(recursive=True)
    p.kill()
    p.wait(timeout=30)
    first = data_lines(csv_path)
    assert len(first) >= 1
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"orphaned workers: {alive}"

    # 2. resume, then Ctrl-C (SIGINT) after one more row: exit 130, rows kept, a resume hint printed
    p = popen("--resume", str(out), "--no-report")
    wait_rows(csv_path, len(first) + 1, p)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    second = data_lines(csv_path)
    assert second[: len(first)] == first, "resume rewrote earlier rows"
    if p.returncode == 130:
        assert f"--resume {out}" in stderr and "interrupted" in stderr
        assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    else:  # it finished before the signal landed
        assert p.returncode == 0

    # 3. resume to the end: nothing redone, every key exactly once
    r = cli("--resume", str(out), "--no-report")
    assert r.returncode == 0, r.stderr
    final = data_lines(csv_path)
    assert final[: len(second)] == second, "resume rewrote earlier rows"
    keys = [x.key() for x in R.read_rows(csv_path)]
    assert len(keys) == len(set(keys)) == 4
    assert set(keys) == {(models[0], "tiny", str(s), ph) for s in sides for ph in ("train", "sample")}
    assert all(x.status == "ok" for x in R.read_rows(csv_path))
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and len(meta["resumed"]) == 2
    assert "already in" in r.stderr  # it said what it skipped


# ---------------------------------------------------------------------------------------- worker isolation


def test_timeout_kills_the_worker(tmp_path):
    m = _models()[0]
    cfg = {"model": m, "preset": "tiny", "size": [16, 16, 16], "phase": "train", "steps": 10**6,
           "min_energy_window_s": 10**6}
    t0 = time.monotonic()
    res = run_worker(cfg, timeout_s=2.0, log_path=tmp_path / "w.log")
    assert res["status"] == "timeout" and "--timeout 2 s" in res["error"]
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_a_crash_becomes_an_error_with_a_one_line_reason(tmp_path):
    cfg = {"model": "no-such-model", "preset": "tiny", "size": [16, 16, 16], "phase": "train"}
    res = run_worker(cfg, timeout_s=120, log_path=tmp_path / "w.log")
    assert res["status"] == "error"
    assert res["error"].startswith("ValueError: unknown model 'no-such-model'") and "\n" not in res["error"]
    assert "Traceback" in (tmp_path / "w.log").read_text()  # the full story is in the worker log


def test_oom_classification():
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_oom(ValueError("bad size"))
    try:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: 8 bytes\nmore")
    except RuntimeError as exc:
        line = reason_line(exc)
    assert line.startswith("RuntimeError: DefaultCPUAllocator: can't allocate memory") and "\n" not in line


# ---------------------------------------------------------------------------------------- resume helpers


def test_repair_csv_and_done_keys(tmp_path):
    p = tmp_path / "results.csv"
    R.append_row(p, R.ResultRow("m", "tiny", "16", "train", status="ok"))
    R.append_row(p, R.ResultRow("m", "tiny", "16", "sample", status="oom"))
    with open(p, "a") as fh:
        fh.write("m,tiny,32,tr")  # a half-written line from a killed sweep
    repair_csv(p)
    assert done_keys(p) == {("m", "tiny", "16", "train"), ("m", "tiny", "16", "sample")}
    assert p.read_text().endswith("\n")


# ---------------------------------------------------------------------------------------- policy


def _pred(peak: int | None, flops: float | None = 1e9):
    return SimpleNamespace(ok=peak is not None, peak_bytes=peak, flops=flops)


def test_policy_measures_what_fits_and_predicts_the_rest():
    GiB = 2**30
    pol = Policy(device="cpu", max_measure_s=90, available_ram=16 * GiB, flop_rate=10e9, steps=3, warmup=1)
    d = pol.decide("m", "train", _pred(100 * 2**20, 1e9))
    assert d.measure and d.est_s is not None and d.est_s < 90
    d = pol.decide("m", "train", _pred(20 * GiB, 1e9))
    assert not d.measure and "RAM" in d.reason
    d = pol.decide("m", "train", _pred(100 * 2**20, 1e13))
    assert not d.measure and "--max-measure-s" in d.reason
    # a measured rate replaces the calibrated one
    pol.learn("m", "train", 1e9, 30.0)  # 30 s per step: 5.5 steps do not fit 90 s
    assert not pol.decide("m", "train", _pred(100 * 2**20, 1e9)).measure
    assert pol.decide("other", "train", _pred(100 * 2**20, 1e9)).measure
    # with a memory limit, configs above it are run on purpose (the OOM path)
    lim = Policy(device="cpu", max_measure_s=90, available_ram=16 * GiB, flop_rate=10e9, cpu_memory_limit=1 * GiB)
    d = lim.decide("m", "train", _pred(3 * GiB, 1e9))
    assert d.measure and "OOM" in d.reason
    # the sweep's own budget (--max-sweep-s): nothing is started once it is spent
    late = Policy(device="cpu", max_measure_s=90, available_ram=16 * GiB, flop_rate=10e9, deadline=time.monotonic() - 1)
    d = late.decide("m", "train", _pred(100 * 2**20, 1e9))
    assert not d.measure and "--max-sweep-s" in d.reason
    soon = Policy(device="cpu", max_measure_s=90, available_ram=16 * GiB, flop_rate=10e9, deadline=time.monotonic() + 8)
    assert not soon.decide("m", "train", _pred(100 * 2**20, 1e10)).measure  # ~9 s needed, 8 s left
    assert soon.budget_s() <= 8
    # --predict and GPUs
    assert not Policy(device="cpu", predict_only=True).decide("m", "train", _pred(1)).measure
    assert Policy(device="cuda:0").decide("m", "train", _pred(500 * GiB, 1e15)).measure


def test_worker_gives_up_early_when_the_warmup_step_is_too_slow():
    from idmbench.harness.worker import SkipMeasurement, _check_time_budget

    cfg = {"time_budget_s": 30, "steps": 3, "min_energy_window_s": 1.0, "_t0": time.perf_counter()}
    _check_time_budget(cfg, 1.0)  # ~6 s left to do: fine
    with pytest.raises(SkipMeasurement, match="warm-up step took 12.0 s"):
        _check_time_budget(cfg, 12.0)
    _check_time_budget({"steps": 3}, 1000.0)  # no budget: never skips


# ---------------------------------------------------------------------------------------- budgets


def test_largest_fitting_side_matches_brute_force():
    import random

    rnd = random.Random(0)
    for _ in range(60):
        mult = rnd.choice([4, 8, 16, 32])
        a, b, p = 10 ** rnd.uniform(5, 10), 10 ** rnd.uniform(-6, 3), rnd.uniform(2.5, 6)
        calls = []

        def peak(s, a=a, b=b, p=p):
            calls.append(s)
            return int(a + b * s**p)

        rows = B.budget_rows("m", "tiny", [(f"{g}GiB", g * 2**30) for g in (16, 24, 40, 80)], peak, mult)
        for row in rows:
            best = None
            for k in range(1, 1024 // mult + 1):
                if peak(k * mult) + B.CUDA_CONTEXT_BYTES <= row.budget_bytes:
                    best = k * mult
            assert row.largest_side == best, (mult, a, b, p, row)
            assert row.capped == (best is not None and best == (1024 // mult) * mult)
            if best is not None:
                assert row.peak_at_largest_bytes == peak(best) + B.CUDA_CONTEXT_BYTES <= row.budget_bytes


def test_budget_when_nothing_fits_and_failed_predictions():
    rows = B.budget_rows("m", "p", [("1GiB", 2**30)], lambda s: 10 * 2**30, 8)
    assert rows[0].largest_side is None and "needs" in rows[0].note
    rows = B.budget_rows("m", "p", [("1GiB", 2**30)], lambda s: None, 8)
    assert rows[0].largest_side is None and rows[0].note == "prediction failed"


# ---------------------------------------------------------------------------------------- output


def test_progress_lines_and_summary_table():
    buf = io.StringIO()
    pr = Progress([10.0, 20.0, 0.05], stream=buf, tty=False)
    pr.begin(0, "idm 16^3 train", "measuring")
    pr.finish(0, "idm 16^3 train: ok")
    pr.begin(1, "idm 32^3 train")
    assert pr.eta_s() > 0
    pr.finish(1, "idm 32^3 train: ok")
    pr.begin(2, "idm 64^3 train")
    pr.finish(2, "idm 64^3 train: predicted", measured=False)
    pr.close()
    text = buf.getvalue()
    assert "[1/3] idm 16^3 train: ok" in text and "[3/3]" in text and "ETA" in text
    rows = [
        R.ResultRow("idm", "tiny", "16", "train", status="ok", peak_mem_bytes=2**20, mem_source="cpu-tensors",
                    step_time_s=0.5, step_time_iqr_s=0.02, energy_j_per_step=3.0, energy_source="codecarbon-estimate",
                    prediction_ratio=1.0),
        R.ResultRow("idm", "tiny", "256", "train", status="predicted", peak_mem_bytes=2**34, mem_source="predicted",
                    predicted_peak_bytes=2**34),
        R.ResultRow("unet", "tiny", "128", "train", status="oom", predicted_peak_bytes=2**35, error="x"),
    ]
    table = summary_table(rows)
    assert "1.00 MiB cpu-tensors" in table and "16.00 GiB predicted" in table and "codecarbon-estimate" in table
    assert "oom" in table and "32.00 GiB predicted" in table


def test_gpu_script_is_valid_bash_and_compare_runs_on_cpu_results(tmp_path):
    r = subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_run.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from idmbench.harness.compare import compare

    p = tmp_path / "results.csv"
    R.append_row(p, R.ResultRow("m", "tiny", "16", "train", status="ok", peak_mem_bytes=1000, mem_source="cpu-tensors",
                                predicted_peak_bytes=1000))
    buf = io.StringIO()
    assert compare(tmp_path, out=buf) == 0 and "1.000" in buf.getvalue()
    R.append_row(p, R.ResultRow("m", "tiny", "32", "train", status="ok", peak_mem_bytes=1300, mem_source="cpu-tensors",
                                predicted_peak_bytes=1000))
    assert compare(tmp_path, out=io.StringIO()) == 1
    R.append_row(p, R.ResultRow("m", "paper", "128", "train", status="ok", peak_mem_bytes=1100, mem_source="cuda-allocator",
                                predicted_peak_bytes=1000, energy_source="none"))
    buf = io.StringIO()
    assert compare(tmp_path, out=buf) == 1 and "ENERGY" in buf.getvalue()


PLUGIN = '''
import torch
from idmbench.registry import ModelSpec, register


class Toy(torch.nn.Module):
    def __init__(self, in_channels=1, out_channels=1, width=4):
        super().__init__()
        self.a = torch.nn.Conv3d(in_channels, width, 3, padding=1)
        self.t = torch.nn.Embedding(1000, width)
        self.b = torch.nn.Conv3d(width, out_channels, 3, padding=1)

    def forward(self, x, timesteps, context=None):
        h = self.a(x) + self.t(timesteps.expand(x.shape[0]))[:, :, None, None, None]
        return self.b(torch.nn.functional.silu(h))


register(ModelSpec(name="toy-plugin", build=lambda in_channels=1, out_channels=1, **cfg: Toy(in_channels, out_channels, **cfg),
                   presets={"tiny": {"width": 4}, "small": {"width": 8}, "paper": {"width": 16}}, divisor=lambda cfg: 1))
'''


@pytest.mark.slow
def test_model_registered_at_run_time_reaches_the_workers(tmp_path, monkeypatch):
    """A model registered with idmbench.register() in the user's own module (no entry point) is
    measured too: the workers import that module."""
    from idmbench.harness.sweep import SweepOptions, run_sweep
    from idmbench.registry import unregister

    (tmp_path / "my_models.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.import_module("my_models")
    try:
        opts = SweepOptions(models=["toy-plugin"], presets={"toy-plugin": "tiny"}, sizes=[(8, 8, 8)], out=tmp_path / "run",
                            phases=["train"], steps=1, min_energy_window_s=0.1, max_measure_s=120, report=False)
        out, err = io.StringIO(), io.StringIO()
        assert run_sweep(opts, out=out, err=err) == 0, err.getvalue()
        rows = R.read_rows(tmp_path / "run" / "results.csv")
        assert [r.status for r in rows] == ["ok"], (rows, err.getvalue())
        assert rows[0].model == "toy-plugin" and 0.9 <= rows[0].prediction_ratio <= 1.1
        assert "toy-plugin" in out.getvalue()
    finally:
        unregister("toy-plugin")
        sys.modules.pop("my_models", None)


# ---------------------------------------------------------------------------------------- measure first


def _identity_gap(row: R.ResultRow) -> int:
    """Bytes of persistent state a row implies: peak - activation (the one definition's subtrahend)."""
    return int(row.peak_mem_bytes) - int(row.activation_bytes)


def _check_activation_identity(rows: list[R.ResultRow]) -> None:
    """peak - activation = parameters (+ gradients + AdamW's two moments, training) + the small rest
    (AdamW step counters, buffers): 16 bytes per fp32 parameter when training, 4 when sampling."""
    for r in rows:
        per_param = 16 if r.phase == "train" else 4
        state = per_param * int(r.params)
        rest = _identity_gap(r) - state
        assert 0 <= rest <= 0.02 * state + 64 * 1024, (r.key(), r.status, _identity_gap(r), state)


@pytest.mark.slow
def test_interrupt_right_after_the_first_row_keeps_it(tmp_path, sigint_raises):
    """Ctrl-C (a SIGINT sent from the row hook, so the timing is exact) right after the first config:
    that row is on disk; before it only its own prediction ran (no other config predicted, no budget
    search); the sweep says how to resume; and the measured row satisfies the activation identity."""
    import os

    from idmbench.harness.sweep import Sweep, SweepOptions

    model = _models()[0]
    side = _sides([model])[0]
    out = tmp_path / "run"
    opts = SweepOptions(models=[model], presets={model: "tiny"}, sizes=[(side,) * 3, (2 * side,) * 3], out=out,
                        phases=["train", "sample"], steps=1, min_energy_window_s=0.1,
                        budgets=[("16GiB", 16 * 2**30)], report=False, max_measure_s=600)
    seen: dict = {}

    def on_row(row):
        seen.update(row=row, predictions=len(sweep.preds), budgets=(out / "budgets.csv").exists())
        os.kill(os.getpid(), signal.SIGINT)

    err = io.StringIO()
    sweep = Sweep(opts, out=io.StringIO(), err=err, on_row=on_row)
    assert sweep.run() == 130
    rows = R.read_rows(out / "results.csv")
    assert [r.key() for r in rows] == [(model, "tiny", str(side), "train")] and rows[0].status == "ok", rows
    assert seen["predictions"] == 1 and not seen["budgets"]
    assert "interrupted: 1 finished row(s) kept" in err.getvalue() and f"--resume {out}" in err.getvalue()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert rows[0].warmup == 1 and rows[0].steps >= 1
    _check_activation_identity(rows)


@pytest.mark.slow
def test_predicted_rows_and_resume_reuses_budget_searches(tmp_path, monkeypatch):
    """A --predict sweep: rows labelled predicted with nothing warmed up or timed, the activation identity
    on every row; a resume of the finished folder redoes no budget search, and one that lacks a model's
    budget rows searches that model only."""
    import dataclasses

    from idmbench.harness.sweep import SweepOptions, run_sweep

    models = _models()
    side = _sides(models)[0]
    out = tmp_path / "pred"
    opts = SweepOptions(models=models, presets={m: "tiny" for m in models}, sizes=[(side,) * 3], out=out,
                        phases=["train", "sample"], predict_only=True, budgets=[("1GiB", 2**30)], report=False)
    err = io.StringIO()
    assert run_sweep(opts, out=io.StringIO(), err=err) == 0, err.getvalue()
    rows = R.read_rows(out / "results.csv")
    assert len(rows) == 4 and all(r.status == "predicted" for r in rows)
    assert all(r.warmup == 0 and r.steps == 0 and r.step_time_s is None for r in rows)
    _check_activation_identity(rows)
    budgets_before = (out / "budgets.csv").read_text()
    assert [b.model for b in B.read_budgets(out / "budgets.csv")] == models

    real = B.budget_rows
    monkeypatch.setattr(B, "budget_rows", lambda *a, **k: pytest.fail("a finished budget search was redone"))
    again = dataclasses.replace(opts, resume=True)
    assert run_sweep(again, out=io.StringIO(), err=io.StringIO()) == 0
    assert (out / "budgets.csv").read_text() == budgets_before
    assert len(R.read_rows(out / "results.csv")) == 4

    B.write_budgets(out / "budgets.csv", [b for b in B.read_budgets(out / "budgets.csv") if b.model != models[1]])
    searched = []
    monkeypatch.setattr(B, "budget_rows", lambda model, *a, **k: searched.append(model) or real(model, *a, **k))
    assert run_sweep(again, out=io.StringIO(), err=io.StringIO()) == 0
    assert searched == [models[1]]
    assert (out / "budgets.csv").read_text() == budgets_before


# ---------------------------------------------------------------------------------------- how a worker died


def test_sigkill_is_labelled_from_evidence():
    from idmbench.harness.runner import sigkill_result

    GiB = 2**30
    r = sigkill_result({"cgroup": 0, "system": 4}, {"cgroup": 1, "system": 5}, 3 * GiB, None, 12.0)
    assert r.status == "oom" and "out-of-memory killer" in r.error and "memory.events" in r.error
    r = sigkill_result({"system": 4}, {"system": 4}, int(7.9 * GiB), 8 * GiB, 12.0)
    assert r.status == "oom" and "cgroup memory limit" in r.error
    r = sigkill_result({"system": 4}, {"system": 4}, 1 * GiB, 8 * GiB, 12.0)
    assert r.status == "killed" and "SIGKILL, cause unknown" in r.error
    r = sigkill_result({}, {}, None, None, 1.0)
    assert r.status == "killed" and "no OOM-kill counter readable" in r.error
    assert "killed" in R.STATUSES


@pytest.mark.slow
def test_a_worker_killed_from_outside_is_killed_not_oom(tmp_path):
    import threading

    m = _models()[0]
    cfg = {"model": m, "preset": "tiny", "size": [16, 16, 16], "phase": "train", "steps": 10**6,
           "min_energy_window_s": 10**6}
    me = psutil.Process()

    def kill_the_worker() -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            for c in me.children(recursive=True):
                try:
                    if "idmbench.harness.worker" in " ".join(c.cmdline()):
                        time.sleep(1.0)
                        c.send_signal(signal.SIGKILL)
                        return
                except psutil.Error:
                    pass
            time.sleep(0.1)

    th = threading.Thread(target=kill_the_worker, daemon=True)
    th.start()
    res = run_worker(cfg, timeout_s=300, log_path=tmp_path / "w.log")
    th.join(timeout=5)
    assert res.status == "killed", res
    assert "SIGKILL, cause unknown" in res.error


# ---------------------------------------------------------------------------------------- time estimates


def test_estimator_learns_from_measured_configs():
    from idmbench.harness import estimate as X
    from idmbench.harness.records import WorkerResult

    est = X.TimeEstimator(flop_rate=1e10, steps=3, warmup=1, min_window_s=1.0,
                          family_of=lambda m: "unet" if m.startswith("unet") else m)
    # nothing measured: the prior, labelled a guess
    e = est.estimate("idm", "train", 1e10)
    t = (1e10 / X.PRIOR_EFFICIENCY + X.PRIOR_STEP_FLOPS) / 1e10
    assert e.guess and e.step_s == pytest.approx(t)
    assert e.seconds == pytest.approx(X.WORKER_STARTUP_S + X.METER_OVERHEAD_S
                                      + (X.FIRST_STEP_FACTOR + X.TRACKED_STEP_FACTOR + 3) * t)
    # one measured config: step time, untimed steps (warm-up + tracked step) and overhead are learned
    res = WorkerResult(status="ok", step_time_s=2.0, phase_s={"warmup": 3.0, "track": 5.0, "window": 6.0, "process": 30.0})
    est.learn("idm", "train", 1e10, res)
    e = est.estimate("idm", "train", 1e10)
    assert not e.guess and e.step_s == pytest.approx(2.0)
    assert e.seconds == pytest.approx(30.0)  # 16 s overhead + (4 untimed + 3 timed) x 2 s: the run it learned from
    assert est.step_s("idm", "train", 8e10) == pytest.approx(2.0 * 8 ** X.SCALE_EXPONENT)
    # two sizes: the affine fit through them (fixed per-step cost + FLOPs / rate)
    est.learn_rate("idm", "train", 8e10, 9.0)  # slope 1e-10 s/FLOP, fixed cost 1 s
    assert est.step_s("idm", "train", 64e10) == pytest.approx(1.0 + 64.0)
    # a family member informs the other; other families do not
    est.learn_rate("unet", "sample", 1e10, 0.5)
    assert est.estimate("unet-ckpt", "sample", 1e10).guess is False
    assert est.estimate("patchddm", "sample", 1e10).guess is True
    # the overhead learned for idm is the best guess for a model not yet run
    assert est.estimate("patchddm", "sample", 1e10).seconds > 16.0


def test_run_json_keeps_other_keys_and_describes_the_models(tmp_path):
    """run.json: a resumed sweep keeps its first command and what a quality run wrote into the same
    folder (even a write that lands while the sweep runs), and says how each model was configured."""
    from idmbench.harness.metadata import RunMeta
    from idmbench.harness.sweep import SweepOptions

    m = _models()[0]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"command": "python run_bench.py first", "quality": {"rows": 3}}))
    opts = SweepOptions(models=[m], presets={m: "tiny"}, sizes=[(16, 16, 16)], out=tmp_path, resume=True,
                        command="python run_bench.py --resume x", env={"torch_version": "t"})
    meta = RunMeta(path)
    meta.start(opts)
    on_disk = json.loads(path.read_text())
    assert on_disk["quality"] == {"rows": 3} and on_disk["command"] == "python run_bench.py first"
    assert on_disk["resumed"][0]["command"] == "python run_bench.py --resume x"
    info = on_disk["model_info"][m]
    assert info == json.loads(json.dumps(idmbench.get_spec(m).describe(idmbench.get_spec(m).config("tiny"), "tiny")))
    assert "attention" in info and info["preset"] == "tiny"
    data = json.loads(path.read_text())
    data["quality"] = {"rows": 4}
    data["quality_extra"] = True
    path.write_text(json.dumps(data))  # a quality run writes meanwhile
    meta.finish("complete")
    final = json.loads(path.read_text())
    assert final["quality"] == {"rows": 4} and final["quality_extra"] is True and final["status"] == "complete"
