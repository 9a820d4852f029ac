"""``DIR/run.json``: what a sweep ran, on what, when -- written at the start, updated as it learns (model
parameters, the calibrated CPU rate) and completed at the end (``status``: ``running``, ``complete``,
``interrupted``, or ``failed`` when the sweep itself hit an unexpected error).

A resumed sweep keeps the first command and start time and appends ``{"at", "command"}`` to
``resumed``. Keys written by others in the same folder (``quality`` from a quality run) are preserved.
``model_info`` holds each model's :meth:`~idmbench.registry.ModelSpec.describe` (its settings, where they
come from, which attention path runs, its recipe) for the report's methodology.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .. import results as R
from ..measure.predict import CUDA_CONTEXT_BYTES, CUDA_CONTEXT_LABEL
from ..registry import get_spec
from .records import now_iso

logger = logging.getLogger(__name__)


def read_run_json(path: Path) -> dict[str, Any]:
    """The contents of a ``run.json`` (``{}`` when absent); a malformed file raises ``ValueError``."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def model_info(models: list[str], presets: dict[str, str], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{model: spec.describe(cfg)}`` for the models of a sweep."""
    out: dict[str, Any] = {}
    for m in models:
        spec = get_spec(m)
        cfg = spec.config(presets[m], **overrides.get(m, {}))
        out[m] = spec.describe(cfg, presets[m])
    return out


class RunMeta:
    """The ``run.json`` of one sweep: :meth:`start`, then :meth:`update` as often as needed (each write is
    atomic), then :meth:`finish`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {}
        self._own: set[str] = set()  # the keys this sweep writes; every other key is read back from disk

    def start(self, opts: Any) -> None:
        """Write the metadata of a sweep about to run (``opts``: :class:`~idmbench.harness.sweep.SweepOptions`)."""
        o, env = opts, opts.env
        prev = read_run_json(self.path) if o.resume else {}
        resumed = list(prev.get("resumed", []))
        if prev:
            resumed.append({"at": now_iso(), "command": o.command})
        self.data = dict(prev)  # keeps keys others wrote (e.g. "quality")
        self._set({
            "command": prev.get("command", o.command),
            "models": o.models,
            "presets": {m: o.presets[m] for m in o.models},
            "overrides": {m: o.overrides[m] for m in o.models if o.overrides.get(m)},
            "model_info": model_info(o.models, o.presets, o.overrides),
            "sizes": [R.size_label(s) for s in o.sizes],
            "phases": o.phases,
            "steps": o.steps,
            "warmup": o.warmup,
            "batch": o.batch,
            "precision": o.precision,
            "device": o.device,
            "device_name": env.get("device_name", ""),
            "torch_version": env.get("torch_version", ""),
            "cuda_version": env.get("cuda_version", ""),
            "driver": env.get("driver", ""),
            "cpu_model": env.get("cpu_model", ""),
            "git_rev": env.get("git_rev", ""),
            "started": prev.get("started", now_iso()),
            "finished": None,
            "status": "running",
            "params": prev.get("params", {}),
            "cuda_context_overhead_bytes": CUDA_CONTEXT_BYTES,
            "cuda_context_overhead_source": CUDA_CONTEXT_LABEL,
            "seed": o.seed,
            "predict_only": o.predict_only,
            "timeout_s": o.timeout_s,
            "max_measure_s": None if math.isinf(o.max_measure_s) else o.max_measure_s,
            "max_sweep_s": None if math.isinf(o.max_sweep_s) else o.max_sweep_s,
            "cpu_memory_limit_bytes": o.cpu_memory_limit_bytes,
            "min_energy_window_s": o.min_energy_window_s,
            "budgets": [{"label": lbl, "bytes": b} for lbl, b in o.budgets],
            "environment": env,
            "resumed": resumed,
            "out": str(o.out),
            "nproc": list(getattr(o, "nproc", [1])),
            "launch": dict(getattr(o, "launch", {})),
            "executor": getattr(o, "executor", "local"),
            "ray_address": getattr(o, "ray_address", None),
        })

    def _set(self, values: dict[str, Any]) -> None:
        self._own.update(values)
        self.data.update(values)
        self._write()

    def update(self, **values: Any) -> None:
        """Set top-level keys and rewrite the file."""
        self._set(values)

    def finish(self, status: str) -> None:
        """Mark the run ``complete`` or ``interrupted`` with the time it ended."""
        self.update(finished=now_iso(), status=status)

    def _write(self) -> None:
        # another process (a quality run) may have written its keys since we read the file: keep its values
        try:
            on_disk = read_run_json(self.path)
        except ValueError as exc:
            logger.warning("%s; rewriting it", exc)
            on_disk = {}
        for k, v in on_disk.items():
            if k not in self._own:
                self.data[k] = v
        R.write_json(self.path, self.data)
