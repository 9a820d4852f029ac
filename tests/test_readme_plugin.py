"""The README's "Adding your own model" guide works exactly as written (issue 11 item 1).

The plugin's files are extracted from README.md — every fenced block in that section whose first line is
a comment naming its path — and nothing else is added. The fast test checks the package is complete and
its entry point importable in-process; the slow test ``pip install``s it into a temporary target folder
(``--no-deps --no-build-isolation --no-index``: no network, nothing written outside the temporary
folder, nothing left in the venv), then, in fresh interpreters with that folder on ``PYTHONPATH``,
checks ``idmbench.list_models()`` lists it and runs the README's ``--predict`` sweep with it.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import idmbench
from idmbench.results import read_rows

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Adding your own model"
#: a fenced block: ```lang, a first line that is a comment naming a path, the body, ```
BLOCK = re.compile(r"^```[a-z]*\n(?:#|//) ?(?P<path>[\w./-]+\.\w+)\n(?P<body>.*?)^```", re.M | re.S)


def readme_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    rest = text.split(SECTION, 1)[1]
    nxt = re.search(r"^## ", rest, flags=re.M)
    return rest[: nxt.start()] if nxt else rest


def plugin_files() -> dict[str, str]:
    """path -> content of every file the guide shows (the naming comment line stays in the file)."""
    files: dict[str, str] = {}
    for m in BLOCK.finditer(readme_section()):
        first = m.group(0).split("\n", 2)[1]
        assert m.group("path") not in files, f"the README shows {m.group('path')} twice"
        files[m.group("path")] = first + "\n" + m.group("body")
    return files


def write_plugin(root: Path) -> Path:
    """Write the guide's files under ``root``; return the project folder (``root/mypkg``)."""
    files = plugin_files()
    for rel, body in files.items():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(body, encoding="utf-8")
    tops = {Path(rel).parts[0] for rel in files}
    assert len(tops) == 1, f"the guide's files should share one project folder; got {sorted(tops)}"
    return root / tops.pop()


def _entry_point(project: Path) -> tuple[str, str, str]:
    """(entry-point name, module, attribute) from the guide's pyproject.toml."""
    meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    eps = meta["project"]["entry-points"][idmbench.registry.ENTRY_POINT_GROUP]
    assert len(eps) == 1, eps
    name, target = next(iter(eps.items()))
    module, _, attr = target.partition(":")
    return name, module, attr


def test_readme_plugin_is_a_complete_package(tmp_path):
    """The files form an installable project (build system, name, version, entry point) whose entry point
    names a module inside the package; that module registers a model that follows the public contract."""
    files = plugin_files()
    assert {"mypkg/pyproject.toml", "mypkg/mypkg/__init__.py", "mypkg/mypkg/bench.py"} <= set(files), sorted(files)
    project = write_plugin(tmp_path)
    meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["build-system"]["build-backend"] and meta["build-system"]["requires"]
    assert meta["project"]["name"] and meta["project"]["version"]
    name, module, attr = _entry_point(project)
    assert (project / Path(*module.split("."))).with_suffix(".py").is_file(), f"{module} is not inside the package"
    # the file tree drawn in the README names the same files
    tree = readme_section().split("```", 2)[1]
    for rel in files:
        assert Path(rel).name in tree, f"{rel} is missing from the README's file tree"

    sys.path.insert(0, str(project))
    try:
        mod = importlib.import_module(module)
        spec = getattr(mod, attr)()
        assert isinstance(spec, idmbench.ModelSpec) and spec.name == name
        idmbench.register(spec)
        try:
            model = idmbench.create_model(name, preset="tiny")
            x = torch.randn(2, 1, 8, 8, 8)
            out = model(x=x, timesteps=torch.tensor([3, 700]), context=None)  # MONAI calls by keyword
            assert out.shape == x.shape
            out.square().mean().backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
            one = model(x, torch.tensor([5]))  # a (1,)-shaped timestep broadcasts
            assert one.shape == x.shape
        finally:
            idmbench.registry.unregister(name)
    finally:
        sys.path.remove(str(project))
        for m in [m for m in sys.modules if m == module.split(".")[0] or m.startswith(module.split(".")[0] + ".")]:
            del sys.modules[m]


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.slow
def test_readme_plugin_installs_and_benchmarks(tmp_path):
    """pip-install the README's plugin (into a temporary target folder), list it, and run the README's
    --predict sweep with it; the rows for the plugin are there with a predicted training peak."""
    project = write_plugin(tmp_path / "src")
    name = _entry_point(project)[0]
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--no-cache-dir", "--quiet", "--target", str(site), str(project)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env(site))
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert list(site.glob("*.dist-info/entry_points.txt")), "the installed plugin has no entry_points.txt"

    env = _env(site)
    code = "import warnings, idmbench; warnings.simplefilter('error'); print(','.join(idmbench.list_models()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = proc.stdout.strip().splitlines()[-1].split(",")
    assert name in models and "idm" in models, models

    out = tmp_path / "out"
    cmd = [sys.executable, "run_bench.py", "--models", f"idm,{name}", "--sizes", "16", "--predict",
           "--budget", "none", "--no-report", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, f"sweep failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    rows = [r for r in read_rows(out / "results.csv") if r.model == name]
    assert {r.phase for r in rows} == {"train", "sample"}, rows
    for r in rows:
        assert r.status == "predicted" and r.error == "", (r.phase, r.status, r.error)
        assert r.predicted_peak_bytes and r.predicted_peak_bytes > 0
    # the in-process registry of this test session never saw the plugin: nothing leaked into the venv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert name not in idmbench.list_models()
