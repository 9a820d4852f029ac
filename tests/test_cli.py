"""The command line: every bad input gets one clear line and exit code 2 with nothing started; --help
explains every flag with units; the report and check subcommands dispatch."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

import idmbench
from idmbench import cli

from conftest import run_cli


def _unaccepted_side(name: str, preset: str = "tiny") -> int:
    spec = idmbench.get_spec(name)
    m = spec.valid_sides(spec.config(preset))
    assert m > 1
    return m * 4 + 1


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    m = idmbench.list_models()[0]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    has_results = tmp_path / "has_results"
    has_results.mkdir()
    (has_results / "results.csv").write_text("model,preset,size,phase\n")
    cases = [
        (["--models", "nosuchmodel"], "unknown model 'nosuchmodel'; valid models: " + ", ".join(idmbench.list_models())),
        (["--models", ","], "--models is empty"),
        (["--models", m, "--sizes", "abc"], "malformed size 'abc'"),
        (["--models", m, "--sizes", "0"], "malformed size '0'"),
        (["--models", m, "--sizes", "16x16"], "malformed size '16x16'"),
        (["--models", m, "--preset", "tiny", "--sizes", str(_unaccepted_side(m))], f"{m} needs every side"),
        (["--models", m, "--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
        (["--models", m, "--preset", "huge"], f"model '{m}' has no preset 'huge'; valid presets:"),
        (["--models", m, "--preset", "nosuch=tiny"], "names model 'nosuch'"),
        (["--models", m, "--precision", "fp8"], "unknown precision 'fp8'; valid: fp32, bf16, fp16"),
        (["--models", m, "--phases", "train,infer"], "unknown phase 'infer'; valid phases: train, sample"),
        (["--models", m, "--budget", "24"], "needs a unit"),
        (["--models", m, "--budget", "24XB"], "unknown unit 'XB'"),
        (["--models", m, "--cpu-memory-limit", "lots"], "malformed --cpu-memory-limit 'lots'"),
        (["--models", m, "--timeout", "-5"], "--timeout must be a positive number of seconds"),
        (["--models", m, "--timeout", "soon"], "--timeout must be a number of seconds"),
        (["--models", m, "--steps", "0"], "--steps must be >= 1"),
        (["--models", m, "--warmup", "0"], "--warmup must be >= 1"),
        (["--models", m, "--batch", "two"], "--batch must be a whole number"),
        (["--models", m, "--max-measure-s", "-1"], "--max-measure-s must be a positive number of seconds"),
        (["--models", m, "--max-sweep-s", "later"], "--max-sweep-s must be a number of seconds"),
        (["--models", m, "--min-energy-window", "0"], "--min-energy-window must be a positive number of seconds"),
        (["--models", m, "--out", str(a_file / "sub")], "is not writable"),
        (["--models", m, "--out", str(has_results)], "already holds results.csv; continue it with --resume"),
        (["--resume", str(tmp_path / "nowhere")], "no such folder"),
        (["--resume", str(tmp_path)], "not a sweep folder"),
        (["--models", m, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--models", m, "--device", "cuda"], "--device cuda requested but"))
        cases.append((["--models", m, "--device", "cuda:1"], "requested but"))
    else:
        cases.append((["--models", m, "--device", "cuda", "--cpu-memory-limit", "2GiB"], "CPU workers only"))
    return cases


def test_every_bad_input_gets_one_line_and_exit_2(tmp_path, capsys):
    out_dir = tmp_path / "never_created"
    for args, expected in _bad_inputs(tmp_path):
        argv = list(args)
        if "--out" not in argv and "--resume" not in argv:
            argv += ["--out", str(out_dir)]
        code = cli.main(argv)
        captured = capsys.readouterr()
        lines = [ln for ln in captured.err.splitlines() if ln.strip()]
        assert code == 2, (args, captured.err)
        assert len(lines) == 1, (args, captured.err)
        assert lines[0].startswith("error: "), lines
        assert expected in lines[0], (args, lines[0])
        assert captured.out == "", (args, captured.out)
        assert not out_dir.exists(), f"{args}: the sweep started (output folder created)"


@pytest.mark.slow
def test_bad_input_through_the_real_entry_point(tmp_path):
    """The user's view: the real ``python run_bench.py`` process, exit status 2, one line, nothing created."""
    out = tmp_path / "out"
    r = run_cli("--models", "idm-typo", "--sizes", "32", "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: unknown model 'idm-typo'; valid models: {', '.join(idmbench.list_models())}"]
    assert r.stdout == "" and not out.exists()
    r = run_cli("--models", idmbench.list_models()[0], "--device", "cuda" if not torch.cuda.is_available() else "warp", "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_help_explains_every_flag_with_units():
    r = run_cli("--help", timeout=60)
    assert r.returncode == 0
    text = r.stdout
    for flag in ("--models", "--sizes", "--preset", "--batch", "--steps", "--warmup", "--phases", "--device",
                 "--precision", "--out", "--predict", "--budget", "--resume", "--timeout", "--cpu-memory-limit",
                 "--max-measure-s", "--max-sweep-s", "--seed", "--min-energy-window", "--no-report"):
        assert flag in text, flag
    for unit in ("seconds", "bytes", "GiB", "voxels"):
        assert unit in text, unit
    assert "report DIR" in text and "check" in text


def test_defaults_on_cpu(tmp_path):
    m = idmbench.list_models()[0]
    ns = cli.build_parser().parse_args(["--models", m, "--out", str(tmp_path / "o")])
    opts = cli.options_from_args(ns, ["--models", m])
    assert opts.device == "cpu"
    assert opts.presets == {m: "small"}
    assert opts.steps == 3 and opts.warmup == 1 and opts.max_measure_s == 180.0 and opts.max_sweep_s == 480.0
    assert [b for b, _ in opts.budgets] == ["16GiB", "24GiB", "40GiB", "80GiB"]
    assert opts.phases == ["train", "sample"] and opts.precision == "fp32" and opts.batch == 1
    assert opts.sizes and all(len(s) == 3 for s in opts.sizes)
    assert opts.env["torch_version"] == torch.__version__


def test_per_model_presets_and_non_cube_sizes(tmp_path):
    names = idmbench.list_models()[:2]
    spec = idmbench.get_spec(names[0])
    m = spec.valid_sides(spec.config("tiny"))
    m2 = idmbench.get_spec(names[1]).valid_sides(idmbench.get_spec(names[1]).config("small"))
    lcm = m * m2 // __import__("math").gcd(m, m2)
    argv = ["--models", ",".join(names), "--preset", f"small,{names[0]}=tiny", "--sizes", f"{lcm}x{2 * lcm}x{lcm}",
            "--budget", "none", "--out", str(tmp_path / "o")]
    opts = cli.options_from_args(cli.build_parser().parse_args(argv), argv)
    assert opts.presets == {names[0]: "tiny", names[1]: "small"}
    assert opts.sizes == [(lcm, 2 * lcm, lcm)]
    assert opts.budgets == []


def test_report_subcommand(tmp_path, monkeypatch, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2  # a folder with no run in it
    assert "no results.csv or quality.csv in" in capsys.readouterr().err
    (tmp_path / "results.csv").write_text("model,preset,size,phase\n")
    calls = []
    fake = types.ModuleType("idmbench.report")
    fake.build_report = lambda d: calls.append(Path(d)) or Path(d) / "report.html"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "idmbench.report", fake)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert calls == [tmp_path] and "report.html" in capsys.readouterr().out
    quality_only = tmp_path / "quality-only"  # a quality run alone is a run folder too
    quality_only.mkdir()
    (quality_only / "quality.csv").write_text("model,t,psnr\n")
    assert cli.main(["report", str(quality_only)]) == 0
    assert calls[-1] == quality_only

    def boom(d):
        raise RuntimeError("no plots today")

    fake.build_report = boom  # type: ignore[attr-defined]
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "report failed (RuntimeError: no plots today)" in capsys.readouterr().err


def test_check_subcommand_dispatches(monkeypatch):
    seen = []
    fake = types.ModuleType("idmbench.check")
    fake.main = lambda argv: seen.append(argv) or 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "idmbench.check", fake)
    assert cli.main(["check", "--tolerance", "5%"]) == 1
    assert seen == [["--tolerance", "5%"]]


