"""The methodology section's data: how each model was configured and where its settings come from, which
measurement sources this run used, and how far predictions agreed with measurements.

Model settings are read from ``run.json["model_info"][model]``, which the sweep writes from
``ModelSpec.describe(cfg)``: ``description``, ``family``, ``settings`` (the config the model was built
with), ``source`` (the paper, repository or configuration the settings follow), ``attention`` (which
attention path ran), ``recipe`` (full volume, patch, wavelet, …), ``prediction`` (what the network
predicts) and ``network_input`` (what the network sees). Nothing is special-cased by model name: a model
is described by what its record says. Run folders written before that record existed get a note instead.
"""

from __future__ import annotations

from typing import Any

from .data import RunData
from .tables import Table

#: keys of a model_info record shown as their own columns, in order, with their header
INFO_COLUMNS = (("description", "model"), ("preset", "preset"), ("recipe", "training recipe"),
                ("network_input", "network input"),
                ("attention", "attention"), ("prediction", "predicts"), ("source", "settings follow"))


def _value(v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_value(x) for x in v) + ")"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _models(run: RunData) -> list[str]:
    names = list(dict.fromkeys(lab.split(" [")[0] for lab in run.labels))
    listed = run.quality_meta.get("models")
    if isinstance(listed, list):
        names += [str(m) for m in listed if str(m) not in names]
    names += [m for m in run.model_info if m not in names]
    return names


def settings_table(run: RunData) -> tuple[Table | None, str]:
    """(table of every model's configuration and its source, a note): one column per model, so the
    baselines read side by side; one row per model_info field. The table is None for a run folder whose
    run.json has no ``model_info`` (written before the sweep recorded it)."""
    models = _models(run)
    info = run.model_info
    if not info:
        return None, ("run.json holds no per-model settings record (model_info: sweeps write it; older sweeps "
                      "and a quality run alone do not), so each model's configuration is not stated here; the "
                      "README's model table gives the presets' settings.")
    shown = [m for m in models if m in info]
    fields = list(INFO_COLUMNS) + [("settings", "settings")]
    rows = []
    for key, name in fields:
        cells = []
        for m in shown:
            rec = info[m]
            if key == "settings":
                settings = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
                cells.append("; ".join(f"{k} = {_value(v)}" for k, v in settings.items()))
            else:
                cells.append(_value(rec.get(key)))
        if any(cells):
            rows.append([name] + cells)
    header = [""] + [m + (f" ({info[m]['family']})" if info[m].get("family") not in (None, "", m) else "")
                     for m in shown]
    table = Table(header=header, rows=rows, wrap=set(range(1, len(header))),
                  caption="each model as it ran (a column per model): its settings, and the paper, repository or "
                          "configuration they follow (run.json model_info)")
    missing = [m for m in models if m not in info]
    note = (f"run.json records no settings for: {', '.join(missing)}." if missing else "")
    return table, note


def sources_present(run: RunData) -> dict[str, list[str]]:
    """Which memory and energy sources this run's rows used (for the methodology section's tags)."""
    f = run.frame
    mem = [s for s in dict.fromkeys(f["mem_source"]) if s]
    if (f["predicted_peak_bytes"].notna()).any() and "predicted" not in mem:
        mem.append("predicted")
    energy = [s for s in dict.fromkeys(f.loc[f["energy_j_per_step"].notna(), "energy_source"]) if s and s != "none"]
    q = run.quality
    if q is not None:
        for col, out in (("mem_source", mem), ("energy_source", energy)):
            if col in q.columns:
                out += [s for s in dict.fromkeys(q[col]) if isinstance(s, str) and s and s != "none" and s not in out]
    return {"memory": mem, "energy": energy}


def prediction_check(run: RunData) -> str:
    """One sentence on measured/predicted ratios where both exist, or ''."""
    r = run.frame["prediction_ratio"].dropna()
    if not len(r):
        return ""
    worst = float((r - 1).abs().max())
    return (f"Where a size was both measured and predicted ({len(r)} row(s)), measured / predicted ranges "
            f"from {r.min():.3f} to {r.max():.3f} (worst deviation {worst * 100:.1f} %).")
