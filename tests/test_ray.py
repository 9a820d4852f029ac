"""``--executor ray``: each config's worker as a Ray task on a real local Ray instance with 2 CPUs (one Ray
session for the module). The rows equal the local executor's for the same 2-model, 1-size sweep, including
the ``error`` rows of a model whose forward raises (registered at run time, so the tasks' workers must
import its module); a Ctrl-C after the first row keeps what finished, and ``--resume`` completes the rest
without redoing it. Without Ray installed, asking for it is a one-line error with the install command.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest

from idmbench import results as R
from idmbench.harness.sweep import Sweep, SweepOptions

from conftest import REPO, register_failing_models

MODELS = ["idm", "fails-always"]
SIDE = 16
#: the columns the same config must fill (or leave empty) whichever executor ran it
SAME = ("model", "preset", "size", "phase", "status", "error", "mem_source", "world_size", "rank", "params",
        "net_shape", "voxels", "batch", "precision", "device", "predicted_peak_bytes", "flops_per_step")


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A local Ray instance with 2 CPUs for the whole module, and the failing test models registered."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    undo = register_failing_models(tmp_path_factory.mktemp("plugins"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        undo()


def _opts(out, executor: str) -> SweepOptions:
    return SweepOptions(models=list(MODELS), presets={m: "tiny" for m in MODELS}, sizes=[(SIDE,) * 3], out=out,
                        phases=["train", "sample"], steps=1, min_energy_window_s=0.2, report=False, executor=executor)


def _table(rows: list[R.ResultRow]) -> dict[tuple, dict]:
    return {(r.key(), r.world_size, r.rank): {c: getattr(r, c) for c in SAME} for r in rows}


@pytest.mark.slow
def test_ray_writes_the_local_executors_rows(ray_session, tmp_path):
    err = io.StringIO()
    assert Sweep(_opts(tmp_path / "local", "local"), out=io.StringIO(), err=io.StringIO()).run() == 0
    assert Sweep(_opts(tmp_path / "ray", "ray"), out=io.StringIO(), err=err).run() == 0, err.getvalue()
    local = R.read_rows(tmp_path / "local" / "results.csv")
    ray_rows = R.read_rows(tmp_path / "ray" / "results.csv")
    assert len(ray_rows) == len(local) == 4
    assert _table(ray_rows) == _table(local)
    by = {(r.model, r.phase): r for r in ray_rows}
    for phase in ("train", "sample"):
        ok, bad = by[("idm", phase)], by[("fails-always", phase)]
        assert ok.status == "ok" and ok.peak_mem_bytes and ok.step_time_s and ok.steps >= 1
        assert "ran as a Ray task on node" in ok.notes
        assert bad.status == "error" and "always fails in forward" in bad.error
    assert "submitted to ray" in err.getvalue()
    # each config's worker log came back from its task
    log = (tmp_path / "ray" / "logs" / f"fails-always_tiny_{SIDE}_train.log").read_text()
    assert log.startswith("# ran as a Ray task on node") and "always fails in forward" in log


@pytest.mark.slow
def test_ctrl_c_then_resume_completes_the_sweep(ray_session, tmp_path, sigint_raises):
    """SIGINT from the row hook right after the first row: exit 130, the finished rows kept (tasks finished
    by then too, the rest cancelled), run.json interrupted; --resume then runs only what is missing."""
    out = tmp_path / "run"
    first: list[R.ResultRow] = []

    def on_row(row: R.ResultRow) -> None:
        first.append(row)
        if len(first) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    err = io.StringIO()
    assert Sweep(_opts(out, "ray"), out=io.StringIO(), err=err, on_row=on_row).run() == 130, err.getvalue()
    kept = R.read_rows(out / "results.csv")
    assert 1 <= len(kept) < 4 and kept[0].key() == first[0].key()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert f"--resume {out}" in err.getvalue()
    done = {r.key() for r in kept}

    resumed: list[R.ResultRow] = []
    opts = _opts(out, "ray")
    opts.resume = True
    assert Sweep(opts, out=io.StringIO(), err=io.StringIO(), on_row=resumed.append).run() == 0
    rows = R.read_rows(out / "results.csv")
    assert len(rows) == 4 and len({r.key() for r in rows}) == 4
    assert not done & {r.key() for r in resumed}, "a finished config was measured again"
    assert {(r.model, r.status) for r in rows} == {("idm", "ok"), ("fails-always", "error")}
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_asking_for_ray_without_it_is_a_one_line_error(tmp_path):
    """With ``ray`` unimportable, --executor ray exits 2 with one line naming the install command."""
    code = ("import sys; sys.modules['ray'] = None; from idmbench.cli import main; "
            f"sys.exit(main(['--executor', 'ray', '--models', 'idm', '--sizes', '16', '--preset', 'tiny', "
            f"'--device', 'cpu', '--out', {str(tmp_path / 'o')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "pip install -e '.[ray]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
