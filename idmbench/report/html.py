"""Render the report page from ``templates/report.html.j2`` with jinja2, autoescape on.

Every string from outside the code (model names, paths, error messages, run.json values) reaches the
page only through the template, so it is escaped; figures are ``data:`` URIs, so the page needs no
network. A Content-Security-Policy meta tag forbids any script and any non-``data:`` resource.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import jinja2

from .data import RunData, phase_order, size_order, size_text
from .headline import Headline
from .plots import Figure
from .tables import Table
from ..units import fmt_num

#: at most this many sample images are inlined (each is a base64 copy of the PNG)
MAX_SAMPLES = 48
#: and none bigger than this (bytes)
MAX_SAMPLE_BYTES = 2 * 1024**2


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("idmbench.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _parse_time(text: object) -> dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _duration(started: object, finished: object) -> str:
    a, b = _parse_time(started), _parse_time(finished)
    if a is None or b is None:
        return ""
    try:
        secs = (b - a).total_seconds()
    except TypeError:  # naive vs aware
        return ""
    if secs < 0:
        return ""
    h, rem = divmod(int(round(secs)), 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _first(frame_col: Any) -> str:
    vals = [v for v in dict.fromkeys(frame_col) if isinstance(v, str) and v]
    return ", ".join(vals)


def run_facts(run: RunData) -> list[tuple[str, list[tuple[str, str]]]]:
    """Header facts in three groups (what was run, on what, when); each a list of (name, value text).
    Missing run.json keys fall back to what results.csv says, or are left out."""
    m, f = run.meta, run.frame

    def get(key: str, default: str = "") -> str:
        v = m.get(key)
        if v is None or v == "" or v == [] or v == {}:
            return default
        if isinstance(v, (list, tuple)):
            return ", ".join(str(x) for x in v)
        if isinstance(v, dict):
            return ", ".join(f"{k}: {x}" for k, x in v.items())
        return str(v)

    models = get("models", ", ".join(run.labels))
    presets = get("presets", _first(f["preset"]) if len(f) else "")
    sizes = m.get("sizes")
    sizes_txt = ", ".join(size_text(str(s)) for s in sizes) if isinstance(sizes, list) and sizes else \
        ", ".join(size_text(s) for s in size_order(f))
    params = m.get("params")
    params_txt = ", ".join(f"{k}: {fmt_num(v / 1e6)} M" for k, v in params.items() if isinstance(v, (int, float))) \
        if isinstance(params, dict) else ""
    what = [
        ("command", get("command")),
        ("models", models),
        ("presets", presets),
        ("volume sizes", sizes_txt),
        ("phases", get("phases", ", ".join(phase_order(f)))),
        ("timed steps / warm-up", " / ".join(x for x in (get("steps"), get("warmup")) if x)),
        ("batch", get("batch")),
        ("precision", get("precision", _first(f["precision"]) if len(f) else "")),
        ("parameters", params_txt),
    ]
    ctx = m.get("cuda_context_overhead_bytes")
    on_what = [
        ("device", get("device", _first(f["device"]) if len(f) else "")),
        ("device name", get("device_name", _first(f["device_name"]) if len(f) else "")),
        ("CPU", get("cpu_model")),
        ("torch", get("torch_version", _first(f["torch_version"]) if len(f) else "")),
        ("CUDA / driver", " / ".join(x for x in (get("cuda_version"), get("driver")) if x)),
        ("CUDA context constant",
         (f"{int(ctx) / 2**20:,.0f} MiB" + (f" ({m['cuda_context_overhead_source']})"
                                            if m.get("cuda_context_overhead_source") else ""))
         if isinstance(ctx, (int, float)) and ctx else ""),
        ("git revision", get("git_rev", _first(f["git_rev"]) if len(f) else "")),
    ]
    finished = m.get("finished")
    when = [
        ("started", get("started")),
        ("finished", get("finished") if finished else ("not recorded (sweep interrupted or still running?)"
                                                          if m else "")),
        ("duration", _duration(m.get("started"), finished)),
        ("run folder", str(run.run_dir)),
    ]
    return [(title, [(k, v) for k, v in items if v]) for title, items in
            (("What was run", what), ("On what", on_what), ("When", when))]


def status_counts(run: RunData) -> list[tuple[str, int]]:
    counts = run.frame["status"].value_counts()
    order = ["ok", "predicted", "oom", "error", "timeout"]
    return [(s, int(counts[s])) for s in order if s in counts] + \
        [(str(s), int(n)) for s, n in counts.items() if s not in order]


def sources_present(run: RunData) -> dict[str, list[str]]:
    """Which memory and energy sources this run's rows used (for the methodology section)."""
    f = run.frame
    mem = [s for s in dict.fromkeys(f["mem_source"]) if s]
    if (f["predicted_peak_bytes"].notna()).any() and "predicted" not in mem:
        mem.append("predicted")
    energy = [s for s in dict.fromkeys(f.loc[f["energy_j_per_step"].notna(), "energy_source"]) if s and s != "none"]
    return {"memory": mem, "energy": energy}


def prediction_check(run: RunData) -> str:
    """One sentence on measured/predicted ratios where both exist, or ''."""
    r = run.frame["prediction_ratio"].dropna()
    if not len(r):
        return ""
    worst = float((r - 1).abs().max())
    return (f"Where a size was both measured and predicted ({len(r)} row(s)), measured / predicted ranges "
            f"from {r.min():.3f} to {r.max():.3f} (worst deviation {worst * 100:.1f} %).")


def sample_images(run: RunData) -> tuple[list[tuple[str, str]], str]:
    """(name, data URI) of the sample mid-slices to inline, and a note on any left out."""
    out, skipped = [], 0
    for p in run.samples:
        if len(out) >= MAX_SAMPLES:
            skipped += 1
            continue
        try:
            data = p.read_bytes()
        except OSError:
            skipped += 1
            continue
        if len(data) > MAX_SAMPLE_BYTES or not data.startswith(b"\x89PNG\r\n\x1a\n"):
            skipped += 1
            continue
        out.append((p.name, "data:image/png;base64," + base64.b64encode(data).decode("ascii")))
    note = f"{skipped} sample image(s) not inlined (over {MAX_SAMPLES} images, over 2 MiB, or not a PNG)." \
        if skipped else ""
    return out, note


def render_html(run: RunData, headline: Headline, figures: list[Figure], tables: list[tuple[str, Table]],
                detail: Table, failures: Table | None, quality: Table | None, title: str | None = None,
                notes: Table | None = None) -> str:
    """The whole page as text."""
    samples, samples_note = sample_images(run)
    ctx = run.meta.get("cuda_context_overhead_bytes")
    title = title or "idmbench report"
    what = ", ".join(run.labels[:6]) + (" …" if len(run.labels) > 6 else "")
    device = str(run.meta.get("device_name") or run.meta.get("device") or "")
    page_title = f"{title}: {what}" + (f" on {device}" if device else "") if what else title
    return _env().get_template("report.html.j2").render(
        title=title,
        page_title=page_title,
        run=run,
        facts=run_facts(run),
        counts=status_counts(run),
        n_rows=len(run.frame),
        headline=headline,
        figures=figures,
        tables=tables,
        detail=detail,
        notes_table=notes,
        failures=failures,
        quality=quality,
        samples=samples,
        samples_note=samples_note,
        sources=sources_present(run),
        prediction_check=prediction_check(run),
        context_mib=(f"{int(ctx) / 2**20:,.0f} MiB" if isinstance(ctx, (int, float)) and ctx else ""),
        steps=run.meta.get("steps"),
        warmup=run.meta.get("warmup"),
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        notes=run.notes,
    )


