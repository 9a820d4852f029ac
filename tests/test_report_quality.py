"""The report's quality section (issue 12, the report's part): quality.csv, training.csv, samples/ and
run.json["quality"] exactly as the quality run writes them, in a folder of their own or beside a sweep.

``write_quality`` writes the agreed format by hand (the quality command is not run: these tests must not
depend on it); expected values come from the fixture's own numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imsave

from idmbench.report import build_report
from idmbench.report.data import load_run
from idmbench.report.quality import cost_figure, loss_figure

from test_report import EVIL, Page, assert_self_contained, write_run

QUALITY_COLUMNS = [
    "model", "preset", "size", "train_steps", "t", "psnr", "ssim", "mae", "psnr_std", "ssim_std", "mae_std",
    "n_volumes", "n_noise", "data_range", "data", "params", "batch", "lr", "seed", "device", "precision",
    "train_time_s", "train_energy_j", "energy_source", "energy_per_param_j", "peak_train_mem_bytes", "mem_source",
    "final_loss", "status", "error", "timestamp",
]
#: per model: PSNR at t = 50 (dB; falls 3 dB per eval step), SSIM at t = 50, training joules and source,
#: peak training memory (bytes), parameters
QMODELS = {
    "idm": dict(psnr=30.0, ssim=0.90, energy=400.0, source="codecarbon-estimate", mem=90 * 2**20, params=1_796_945),
    "unet": dict(psnr=31.0, ssim=0.92, energy=900.0, source="nvml", mem=1_700 * 2**20, params=1_875_969),
    "patchddm": dict(psnr=29.0, ssim=0.88, energy=500.0, source="codecarbon-estimate", mem=110 * 2**20,
                     params=1_850_301),
}
EVAL_T = (50, 250, 500)
STEPS = 60


def write_quality(run_dir: Path, models=("idm", "unet", "patchddm"), samples: int = 2, error_model: str | None = None,
                  run_json: bool = True, heldout_is_train: bool = False, status: str = "complete") -> Path:
    """quality.csv, training.csv, samples/ and run.json["quality"] as the quality run writes them."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "quality.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=QUALITY_COLUMNS)
        w.writeheader()
        for model in models:
            m = QMODELS[model]
            for i, t in enumerate(EVAL_T):
                row = dict(model=model, preset="small", size="32", train_steps=STEPS, t=t, data_range=2.0,
                           data="synthetic", params=m["params"], batch=1, lr=1e-4, seed=0, device="cpu",
                           precision="fp32", timestamp=f"2025-01-02T10:0{i}:00+00:00", status="ok", error="")
                if model == error_model:
                    row.update(status="error", error="RuntimeError: training diverged (loss is nan)")
                else:
                    row.update(psnr=m["psnr"] - 3 * i, ssim=m["ssim"] - 0.05 * i, mae=0.02 + 0.01 * i, psnr_std=0.4,
                               ssim_std=0.01, mae_std=0.002, n_volumes=2, n_noise=4, train_time_s=120.0,
                               train_energy_j=m["energy"], energy_source=m["source"],
                               energy_per_param_j=m["energy"] / m["params"], peak_train_mem_bytes=m["mem"],
                               mem_source="cpu-tensors", final_loss=0.05)
                w.writerow(row)
    rng = np.random.default_rng(0)
    with open(run_dir / "training.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "preset", "step", "loss", "seconds"])
        for model in models:
            for step in range(STEPS):
                w.writerow([model, "small", step, 1.0 / (1 + 0.1 * step) + 0.05 * rng.random(), 2.0 * (step + 1)])
    (run_dir / "samples").mkdir(exist_ok=True)
    for model in models:
        for k in range(samples):
            img = np.outer(np.arange(16), np.arange(48)) * (k + 1)
            imsave(run_dir / "samples" / f"{model}_sample{k}.png", img, cmap="gray")
    if run_json:
        path = run_dir / "run.json"
        meta = json.loads(path.read_text()) if path.exists() else {"environment": {"cpu_model": "AMD EPYC",
                                                                                    "cpu_count": 2}}
        meta["quality"] = {
            "command": "python run_bench.py quality --models " + ",".join(models) + " --size 32",
            "models": list(models), "presets": {m: "small" for m in models}, "size": "32", "data": "synthetic",
            "modalities": [], "n_train": 6, "n_heldout": 2, "heldout_is_train": heldout_is_train,
            "train_steps": STEPS, "batch": 1, "lr": 1e-4, "seed": 0, "eval_t": list(EVAL_T), "samples": samples,
            "sample_steps": 20, "device": "cpu", "precision": "fp32", "started": "2025-01-02T09:00:00+00:00",
            "finished": "2025-01-02T10:05:00+00:00", "status": status, "environment": {"cpu_model": "AMD EPYC"},
        }
        path.write_text(json.dumps(meta, indent=2))
    return run_dir


def test_fixture_matches_the_quality_writer():
    """The agreed format is what the quality run really writes (its row dataclass and training columns)."""
    from idmbench.quality.files import QUALITY_COLUMNS as WRITTEN, TRAINING_COLUMNS

    assert WRITTEN == QUALITY_COLUMNS
    assert TRAINING_COLUMNS == ["model", "preset", "step", "loss", "seconds"]


def _page(run_dir: Path) -> tuple[str, Page]:
    text = build_report(run_dir).read_text(encoding="utf-8")
    return text, Page(text)


def test_quality_only_folder(tmp_path):
    """A folder with a quality run and no results.csv: the page has the quality tables, the loss curves,
    the quality-beside-cost view and every sample in model then sample order, and no sweep sections."""
    run_dir = write_quality(tmp_path / "q", samples=12)
    text, page = _page(run_dir)
    assert_self_contained(page)
    assert 'id="headline"' not in text and 'id="tables"' not in text
    assert "No sweep in this folder" in "".join(page.text)
    scores = page.body("quality-table")
    assert [(r[0], r[1]) for r in scores] == [(m, str(t)) for m in ("idm", "unet", "patchddm") for t in EVAL_T]
    idm250 = scores[1]
    assert idm250[2] == "27.00 ± 0.40" and idm250[3] == "0.850 ± 0.010" and idm250[5] == "2 × 4"
    cost = page.body("quality-cost-table")
    assert [r[0] for r in cost] == ["idm", "unet", "patchddm"]
    head = page.tables["quality-cost-table"][0]
    assert cost[0][head.index("training energy (J, source)")] == "400 (codecarbon-estimate)"
    assert cost[1][head.index("peak training memory (source)")] == "1.66 GiB (cpu-tensors)"
    figs = {a["id"] for a in page.all("figure") if a.get("id", "").startswith("fig-")}
    assert figs == {"fig-loss", "fig-quality-cost"}
    names = [a["alt"].removeprefix("sample ") for a in page.all("img") if a.get("alt", "").startswith("sample ")]
    assert names == [f"{m}_sample{k}.png" for m in ("idm", "unet", "patchddm") for k in range(12)]  # 10 after 9
    facts = "".join(page.text)
    assert "Quality run" in facts and "synthetic" in facts and "6 / 2" in facts
    md = (run_dir / "report.md").read_text()
    assert "## Quality" in md and "27.00 ± 0.40" in md and "## Peak training memory" not in md


def test_quality_beside_a_sweep(tmp_path):
    """Sweep and quality run in one folder: both parts, the sweep's run.json keys kept."""
    run_dir = write_run(tmp_path / "both", models=("idm", "unet", "patchddm"), sizes=("16", "32"))
    write_quality(run_dir)
    text, page = _page(run_dir)
    assert 'id="headline"' in text and "quality-table" in page.tables and "rows-1" in page.tables
    assert {"fig-memory", "fig-loss", "fig-quality-cost"} <= {a.get("id") for a in page.all("figure")}
    assert "No quality run in this folder" not in text


def test_cost_figure_points_are_the_csv_values(tmp_path):
    """Quality beside cost: one point per model at (peak training memory, PSNR) and (training joules, PSNR)
    at the middle evaluation timestep; energy estimates half-filled, nvml filled."""
    run = load_run(write_quality(tmp_path / "q"))
    fig = cost_figure(run)
    assert "t = 250" in fig.caption
    mem_ax, energy_ax = fig.mpl.axes[0], fig.mpl.axes[1]

    def points(ax):
        return {(float(ln.get_xdata()[0]), float(ln.get_ydata()[0])): ln.get_fillstyle()
                for ln in ax.get_lines() if len(ln.get_xdata()) == 1 and ln.get_marker() not in ("", "None", "_")}

    expected_mem = {(float(m["mem"]), m["psnr"] - 3.0): "full" for m in QMODELS.values()}
    assert points(mem_ax) == expected_mem
    expected_energy = {(m["energy"], m["psnr"] - 3.0): "left" if m["source"] == "codecarbon-estimate" else "full"
                       for m in QMODELS.values()}
    assert points(energy_ax) == expected_energy
    labels = [t.get_text() for ax in fig.mpl.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("estimate" in lab for lab in labels) and any("measured" in lab for lab in labels)
    assert "codecarbon-estimate" in fig.caption and "nvml" in fig.caption


def test_loss_curves_are_the_moving_mean_of_training_csv(tmp_path):
    run_dir = write_quality(tmp_path / "q", models=("idm", "unet"))
    fig = loss_figure(load_run(run_dir))
    rows = list(csv.DictReader(open(run_dir / "training.csv")))
    loss = np.array([float(r["loss"]) for r in rows if r["model"] == "idm"])
    win = STEPS // 20
    expected = np.array([loss[max(0, i - win + 1): i + 1].mean() for i in range(len(loss))])
    bold = [ln for ln in fig.mpl.axes[0].get_lines() if ln.get_label() == "idm"]
    assert len(bold) == 1 and np.allclose(bold[0].get_ydata(), expected)
    faint = [ln for ln in fig.mpl.axes[0].get_lines() if ln.get_alpha() and ln.get_alpha() < 1]
    assert any(np.allclose(ln.get_ydata(), loss) for ln in faint)


def test_quality_errors_and_notes(tmp_path):
    """An error row is listed with its one-line reason, escaped; the held-out-is-training note and an
    unfinished run are said."""
    run_dir = write_quality(tmp_path / "q", error_model="unet", heldout_is_train=True, status="interrupted")
    with open(run_dir / "quality.csv", "a", newline="") as fh:
        csv.writer(fh).writerow([EVIL, "small", "32", STEPS, 50] + [""] * 23 + ["error", EVIL, ""])
    text, page = _page(run_dir)
    errors = page.body("quality-errors-table")
    assert [r[0] for r in errors] == ["unet"] * 3 + [EVIL] and "training diverged" in errors[0][4]
    assert EVIL not in text
    assert "unet" not in [r[0] for r in page.body("quality-table")]
    words = "".join(page.text)
    assert "held-out set is the training set" in words and "interrupted" in words


def test_no_spread_from_a_single_draw(tmp_path):
    """One volume × one noise draw has no standard deviation to show: the cell is the mean alone."""
    run_dir = write_quality(tmp_path / "q", models=("idm",))
    frame = pd.read_csv(run_dir / "quality.csv", dtype=str, keep_default_na=False)
    frame["n_volumes"], frame["n_noise"], frame["psnr_std"] = "1", "1", "0.0"
    frame.to_csv(run_dir / "quality.csv", index=False)
    from idmbench.report.quality import scores_table

    rows = scores_table(load_run(run_dir)).rows
    assert [r[2] for r in rows] == ["30.00", "27.00", "24.00"] and rows[0][5] == "1 × 1"


@pytest.mark.parametrize("broken", ["no-json", "training-only"])
def test_partial_quality_folders(tmp_path, broken):
    """Without run.json, or with only training.csv so far (the run is still training), the page builds."""
    run_dir = write_quality(tmp_path / "q", run_json=broken != "no-json")
    if broken == "training-only":
        (run_dir / "quality.csv").unlink()
    text, page = _page(run_dir)
    assert "fig-loss" in {a.get("id") for a in page.all("figure")}
    if broken == "training-only":
        assert "quality-table" not in page.tables
        assert 'id="fig-quality-cost-omitted"' in text
