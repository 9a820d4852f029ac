"""The harness: a real sweep through the CLI writes every contract column; an out-of-memory config becomes
an ``oom`` row and the sweep goes on; a killed or interrupted sweep keeps its rows and ``--resume`` finishes
it without redoing them; timeouts, crashes, the measure-or-predict policy, the budget search, progress."""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

import idmbench
from idmbench import results as R
from idmbench.harness import budget as B
from idmbench.harness.policy import Policy
from idmbench.harness.progress import Progress, summary_table
from idmbench.harness.sweep import done_keys, repair_csv, run_worker
from idmbench.harness.worker import is_oom, reason_line

REPO = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--steps", "1", "--warmup", "1", "--min-energy-window", "0.2", "--no-report"]


def _models() -> list[str]:
    """The two models the sweep tests use: ``idm`` and a baseline (the first two registered otherwise)."""
    names = idmbench.list_models()
    if "idm" in names:
        other = "unet" if "unet" in names else next(n for n in names if n != "idm")
        return ["idm", other]
    return names[:2]


def _sides(models: list[str], preset: str = "tiny") -> list[int]:
    """The two smallest cube sides <= 32 every model accepts."""
    lcm = 1
    for m in models:
        spec = idmbench.get_spec(m)
        v = spec.valid_sides(spec.config(preset))
        lcm = lcm * v // math.gcd(lcm, v)
    sides = [k * lcm for k in range(1, 33) if k * lcm >= 8 and k * lcm <= 32][:2]
    assert len(sides) == 2, f"no two sides <= 32 fit {models}"
    return sides


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_bench.py", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_bench.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def data_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [ln for ln in path.read_text().splitlines()[1:] if ln.strip()]


def wait_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while len(data_lines(path)) < n:
        assert proc.poll() is None, f"sweep ended early: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() - t0 < timeout, "no row landed in time"
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------- real sweeps


def test_sweep_writes_every_contract_column(tmp_path):
    models = _models()
    sides = _sides(models)
    out = tmp_path / "run"
    r = cli("--models", ",".join(models), "--sizes", ",".join(map(str, sides)), "--phases", "train",
            "--budget", "16GiB", "--out", str(out), *FAST)
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
        assert b["budget"] == "16GiB" and int(b["budget_bytes"]) == 16 * 2**30
        assert int(b["largest_side"]) > 0 and int(b["peak_at_largest_bytes"]) <= 16 * 2**30
        assert "constant" in b["source"]
    # the terminal summary
    assert "peak memory (source)" in r.stdout and "cpu-tensors" in r.stdout
    assert "largest trainable cube" in r.stdout and "16GiB" in r.stdout
    assert "ETA" in r.stderr  # progress


def test_oom_row_and_the_sweep_goes_on(tmp_path):
    """An oversized config under --cpu-memory-limit ends as an 'oom' row; the next configs still run."""
    models = _models()
    small = _sides(models)[0]
    big = 128
    for m in models:
        spec = idmbench.get_spec(m)
        spec.check_size((big,) * 3, spec.config("tiny"))
    from idmbench.measure.predict import Predictor

    big_peaks = {m: Predictor(m, "tiny").predict(big, "train", flops=False).peak_bytes for m in models}
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
