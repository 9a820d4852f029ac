"""The report (issue 5): a self-contained HTML page and a Markdown summary built from a run folder.

Most tests use ``write_run``, which writes a realistic results folder with ``idmbench.results.append_row``
(four models × five sizes × two phases on a CPU machine: measured small sizes, predicted large ones,
an ``oom``, an ``error`` and a ``timeout``, run.json and budgets.csv), so they do not depend on the
harness; the other report test files import it from here. ``test_report_on_real_sweep`` runs the real
harness (and fails, not skips, when it cannot); the browser test renders the page in headless Chromium.
Expected values are computed from the fixture's own numbers, never with the report's functions.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from idmbench.report import build_report
from idmbench.report.data import load_run, size_text
from idmbench.report.headline import build_headline
from idmbench.results import ResultRow, append_row, read_rows

REPO = Path(__file__).resolve().parents[1]
EVIL = "<script>alert(1)</script>"
EVIL_ERROR = 'RuntimeError: bad <img src=x onerror="alert(2)"> & more'

# ----------------------------------------------------------------------------------------------------------
# fixture: a realistic run folder
# ----------------------------------------------------------------------------------------------------------

#: power the fixture's codecarbon estimate implies on a CPU run (energy per step = this × step time), W
CPU_WATTS = 35.0
#: bytes per voxel of the network's working set in a training / sampling step, and parameter counts
MODELS = {
    "idm": dict(train=220.0, sample=90.0, params=1_180_000, net=1.0, time=1.6),
    "unet": dict(train=1_500.0, sample=260.0, params=3_520_000, net=1.0, time=1.0),
    "unet-ckpt": dict(train=520.0, sample=260.0, params=3_520_000, net=1.0, time=1.35),
    "patchddm": dict(train=1_500.0, sample=260.0, params=3_600_000, net=0.5, time=1.0),
}
SIZES = ("16", "32", "64", "128", "256")
MEASURED = {"16", "32"}  # sizes run for real on this "CPU machine"; larger ones are predicted


def model_peak(model: str, side: int, phase: str) -> int:
    """The fixture's peak memory of one step (bytes): state (weights, grads, AdamW) + working set."""
    m = MODELS.get(model, MODELS["unet"])
    net_side = side * (m["net"] if phase == "train" else 1.0)
    state = m["params"] * (16 if phase == "train" else 4)
    return int(state + m[phase] * net_side**3)


