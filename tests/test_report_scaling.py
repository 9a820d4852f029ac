"""The report's scaling section (``report/scaling.py``): with data-parallel rows it shows group throughput
against world size (speed-up and efficiency from the single-process row), per-rank peak memory with DDP's
buckets, every rank's row and failed groups; those rows stay out of every other table and figure; a run
without them (every older folder) has no such section."""

from __future__ import annotations

import re

import pytest

from idmbench import results as R
from idmbench.report import build_report
from idmbench.report.data import load_run
from idmbench.report.scaling import groups, scaling_section

MiB = 2**20


def _row(**kw) -> R.ResultRow:
    base = dict(model="idm", preset="tiny", size="16", phase="train", status="ok", device="cpu", batch=1, voxels=4096,
                mem_source="cpu-tensors", energy_source="none", params=72849, steps=3, warmup=1)
    return R.ResultRow(**(base | kw))


@pytest.fixture
def scaling_run(tmp_path):
    """One model: a single-process training row (8,000 voxel/s, 1.5 MiB), a 2-rank group (20,000 voxel/s, a
    2 MiB peak per rank with 0.25 MiB of buckets), a 4-rank group whose rank 3 ran out of memory, and a sampling
    row (single-process)."""
    rows = [
        _row(voxels_per_s=8000.0, group_voxels_per_s=8000.0, peak_mem_bytes=int(1.5 * MiB), step_time_s=0.5),
        _row(phase="sample", voxels_per_s=9e4, peak_mem_bytes=MiB, step_time_s=0.05),
    ]
    for rank, peak in ((0, 2 * MiB), (1, 2 * MiB - 4096)):
        rows.append(_row(world_size=2, rank=rank, peak_mem_bytes=peak, ddp_bucket_bytes=MiB // 4, step_time_s=0.4 + rank / 100,
                         voxels_per_s=10240.0, group_voxels_per_s=20000.0, nosync_step_time_s=0.35, allreduce_share=0.1 + rank / 10))
    for rank in range(4):
        status = "oom" if rank == 3 else "error"
        err = "RuntimeError: out of memory" if rank == 3 else "rank lost its group after rank 3 ended with oom"
        rows.append(_row(world_size=4, rank=rank, status=status, error=err, mem_source=""))
    for r in rows:
        R.append_row(tmp_path / "results.csv", r)
    return tmp_path


def test_groups_speedup_efficiency_and_per_rank_memory(scaling_run):
    run = load_run(scaling_run)
    assert len(run.frame) == 2 and set(run.frame["world_size"]) == {1}  # the other figures see single processes
    assert len(run.parallel) == 6
    g2, g4 = groups(run)
    assert (g2["world_size"], g2["ok"], g2["status"]) == (2, True, "ok")
    assert g2["throughput"] == 20000.0 and g2["single"] == 8000.0
    assert g2["speedup"] == pytest.approx(2.5) and g2["efficiency"] == pytest.approx(1.25)
    assert g2["peak"] == 2 * MiB and g2["single_peak"] == 1.5 * MiB and g2["buckets"] == MiB // 4
    assert g2["step"] == pytest.approx(0.41) and g2["share"] == pytest.approx(0.2)
    assert (g4["world_size"], g4["ok"], g4["throughput"], g4["speedup"]) == (4, False, None, None)
    assert (g4["status"], g4["why"]) == ("oom", "RuntimeError: out of memory")  # the cause, not its partners' errors


def test_report_has_a_scaling_section_and_keeps_rank_rows_out_of_the_rest(scaling_run):
    html = build_report(scaling_run).read_text()
    assert '<section id="scaling">' in html and 'href="#scaling"' in html
    assert '<figure id="fig-scaling">' in html and "data:image/png;base64," in html
    scaling = html[html.index('<section id="scaling">'):html.index('<section id="tables">')]
    table = scaling[scaling.index('id="scaling-table"'):scaling.index('id="ranks-table"')]
    for cell in (">2.50<", ">125 %<", ">2.00\u00a0MiB<", ">1.50\u00a0MiB<", ">0.250\u00a0MiB<", ">0.410<", ">20 %<"):
        assert cell in table, cell
    assert "out of memory" in table  # the failed group's reason
    ranks = scaling[scaling.index('id="ranks-table"'):]
    assert len(re.findall(r"<tr class=", ranks)) == 6
    for text in ("0 of 2", "1 of 2", "3 of 4"):
        assert text in ranks
    # the per-phase tables hold the single-process rows only
    rest = html[html.index('<section id="tables">'):]
    train = rest[rest.index('id="rows-1"'):rest.index("</table>", rest.index('id="rows-1"'))]
    assert len(re.findall(r"<tr class=", train)) == 1
    assert "single-process rows of" in rest
    md = (scaling_run / "report.md").read_text()
    assert "## Data-parallel scaling (training)" in md and "| idm" in md


def test_no_section_without_data_parallel_rows(tmp_path):
    R.append_row(tmp_path / "results.csv", _row(voxels_per_s=8000.0, peak_mem_bytes=MiB, step_time_s=0.5))
    assert scaling_section(load_run(tmp_path)) is None
    html = build_report(tmp_path).read_text()
    assert 'id="scaling"' not in html and 'href="#scaling"' not in html
    assert "Data-parallel" not in (tmp_path / "report.md").read_text()


def test_a_group_without_a_single_process_row_has_no_speedup(tmp_path):
    for rank in range(2):
        R.append_row(tmp_path / "results.csv", _row(world_size=2, rank=rank, peak_mem_bytes=MiB, group_voxels_per_s=1e4,
                                                    step_time_s=0.3, ddp_bucket_bytes=1024))
    run = load_run(tmp_path)
    (g,) = groups(run)
    assert g["throughput"] == 1e4 and g["single"] is None and g["speedup"] is None
    sec = scaling_section(run)
    assert sec is not None and sec.figure is not None and len(sec.ranks.rows) == 2
    assert len(run.frame) == 0 and build_report(tmp_path).exists()
