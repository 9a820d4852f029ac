"""``scripts/gpu_run.sh``'s comparison step cannot pass empty: results files written here (no GPU needed) with
no CUDA rows, with CUDA error rows, with a model never measured on CUDA, or with a ratio off the
prediction fail; good CUDA rows pass, and the table it checked is printed."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from idmbench.harness.compare import compare
from idmbench.results import ResultRow, append_row

from conftest import REPO

GiB = 2**30


def cuda_row(model: str, size: str = "128", phase: str = "train", ratio: float = 1.05, **kw) -> ResultRow:
    pred = 10 * GiB
    base = dict(model=model, preset="paper", size=size, phase=phase, status="ok", params=1000,
                peak_mem_bytes=int(pred * ratio), predicted_peak_bytes=pred, mem_source="cuda-allocator",
                reserved_bytes=int(pred * ratio * 1.1), nvml_used_bytes=int(pred * ratio * 1.1) + GiB // 2,
                energy_source="nvml", energy_j_per_step=100.0, step_time_s=1.0, device="cuda:0")
    base.update(kw)
    return ResultRow(**base)


def results(tmp_path: Path, rows: list[ResultRow]) -> Path:
    for r in rows:
        append_row(tmp_path / "results.csv", r)
    return tmp_path


def run(tmp_path: Path, rows: list[ResultRow], cuda: bool = True) -> tuple[int, str]:
    buf = io.StringIO()
    return compare(results(tmp_path, rows), cuda=cuda, out=buf), buf.getvalue()


def test_good_cuda_rows_pass_and_the_table_is_printed(tmp_path):
    code, out = run(tmp_path, [cuda_row("idm"), cuda_row("unet", ratio=1.2), cuda_row("unet", "256", status="oom",
                                                                                         peak_mem_bytes=None)])
    assert code == 0, out
    header = out.splitlines()[0].split()
    assert header[:3] == ["model", "preset", "size"] and header[-1] == "verdict"
    assert "idm" in out and "1.050" in out and "1.200" in out and "0.90-1.25" in out
    assert "did not fit (oom; a finding, not a failure): unet 256 train" in out
    assert "every model (2) measured on CUDA" in out


def test_no_cuda_rows_fails(tmp_path):
    cpu = [cuda_row("idm", mem_source="cpu-tensors", energy_source="codecarbon-estimate", ratio=1.0)]
    code, out = run(tmp_path, cpu)
    assert code == 1 and "FAIL: no config measured on CUDA for idm" in out
    # nothing measured at all (only predictions) fails even without --cuda
    d = tmp_path / "predicted"
    d.mkdir()
    code, out = run(d, [cuda_row("idm", status="predicted", mem_source="predicted", peak_mem_bytes=None)], cuda=False)
    assert code == 1 and "FAIL: no measured rows" in out


def test_cuda_error_rows_fail(tmp_path):
    rows = [cuda_row("idm"), cuda_row("unet"), cuda_row("unet", "256", status="error", peak_mem_bytes=None,
                                                        error="RuntimeError: cuDNN error")]
    code, out = run(tmp_path, rows)
    assert code == 1
    assert "FAIL: 1 config(s) failed: unet 256 train error: RuntimeError: cuDNN error" in out
    for status in ("timeout", "killed"):
        d = tmp_path / status
        d.mkdir()
        code, out = run(d, [cuda_row("idm"), cuda_row("idm", "256", status=status, peak_mem_bytes=None)])
        assert code == 1 and f"idm 256 train {status}" in out


def test_a_model_without_a_cuda_measurement_fails(tmp_path):
    rows = [cuda_row("idm"), cuda_row("patchddm", status="oom", peak_mem_bytes=None)]
    code, out = run(tmp_path, rows)
    assert code == 1 and "no config measured on CUDA for patchddm" in out


def test_a_ratio_off_the_prediction_or_missing_nvml_energy_fails(tmp_path):
    code, out = run(tmp_path, [cuda_row("idm", ratio=1.4)])
    assert code == 1 and "OFF" in out and "idm 128 train (OFF)" in out
    d = tmp_path / "energy"
    d.mkdir()
    code, out = run(d, [cuda_row("idm", energy_source="none")])
    assert code == 1 and "NO NVML ENERGY" in out


@pytest.mark.slow
def test_command_line_exit_codes(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "idmbench.harness.compare", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    proc = cli(str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    results(tmp_path, [cuda_row("idm", mem_source="cpu-tensors", energy_source="none", ratio=1.0)])
    assert cli(str(tmp_path)).returncode == 0
    proc = cli(str(tmp_path), "--cuda")
    assert proc.returncode == 1 and "no config measured on CUDA for idm" in proc.stdout
