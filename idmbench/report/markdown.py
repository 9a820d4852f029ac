"""``report.md``: a short Markdown summary for a terminal or a pull-request comment: the run in one line,
the headline sentences, the headline table and the largest-trainable-cube table.

Cells are escaped for Markdown tables (``|``) and for the HTML that Markdown renderers pass through
(``<``, ``>``, ``&``), so a model named ``<script>`` shows as text there too.
"""

from __future__ import annotations

from .data import RunData
from .headline import Headline
from .tables import Table


def md_escape(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return " ".join(s.split())  # no newlines inside a cell


def md_table(table: Table) -> str:
    """A GitHub-flavoured Markdown table, numbers right-aligned."""
    head = "| " + " | ".join(md_escape(h) for h in table.header) + " |"
    rule = "| " + " | ".join("---:" if j in table.numeric else "---" for j in range(len(table.header))) + " |"
    body = ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in table.rows]
    return "\n".join([head, rule, *body])


def render_markdown(run: RunData, headline: Headline, title: str | None = None) -> str:
    m = run.meta
    what = ", ".join(run.labels) or "no models"
    bits = [f"models: {what}"]
    for key, name in (("device_name", "device"), ("precision", "precision"), ("steps", "timed steps"),
                      ("git_rev", "git")):
        if m.get(key) not in (None, ""):
            bits.append(f"{name}: {m[key]}")
    counts = run.frame["status"].value_counts()
    bits.append(f"{len(run.frame)} rows (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")")
    out = [f"# {md_escape(title or 'idmbench report')}", "", md_escape("; ".join(bits)), ""]
    out += [f"- {md_escape(s)}" for s in headline.sentences]
    out.append("")
    if headline.table is not None:
        out += ["## Peak training memory", "", md_table(headline.table), "",
                "Reduction = 1 − IDM/baseline; × = baseline/IDM; (pred.) = predicted, not measured.", ""]
    out += ["## Largest trainable cube per memory budget", "", md_escape(headline.budget_note), ""]
    if headline.budgets is not None:
        out += [md_table(headline.budgets), "", md_escape(headline.budgets.caption[:1].upper() + headline.budgets.caption[1:]) + ".", ""]
    out.append(f"Full report with plots, every row and the methodology: `report.html` in {md_escape(run.run_dir)}.")
    return "\n".join(out) + "\n"
