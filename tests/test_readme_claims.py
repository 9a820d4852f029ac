"""Every number the README states about the models, the gate and the defaults, checked against the code.

The numbers are read from README.md itself, so a README edit that states something the code does not do,
or a code change that makes a README number false, fails here. (Claims backed elsewhere are listed in
the docstring of each test's neighbour: gradients and reconstruction in ``test_idm.py``, reference
parameter counts in ``test_gdunet.py``, prediction vs measurement in ``test_measure.py``.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import idmbench
from idmbench import check
from idmbench.measure.memory import fake_mode
from idmbench.registry import count_parameters, create_model

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
GiB, TiB = 2**30, 2**40


def section(title: str) -> str:
    """The README's text from the heading ``title`` to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(title)}\s*$", README, re.M)
    assert m, f"README has no section {title!r}"
    level = len(m.group(1))
    rest = README[m.end():]
    nxt = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: nxt.start()] if nxt else rest


def number(text: str) -> int:
    return int(text.replace(",", ""))


def params(name: str, preset: str, **kw) -> int:
    with fake_mode():  # no allocation: the paper presets have up to 74 M parameters
        return count_parameters(create_model(name, preset=preset, **kw))


def models_table() -> dict[str, tuple[str, str]]:
    """``The models`` table: model -> (parameters cell, valid sides cell)."""
    out = {}
    for line in section("The models").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[0] != "`model`":
            out[cells[0].strip("`")] = (cells[2], cells[3])
    return out


# ---------------------------------------------------------------------------------------- the models


def test_models_table_parameter_counts_and_valid_sides():
    """Every parameter count and every valid side in the models table is what the registry builds."""
    table = models_table()
    assert set(table) == {"idm", "unet", "unet-ckpt", "patchddm", "wdm"}
    for name, (counts, sides) in table.items():
        spec = idmbench.get_spec(name)
        if counts.startswith("as `"):  # unet-ckpt: "as `unet` (loads its weights)"
            other = counts.split("`")[1]
            for p in spec.presets:
                assert params(name, p) == params(other, p), (name, p)
        else:
            claimed = {p: number(n) for p, n in re.findall(r"(\w+) ([\d,]{5,})", counts)}
            assert set(claimed) == set(spec.presets), (name, claimed)
            for p, n in claimed.items():
                assert params(name, p) == n, (name, p)
        every = re.search(r"(\d+) for every preset", sides)
        claimed_sides = {p: int(every.group(1)) for p in spec.presets} if every else \
            {p: int(n) for p, n in re.findall(r"(\w+) (\d+)", sides) if p in spec.presets}
        if sides.startswith("as `"):
            other = idmbench.get_spec(sides.split("`")[1])
            claimed_sides = {p: other.valid_sides(other.config(p)) for p in spec.presets}
        assert set(claimed_sides) == set(spec.presets), (name, sides)
        for p, m in claimed_sides.items():
            assert spec.valid_sides(spec.config(p)) == m, (name, p)


def test_small_presets_are_parameter_matched_within_5_percent():
    """"`small` is parameter-matched (±5 % of both `unet` and `idm` small)" and "~1.8 M parameters"."""
    assert "±5 % of both `unet` and `idm` small" in README and "~1.8 M parameters" in README
    small = {n: params(n, "small") for n in models_table()}
    for n, p in small.items():
        for ref in ("unet", "idm"):
            assert abs(p / small[ref] - 1) <= 0.05, (n, ref, p, small[ref])
        assert abs(p / 1.8e6 - 1) <= 0.05, (n, p)
    assert check.PARAM_MATCH == 0.05  # the gate's unet invariant uses the same bound


def test_patchddm_reference_parameter_counts():
    """24,260,299 with the reference's 8 input channels (4 MRI + noisy mask + 3 coordinates); 24,257,167 with
    this benchmark's 1 image + 3 coordinates."""
    text = section("The models")
    assert "24,260,299 parameters with the reference's 8 input channels; 24,257,167" in text
    assert params("patchddm", "paper", in_channels=5) == 24_260_299
    assert params("patchddm", "paper") == 24_257_167


