"""What a worker is asked (:class:`WorkerConfig`), what it answers (:class:`WorkerResult`), and the
:class:`~idmbench.results.ResultRow` each config becomes.

Both records travel as JSON between the sweep and the worker process (``config.json`` in,
``result.json`` out). A measured figure is named once, as a field of :class:`WorkerResult`; a field of
the same name in :class:`~idmbench.results.ResultRow` receives it (:func:`measured_row`), so adding a
measured column means adding the field to both dataclasses and filling it in the worker -- no key lists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Mapping

from .. import results as R

logger = logging.getLogger(__name__)

#: the worker's own status for "too slow for the time budget after all" (the sweep writes a predicted row)
STATUS_SKIPPED = "skipped"


def now_iso() -> str:
    """The local time with its UTC offset, to the second (``2025-01-31T14:02:11+01:00``)."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _from_mapping(cls: type, data: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        logger.debug("%s: ignoring unknown keys %s", cls.__name__, unknown)
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class WorkerConfig:
    """One job for ``python -m idmbench.harness.worker CONFIG.json``.

    Args:
        model / preset / overrides: what to build (:func:`idmbench.create_model`).
        size: volume (D, H, W) in voxels. phase: ``train`` | ``sample``. batch: volumes per step.
        steps: timed steps (at least; more fill the energy window). warmup: untimed steps first (>= 1).
        device: ``cpu`` | ``cuda:N``. precision: ``fp32`` | ``bf16`` | ``fp16``. seed: weights and data.
        min_energy_window_s: shortest energy window (s).
        imports: ``[module, sys.path entry]`` pairs to import first (models registered at run time).
        cpu_memory_limit_bytes: ``--cpu-memory-limit`` address-space cap (bytes) or None.
        safety_cap_bytes: without a user limit, the address space allowed beyond the worker's baseline
            (bytes; available RAM) so that a misprediction ends as an ``oom`` row, not swapping.
        time_budget_s: give up after the warm-up step if measuring would take longer (s), or None.
        result_path: where the worker writes its :class:`WorkerResult` as JSON (a data-parallel rank R
            writes ``result.rankR.json`` beside it).
        launch: empty for one process; else a :class:`~idmbench.harness.torchrun.LaunchSpec` as a mapping:
            the training step runs data-parallel in a torchrun group (:mod:`.torchrun`, :mod:`.ddp`).
    """

    model: str
    preset: str
    size: list[int]
    phase: str
    overrides: dict[str, Any] = field(default_factory=dict)
    batch: int = 1
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    min_energy_window_s: float = 1.0
    imports: list[list[str]] = field(default_factory=list)
    cpu_memory_limit_bytes: int | None = None
    safety_cap_bytes: int | None = None
    time_budget_s: float | None = None
    result_path: str = ""
    launch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, cfg: "WorkerConfig | Mapping[str, Any]") -> "WorkerConfig":
        """A :class:`WorkerConfig` from itself or from its JSON mapping (unknown keys are ignored)."""
        return cfg if isinstance(cfg, WorkerConfig) else _from_mapping(cls, cfg)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@dataclass
class WorkerResult:
    """A worker's answer: the status and every figure it measured (units in the names).

    ``status`` is ``ok``, ``oom``, ``error`` or ``skipped`` from the worker; the sweep adds ``timeout``
    and ``killed`` for workers it had to kill or that died without an answer. A failure keeps whatever
    was measured before it. ``phase_s`` holds how long each part of the worker took (s: ``startup``,
    ``build``, ``warmup``, ``track``, ``window``) -- the sweep's time estimates learn from it.
    Read like the JSON it travels as: ``res["status"]`` is ``res.status``.
    """

    status: str = R.STATUS_ERROR
    error: str = ""
    pid: int | None = None
    params: int | None = None
    net_shape: str = ""
    loss: float | None = None
    warmup_s: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None
    activation_bytes: int | None = None
    mem_source: str = ""
    param_bytes: int | None = None
    grad_bytes: int | None = None
    opt_bytes: int | None = None
    tracker_peak_bytes: int | None = None
    reserved_bytes: int | None = None
    nvml_used_bytes: int | None = None
    rss_peak_bytes: int | None = None
    step_time_s: float | None = None
    step_time_iqr_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    steps: int = 0
    warmup: int = 0
    voxels_per_s: float | None = None
    energy_window_s: float | None = None
    energy_j_per_step: float | None = None
    energy_source: str = "none"
    phase_s: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    notes: str = ""
    world_size: int = 1
    rank: int = 0
    group_voxels_per_s: float | None = None
    nosync_step_time_s: float | None = None
    allreduce_share: float | None = None
    ddp_bucket_bytes: int | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> "WorkerResult":
        return _from_mapping(cls, json.loads(text))

    @property
    def tracked_step_s(self) -> float | None:
        """Seconds of the tracked (memory) step, when measured."""
        return self.phase_s.get("track")