def write_run(run_dir: Path, models=("idm", "unet", "unet-ckpt", "patchddm"), sizes=SIZES, phases=("train", "sample"),
              budgets=True, run_json=True, error_text="RuntimeError: worker exited with signal 9", gpu=False,
              energy: dict[str, str] | None = None, measured: set[str] | None = None, failures: bool = True,
              preset: str = "tiny") -> Path:
    """Write results.csv (+ run.json, budgets.csv) as the harness would for a CPU sweep (``gpu``: a CUDA
    sweep: allocator peaks, reserved and NVML memory, NVML energy); return run_dir.

    unet train 64³ is an ``oom`` (measured attempt under a memory limit, with its prediction), unet-ckpt
    sample 32³ an ``error`` carrying ``error_text``, patchddm train 64³ a ``timeout``; the rest is ``ok``
    at the measured sizes and ``predicted`` above them. ``energy`` maps a model to its energy_source
    (default codecarbon-estimate on CPU, nvml on GPU); ``measured`` replaces the measured sizes (an empty
    set: a predict-only run); ``failures=False`` leaves the three failures out; ``preset`` names the preset.
    """
    measured_sizes, idm_64_measured = (MEASURED, True) if measured is None else (set(measured), False)
    ctx = 400 * 2**20
    device, device_name = ("cuda:0", "NVIDIA H100 80GB HBM3") if gpu else ("cpu", "Intel(R) Xeon(R) CPU @ 2.20GHz")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    csv = run_dir / "results.csv"
    for model in models:
        m = MODELS.get(model, MODELS["unet"])
        for size in sizes:
            side = int(size)
            for phase in phases:
                peak = model_peak(model, side, phase)
                net = int(side * m["net"]) if phase == "train" else side
                row = ResultRow(model=model, preset=preset, size=size, phase=phase, params=m["params"], device=device,
                                voxels=side**3, net_shape=f"{net}x{net}x{net}", batch=1, precision="fp32", steps=2,
                                warmup=1, device_name=device_name, torch_version="2.13.0",
                                git_rev="359c327", timestamp="2025-01-01T12:00:00", seed=0)
                row.flops_per_step = 2.0e3 * side**3 * (3 if phase == "train" else 1)
                failure = {("unet", "64", "train"): "oom", ("unet-ckpt", "32", "sample"): "error",
                           ("patchddm", "64", "train"): "timeout"}.get((model, size, phase)) if failures else None
                if failure:
                    row.status = failure
                    row.predicted_peak_bytes = peak
                    row.error = {"oom": "out of memory: worker hit --cpu-memory-limit 2GiB",
                                 "error": error_text, "timeout": "no result within --timeout 600 s"}[failure]
                elif size in measured_sizes or (idm_64_measured and model == "idm" and size == "64"):
                    t = m["time"] * (3 if phase == "train" else 1) * 2.0e-7 * net**3 + 0.01
                    measured = int(peak * (1.0 + 0.02 * (side % 3)))
                    row.status, row.mem_source = "ok", "cuda-allocator" if gpu else "cpu-tensors"
                    row.peak_mem_bytes, row.predicted_peak_bytes = measured, peak
                    row.prediction_ratio = measured / peak
                    row.activation_bytes = measured - m["params"] * (16 if phase == "train" else 4)
                    if gpu:
                        row.reserved_bytes = int(measured * 1.1)
                        row.nvml_used_bytes = row.reserved_bytes + ctx
                        t /= 50
                    else:
                        row.rss_peak_bytes = measured + 350 * 2**20
                    row.step_time_s, row.step_time_iqr_s = t, 0.08 * t
                    row.voxels_per_s = side**3 / t
                    src = (energy or {}).get(model, "nvml" if gpu else "codecarbon-estimate")
                    row.energy_j_per_step, row.energy_source = (300.0 if gpu else CPU_WATTS) * t, src
                    row.energy_window_s, row.wall_s, row.loss = max(1.0, 3 * t), 4.0 + 3 * t, 1.02
                    row.notes = "measured: fits in RAM and in the time budget"
                else:
                    row.status, row.mem_source, row.peak_mem_bytes = "predicted", "predicted", peak
                    row.predicted_peak_bytes = peak
                    row.steps = row.warmup = 0
                    row.notes = "not measured: estimated 5 min to measure > --max-measure-s 90 s"
                append_row(csv, row)
    if run_json:
        meta = {
            "command": "python run_bench.py --models " + ",".join(models) + " --sizes " + ",".join(sizes)
                       + f" --preset {preset} --steps 2 --warmup 1 --budget 16GiB,24GiB,40GiB,80GiB",
            "models": list(models), "presets": {m: preset for m in models}, "sizes": list(sizes),
            "phases": list(phases), "steps": 2, "warmup": 1, "batch": 1, "precision": "fp32", "device": device,
            "device_name": device_name, "torch_version": "2.13.0", "cuda_version": "12.8" if gpu else None,
            "driver": "570.86" if gpu else None, "cpu_model": "Intel(R) Xeon(R) CPU @ 2.20GHz", "git_rev": "359c327",
            "started": "2025-01-01T12:00:00+00:00", "finished": "2025-01-01T12:09:30+00:00",
            "params": {m: MODELS.get(m, MODELS["unet"])["params"] for m in models},
            "cuda_context_overhead_bytes": ctx,
        }
        (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    if budgets:  # as idmbench.harness.budget writes it: predicted peak + the context constant must fit
        lines = ["model,preset,budget,budget_bytes,largest_side,peak_at_largest_bytes,predicted_peak_bytes,"
                 "context_bytes,batch,precision,capped,source,note"]
        for model in models:
            for gib in (16, 24, 40, 80):
                fits = [s for s in range(16, 513, 16) if model_peak(model, s, "train") + ctx <= gib * 2**30]
                side = fits[-1] if fits else ""
                pred = model_peak(model, side, "train") if fits else ""
                peak = pred + ctx if fits else ""
                capped = bool(fits) and side == 512
                lines.append(f"{model},{preset},{gib}GiB,{gib * 2**30},{side},{peak},{pred},{ctx},1,fp32,{capped},"
                             f"predicted,{'search capped at 512' if capped else ''}")
        (run_dir / "budgets.csv").write_text("\n".join(lines) + "\n")
    return run_dir


# ----------------------------------------------------------------------------------------------------------
# a small HTML inspector
# ----------------------------------------------------------------------------------------------------------


class Page(HTMLParser):
    """Collects what the assertions need: every tag with its attributes, the text of every table row
    (by table id) and the text content."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.table_attrs: dict[str, dict[str, str]] = {}
        self.text: list[str] = []
        self._table: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "table":
            tid = a.get("id", f"table{len(self.tables)}")
            self._table.append(tid)
            self.tables[tid] = []
            self.table_attrs[tid] = a
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table[-1]].append(self._row)
            self._row = None
        elif tag == "table" and self._table:
            self._table.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag]

    def body(self, tid: str) -> list[list[str]]:
        """Rows of table ``tid`` without its header row."""
        return self.tables[tid][1:]


def assert_self_contained(page: Page) -> None:
    """No element loads anything from the network; no script at all."""
    assert not page.all("script"), "the report must not contain scripts"
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "action", "data", "poster"):
            if name not in attrs:
                continue
            v = attrs[name].strip().lower()
            assert not v.startswith(("http://", "https://", "//", "ftp:", "file:")), f"<{tag} {name}={v[:60]!r}>"
            if name == "src":
                assert v.startswith("data:image/png;base64,"), f"<{tag} src={v[:60]!r}> is not an inline PNG"
            if name == "href":
                assert v.startswith("#"), f"<{tag} href={v!r}> leaves the page"
    links = page.all("link")
    assert not links, f"no external stylesheets/fonts: {links}"


def page_text(page: Page) -> str:
    """The page's text content, tags removed (entities decoded)."""
    return "".join(page.text)


def decode_png(src: str) -> bytes:
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return data


def png_size(data: bytes) -> tuple[int, int]:
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ----------------------------------------------------------------------------------------------------------
# tests on the fixture run
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fixture run with the injected model and error message, reported once for the module."""
    run_dir = write_run(tmp_path_factory.mktemp("run"), models=("idm", "unet", "unet-ckpt", "patchddm", EVIL),
                        error_text=EVIL_ERROR)
    out = build_report(run_dir)
    text = out.read_text(encoding="utf-8")
    return run_dir, out, text, Page(text)


def test_build_report_writes_html_and_md(built):
    run_dir, out, text, _ = built
    assert out == run_dir / "report.html" and out.is_file()
    assert (run_dir / "report.md").is_file()
    assert text.lstrip().lower().startswith("<!doctype html>")
    assert not (run_dir / ".report.html.tmp").exists()


def test_html_is_self_contained_with_inline_plots(built):
    _, _, text, page = built
    assert_self_contained(page)
    assert "http://" not in text and "https://" not in text
    figs = {a.get("id") for a in page.all("figure")} - {None, ""}
    assert figs == {"fig-memory", "fig-throughput", "fig-tradeoff", "fig-sampling"}
    imgs = page.all("img")
    assert len(imgs) == 4
    for img in imgs:
        w, h = png_size(decode_png(img["src"]))
        assert w >= 600 and h >= 300, (img.get("alt"), w, h)
    # the page says where every figure came from
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", text, flags=re.S)
    assert len(captions) == 4 and all("Source:" in c for c in captions)
    assert "FakeTensorMode" in captions[0] and "cpu-tensors" in captions[0]
    # every energy figure is codecarbon's estimate: no second plot of step time × a constant, but one
    # sentence with the watts the rows imply (the fixture's constant)
    omitted = [a.get("id") for a in page.all("p") if a.get("id", "").endswith("-omitted")]
    assert omitted == ["fig-energy-omitted"]
    energy = re.search(r'id="fig-energy-omitted">(.*?)</p>', text, flags=re.S).group(1)
    assert "codecarbon" in energy and f"{CPU_WATTS:.1f} W in every row" in energy
    # printable: a print media query and a CSP that forbids anything but inline data
    assert "@media print" in text
    csp = [a for a in page.all("meta") if a.get("http-equiv", "").lower() == "content-security-policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]


def test_tables_hold_every_row_including_failures(built):
    run_dir, _, _, page = built
    rows = read_rows(run_dir / "results.csv")
    tables = {tid: page.body(tid) for tid, a in page.table_attrs.items() if tid.startswith("rows-")}
    phases = {page.table_attrs[tid]["data-phase"]: body for tid, body in tables.items()}
    assert set(phases) == {"train", "sample"}
    assert sum(len(b) for b in phases.values()) == len(rows)
    header = page.tables["rows-1"][0]
    assert "step time, median (IQR) (s)" in header and "energy (J/step)" in header
    peak = header.index("peak memory")
    cells = [c[peak] for b in phases.values() for c in b if c[peak]]
    assert cells and all(re.fullmatch(r"[\d.,]+\s(MiB|GiB|TiB)", c) for c in cells), cells  # each with its unit
    assert not any(re.match(r"\d{1,3}(,\d{3})+\s", c) for c in cells)  # humane magnitudes: no "2,135,815 MiB"
    for r in rows:
        hits = [c for c in phases[r.phase] if c[0] == r.model and c[1] == r.preset and c[2] == size_text(r.size)
                and c[3] == r.status]
        assert len(hits) == 1, (r.model, r.size, r.phase, r.status)
    statuses = {c[3] for b in phases.values() for c in b}
    assert {"ok", "predicted", "oom", "error", "timeout"} <= statuses
    # the failures are listed with their reason, not hidden
    fails = page.body("failures-table")
    assert {c[4] for c in fails} == {"oom", "error", "timeout"}
    assert any("cpu-memory-limit" in c[5] for c in fails)
    assert len(page.body("detail-table")) == len(rows)
    assert len(page.body("notes-table")) == sum(1 for r in rows if r.notes)


def test_injected_strings_are_escaped(built):
    run_dir, _, text, page = built
    assert EVIL not in text
    assert html.escape(EVIL, quote=False) in text
    assert '<img src=x' not in text and "onerror=" not in text.replace("onerror=&#34;", "").replace(
        "onerror=&quot;", "")
    assert not page.all("script")
    assert all(a["src"].startswith("data:") for a in page.all("img"))
    # as text, the name is in the tables exactly as written
    assert any(c and c[0] == EVIL for body in page.tables.values() for c in body)
    md = (run_dir / "report.md").read_text()
    assert EVIL not in md and "&lt;script&gt;" in md


def test_headline_reductions(built):
    run_dir, _, _, page = built
    run = load_run(run_dir)
    h = build_headline(run)
    head = page.tables["headline-table"][0]
    assert head[0] == "volume (voxels)" and "idm vs unet" in head
    by_size = {r[0]: r for r in page.body("headline-table")}
    assert list(by_size) == ["16³", "32³", "64³", "128³", "256³"]
    col = head.index("idm vs unet")
    # expected from the fixture's own model of the peak (measured = prediction × (1 + 0.02 · (side mod 3)))
    idm, unet = (int(model_peak(m, 32, "train") * 1.04) for m in ("idm", "unet"))
    pct, factor = 100.0 * (unet - idm) / unet, unet / idm
    assert pct > 50 and factor > 2
    assert by_size["32³"][col].startswith(f"{pct:.0f} % · ")
    assert "(pred.)" not in by_size["32³"][col]  # both measured
    assert "(pred.)" in by_size["128³"][col]  # both predicted
    assert by_size["64³"][col] == "unet oom; idm measured"
    assert by_size["64³"][head.index("unet peak")].startswith("oom (pred.")
    assert by_size["32³"][head.index("idm peak")].endswith(" MiB")  # each figure carries its unit
    assert by_size["256³"][head.index("unet peak")].endswith(" GiB (pred.)")
    unet = [s for s in h.sentences if s.startswith("Against unet:")]
    assert len(unet) == 1
    assert f"idm needs {pct:.0f} % less ({factor:.2f}×) at 32³" in unet[0]
    assert "(measured, cpu-tensors)" in unet[0] and "at 256³" in unet[0] and "(predicted)" in unet[0]
    assert "at 64³ unet ended with status oom while idm was measured at" in unet[0]
    budgets = page.body("budget-table")
    bhead = page.tables["budget-table"][0]
    assert [r[0] for r in budgets][:4] == ["idm", "unet", "unet-ckpt", "patchddm"]
    assert bhead[:3] == ["model", "preset", "parameters"] and {r[1] for r in budgets} == {"tiny"}  # names the preset
    assert bhead[3:7] == ["16 GiB", "24 GiB", "40 GiB", "80 GiB"]
    idm_side = int(budgets[0][bhead.index("24 GiB")].split("³")[0])
    unet_side = int(budgets[1][bhead.index("24 GiB")].split("³")[0])
    assert idm_side > unet_side  # IDM trains a larger cube on a 24 GiB card
    assert budgets[0][bhead.index("80 GiB")].startswith("≥ 512³") and budgets[0][-1] == "search capped at 512"
    assert budgets[0][2] == "1.18 M"  # the fixture's idm parameter count
    caption = re.search(r'<table id="budget-table">\s*<caption>(.*?)</caption>', built[2], flags=re.S).group(1)
    assert "tiny" in caption
    assert "--predict --preset paper --budget 24GiB" in page_text(page)  # the real answer, for the real networks


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_markdown_summary(built):
    run_dir, _, _, _ = built
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# ")
    assert "## Peak training memory" in md and "## Largest trainable cube per memory budget" in md
    table_lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    rows = [_md_cells(ln) for ln in table_lines]
    assert any("idm vs unet" in r for r in rows)
    assert any(r[0] == "idm" for r in rows)
    assert any(r[0] == "256³" for r in rows)
    widths = {len(r) for r in rows if "idm vs unet" in r or r[0] == "256³"}
    assert len(widths) == 1  # header and body have the same number of cells
    assert re.search(r"^\|[ :-]+\|", md, flags=re.M)  # a GitHub pipe table's rule line
    assert "--predict --preset paper --budget 24GiB" in md


def test_gpu_run_marks_sources(tmp_path):
    """A CUDA run where one model fell back to a codecarbon estimate: NVML measurements and the estimate
    are drawn differently, measured memory filled and predicted hollow, GPU sizes as lines, and the
    methodology tags the sources this run used."""
    from idmbench.report.plots import energy_figure, memory_figure

    run_dir = write_run(tmp_path, sizes=("16", "32", "64"), gpu=True, energy={"unet-ckpt": "codecarbon-estimate"})
    run = load_run(run_dir)
    energy = energy_figure(run)
    assert "nvml, codecarbon-estimate" in energy.caption
    ax_lines = [ln for ax in energy.mpl.axes for ln in ax.get_lines()]
    segments = [ln for ln in ax_lines if len(ln.get_xdata()) > 1]
    points = [ln for ln in ax_lines if len(ln.get_xdata()) == 1]
    assert {ln.get_linestyle() for ln in segments} == {"-", "--"}  # measured solid, estimate dashed
    est_color = [ln for ln in segments if ln.get_linestyle() == "--"][0].get_color()
    assert {ln.get_fillstyle() for ln in points if ln.get_color() == est_color} == {"left"}  # half-filled
    assert {ln.get_fillstyle() for ln in points if ln.get_color() != est_color} == {"full"}  # filled

    mem = memory_figure(run)
    ax = mem.mpl.axes[0]
    points = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 1 and ln.get_marker() not in ("x", "None", "")]
    assert {ln.get_fillstyle() for ln in points} == {"full", "none"}  # measured filled, predicted hollow
    hlines = {round(ln.get_ydata()[0] / 2**30) for ln in ax.get_lines()
              if len(ln.get_ydata()) == 2 and ln.get_ydata()[0] == ln.get_ydata()[1]}
    assert {16, 24, 40, 80} <= hlines
    assert "cuda-allocator" in mem.caption

    text = build_report(run_dir).read_text()
    page = Page(text)
    tagged = re.findall(r"<strong>([a-z-]+)</strong><span class=\"tag\">used in this run</span>", text)
    assert set(tagged) == {"cuda-allocator", "predicted", "nvml", "codecarbon-estimate"}
    detail = page.tables["detail-table"][0]
    assert "CUDA reserved" in detail and "NVML used, incl. context" in detail
    assert "process peak RSS" not in detail  # empty for every row on this run: left out, and said so
    assert "NVIDIA H100 80GB HBM3" in text and "570.86" in text
    assert "CUDA context constant" in text  # a GPU run states the constant in its header


def test_missing_results_raises_one_line(tmp_path):
    with pytest.raises(ValueError) as exc:
        build_report(tmp_path)
    assert "results.csv" in str(exc.value) and "quality.csv" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(ValueError, match="does not exist$"):
        build_report(tmp_path / "nonexistent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        build_report(tmp_path / "file")
    from idmbench.report import check_run_dir

    with pytest.raises(ValueError, match="no results.csv or quality.csv"):
        check_run_dir(tmp_path)
    (tmp_path / "quality.csv").write_text("model,t\n")
    assert check_run_dir(str(tmp_path)) == tmp_path  # a quality run alone is a run folder


def test_headline_without_idm_or_without_baselines(tmp_path):
    no_idm = load_run(write_run(tmp_path / "a", models=("unet", "patchddm"), sizes=("16", "32"), budgets=False))
    h = build_headline(no_idm)
    assert any("not in this run" in s for s in h.sentences)
    assert h.table is not None and not any("reduction" in c for c in h.table.header)
    assert h.budgets is not None and "coarse bound" in h.budget_note  # derived from the run's own sizes
    only = load_run(write_run(tmp_path / "b", models=("idm",), sizes=("16", "32"), budgets=False))
    h = build_headline(only)
    assert any("no baseline" in s for s in h.sentences)
    sample_only = load_run(write_run(tmp_path / "c", models=("idm", "unet"), sizes=("16",), phases=("sample",)))
    assert any("No training rows" in s for s in build_headline(sample_only).sentences)


def test_old_run_without_metadata_and_quality_section(tmp_path):
    """Only the contract columns, no run.json/budgets.csv: the page still builds and says what is missing;
    then a quality run appears in the folder and the page shows it."""
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "results.csv").write_text(
        "model,preset,size,phase,status,params,peak_mem_bytes,mem_source,predicted_peak_bytes,step_time_s,"
        "step_time_iqr_s,voxels_per_s,energy_j_per_step,energy_source,flops_per_step,device\n"
        "idm,small,32,train,ok,1000,5000000,cpu-tensors,,0.5,0.01,65536,,none,1e9,cpu\n"
        "unet,small,32,train,oom,1000,,,,,,,,none,,cpu\n"
        "unet,small,16x32x32,train,ok,1000,9000000,cpu-tensors,,0.2,0.01,81920,,none,1e9,cpu\n"
    )
    page = Page(build_report(run_dir).read_text())
    text = "".join(page.text)
    assert "no run.json in this folder" in text
    assert "No quality run in this folder" in text
    assert "no energy figures in this run" in text
    assert "run.json holds no per-model settings record" in text
    figs = {a["id"] for a in page.all("figure")}
    assert figs == {"fig-memory", "fig-tradeoff", "fig-throughput"} and len(page.all("img")) == 3
    assert sum(len(page.body(t)) for t in page.tables if t.startswith("rows-")) == 3
    assert any(c[3] == "oom" for c in page.body("rows-1"))

    (run_dir / "quality.csv").write_text(
        "model,preset,size,train_steps,t,psnr,ssim,mae,psnr_std,ssim_std,mae_std,n_volumes,n_noise,data_range,data,"
        "params,batch,lr,seed,device,precision,train_time_s,train_energy_j,energy_source,energy_per_param_j,"
        "peak_train_mem_bytes,mem_source,final_loss,status,error,timestamp\n"
        "idm,small,32,10,250,24.51234,0.71,0.031,0.5,0.01,0.002,2,2,2.0,synthetic,1000,1,1e-4,0,cpu,fp32,5.0,40.0,"
        "codecarbon-estimate,0.04,5000000,cpu-tensors,0.5,ok,,2025-01-01T00:00:00\n"
        f"{EVIL},small,32,10,250,,,,,,,,,2.0,synthetic,1000,1,1e-4,0,cpu,fp32,,,none,,,,,error,boom,2025-01-01T00:00:01\n")
    (run_dir / "samples").mkdir()
    from matplotlib.image import imsave
    import numpy as np
    imsave(run_dir / "samples" / "idm_sample0.png", np.outer(np.arange(32), np.arange(32)), cmap="gray")
    text = build_report(run_dir).read_text()
    page = Page(text)
    q = page.body("quality-table")
    assert q == [["idm", "250", "24.51 ± 0.50", "0.710 ± 0.010", "0.0310 ± 0.0020", "2 × 2", "2"]]
    assert page.body("quality-errors-table")[0][0] == EVIL and EVIL not in text
    imgs = page.all("img")
    assert "sample idm_sample0.png" in [a["alt"] for a in imgs]
    assert_self_contained(page)


def test_odd_inputs_still_make_a_page(tmp_path):
    """A header-only results.csv, and one with a non-cube size, an unknown phase and status, a malformed
    size, a ``$`` in a model name (matplotlib mathtext), NaN energy, a multi-line error, a run.json of the
    wrong types and a budgets.csv where nothing fits: each still gives a page that says what it can."""
    from idmbench.results import COLUMNS

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results.csv").write_text(",".join(COLUMNS) + "\n")
    page = Page(build_report(empty).read_text())
    assert "results.csv holds no rows yet" in "".join(page.text)
    assert not page.all("img")  # no empty plot frames: each figure is left out with one line why
    assert len([a for a in page.all("p") if a.get("id", "").endswith("-omitted")]) == 5

    odd = tmp_path / "odd"
    odd.mkdir()
    p = odd / "results.csv"
    append_row(p, ResultRow(model="m$x$", preset="a", size="32x64x64", phase="train", peak_mem_bytes=10**8,
                            mem_source="cpu-tensors", step_time_s=0.5, voxels_per_s=1e5, energy_j_per_step=float("nan")))
    append_row(p, ResultRow(model="m$x$", preset="b", size="16", phase="eval", status="weird", peak_mem_bytes=10**7))
    append_row(p, ResultRow(model="idm", preset="a", size="32", phase="train", peak_mem_bytes=5 * 10**7,
                            mem_source="cpu-tensors"))
    append_row(p, ResultRow(model="idm", preset="a", size="bogus", phase="sample", status="error", error="x\ny"))
    (odd / "run.json").write_text(json.dumps({"models": "idm", "sizes": [16, "32x64x64"], "params": [1, 2],
                                              "steps": None, "started": "garbage", "finished": "2025-01-01"}))
    (odd / "budgets.csv").write_text("model,preset,budget,budget_bytes,largest_side,peak_at_largest_bytes,source\n"
                                     "idm,a,24GiB,1,,,predicted\n")
    page = Page(build_report(odd).read_text())
    assert_self_contained(page)
    phases = {page.table_attrs[t]["data-phase"] for t in page.tables if t.startswith("rows-")}
    assert phases == {"train", "sample", "eval"}
    body = [c for t in page.tables if t.startswith("rows-") for c in page.body(t)]
    assert {c[0] for c in body} == {"m$x$", "idm"} and "32×64×64" in {c[2] for c in body}
    assert page.body("budget-table") == [["idm", "a", "none fits"]]
    assert page.tables["headline-table"][0][1:3] == ["idm peak", "m$x$ [a] peak"]  # run.json order first


# ----------------------------------------------------------------------------------------------------------
# the real harness
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_on_real_sweep(tmp_path):
    """A real tiny sweep through run_bench.py, then the report on its folder (no skip: a broken harness fails)."""
    out = tmp_path / "sweep"
    # --warmup 1: the harness needs one untimed step so the optimiser state exists before timing
    cmd = [sys.executable, "run_bench.py", "--models", "idm,unet", "--sizes", "16,32", "--preset", "tiny",
           "--steps", "1", "--warmup", "1", "--budget", "none", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"sweep failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (out / "results.csv").is_file()
    assert (out / "report.html").is_file(), "the sweep should build its report at the end"
    rows = read_rows(out / "results.csv")
    assert rows
    if not any(r.status == "oom" for r in rows):
        # a tiny CPU sweep fits in memory; add the row the harness writes after an OOM so the page shows one
        append_row(out / "results.csv", ResultRow(model="unet", preset="tiny", size="256", phase="train",
                                                  status="oom", error="out of memory (added by the test)",
                                                  device=rows[0].device))
        rows = read_rows(out / "results.csv")
    path = build_report(out)
    page = Page(path.read_text(encoding="utf-8"))
    assert_self_contained(page)
    drawn = {a["id"] for a in page.all("figure") if a.get("id", "").startswith("fig-")}
    omitted = {a["id"].removesuffix("-omitted") for a in page.all("p") if a.get("id", "").endswith("-omitted")}
    assert drawn | omitted == {"fig-memory", "fig-sampling", "fig-tradeoff", "fig-throughput", "fig-energy"}
    assert not drawn & omitted and {"fig-memory", "fig-sampling"} <= drawn
    assert len(page.all("img")) == len(drawn)
    body = [c for tid in page.tables if tid.startswith("rows-") for c in page.body(tid)]
    assert len(body) == len(rows)
    for r in rows:
        assert any(c[0] == r.model and c[2] == size_text(r.size) and c[3] == r.status for c in body), r.key()
    assert any(c[3] == "oom" for c in body)
    assert (out / "report.md").is_file()


# ----------------------------------------------------------------------------------------------------------
# the browser
# ----------------------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]

#: appended to a copy of the page: after every image has loaded (or failed), record what the browser decoded
PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = document.images, out = [];
  for (var i = 0; i < imgs.length; i++) {
    imgs[i].setAttribute("data-natural-width", String(imgs[i].naturalWidth));
    imgs[i].setAttribute("data-complete", String(imgs[i].complete));
    out.push(imgs[i].naturalWidth);
  }
  document.body.setAttribute("data-probe", "done:" + imgs.length + ":" + out.join(","));
});
</script>"""


def _chromium() -> str:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    pytest.skip("chromium not installed: `apt-get install -y chromium` (as .ci/run does) to run the browser test")


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish in 120 s: {' '.join(cmd)}")


@pytest.mark.browser
def test_report_renders_in_chromium(built, tmp_path):
    exe = _chromium()
    run_dir, path, text, page = built
    # 1. a screenshot of the real page is not blank: the plots' colours are on it
    shot = tmp_path / "shot.png"
    proc = _run_chromium(exe, tmp_path / "profile1", f"--screenshot={shot}", "--window-size=1280,2000",
                         "--virtual-time-budget=5000", path.as_uri())
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
    from matplotlib.image import imread

    img = imread(shot)[..., :3].astype(float)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000, img.shape
    non_white = (img.min(axis=2) < 0.94).mean()
    assert img.std() > 0.05, "screenshot is blank"
    assert non_white > 0.03, f"only {non_white:.1%} of the screenshot is not white"
    saturated = ((img.max(axis=2) - img.min(axis=2)) > 0.3).mean()  # coloured pixels: plots, not just text
    assert saturated > 0.001, f"no coloured pixels ({saturated:.3%}): plots not drawn?"

    # 2. every image decodes: a copy with a probe script (the page itself has no scripts and forbids them)
    probe = tmp_path / "probe.html"
    probed = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text, count=1)
    probe.write_text(probed.replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    proc = _run_chromium(exe, tmp_path / "profile2", "--dump-dom", "--virtual-time-budget=10000", probe.as_uri())
    dom = proc.stdout.decode("utf-8", errors="replace")
    assert "data-probe=\"done:" in dom, f"probe did not run (rc {proc.returncode}): {proc.stderr.decode()[-2000:]}"
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == len(page.all("img")) == 4
    assert all(w > 0 for w in widths), f"an image did not decode: naturalWidth {widths}"
    # and the escaped name is text in the rendered DOM, not an element
    dom_page = Page(dom)
    assert len(dom_page.all("script")) == 1  # the probe only
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom

    # 3. printable: Chromium prints it to a multi-page PDF
    pdf = tmp_path / "report.pdf"
    proc = _run_chromium(exe, tmp_path / "profile3", f"--print-to-pdf={pdf}", "--no-pdf-header-footer", path.as_uri())
    assert pdf.is_file(), f"no PDF (rc {proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page[^s]", data)) >= 3
