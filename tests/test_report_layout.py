"""The report as a reader meets it (issue 11 item 5, issue 10 item 9, issue 9 item 5): no empty plot frames,
one legend vocabulary, humane units, a header that states each machine fact once, a budget table that
names its preset, energy estimates said in watts, each baseline's settings with their source, models
described by their data (a wavelet model is not a patch model), and a page rebuilt byte for byte.

Fixtures come from ``test_report.write_run`` (and ``test_report_quality.write_quality``); expected values
are the fixtures' own numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest

from idmbench.report import build_report
from idmbench.report.data import load_run
from idmbench.report.plots import all_figures, patch_trained, sampling_figure
from idmbench.report.plotting import byte_tick
from idmbench.report.quality import cost_figure, loss_figure
from idmbench.results import STATUS_OK, STATUS_PREDICTED, STATUSES, ResultRow, append_row

from test_report import Page, write_run
from test_report_quality import write_quality

REPORT_DIR = Path(__file__).resolve().parents[1] / "idmbench" / "report"


def _page(run_dir: Path) -> tuple[str, Page]:
    text = build_report(run_dir).read_text(encoding="utf-8")
    return text, Page(text)


def _omitted(page: Page) -> dict[str, str]:
    return {a["id"].removesuffix("-omitted"): "" for a in page.all("p") if a.get("id", "").endswith("-omitted")}


def _omitted_text(text: str, key: str) -> str:
    return re.search(rf'id="{key}-omitted">(.*?)</p>', text, flags=re.S).group(1)


def _facts(text: str, group: str) -> dict[str, str]:
    """The (name -> value) lines of one header group, e.g. "On what"."""
    block = re.search(rf"<h3>{group}</h3>\s*<dl>(.*?)</dl>", text, flags=re.S)
    assert block, f"no header group {group!r}"
    pairs = re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", block.group(1), flags=re.S)
    return {k: re.sub(r"<[^>]+>", "", v) for k, v in pairs}


def test_predict_only_run_has_no_empty_frames_and_names_the_preset(tmp_path):
    """A --predict run: the two memory figures are drawn (hollow points), the three figures that need a
    measurement are left out with one line each, and the budget table names the preset and how to get the
    answer for the paper-size networks."""
    run_dir = write_run(tmp_path / "p", measured=set(), failures=False, preset="small")
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**meta, "predict_only": True}))
    text, page = _page(run_dir)
    drawn = {a["id"] for a in page.all("figure")}
    assert drawn == {"fig-memory", "fig-sampling"} and len(page.all("img")) == 2
    omitted = _omitted(page)
    assert set(omitted) == {"fig-tradeoff", "fig-throughput", "fig-energy"}
    for key in omitted:
        assert "nothing was measured in this run" in _omitted_text(text, key)
    for fig in all_figures(load_run(run_dir))[0]:  # every drawn figure has points, all hollow (predicted)
        points = [ln for ax in fig.mpl.axes for ln in ax.get_lines() if len(ln.get_xdata()) == 1
                  and ln.get_marker() not in ("", "None", "x")]
        assert points and {ln.get_fillstyle() for ln in points} == {"none"}, fig.key
    budgets = page.tables["budget-table"]
    assert budgets[0][:2] == ["model", "preset"] and {r[1] for r in budgets[1:]} == {"small"}
    caption = re.search(r'<table id="budget-table">\s*<caption>(.*?)</caption>', text, flags=re.S).group(1)
    assert "small" in caption
    assert "<code>python run_bench.py --predict --preset paper --budget 24GiB</code>" in text
    assert _facts(text, "What was run")["timed steps / warm-up"].startswith("none: --predict")
    assert text.count('<p class="legend">') == 1 and "half-filled markers on dashed lines are estimates" in text


def test_paper_preset_needs_no_hint(tmp_path):
    text, _ = _page(write_run(tmp_path / "p", preset="paper"))
    assert "--preset paper --budget 24GiB" not in text


def test_all_failed_run_draws_no_empty_frame(tmp_path):
    run_dir = tmp_path / "oom"
    run_dir.mkdir()
    for size in ("64", "128"):
        for phase in ("train", "sample"):
            append_row(run_dir / "results.csv", ResultRow(model="unet", preset="small", size=size, phase=phase,
                                                          status="oom", error="out of memory"))
    text, page = _page(run_dir)
    assert not page.all("img")
    assert set(_omitted(page)) == {"fig-memory", "fig-sampling", "fig-tradeoff", "fig-throughput", "fig-energy"}
    assert "every training configuration failed (2 oom)" in _omitted_text(text, "fig-memory")


def test_header_states_each_machine_fact_once(tmp_path):
    from idmbench.report.html import run_facts

    cpu = dict(run_facts(load_run(write_run(tmp_path / "cpu", sizes=("16",)))))
    assert list(cpu["On what"]) == [("CPU", "Intel(R) Xeon(R) CPU @ 2.20GHz"), ("torch", "2.13.0"),
                                    ("git revision", "359c327")]  # no GPU lines, no CUDA context on a CPU run
    words = [v for group in cpu.values() for _, v in group]
    assert sum("Xeon" in v for v in words) == 1  # the CPU name once
    gpu = dict(dict(run_facts(load_run(write_run(tmp_path / "gpu", sizes=("16",), gpu=True))))["On what"])
    assert gpu["GPU"] == "NVIDIA H100 80GB HBM3" and gpu["CUDA / driver"] == "12.8 / 570.86"
    assert gpu["CUDA context constant"] == "400 MiB, assumed"  # the fixture's 400 MiB


@pytest.mark.slow  # two full builds: about 7 s of CPU
def test_rebuild_is_byte_identical_and_dated_by_the_run(tmp_path):
    """The page states when the run finished (run.json), not when it was built: rebuilding the same files
    gives the same bytes (a committed sample report does not change when re-reported)."""
    run_dir = write_run(tmp_path / "r", models=("idm", "unet"), sizes=("16", "32"))
    write_quality(run_dir, models=("idm", "unet"), samples=1)
    first_html, first_md = build_report(run_dir).read_bytes(), (run_dir / "report.md").read_bytes()
    second_html, second_md = build_report(run_dir).read_bytes(), (run_dir / "report.md").read_bytes()
    assert first_html == second_html and first_md == second_md
    text = first_html.decode()
    assert "finished 2025-01-02T10:05:00+00:00" in text  # the later of the sweep's and the quality run's end
    assert dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M") not in text


def test_units_are_humane(tmp_path):
    assert byte_tick(2**40) == "1 TiB" and byte_tick(2**29) == "512 MiB" and byte_tick(24 * 2**30) == "24 GiB"
    run = load_run(write_run(tmp_path / "u"))
    figures, _ = all_figures(run)
    memory = next(f for f in figures if f.key == "fig-memory")
    assert memory.png_b64  # rendered as the page renders it (ticks are labelled at draw time)
    labels = [t.get_text() for t in memory.mpl.axes[0].get_yticklabels() if t.get_text()]
    assert labels and all(re.fullmatch(r"\d+(\.\d+)? (MiB|GiB|TiB)", lab) for lab in labels), labels
    assert all(float(lab.split()[0]) < 1024 for lab in labels), labels  # "1 TiB", never "1024 GiB"
    gpu_labels = [t.get_text() for t in memory.mpl.axes[0].texts]
    assert {"16 GiB", "24 GiB", "40 GiB", "80 GiB"} <= set(gpu_labels)  # GiB like the tables, not "GB"


def test_no_byte_literals_in_report_code():
    """Byte formatting goes through idmbench.units (MiB/GiB/TiB constants, fmt_bytes): no 2**20 / 1024**3."""
    pattern = re.compile(r"2\s*\*\*\s*(10|20|30|40)\b|1024\s*\*\*")
    hits = [f"{p.name}:{i}" for p in REPORT_DIR.glob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


def test_report_files_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in REPORT_DIR.glob("*.py")}
    assert all(n <= 400 for n in sizes.values()), sizes


def test_one_legend_vocabulary(tmp_path):
    """Across every plot of the page (a GPU sweep with an estimate among NVML figures, and a quality run):
    measured = filled marker on a solid line, predicted = hollow on dotted, estimate = half-filled on
    dashed; each legend word means the same everywhere; no other line style carries data."""
    run_dir = write_run(tmp_path / "g", sizes=("16", "32", "64", "128"), gpu=True,
                        energy={"unet-ckpt": "codecarbon-estimate"})
    write_quality(run_dir)
    run = load_run(run_dir)
    figures = all_figures(run)[0] + [loss_figure(run), cost_figure(run)]
    assert len(figures) == 7
    entries: dict[str, set[tuple[str, str]]] = {}
    for fig in figures:
        for ax in fig.mpl.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            for handle, label in zip(legend.legend_handles, legend.get_texts()):
                for word in ("measured", "predicted", "estimate"):
                    if label.get_text().startswith(word):
                        entries.setdefault(word, set()).add((handle.get_linestyle(), handle.get_fillstyle()))
            for ln in ax.get_lines():
                if len(ln.get_xdata()) > 1 and ln.get_marker() in ("", "None"):
                    assert ln.get_linestyle() in ("-", ":", "--"), (fig.key, ln.get_linestyle())
                if len(ln.get_xdata()) == 1 and ln.get_marker() not in ("", "None", "x", "_"):
                    assert ln.get_fillstyle() in ("full", "none", "left"), (fig.key, ln.get_fillstyle())
    assert entries == {"measured": {("-", "full")}, "predicted": {(":", "none")}, "estimate": {("--", "left")}}


def test_energy_sentence_gives_the_watts_of_the_rows(tmp_path):
    """Every energy figure an estimate, at a different power per model: the page names the range and
    the median of J/step ÷ s/step instead of an energy plot."""
    run_dir = write_run(tmp_path / "e", sizes=("16", "32"))
    watts = {"idm": 10.0, "unet": 20.0, "unet-ckpt": 30.0, "patchddm": 40.0}
    frame = pd.read_csv(run_dir / "results.csv", dtype=str, keep_default_na=False)
    ok = frame["status"] == "ok"
    frame.loc[ok, "energy_j_per_step"] = [repr(float(t) * watts[m]) for m, t in
                                          zip(frame.loc[ok, "model"], frame.loc[ok, "step_time_s"])]
    frame.to_csv(run_dir / "results.csv", index=False)
    per_row = [watts[m] for m in frame.loc[ok, "model"]]
    text, page = _page(run_dir)
    assert "fig-energy" in _omitted(page)
    sentence = _omitted_text(text, "fig-energy")
    med = statistics.median(per_row)
    assert f"10.0–40.0 W over {len(per_row)} rows (median {med:.1f} W)" in sentence
    assert "codecarbon" in sentence and "estimate" in sentence


def _wavelet_run(tmp_path: Path, model_info: dict | None) -> Path:
    run_dir = write_run(tmp_path / "w", models=("idm", "unet", "patchddm"), sizes=("16", "32"), failures=False)
    for size in ("16", "32"):  # wdm: the network sees 8·C channels at half the side, in both phases
        side = int(size)
        for phase in ("train", "sample"):
            append_row(run_dir / "results.csv", ResultRow(
                model="wdm", preset="tiny", size=size, phase=phase, status="ok", params=80_000,
                peak_mem_bytes=300 * side**3, mem_source="cpu-tensors", step_time_s=0.01 * side,
                voxels_per_s=side**3 / (0.01 * side), voxels=side**3, net_shape=f"{side // 2}x{side // 2}x{side // 2}",
                device="cpu", energy_source="none"))
    meta = json.loads((run_dir / "run.json").read_text())
    meta["models"] = ["idm", "unet", "patchddm", "wdm"]
    if model_info is not None:
        meta["model_info"] = model_info
    (run_dir / "run.json").write_text(json.dumps(meta))
    return run_dir


MODEL_INFO = {
    "idm": {"description": "invertible diffusion model", "family": "idm", "settings": {"base_channels": 16,
            "levels": 3}, "source": "this project (arXiv 2504.10883)", "attention": "invertible checkerboard SDPA",
            "recipe": "full", "prediction": "epsilon", "network_input": "(C, S, S, S)"},
    "unet": {"description": "MONAI DiffusionModelUNet", "family": "unet", "settings": {
             "use_flash_attention": False, "channels": [32, 64, 64]}, "source": "MONAI 3D DDPM tutorial",
             "attention": "naive (N×N matrix)", "recipe": "full", "prediction": "epsilon",
             "network_input": "(C, S, S, S)"},
    "patchddm": {"description": "PatchDDM-3D", "family": "gdunet", "settings": {"skip": "additive",
                 "patch_fraction": 0.5}, "source": "PatchDDM-3D run.sh", "attention": "none", "recipe": "patch",
                 "prediction": "epsilon", "network_input": "(C + 3, S/2, S/2, S/2)"},
    "wdm": {"description": "WDM-3D wavelet diffusion", "family": "gdunet", "settings": {"base": 64},
            "source": "wdm-3d repository", "attention": "none", "recipe": "wavelet", "prediction": "x0",
            "network_input": "(8·C, S/2, S/2, S/2)"},
}


def test_models_are_described_by_their_data(tmp_path):
    """wdm runs at half the side in both phases: it is not a patch-trained model; patchddm is. The
    methodology lists each model's settings and their source; a MONAI baseline on its naive attention
    path is called out in the headline."""
    run_dir = _wavelet_run(tmp_path, MODEL_INFO)
    run = load_run(run_dir)
    assert patch_trained(run) == ["patchddm"]
    labels = [t.get_text() for t in sampling_figure(run).mpl.axes[0].get_legend().get_texts()]
    assert "patchddm (trains on patches)" in labels and "wdm" in labels
    text, page = _page(run_dir)
    train = page.tables["rows-1"]
    sees = train[0].index("network sees (voxels)")
    assert {r[2]: r[sees] for r in train[1:] if r[0] == "wdm"} == {"16³": "8³", "32³": "16³"}
    settings = page.tables["settings-table"]
    assert [h.split(" (")[0] for h in settings[0][1:]] == ["idm", "unet", "patchddm", "wdm"]  # a column per model
    by_model = {h.split(" (")[0]: {r[0]: r[j] for r in settings[1:]} for j, h in enumerate(settings[0]) if j}
    assert by_model["unet"]["settings follow"] == "MONAI 3D DDPM tutorial"
    assert "use_flash_attention = no" in by_model["unet"]["settings"]
    assert by_model["wdm"]["network input"] == "(8·C, S/2, S/2, S/2)" and by_model["wdm"]["predicts"] == "x0"
    assert by_model["patchddm"]["training recipe"] == "patch"
    unet_sentence = next(s for s in build_report_sentences(run_dir) if s.startswith("Against unet:"))
    assert "use_flash_attention=False" in unet_sentence
    assert not any("use_flash_attention" in s for s in build_report_sentences(run_dir) if not s.startswith(
        "Against unet:"))
    assert "voxels the network processes per second (patch voxels for patch-trained models; image voxels " \
           "represented for the wavelet model)" in text


def build_report_sentences(run_dir: Path) -> list[str]:
    from idmbench.report.headline import build_headline

    return build_headline(load_run(run_dir)).sentences


def test_older_run_without_model_info(tmp_path):
    text, page = _page(_wavelet_run(tmp_path, None))
    assert "settings-table" not in page.tables
    assert "run.json holds no per-model settings record" in text


@pytest.mark.parametrize("status", [s for s in STATUSES if s not in (STATUS_OK, STATUS_PREDICTED)])
def test_every_failed_status_is_a_failure(tmp_path, status):
    """Every status of idmbench.results.STATUSES that is not a measurement or a prediction is listed as a
    failure with its reason (a status the harness adds later is handled without a report change)."""
    run_dir = tmp_path / status
    run_dir.mkdir()
    append_row(run_dir / "results.csv", ResultRow(model="idm", preset="small", size="32", phase="train",
                                                  peak_mem_bytes=10**7, mem_source="cpu-tensors"))
    append_row(run_dir / "results.csv", ResultRow(model="unet", preset="small", size="32", phase="train",
                                                  status=status, error=f"why: {status}"))
    text, page = _page(run_dir)
    fails = page.body("failures-table")
    assert [(r[0], r[4], r[5]) for r in fails] == [("unet", status, f"why: {status}")]
    assert re.search(rf'<tr class="status-{status} failed">', text)