@pytest.mark.slow
def test_unet_predicted_training_peaks():
    """"Predicted training peak of `unet` small ...: a at 64³, b at 128³, c at 256³ with SDPA against d, e
    and f on the naive path" -- each to the digits shown."""
    from idmbench.measure.predict import Predictor

    m = re.search(r"Predicted training peak of `unet` small[^:]*: (.*?) on the naive path", section("The models"), re.S)
    assert m, "the unet peak sentence moved"
    figs = re.findall(r"([\d.]+) (GiB|TiB)", m.group(1))
    assert len(figs) == 6
    sizes = (64, 128, 256)
    for i, (value, unit) in enumerate(figs):
        sdpa = i < 3
        side = sizes[i % 3]
        p = Predictor("unet", "small", overrides={"use_flash_attention": sdpa}, flops=False).predict(side, "train")
        assert p.ok, p.error
        got = p.peak_bytes / (GiB if unit == "GiB" else TiB)
        half_digit = 0.5 * 10 ** -len(value.split(".")[1]) if "." in value else 0.5
        assert abs(got - float(value)) <= half_digit + 1e-9, (side, "sdpa" if sdpa else "naive", got, value)


# ---------------------------------------------------------------------------------------- the gate


def test_gate_section_states_the_gates_numbers():
    text = " ".join(section("The memory-regression gate").split())
    assert f"up to {max(max(s) for s in check.PREDICTED.values())}³" in text
    assert f"measured CPU activation bytes at {check.MEASURED_SIZE}³" in text
    assert f"(default {check.DEFAULT_TOLERANCE.replace('%', ' %')})" in text
    assert f"at {check.INVARIANT_SIZE}³ (`small`) is at most 1/{round(1 / check.TWIN_LIMIT)} of its own plain-autograd twin's" in text
    assert f"at most 1/{round(1 / check.UNET_LIMIT)} of `unet`'s with SDPA attention" in text
    assert f"parameter-matched within {check.PARAM_MATCH * 100:g} %" in text
    lo, hi = check.FLAT_BLOCKS
    assert f"({lo} → {hi}: at most +{check.FLAT_GROWTH * 100:g} %)" in text
    assert (f"measured on CPU tensors at {check.MEASURED_TWIN_SIZE}³ with {check.MEASURED_TWIN_BLOCKS} blocks per level, "
            f"they are at most 1/{round(1 / check.MEASURED_TWIN_LIMIT)} of the plain-autograd twin's") in text


def test_cuda_context_constant():
    """"adds a labelled constant for the context/workspace (0.5 GiB, assumed, not measured)"."""
    from idmbench.measure.predict import CUDA_CONTEXT_BYTES, CUDA_CONTEXT_LABEL

    assert "(0.5 GiB, assumed,\n  not measured)" in README or "(0.5 GiB, assumed, not measured)" in " ".join(README.split())
    assert CUDA_CONTEXT_BYTES == GiB // 2 and "0.5 GiB" in CUDA_CONTEXT_LABEL


def test_energy_window_default_is_one_second():
    """"`nvmlDeviceGetTotalEnergyConsumption` delta over a ≥ 1 s window" -- the sweep's default window."""
    import dataclasses

    from idmbench.harness.options import SweepOptions

    assert "delta over a ≥ 1 s window" in README
    default = {f.name: f.default for f in dataclasses.fields(SweepOptions)}["min_energy_window_s"]
    assert default == 1.0


# ---------------------------------------------------------------------------------------- quality and data


