"""The report: a self-contained HTML page (plots, tables, methodology) and a short Markdown summary,
built from the files of one run folder only, so any old run can be re-reported::

    from idmbench.report import build_report
    build_report("reports/2025-01-01T12-00")   # writes report.html and report.md there

Modules: ``data`` (read the folder), ``headline`` (IDM vs baselines, largest trainable cube),
``plots`` (the five figures), ``tables`` (every row), ``html`` / ``markdown`` (render), ``units``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_report"]


def build_report(run_dir: str | Path, *, title: str | None = None, reference: str = "idm",
                 markdown: bool = True) -> Path:
    """Write ``run_dir/report.html`` (and ``run_dir/report.md`` unless ``markdown=False``); return the
    HTML path.

    ``reference`` is the model the headline compares against every other one. Raises ValueError with
    a one-line message when ``run_dir`` holds no results.csv.
    """
    from .data import load_run
    from .headline import build_headline
    from .html import render_html
    from .markdown import render_markdown
    from .plots import all_figures
    from .tables import detail_table, failures_table, notes_table, quality_table, results_tables

    run = load_run(run_dir)
    run.reference = reference
    headline = build_headline(run)
    page = render_html(run, headline, all_figures(run), results_tables(run), detail_table(run),
                       failures_table(run), quality_table(run), title=title, notes=notes_table(run))
    out = Path(run_dir) / "report.html"
    tmp = out.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a reader never sees half a page
    if markdown:
        (Path(run_dir) / "report.md").write_text(render_markdown(run, headline, title=title), encoding="utf-8")
    return out
