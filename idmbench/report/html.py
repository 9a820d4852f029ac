"""Render the report page from ``templates/report.html.j2`` with jinja2, autoescape on.

Every string from outside the code (model names, paths, error messages, run.json values) reaches the
page only through the template, so it is escaped; figures are ``data:`` URIs, so the page needs no
network. A Content-Security-Policy meta tag forbids any script and any non-``data:`` resource. The page
states when the run finished, read from its files, not when the page was built: the same files give
the same bytes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import jinja2

from . import methodology, quality
from .scaling import scaling_section
from .data import FAILED, RunData, phase_order, size_order, size_text
from .headline import Headline
from .plots import all_figures, energy_sentence
from .plotting import Figure, Omitted, legend_sentence
from .tables import THROUGHPUT_MEANING, detail_table, failures_table, notes_table, results_tables
from ..results import STATUSES
from ..units import fmt_bytes, fmt_num


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


def _get(m: dict[str, Any], key: str, default: str = "") -> str:
    v = m.get(key)
    if v is None or v == "" or v == [] or v == {}:
        return default
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items())
    return str(v)


def _machine(run: RunData) -> list[tuple[str, str]]:
    """The "on what" lines: each fact once; the GPU and CUDA lines only where a GPU was involved."""
    m, f = run.meta, run.frame
    env = m.get("environment") if isinstance(m.get("environment"), dict) else {}
    env = env or (run.quality_meta.get("environment") if isinstance(run.quality_meta.get("environment"), dict) else {})
    cpu = _get(m, "cpu_model") or _get(env, "cpu_model")
    cores = env.get("cpu_count")
    if cores:
        cpu = f"{cpu or 'CPU'} ({cores} cores)"
    torch_v = _get(m, "torch_version") or _get(env, "torch_version") or (_first(f["torch_version"]) if len(f) else "")
    git = _get(m, "git_rev") or _get(env, "git_rev") or (_first(f["git_rev"]) if len(f) else "")
    out: list[tuple[str, str]] = []
    if run.on_gpu:
        gpu = _get(m, "device_name") or _get(env, "device_name") or (_first(f["device_name"]) if len(f) else "")
        out.append(("GPU", gpu or _get(m, "device")))
        out.append(("CUDA / driver", " / ".join(x for x in (_get(m, "cuda_version") or _get(env, "cuda_version"),
                                                            _get(m, "driver") or _get(env, "driver")) if x)))
        ctx = m.get("cuda_context_overhead_bytes")
        if isinstance(ctx, (int, float)) and ctx:
            out.append(("CUDA context constant", f"{fmt_bytes(ctx, None, True)}, assumed"))
    out.append(("CPU", cpu or (_first(f["device_name"]) if len(f) else "")))
    out += [("torch", torch_v), ("git revision", git)]
    return out


def run_facts(run: RunData) -> list[tuple[str, list[tuple[str, str]]]]:
    """Header facts in groups (what was run, the quality run, on what, when); each a list of (name, value
    text). Missing run.json keys fall back to what the CSV files say, or are left out."""
    m, f = run.meta, run.frame
    groups: list[tuple[str, list[tuple[str, str]]]] = []
    if run.has_sweep:
        sizes = m.get("sizes")
        sizes_txt = ", ".join(size_text(str(s)) for s in sizes) if isinstance(sizes, list) and sizes else \
            ", ".join(size_text(s) for s in size_order(f))
        params = m.get("params")
        params_txt = ", ".join(f"{k}: {fmt_num(v / 1e6)} M" for k, v in params.items()
                               if isinstance(v, (int, float))) if isinstance(params, dict) else ""
        groups.append(("What was run", [
            ("command", _get(m, "command")),
            ("models", _get(m, "models", ", ".join(run.labels))),
            ("presets", _get(m, "presets", _first(f["preset"]) if len(f) else "")),
            ("volume sizes", sizes_txt),
            ("phases", _get(m, "phases", ", ".join(phase_order(f)))),
            ("timed steps / warm-up", "none: --predict, every figure predicted" if m.get("predict_only") is True
             else " / ".join(x for x in (_get(m, "steps"), _get(m, "warmup")) if x)),
            ("batch", _get(m, "batch")),
            ("precision", _get(m, "precision", _first(f["precision"]) if len(f) else "")),
            ("parameters", params_txt),
        ]))
    if run.quality_meta or run.has_quality:
        groups.append(("Quality run", quality.quality_facts(run)))
    groups.append(("On what", _machine(run)))
    started = m.get("started") or run.quality_meta.get("started")
    finished = m.get("finished") if run.has_sweep else run.quality_meta.get("finished")
    groups.append(("When", [
        ("started", str(started or "")),
        ("finished", str(finished) if finished else ("not recorded (interrupted or still running?)" if m else "")),
        ("duration", _duration(started, finished)),
        ("run folder", str(run.run_dir)),
    ]))
    return [(title, [(k, v) for k, v in items if v]) for title, items in groups if any(v for _, v in items)]


def status_counts(run: RunData) -> list[tuple[str, int]]:
    counts = run.frame["status"].value_counts()
    return [(s, int(counts[s])) for s in STATUSES if s in counts] + \
        [(str(s), int(n)) for s, n in counts.items() if s not in STATUSES]


def render_html(run: RunData, headline: Headline, title: str | None = None) -> str:
    """The whole page as text."""
    figures, omitted = all_figures(run) if run.has_sweep else ([], [])
    q_figs = [quality.loss_figure(run), quality.cost_figure(run)] if run.has_quality else []
    samples, samples_note = quality.sample_images(run)
    settings, settings_note = methodology.settings_table(run)
    title = title or "idmbench report"
    labels = run.labels or list(dict.fromkeys(str(x) for x in (run.quality["model"] if run.quality is not None
                                                                and "model" in run.quality.columns else [])))
    what = ", ".join(labels[:6]) + (" …" if len(labels) > 6 else "")
    return _env().get_template("report.html.j2").render(
        title=title,
        page_title=f"{title}: {what}" if what else title,
        run=run,
        facts=run_facts(run),
        counts=status_counts(run),
        n_rows=len(run.frame),
        headline=headline,
        figures=figures,
        omitted=omitted,
        legend=legend_sentence(),
        tables=results_tables(run),
        scaling=scaling_section(run) if run.has_sweep else None,
        detail=detail_table(run),
        notes_table=notes_table(run),
        failures=failures_table(run),
        failed_statuses=", ".join(FAILED),
        scores=quality.scores_table(run),
        cost=quality.cost_table(run),
        quality_errors=quality.errors_table(run),
        quality_notes=quality.quality_notes(run),
        quality_figures=[x for x in q_figs if isinstance(x, Figure)],
        quality_omitted=[x for x in q_figs if isinstance(x, Omitted)],
        samples=samples,
        samples_note=samples_note,
        settings=settings,
        settings_note=settings_note,
        sources=methodology.sources_present(run),
        prediction_check=methodology.prediction_check(run),
        energy_sentence=energy_sentence(run),
        throughput_meaning=THROUGHPUT_MEANING,
        gpu=run.on_gpu,
        steps=run.meta.get("steps"),
        warmup=run.meta.get("warmup"),
        finished=run.finished(),
        notes=run.notes,
    )
