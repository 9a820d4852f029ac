"""Data-parallel rows (``run_bench.py --nproc N``): a real torchrun group of 2 CPU processes (gloo) writes a row
per rank with ``world_size`` 2; a rank that fails stops its group and both rows say why; torchrun's flags
for one and several nodes; the rows' new columns in old and new results files; and the one-line errors
of the new flags."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from idmbench import results as R
from idmbench.cli import main
from idmbench.harness.parallel import missing_world_sizes, world_sizes
from idmbench.harness.records import WorkerConfig, WorkerResult
from idmbench.harness.runner import plugin_imports
from idmbench.harness.torchrun import LaunchSpec, label_group, launch_for, rank_result_path, run_group

from conftest import FAST, run_cli

# ------------------------------------------------------------------------------------------- real groups


@pytest.mark.slow
def test_nproc_2_writes_a_row_per_rank(tmp_path):
    """The issue's command: both ranks' rows, world_size 2, each with its own peak memory and step time; DDP's
    buckets hold exactly one fp32 copy of the parameters and sit on top of the single-process peak; the
    group throughput is 2 x voxels / the slower rank's step; sampling stays single-process."""
    out = tmp_path / "run"
    r = run_cli("--nproc", "2", "--device", "cpu", "--models", "idm", "--sizes", "16", "--preset", "tiny",
                "--phases", "train,sample", "--budget", "none", "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    assert "sampling rows stay single-process" in r.stderr
    rows = R.read_rows(out / "results.csv")
    train = [x for x in rows if x.phase == "train"]
    sample = [x for x in rows if x.phase == "sample"]
    assert sorted((x.world_size, x.rank) for x in train) == [(2, 0), (2, 1)], rows
    assert [(x.world_size, x.rank) for x in sample] == [(1, 0)]
    slowest = max(x.step_time_s for x in train)
    for x in train:
        assert x.status == "ok", (x.status, x.error)
        assert x.mem_source == "cpu-tensors" and x.energy_source == "none"
        assert x.ddp_bucket_bytes == 4 * x.params  # one fp32 slot per parameter
        assert x.peak_mem_bytes >= x.predicted_peak_bytes + x.ddp_bucket_bytes
        assert x.prediction_ratio is None  # a single-process prediction is not a rank's peak
        assert x.step_time_s > 0 and x.nosync_step_time_s > 0 and 0.0 <= x.allreduce_share < 1.0
        assert math.isclose(x.group_voxels_per_s, 2 * x.batch * x.voxels / slowest, rel_tol=1e-9)
        assert "rank" in x.notes or "DDP" in x.notes
    assert (out / "logs" / "idm_tiny_16_train_ws2.log").exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["nproc"] == [2] and meta["launch"]["nnodes"] == 1
    # resuming the finished folder redoes nothing, and cannot change --nproc
    r2 = run_cli("--resume", str(out), *FAST)
    assert r2.returncode == 0, r2.stderr
    assert len(R.read_rows(out / "results.csv")) == 3
    r3 = run_cli("--resume", str(out), "--nproc", "4")
    assert r3.returncode == 2 and "cannot change --nproc" in r3.stderr


@pytest.mark.slow
def test_a_failing_rank_stops_its_group_and_both_rows_say_why(tmp_path, failing_models):
    """Rank 1 raises in forward; rank 0 loses its partner in the gradient all-reduce (gloo: connection closed)
    or is stopped by torchrun first: rank 1's row is its own error, rank 0's names rank 1's failure."""
    job = WorkerConfig(model="fails-on-rank1", preset="tiny", size=[8, 8, 8], phase="train", steps=1,
                       min_energy_window_s=0.0, imports=plugin_imports(["fails-on-rank1"]),
                       launch=LaunchSpec(nproc_per_node=2).to_dict())
    res = run_group(job, timeout_s=240, log_path=tmp_path / "group.log")
    assert [(r.rank, r.world_size) for r in res] == [(0, 2), (1, 2)]
    assert res[1].status == "error" and "always fails in forward" in res[1].error, res[1]
    assert res[0].status == "error" and "after rank 1 ended with error (RuntimeError: this test model" in res[0].error, res[0]
    assert "\n" not in res[0].error and "\n" not in res[1].error


# ------------------------------------------------------------------------------------------- torchrun's flags


def test_torchrun_flags_for_one_and_several_nodes():
    one = LaunchSpec(nproc_per_node=2)
    assert one.world_size == 2
    assert one.torchrun_args("x") == ["--nproc-per-node=2", "--max-restarts=0", "--standalone"]
    c10d = LaunchSpec(nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29500", rdzv_id="lab")
    assert c10d.world_size == 16 and c10d.backend() == "c10d"
    assert c10d.torchrun_args("lab-idm") == ["--nproc-per-node=8", "--max-restarts=0", "--nnodes=2",
                                              "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=lab-idm"]
    static = LaunchSpec(nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500")
    assert static.backend() == "static" and static.torchrun_args("r")[-1] == "--node-rank=1"
    with pytest.raises(ValueError, match="--rdzv-endpoint"):
        LaunchSpec(nproc_per_node=2, nnodes=2)
    with pytest.raises(ValueError, match="outside 0..1"):
        LaunchSpec(nproc_per_node=2, nnodes=2, node_rank=2, rdzv_endpoint="h:1")
    with pytest.raises(ValueError, match="c10d, static"):
        LaunchSpec(rdzv_backend="etcd")


def test_world_sizes_and_launch_per_job():
    assert world_sizes("train", [1, 2, 4], {"nnodes": 1}) == [1, 2, 4]
    assert world_sizes("train", [2], {"nnodes": 2}) == [4]
    assert world_sizes("sample", [2, 4], {"nnodes": 1}) == [1]
    assert launch_for(1, {"nnodes": 1}) == {}
    assert launch_for(8, {"nnodes": 2, "rdzv_endpoint": "h:1"}) == {"nnodes": 2, "rdzv_endpoint": "h:1", "nproc_per_node": 4}
    # resume: what is missing, a predicted row (0) standing for every world size
    assert missing_world_sizes({1}, "train", [1, 2], {"nnodes": 1}) == [2]
    assert missing_world_sizes({0}, "train", [1, 2], {"nnodes": 1}) == []
    assert missing_world_sizes(set(), "sample", [2], {"nnodes": 1}) == [1]
    assert rank_result_path("/x/result.json", 3) == Path("/x/result.rank3.json")


def test_ranks_without_a_result_are_labelled_from_the_others():
    death = WorkerResult(status="error", error="torchrun exited with code 1 without a result", wall_s=5.0)
    oom = WorkerResult(status="oom", error="CUDA out of memory")
    out = label_group({2: oom}, 3, death)
    assert [(r.rank, r.world_size, r.status) for r in out] == [(0, 3, "oom"), (1, 3, "oom"), (2, 3, "oom")]
    assert "after rank 2 ended with oom (CUDA out of memory)" in out[0].error and out[2].error == "CUDA out of memory"
    # no rank answered: every rank gets the launcher's own end (e.g. a timeout)
    timeout = WorkerResult(status="timeout", error="exceeded --timeout 60 s; worker killed")
    out = label_group({}, 2, timeout)
    assert [(r.rank, r.status) for r in out] == [(0, "timeout"), (1, "timeout")] and out[0] is not out[1]
    # a rank whose own error only says it lost its partner names the rank that failed first-hand
    lost = WorkerResult(status="error", error="RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    out = label_group({0: lost, 1: oom}, 2, death)
    assert out[0].status == "oom" and out[0].error.startswith("rank 0 lost its group after rank 1 ended with oom")
    assert "Connection closed by peer" in out[0].error and out[1].error == "CUDA out of memory"
    # every local rank fine but one missing (it ran on another node): an error that says so
    ok = WorkerResult(status="ok")
    out = label_group({0: ok}, 2, death)
    assert out[0].status == "ok" and out[1].status == "error" and "on this node" in out[1].error


# ------------------------------------------------------------------------------------------- rows and files


def test_old_results_files_still_read_and_get_the_new_columns(tmp_path):
    """A results.csv from before the data-parallel columns: its rows read with world_size 1 and rank 0, and
    appending a new row (a resumed sweep) rewrites the header so the file stays one table."""
    path = tmp_path / "results.csv"
    old_cols = [c for c in R.COLUMNS if c not in ("world_size", "rank", "group_voxels_per_s", "nosync_step_time_s",
                                                 "allreduce_share", "ddp_bucket_bytes")]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old_cols)
        w.writeheader()
        w.writerow({c: "" for c in old_cols} | {"model": "idm", "preset": "tiny", "size": "16", "phase": "train",
                                                "status": "ok", "peak_mem_bytes": "123", "batch": "1"})
    (old,) = R.read_rows(path)
    assert (old.world_size, old.rank, old.peak_mem_bytes) == (1, 0, 123)
    R.append_row(path, R.ResultRow(model="idm", preset="tiny", size="16", phase="train", world_size=2, rank=1,
                                   ddp_bucket_bytes=400))
    with open(path, newline="") as fh:
        assert next(csv.reader(fh)) == R.COLUMNS
    rows = R.read_rows(path)
    assert [(r.world_size, r.rank, r.peak_mem_bytes, r.ddp_bucket_bytes) for r in rows] == [(1, 0, 123, None), (2, 1, None, 400)]
    assert R.done_world_sizes(path) == {("idm", "tiny", "16", "train"): {1, 2}}


# ------------------------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize("args,message", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "two"], "--nproc must be a whole number"),
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--node-rank", "1"], "--node-rank and --rdzv-endpoint are for several nodes"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0"], "--rdzv-endpoint must be HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:29500", "--node-rank", "2"], "outside 0..1"),
    (["--ray-address", "auto"], "--ray-address auto needs --executor ray"),
    (["--executor", "slurm"], "valid"),
    (["--executor", "ray", "--nnodes", "2", "--rdzv-endpoint", "h:1"], "use torchrun's rendezvous"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--max-measure-s", "60"], "every node must measure the same"),
])
def test_bad_parallel_flags_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(["--models", "idm", "--sizes", "16", "--preset", "tiny", "--device", "cpu", "--out",
                 str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # nothing started, not even the output folder


def test_compare_leaves_data_parallel_rows_out(tmp_path):
    """``compare`` checks measured against predicted memory of single processes only: a rank's peak also
    holds DDP's buckets, which no single-process prediction includes."""
    import io

    from idmbench.harness.compare import compare

    common = dict(model="idm", preset="tiny", size="16", phase="train", status="ok", mem_source="cpu-tensors",
                  predicted_peak_bytes=1000, energy_source="none")
    R.append_row(tmp_path / "results.csv", R.ResultRow(**common, peak_mem_bytes=1000))
    for rank in range(2):
        R.append_row(tmp_path / "results.csv", R.ResultRow(**common, peak_mem_bytes=1400, world_size=2, rank=rank))
    buf = io.StringIO()
    assert compare(tmp_path, out=buf) == 0, buf.getvalue()
    assert "2 data-parallel row(s) (world_size > 1) not compared" in buf.getvalue()
