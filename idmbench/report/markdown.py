"""``report.md``: a short Markdown summary for a terminal or a pull-request comment: the run in one line,
the headline sentences, the headline table, the largest-trainable-cube table and, when the folder holds a
quality run, its scores.

Tables are written by ``DataFrame.to_markdown`` (tabulate, GitHub pipe tables); :func:`md_escape` is the
one escaping step, applied to every cell first: ``|`` and backslashes for the table, ``<``, ``>``, ``&``
for the HTML that Markdown renderers pass through, so a model named ``<script>`` shows as text there too.
"""

from __future__ import annotations

import pandas as pd

from .data import RunData
from .headline import Headline
from .quality import scores_table
from .scaling import summary_table as scaling_table
from .tables import Table


def md_escape(text: object) -> str:
    """Text safe inside a Markdown table cell or paragraph."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return " ".join(s.split())  # no newlines inside a cell


def md_table(table: Table) -> str:
    """A GitHub-flavoured Markdown table, numbers right-aligned."""
    frame = pd.DataFrame([[md_escape(c) for c in row] for row in table.rows],
                         columns=[md_escape(h) for h in table.header])
    align = ["right" if j in table.numeric else "left" for j in range(len(table.header))]
    return frame.to_markdown(index=False, tablefmt="github", colalign=align, disable_numparse=True)


def _sentence(text: str) -> str:
    return md_escape(text[:1].upper() + text[1:]) + "."


def render_markdown(run: RunData, headline: Headline, title: str | None = None) -> str:
    m = run.meta
    q_models = list(dict.fromkeys(run.quality["model"])) if run.quality is not None and "model" in run.quality else []
    bits = [f"models: {', '.join(run.labels)}"] if run.labels else []
    if q_models:
        bits.append(f"quality run: {', '.join(q_models)}")
    for key, name in (("device_name", "device"), ("precision", "precision"), ("steps", "timed steps"),
                      ("git_rev", "git")):
        if m.get(key) not in (None, ""):
            bits.append(f"{name}: {m[key]}")
    if run.has_sweep:
        counts = run.frame["status"].value_counts()
        bits.append(f"{len(run.frame)} rows (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")")
    out = [f"# {md_escape(title or 'idmbench report')}", "", md_escape("; ".join(bits)), ""]
    if run.has_sweep:
        out += [f"- {md_escape(s)}" for s in headline.sentences]
        out.append("")
        if headline.table is not None:
            out += ["## Peak training memory", "", md_table(headline.table), "",
                    "Reduction = 1 − IDM/baseline; × = baseline/IDM; (pred.) = predicted, not measured.", ""]
        out += ["## Largest trainable cube per memory budget", "", md_escape(headline.budget_note), ""]
        if headline.budgets is not None:
            out += [md_table(headline.budgets), "", _sentence(headline.budgets.caption), ""]
            if headline.budget_hint:
                out += ["These are the presets this run used, not the paper-size networks: for those, run "
                        f"`{headline.budget_hint}`.", ""]
    if run.parallel is not None and len(run.parallel):
        scaling = scaling_table(run)
        out += ["## Data-parallel scaling (training)", "", md_table(scaling), "", _sentence(scaling.caption),
                "Peak memory is per rank (per GPU on CUDA) and includes DDP's gradient buckets; throughput is the "
                "whole group's.", ""]
    scores = scores_table(run)
    if scores is not None:
        out += ["## Quality", "", md_table(scores), "", _sentence(scores.caption), ""]
    out.append(f"Full report with plots, every row and the methodology: `report.html` in {md_escape(run.run_dir)}.")
    return "\n".join(out) + "\n"
