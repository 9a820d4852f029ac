"""idmbench.quality: metrics, scoring, training to a budget, samples, and the ``quality`` command end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import idmbench
from idmbench.data import synthetic_volumes, training_order
from idmbench.quality import files as Q
from idmbench.quality.__main__ import build_parser, main
from idmbench.quality.metrics import score_denoising, volume_metrics
from idmbench.quality.samples import mid_slices, save_mid_slices

AGREED_QUALITY_COLUMNS = (
    "model, preset, size, train_steps, t, psnr, ssim, mae, psnr_std, ssim_std, mae_std, n_volumes, n_noise, "
    "data_range, data, params, batch, lr, seed, device, precision, train_time_s, train_energy_j, energy_source, "
    "energy_per_param_j, peak_train_mem_bytes, mem_source, final_loss, status, error, timestamp"
).split(", ")
RUN_JSON_KEYS = {
    "command", "models", "presets", "size", "data", "modalities", "n_train", "n_heldout", "heldout_is_train",
    "train_steps", "batch", "lr", "seed", "eval_t", "samples", "sample_steps", "device", "precision", "started",
    "finished", "status", "environment",
}


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return idmbench.create_model(name, preset="tiny")


# ------------------------------------------------------------------------------------------ metrics


def test_identical_volumes_score_perfectly():
    x = synthetic_volumes(1, (16, 16, 16), seed=0)[0][None]
    m = volume_metrics(x, x.clone())
    assert float(m["ssim"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(m["mae"][0]) == 0.0
    assert float(m["psnr"][0]) == float("inf")


def test_more_noise_scores_worse():
    x = synthetic_volumes(1, (16, 16, 16), seed=0)[0][None]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    scores = [volume_metrics((x + s * noise).clamp(-1, 1), x) for s in (0.05, 0.2, 0.5)]
    psnr = [float(m["psnr"][0]) for m in scores]
    ssim = [float(m["ssim"][0]) for m in scores]
    mae = [float(m["mae"][0]) for m in scores]
    assert psnr[0] > psnr[1] > psnr[2] and ssim[0] > ssim[1] > ssim[2] and mae[0] < mae[1] < mae[2]
    # PSNR on the [-1, 1] scale (data range 2): 20 log10(2) - 10 log10(MSE)
    mse = float(((x + 0.05 * noise).clamp(-1, 1) - x).pow(2).mean())
    assert psnr[0] == pytest.approx(20 * torch.log10(torch.tensor(2.0)).item() - 10 * torch.log10(torch.tensor(mse)).item(), rel=1e-6)


class _Oracle(torch.nn.Module):
    """Returns the true noise (set before the call): a perfect epsilon predictor."""

    def __init__(self) -> None:
        super().__init__()
        self.eps: torch.Tensor | None = None

    def forward(self, x, timesteps, context=None):
        return self.eps


def test_x0_from_a_perfect_noise_prediction_is_exact():
    from idmbench import diffusion

    x0 = synthetic_volumes(1, (16, 16, 16), seed=0)[0][None]
    sched = diffusion.make_train_scheduler()
    model = _Oracle()
    for t in (0, 250, 999):
        model.eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        tt = torch.tensor([t])
        x_t = sched.add_noise(original_samples=x0, noise=model.eps, timesteps=tt)
        x0_hat = diffusion.predict_x0(model, x_t, tt, sched, spec=idmbench.get_spec("unet"))
        assert torch.allclose(x0_hat, x0, atol=2e-4 if t == 999 else 1e-5), t


def test_scores_are_reproducible_and_use_fixed_noise():
    spec = idmbench.get_spec("unet")
    vols = synthetic_volumes(1, (16, 16, 16), seed=0)
    model = _build("unet")
    a = score_denoising(model, spec, spec.config("tiny"), vols, 250, n_noise=2, seed=0, batch=2)
    b = score_denoising(model, spec, spec.config("tiny"), vols, 250, n_noise=2, seed=0, batch=1)
    c = score_denoising(model, spec, spec.config("tiny"), vols, 250, n_noise=2, seed=1, batch=2)
    assert (a.psnr, a.ssim, a.mae) == pytest.approx((b.psnr, b.ssim, b.mae), rel=1e-9)
    assert a.psnr != c.psnr
    assert (a.n_volumes, a.n_noise, a.data_range) == (1, 2, 2.0)
    low = score_denoising(model, spec, spec.config("tiny"), vols, 50, n_noise=2, seed=0, batch=2)
    assert low.psnr > a.psnr  # less noise at t = 50


# ------------------------------------------------------------------------------------------ samples


def test_mid_slices_pick_the_three_planes(tmp_path):
    v = torch.zeros(8, 10, 12)
    v[4, :, :] = 1.0  # the sagittal mid-plane
    s = mid_slices(v)
    assert s["sagittal"].shape == (12, 10) and s["sagittal"].min() == 1.0
    assert s["axial"].shape == (10, 8) and s["coronal"].shape == (12, 8)
    path = save_mid_slices(torch.stack([v, -v]), tmp_path / "s.png", title="x", channel_names=["t1", "flair"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ learning


@pytest.mark.slow
def test_training_improves_denoising_at_t250():
    """Learning is real: the same seeded network after 8 AdamW steps denoises held-out volumes better."""
    from idmbench.measure.energy import NullEnergyMeter
    from idmbench.quality.train import train_model

    vols = synthetic_volumes(5, (16, 16, 16), seed=0)
    train, held = vols[:4], vols[4:]
    spec = idmbench.get_spec("idm")
    cfg = spec.config("tiny")
    before = score_denoising(_build("idm"), spec, cfg, held, 250, n_noise=2, seed=0, batch=2)
    model = _build("idm")
    res = train_model(model, spec, cfg, train, training_order(4, 8, 1, 0), lr=3e-3, meter=NullEnergyMeter())
    after = score_denoising(model, spec, cfg, held, 250, n_noise=2, seed=0, batch=2)
    assert len(res.losses) == 8 and res.energy_source == "none" and res.mem_source == "rss"
    assert after.psnr > before.psnr + 1.0, (before.psnr, after.psnr)
    assert after.ssim > before.ssim


# ------------------------------------------------------------------------------------------ the command


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_quality_end_to_end_writes_every_file_and_column(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"models": ["idm"], "sizes": ["32"], "status": "complete"}))  # a sweep's
    argv = ["--models", "idm,unet", "--data", "synthetic", "--size", "16", "--preset", "tiny", "--train-steps", "2",
            "--eval-t", "50,250", "--samples", "1", "--sample-steps", "2", "--noise-draws", "1",
            "--synthetic-volumes", "3", "--out", str(out)]
    code, stdout, stderr = _run(argv, capsys)
    assert code == 0, stderr

    assert _header(out / "quality.csv") == AGREED_QUALITY_COLUMNS
    rows = _read(out / "quality.csv")
    assert [(r["model"], r["t"]) for r in rows] == [("idm", "50"), ("idm", "250"), ("unet", "50"), ("unet", "250")]
    for r in rows:
        assert r["status"] == "ok" and r["error"] == ""
        assert (r["preset"], r["size"], r["train_steps"], r["data"], r["device"]) == ("tiny", "16", "2", "synthetic", "cpu")
        assert float(r["psnr"]) > 0 and 0 < float(r["ssim"]) <= 1 and float(r["mae"]) > 0
        assert r["n_volumes"] == "1" and r["n_noise"] == "1" and float(r["data_range"]) == 2.0
        assert int(r["params"]) > 0 and float(r["train_time_s"]) > 0 and float(r["final_loss"]) > 0
        assert r["energy_source"] in Q.ENERGY_SOURCES and r["mem_source"] == "cpu-tensors"
        assert int(r["peak_train_mem_bytes"]) > 4 * int(r["params"])  # at least the parameters' bytes
        if r["energy_source"] != "none":
            assert float(r["energy_per_param_j"]) == pytest.approx(float(r["train_energy_j"]) / int(r["params"]))
    assert float(rows[0]["psnr"]) > float(rows[1]["psnr"])  # t = 50 is easier than t = 250

    assert _header(out / "training.csv") == Q.TRAINING_COLUMNS
    steps = _read(out / "training.csv")
    assert [(r["model"], r["step"]) for r in steps] == [("idm", "0"), ("idm", "1"), ("unet", "0"), ("unet", "1")]
    assert all(float(r["loss"]) > 0 and float(r["seconds"]) > 0 for r in steps)

    for m in ("idm", "unet"):
        assert (out / "samples" / f"{m}_sample0.png").read_bytes()[:4] == b"\x89PNG"

    meta = json.loads((out / "run.json").read_text())
    assert meta["sizes"] == ["32"] and meta["status"] == "complete"  # the sweep's keys are kept
    q = meta["quality"]
    assert RUN_JSON_KEYS <= set(q)
    assert q["status"] == "complete" and q["models"] == ["idm", "unet"] and q["eval_t"] == [50, 250]
    assert q["errors"] == {} and q["params"]["idm"] == int(rows[0]["params"])
    assert (q["n_train"], q["n_heldout"], q["heldout_is_train"]) == (2, 1, False)
    assert "torch_version" in q["environment"]
    assert "idm" in stdout and "PSNR dB" in stdout  # the summary table

    # resume: nothing left to do
    code, _, stderr = _run(["--resume", str(out)], capsys)
    assert code == 0 and stderr.count("already complete, skipped") == 2
    assert len(_read(out / "quality.csv")) == 4 and len(_read(out / "training.csv")) == 4

    # an interrupted model: its t = 250 row and sample gone -> scored again from the saved weights, not retrained
    kept = [r for r in rows if not (r["model"] == "unet" and r["t"] == "250")]
    with open(out / "quality.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=AGREED_QUALITY_COLUMNS)
        w.writeheader()
        w.writerows(kept)
    (out / "samples" / "unet_sample0.png").unlink()
    code, _, stderr = _run(["--resume", str(out)], capsys)
    assert code == 0 and "trained weights loaded" in stderr
    again = _read(out / "quality.csv")
    assert [(r["model"], r["t"]) for r in again][-1] == ("unet", "250") and len(again) == 4
    assert again[-1]["psnr"] == rows[-1]["psnr"]  # the same weights and noise: the same score
    assert len(_read(out / "training.csv")) == 4 and (out / "samples" / "unet_sample0.png").exists()

    # a resumed run refuses another budget
    code, _, stderr = _run(["--resume", str(out), "--train-steps", "5"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--train-steps 2" in stderr


def test_failing_model_becomes_error_rows_and_the_run_goes_on(tmp_path, capsys):
    from idmbench.registry import ModelSpec, register, unregister

    class Broken(torch.nn.Module):
        def __init__(self, in_channels=1, out_channels=1):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, timesteps, context=None):
            raise RuntimeError("broken on purpose\nsecond line")

    register(ModelSpec(name="broken-test", build=lambda in_channels=1, out_channels=1, **cfg: Broken(in_channels, out_channels),
                       presets={"tiny": {}, "small": {}, "paper": {}}, divisor=lambda cfg: 1))
    try:
        out = tmp_path / "run"
        code, _, stderr = _run(["--models", "broken-test", "--size", "16", "--train-steps", "1", "--eval-t", "50,250",
                                "--samples", "0", "--synthetic-volumes", "2", "--out", str(out)], capsys)
    finally:
        unregister("broken-test")
    assert code == 1  # every model failed
    rows = _read(out / "quality.csv")
    assert [(r["model"], r["t"], r["status"]) for r in rows] == [("broken-test", "50", "error"), ("broken-test", "250", "error")]
    assert all("broken on purpose" in r["error"] and "\n" not in r["error"] and r["psnr"] == "" for r in rows)
    q = json.loads((out / "run.json").read_text())["quality"]
    assert q["status"] == "complete" and "broken on purpose" in q["errors"]["broken-test"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--models", "nope"], "unknown model 'nope'; valid models: "),
        (["--models", "unet", "--size", "18"], "--size: unet needs every side divisible by"),
        (["--modalities", "t1"], "--modalities needs --data DIR in the BraTS layout"),
        (["--data", "{missing}"], "no such folder"),
        (["--data", "{empty}"], r"no NIfTI volumes found in .*\*\.nii, \*\.nii\.gz"),
        (["--preset", "huge"], "has no preset 'huge'; valid presets:"),
        (["--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
        (["--resume", "{empty}"], "no run.json there"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, match):
    import re

    (tmp_path / "empty").mkdir()
    argv = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in argv]
    code, _, stderr = _run(argv + ["--out", str(tmp_path / "out"), "--train-steps", "1"], capsys)
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert re.search(match, stderr), stderr


@pytest.mark.parametrize("argv", [["--eval-t", "1000"], ["--train-steps", "-1"], ["--size", "16x16"], ["--precision", "fp8"]])
def test_bad_flag_values_are_rejected_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    err = capsys.readouterr().err
    assert ei.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_out_that_holds_a_quality_run_needs_resume(tmp_path, capsys):
    (tmp_path / "quality.csv").write_text(",".join(AGREED_QUALITY_COLUMNS) + "\n")
    code, _, stderr = _run(["--out", str(tmp_path), "--train-steps", "1"], capsys)
    assert code == 2 and f"--resume {tmp_path}" in stderr


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, says in ((a_file, "is a file, not a folder"), (a_file / "below", f"not writable: {a_file} is a file")):
        code, _, stderr = _run(["--out", str(out), "--train-steps", "1"], capsys)
        assert code == 2 and says in stderr and stderr.count("\n") == 1, stderr


def test_every_flag_has_help_with_a_default():
    p = build_parser()
    for action in p._actions:
        if action.dest in ("help",):
            continue
        assert action.help and action.default is None, action.dest
