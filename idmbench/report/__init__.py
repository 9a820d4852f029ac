"""The report: a self-contained HTML page (plots, tables, methodology) and a short Markdown summary,
built from the files of one run folder only, so any old run can be re-reported::

    from idmbench.report import build_report
    build_report("reports/2025-01-01T12-00")   # writes report.html and report.md there

A folder may hold a sweep (results.csv), a quality run (quality.csv, training.csv, samples/), or both;
the page shows what is there. Rebuilding from the same files gives the same bytes.

Modules: ``data`` (read the folder), ``headline`` (IDM vs baselines) and ``budgets`` (largest trainable
cube), ``plotting`` (the one legend vocabulary, figure skeletons) and ``plots`` (the sweep's figures),
``quality`` (scores, loss curves, samples, quality beside cost), ``tables`` (every row),
``methodology`` (model settings, sources), ``html`` / ``markdown`` (render).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_report", "check_run_dir"]


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path if a report can be built from it, else ``ValueError`` with one line (it does
    not exist, is not a folder, or holds neither results.csv nor quality.csv / training.csv). Reads no
    file: for a command line's up-front check (``run_bench.py report DIR``)."""
    from .data import check_run_dir as check

    return check(run_dir)


def build_report(run_dir: str | Path, *, title: str | None = None, reference: str = "idm",
                 markdown: bool = True) -> Path:
    """Write ``run_dir/report.html`` (and ``run_dir/report.md`` unless ``markdown=False``); return the
    HTML path.

    Args:
        run_dir: a run folder holding results.csv (a sweep), quality.csv / training.csv (a quality run),
            or both.
        title: the page title (default "idmbench report").
        reference: the model the headline compares against every other one.
        markdown: also write the Markdown summary.

    Raises:
        ValueError: one line, when ``run_dir`` does not exist, is not a folder, or holds neither a sweep
            nor a quality run.
    """
    from .data import load_run
    from .headline import build_headline
    from .html import render_html
    from .markdown import render_markdown

    run = load_run(run_dir)
    run.reference = reference
    headline = build_headline(run)
    page = render_html(run, headline, title=title)
    out = Path(run_dir) / "report.html"
    _write(out, page)
    if markdown:
        _write(Path(run_dir) / "report.md", render_markdown(run, headline, title=title))
    return out


def _write(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file, so a reader never sees half a page."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