def test_default_preset_falls_back_per_model_on_cuda(monkeypatch, tmp_path, capsys):
    """On a GPU the default preset is paper; PatchDDM's paper network needs multiples of 128, so the main
    job (--sizes 64,128,256) uses its small preset instead, says so, and still runs. An explicit
    --preset paper is refused as bad input."""
    from idmbench import cli as C

    monkeypatch.setattr(C, "resolve_device", lambda text: "cuda:0")
    argv = ["--models", "idm,patchddm", "--sizes", "64,128,256", "--out", str(tmp_path / "run")]
    opts = C.options_from_args(C.build_parser().parse_args(argv), argv)
    assert opts.presets == {"idm": "paper", "patchddm": "small"}
    err = capsys.readouterr().err
    assert "note: patchddm's default preset paper needs sides that are multiples of 128; using preset small" in err
    argv2 = argv + ["--preset", "paper"]
    with pytest.raises(C.UsageError, match=r"patchddm needs every side divisible by 64.*valid sides are multiples of 128"):
        C.options_from_args(C.build_parser().parse_args(argv2), argv2)


# ---------------------------------------------------------------------------------------- resume, messages


def _run_json(d: Path, model: str) -> None:
    import json

    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(json.dumps({
        "models": [model], "presets": {model: "tiny"}, "sizes": ["16"], "phases": ["train"], "batch": 1, "steps": 2,
        "warmup": 1, "seed": 3, "precision": "fp32", "device": "cpu", "timeout_s": 100, "min_energy_window_s": 0.5,
        "max_measure_s": None, "max_sweep_s": 60, "budgets": [], "predict_only": True, "quality": {"kept": 1},
    }))