# ------------------------------------------------------------------------------------------ rows


def base_row(model: str, preset: str, size: tuple[int, int, int], phase: str, *, device: str, batch: int,
             precision: str, seed: int, env: Mapping[str, Any], pred: Any = None) -> R.ResultRow:
    """The row's identity, environment and (when ``pred`` is a successful or failed
    :class:`~idmbench.measure.predict.Prediction`) the predicted figures; no status figures yet."""
    row = R.ResultRow(
        model=model, preset=preset, size=R.size_label(size), phase=phase, device=device,
        voxels=int(math.prod(size)), batch=batch, precision=precision, steps=0, warmup=0,
        torch_version=str(env.get("torch_version", "")), device_name=str(env.get("device_name", "")),
        git_rev=str(env.get("git_rev", "")), seed=seed, energy_source="none", timestamp=now_iso(),
    )
    if pred is not None:
        row.params = pred.params
        row.flops_per_step = float(pred.flops) if pred.flops is not None else None
        row.predicted_peak_bytes = pred.peak_bytes
        row.predicted_activation_bytes = pred.activation_bytes
        row.net_shape = "x".join(map(str, pred.net_shape)) if pred.net_shape else ""
    return row


def predicted_row(base: R.ResultRow, pred: Any, reason: str) -> R.ResultRow:
    """``base`` as a ``predicted`` row (nothing ran: ``steps`` and ``warmup`` stay 0), or an ``error`` row
    when the prediction failed; ``reason`` says why it was not measured."""
    row = dataclasses.replace(base)
    row.notes = f"not measured: {reason}"
    if pred is not None and pred.ok:
        row.status = R.STATUS_PREDICTED
        row.peak_mem_bytes = pred.peak_bytes
        row.activation_bytes = pred.activation_bytes
        row.mem_source = "predicted"
    else:
        row.status = R.STATUS_ERROR
        row.error = f"prediction failed: {pred.error if pred is not None else 'no prediction'}"
    return row


_ROW_FIELDS = {f.name for f in fields(R.ResultRow)}
#: worker fields that are not row columns (kept in the worker log and the result JSON only)
_NOT_COLUMNS = {f.name for f in fields(WorkerResult)} - _ROW_FIELDS


def measured_row(base: R.ResultRow, res: WorkerResult, reason: str, pred: Any = None) -> R.ResultRow:
    """``base`` completed with the worker's answer: every :class:`WorkerResult` field that is also a
    :class:`~idmbench.results.ResultRow` column is copied (when set); sources are kept only for ``ok``
    rows; ``prediction_ratio`` = measured / predicted peak."""
    row = dataclasses.replace(base)
    for f in fields(WorkerResult):
        if f.name in _NOT_COLUMNS or f.name in ("notes", "status", "error"):
            continue
        v = getattr(res, f.name)
        if v is None or v == "":
            continue
        setattr(row, f.name, v)
    row.status = res.status if res.status in R.STATUSES else R.STATUS_ERROR
    if res.status not in R.STATUSES:
        logger.warning("worker answered an unknown status %r for %s; recorded as error", res.status, row.key())
    row.error = str(res.error or "")
    if row.status == R.STATUS_OK:
        if row.mem_source not in R.MEM_SOURCES:
            logger.warning("unknown memory source %r for %s", row.mem_source, row.key())
    else:
        row.mem_source = ""
        row.energy_source = "none"
    if row.peak_mem_bytes and row.predicted_peak_bytes and row.world_size <= 1:
        # (a data-parallel rank also holds DDP's buckets: the single-process prediction is not its peak)
        row.prediction_ratio = row.peak_mem_bytes / row.predicted_peak_bytes
    notes = [f"measured: {reason}"] if reason else []
    if pred is not None and pred.error:
        notes.append(f"prediction failed: {pred.error}")
    if res.notes:
        notes.append(str(res.notes))
    row.notes = "; ".join(notes)
    return row


def job_rows(base: R.ResultRow, pred: Any, results: list[WorkerResult], reason: str) -> tuple[list[R.ResultRow], WorkerResult | None]:
    """The rows of a finished job and, when it gave up as too slow (``skipped``, with a successful
    prediction), that result: then one ``predicted`` row stands for the config. Otherwise one
    :func:`measured_row` per rank (``world_size`` and ``rank`` come with each result)."""
    skipped = next((r for r in results if r.status == STATUS_SKIPPED), None)
    if skipped is not None and pred is not None and pred.ok:
        return [predicted_row(base, pred, skipped.error or "too slow")], skipped
    return [measured_row(base, res, reason, pred) for res in results], None