def test_quality_and_data_defaults():
    """The quality section's defaults: lr 1e-4, loss mean of the last 20 steps, --eval-t 50, 250, 500,
    4 noise draws, 8 synthetic volumes, held-out fraction 0.2, data range 2.0, SSIM window sigma 1.5 and
    11 voxels, clipping at the 0.5 / 99.5 percentiles, preset small."""
    import importlib

    preprocess = importlib.import_module("idmbench.data.preprocess")
    from idmbench.quality import cli as Q
    from idmbench.quality import metrics as M
    from idmbench.quality import train as T

    text = " ".join(section("Quality: does the lighter model still learn?").split())
    assert "`--lr` (default 1e-4)" in text and Q.DEFAULT_LR == 1e-4
    assert "(mean of the last 20 steps)" in text and T.FINAL_LOSS_STEPS == 20
    assert "default 50, 250, 500 of the 1000-step" in text and tuple(Q.DEFAULT_EVAL_T) == (50, 250, 500)
    assert "`--noise-draws` noise draws (default 4;" in text and Q.DEFAULT_NOISE_DRAWS == 4
    assert "`--synthetic-volumes`, default 8" in text and Q.DEFAULT_SYNTHETIC_VOLUMES == 8
    assert "`--heldout-fraction` (default 0.2," in text and Q.DEFAULT_HELDOUT_FRACTION == 0.2
    assert "**data range 2.0**" in text and M.DATA_RANGE == 2.0
    assert "Gaussian window σ 1.5, 11 voxels" in text and M.SSIM_SIGMA == 1.5 and M.ssim_window((64, 64, 64)) == 11
    assert "0.5 / 99.5 percentiles" in text and tuple(preprocess.CLIP_PERCENTILES) == (0.5, 99.5)
    assert "`--preset` defaults to `small`" in text and Q.DEFAULT_PRESET == "small"
    from idmbench.diffusion import NUM_TRAIN_TIMESTEPS

    assert NUM_TRAIN_TIMESTEPS == 1000