def test_resume_takes_its_settings_from_run_json(tmp_path):
    m = "idm" if "idm" in idmbench.list_models() else idmbench.list_models()[0]
    d = tmp_path / "run"
    _run_json(d, m)
    argv = ["--resume", str(d), "--timeout", "50"]
    opts = cli.options_from_args(cli.parse_args(argv), argv)
    assert opts.models == [m] and opts.presets == {m: "tiny"} and opts.sizes == [(16, 16, 16)]
    assert opts.phases == ["train"] and opts.steps == 2 and opts.seed == 3 and opts.min_energy_window_s == 0.5
    assert opts.max_measure_s == float("inf") and opts.max_sweep_s == 60 and opts.budgets == []
    assert opts.predict_only and opts.resume and opts.out == d
    assert opts.timeout_s == 50  # a policy flag given again wins


def test_resume_refuses_to_change_what_the_folder_holds(tmp_path, capsys):
    names = idmbench.list_models()
    m, other = names[0], names[1]
    d = tmp_path / "run"
    _run_json(d, m)
    for flag, value in (("--models", other), ("--sizes", "32"), ("--preset", "small"), ("--phases", "sample"),
                        ("--seed", "4")):
        assert cli.main(["--resume", str(d), flag, value]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"resuming cannot change {flag}" in lines[0] and "--out" in lines[0], lines
    # the same value is no change
    ns = cli.parse_args(["--resume", str(d), "--models", m])
    assert ns.models == [m]


def test_plain_messages_for_common_mistakes(tmp_path, capsys):
    m = "idm" if "idm" in idmbench.list_models() else idmbench.list_models()[0]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli.main(["--models", m, "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "nonexistent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DIR" in err[0]
    assert cli.main(["--models", m, "report", str(tmp_path)]) == 2
    assert "goes first" in capsys.readouterr().err


def test_size_errors_pass_the_model_s_own_words_through(tmp_path, capsys):
    m = "idm" if "idm" in idmbench.list_models() else idmbench.list_models()[0]
    spec = idmbench.get_spec(m)
    side = spec.valid_sides(spec.config("small")) * 8 + 1
    with pytest.raises(ValueError) as exc:
        spec.check_size((side,) * 3, spec.config("small"))
    assert cli.main(["--models", m, "--sizes", str(side), "--out", str(tmp_path / "o")]) == 2
    line = capsys.readouterr().err.strip()
    assert line == f"error: {exc.value} (preset small)"


@pytest.mark.slow
def test_every_command_has_help_and_one_line_errors():
    for cmd in ("report", "check", "quality"):
        r = run_cli(cmd, "--help", timeout=120)
        assert r.returncode == 0, (cmd, r.stderr)
        assert r.stdout.startswith(f"usage: run_bench.py {cmd}"), (cmd, r.stdout[:200])
        r = run_cli(cmd, "--frobnicate", timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (cmd, r.stderr)


@pytest.mark.slow
def test_console_script_names_itself():
    import shutil

    exe = Path(sys.executable).with_name("idmbench")
    exe = exe if exe.exists() else Path(shutil.which("idmbench") or "")
    if not exe.name or not exe.exists():
        pytest.skip("the idmbench console script is not installed (pip install -e . creates it)")
    import subprocess

    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: idmbench ")
    r = subprocess.run([str(exe), "--frobnicate"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: unrecognized arguments: --frobnicate (see idmbench --help)"]