def test_reference_presets_as_described():
    """PatchDDM-3D paper: base 29, multipliers (1,3,4,4,4,4,4), 2 res blocks, 29 groups, `small` the same
    pattern at base 12; WDM-3D paper: base 64, (1,2,2,4,4,4), 32 groups, paper128 (1,2,2,4,4), `small` the
    128³ pattern at base 12, the low-pass band divided by 3."""
    from idmbench.recipes import get_recipe

    text = " ".join(section("The models").split())
    for phrase in ("base 29, multipliers (1,3,4,4,4,4,4), 2 res blocks, 29 GroupNorm groups",
                   "`small`: the same pattern at base 12", "base 64, multipliers (1,2,2,4,4,4), 2 res blocks, 32 groups",
                   "the low-pass band divided by 3", "(multipliers (1,2,2,4,4)); `small` the 128³ pattern at base 12"):
        assert phrase in text, phrase

    def pattern(name: str, preset: str) -> tuple[int, tuple[int, ...], int, int]:
        cfg = idmbench.get_spec(name).config(preset)
        ch = cfg["channels"]
        return ch[0], tuple(c // ch[0] for c in ch), cfg["num_res_blocks"], cfg["norm_num_groups"]

    assert pattern("patchddm", "paper") == (29, (1, 3, 4, 4, 4, 4, 4), 2, 29)
    assert pattern("patchddm", "small")[:2] == (12, (1, 3, 4, 4))  # the same pattern at base 12, on fewer levels
    assert pattern("wdm", "paper") == (64, (1, 2, 2, 4, 4, 4), 2, 32)
    assert pattern("wdm", "paper128") == (64, (1, 2, 2, 4, 4), 2, 32)
    assert pattern("wdm", "small")[:2] == (12, (1, 2, 2, 4, 4))
    assert get_recipe("wavelet").lowpass_scale == pytest.approx(1 / 3)


def test_sample_report_ran_on_a_two_core_cpu_machine():
    """"`reports/sample/` holds a report from a real run on a 2-core CPU machine without a GPU"."""
    import json

    assert "a real run on a 2-core CPU machine without a GPU" in README
    run = json.loads((Path(__file__).resolve().parents[1] / "reports" / "sample" / "run.json").read_text())
    env = run["environment"]
    assert env["cpu_count"] == 2 and run["device"] == "cpu" and not env.get("cuda_version")


def _live_multiple(side: int, measured: bool) -> float:
    """IDM small's training activation bytes (the one definition) over its live state at ``side``^3."""
    base = idmbench.get_spec("idm").config("small")["base_channels"]
    act = (check.measured_activation if measured else check.predicted_activation)("idm", "small", side)
    return act / (base * side**3 * 4)


@pytest.mark.slow
def test_idm_activation_against_the_live_state():
    """"the activation peak is ≤ N× the live state (`base_channels × voxels × 4 bytes`) -- a× at 32³ and b× at
    64³ measured on CPU tensors ..., ≤ N× predicted at 128³ and 256³": each multiple to the digits shown
    (64³ on fake tensors, which equal the CPU measurement byte for byte: ``test_measure.py``)."""
    text = " ".join(section("IDM in one paragraph").split())
    m = re.search(r"the activation peak is (~|≤ |at most )([\d.]+)× the live state \(`base_channels × voxels × 4 bytes`\)", text)
    assert m, "the live-state claim moved or changed form"
    bound, factor = m.group(1).strip(), float(m.group(2))
    claim = text[m.end():].split("does not grow")[0]  # the sentence's own figures, up to its next clause
    each = dict((int(side), float(x)) for x, side in re.findall(r"([\d.]+)× at (\d+)³", claim.split("before the")[0]))
    predicted = re.search(r"≤ ([\d.]+)× predicted at (\d+)³ and (\d+)³", claim)
    sides = {**{s: (True, x) for s, x in each.items()}}
    if predicted:
        sides.update({int(predicted.group(2)): (False, None), int(predicted.group(3)): (False, None)})
    assert sides, "no size given for the live-state multiple"
    for side, (was_measured, stated) in sorted(sides.items()):
        ratio = _live_multiple(side, measured=was_measured and side <= 32)
        if bound == "~":
            assert abs(ratio - factor) <= 0.5, (side, ratio, factor)
        else:
            assert ratio <= factor, (side, ratio, factor)
        if stated is not None:
            assert abs(ratio - stated) <= 0.005 + 1e-9, (side, ratio, stated)


def _idm_train_peak(preset: str, side: int) -> int:
    """Predicted training peak of ``idm`` ``preset`` at ``side``^3 (a worker process's task)."""
    from idmbench.measure.predict import Predictor

    p = Predictor("idm", preset, flops=False).predict(side, "train")
    assert p.ok, p.error
    return int(p.peak_bytes)


@pytest.mark.slow
def test_idm_largest_training_cubes():
    """"Largest training cube, predicted peak of the whole step plus the 0.5 GiB context constant: `small`
    a³ / b³ / c³ and `paper` d³ / e³ / f³ on 24 / 40 / 80 GiB": each side fits, the next valid side does not.
    The twelve predictions are independent and single-threaded: one worker process per core."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    from idmbench.measure.predict import CUDA_CONTEXT_BYTES

    text = " ".join(section("IDM in one paragraph").split())
    m = re.search(r"`small` (\d+)³ / (\d+)³ / (\d+)³ and `paper` (\d+)³ / (\d+)³ / (\d+)³ on (\d+) / (\d+) / (\d+) GiB", text)
    assert m, "the largest-cube sentence moved or changed form"
    g = [int(v) for v in m.groups()]
    budgets = g[6:]
    spec = idmbench.get_spec("idm")
    cases = [(preset, side, side + spec.valid_sides(spec.config(preset)), budget)
             for preset, cubes in (("small", g[0:3]), ("paper", g[3:6])) for side, budget in zip(cubes, budgets)]
    jobs = [(preset, s) for preset, side, bigger, _ in cases for s in (side, bigger)]
    with ProcessPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1)),
                             mp_context=mp.get_context("spawn")) as pool:
        peaks = dict(zip(jobs, pool.map(_idm_train_peak, *zip(*jobs))))
    for preset, side, bigger, budget in cases:
        assert peaks[(preset, side)] + CUDA_CONTEXT_BYTES <= budget * GiB, (preset, side, budget)
        assert peaks[(preset, bigger)] + CUDA_CONTEXT_BYTES > budget * GiB, (preset, bigger, budget)


def test_idm_core_defaults_as_described():
    """"full attention up to 64 tokens, 4³ windows above" and "`recompute_budget` (default ¼ of the state)"."""
    text = " ".join(section("IDM in one paragraph").split())
    assert "full attention up to 64 tokens, 4³ windows above" in text and "(default ¼ of the state)" in text
    for preset in ("small", "paper"):
        with fake_mode():
            model = create_model("idm", preset=preset)
        assert model.core.recompute_budget == 0.25
        attention = [m for m in model.modules() if hasattr(m, "full_max_tokens")]
        assert attention and all(m.full_max_tokens == 64 and m.window == 4 for m in attention)
