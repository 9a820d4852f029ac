"""The sweep: models x volume sizes x phases, each config measured in a fresh worker or predicted.

Output folder ``DIR``:

* ``results.csv`` -- one :class:`~idmbench.results.ResultRow` per (model, preset, size, phase), appended
  and fsync'd the moment the config finishes, so an interrupted or killed sweep keeps every finished row;
  ``--resume DIR`` skips the configs already there.
* ``run.json`` -- what was run, on what, when (written at the start, completed at the end).
* ``budgets.csv`` -- the largest trainable cube per model and memory budget (predicted).
* ``logs/`` -- each worker's stderr.
* ``report.html`` etc. -- :func:`idmbench.report.build_report` at the end (a failure there loses nothing).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from .. import results as R
from ..measure.predict import CUDA_CONTEXT_BYTES, CUDA_CONTEXT_LABEL, Prediction, predictor
from ..registry import get_spec
from . import budget as B
from .policy import Decision, Policy, calibrate_cpu_flop_rate
from .progress import Progress, budget_table, summary_table
from ..units import format_bytes, format_seconds, format_si

PKG_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SweepOptions:
    """A validated sweep request (the CLI builds it; units in the names)."""

    models: list[str]
    presets: dict[str, str]
    sizes: list[tuple[int, int, int]]
    out: Path
    phases: list[str] = field(default_factory=lambda: ["train", "sample"])
    batch: int = 1
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    predict_only: bool = False
    budgets: list[tuple[str, int]] = field(default_factory=list)
    timeout_s: float = 600.0
    cpu_memory_limit_bytes: int | None = None
    max_measure_s: float = math.inf
    max_sweep_s: float = math.inf
    seed: int = 0
    min_energy_window_s: float = 1.0
    report: bool = True
    resume: bool = False
    command: str = ""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler (and used for Ctrl-C)."""


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


_PRCTL: Any = None


def _load_prctl() -> Any:
    """``prctl`` from libc, looked up in the parent (no dynamic loading between fork and exec)."""
    global _PRCTL
    if _PRCTL is None and sys.platform.startswith("linux"):
        try:
            _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _PRCTL = False
    return _PRCTL or None


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Worker dies with its parent (Linux ``PR_SET_PDEATHSIG``), so a killed sweep leaves no orphan."""
    if _PRCTL:
        _PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


def _plugin_imports(models: list[str]) -> list[list[str]]:
    """``[module, sys.path entry]`` pairs a worker imports so that models registered at run time with
    :func:`idmbench.register` (not through an entry point) exist there too."""
    out = []
    for m in models:
        spec = get_spec(m)
        mod = getattr(spec.build, "__module__", "") or ""
        if spec.source != "builtin" or not mod or mod == "__main__" or mod.startswith("idmbench."):
            continue
        path = ""
        module = sys.modules.get(mod)
        file = getattr(module, "__file__", None)
        if file:
            root = Path(file).resolve().parent
            for _ in range(mod.count(".")):
                root = root.parent
            path = str(root)
        if [mod, path] not in out:
            out.append([mod, path])
    return out


def repair_csv(path: Path) -> None:
    """Drop a half-written last line (a sweep killed mid-write) so the file parses."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n")
        with open(path, "r+b") as fh:
            fh.truncate(cut + 1 if cut >= 0 else 0)


def done_keys(path: Path) -> set[tuple[str, str, str, str]]:
    """Keys (model, preset, size, phase) of rows with a final status already in ``results.csv``."""
    if not path.exists() or path.stat().st_size == 0:
        return set()
    return {r.key() for r in R.read_rows(path) if r.status in R.STATUSES}


def run_worker(cfg: dict[str, Any], *, timeout_s: float, log_path: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Run one config in ``python -m idmbench.harness.worker`` and return its result dict.

    Over ``timeout_s`` seconds the worker's process group is killed: status ``timeout``. A worker that
    dies without a result (segfault, the kernel's OOM killer) becomes ``error`` / ``oom`` with the reason.
    Ctrl-C kills the worker and re-raises.
    """
    with tempfile.TemporaryDirectory(prefix="idmbench-") as tmp:
        cfg = dict(cfg)
        cfg_path = Path(tmp) / "config.json"
        cfg["result_path"] = str(Path(tmp) / "result.json")
        cfg_path.write_text(json.dumps(cfg))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PKG_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "idmbench.harness.worker", str(cfg_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=_set_pdeathsig if _load_prctl() else None,
            )
            killed_for_timeout = False
            try:
                while True:
                    try:
                        proc.wait(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        if progress is not None:
                            progress.tick()
                        if time.monotonic() - t0 > timeout_s:
                            killed_for_timeout = True
                            _kill(proc)
                            break
            except BaseException:
                _kill(proc)
                raise
        wall = time.monotonic() - t0
        if killed_for_timeout:
            return {"status": R.STATUS_TIMEOUT, "error": f"exceeded --timeout {timeout_s:g} s; worker killed", "wall_s": wall}
        res_path = Path(cfg["result_path"])
        if res_path.exists():
            try:
                res = json.loads(res_path.read_text())
                res.setdefault("wall_s", wall)
                return res
            except json.JSONDecodeError:
                pass
        rc = proc.returncode
        tail = _last_line(log_path)
        if rc is not None and rc < 0:
            sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            if -rc == signal.SIGKILL:
                return {"status": R.STATUS_OOM, "error": "worker killed by SIGKILL without a result (most likely the kernel's out-of-memory killer)", "wall_s": wall}
            return {"status": R.STATUS_ERROR, "error": f"worker died of {sig}" + (f": {tail}" if tail else ""), "wall_s": wall}
        return {"status": R.STATUS_ERROR, "error": f"worker exited with code {rc} without a result" + (f": {tail}" if tail else ""), "wall_s": wall}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _cfg_label(model: str, size: tuple[int, int, int], phase: str) -> str:
    return f"{model} {R.size_label(size)}{'^3' if len(set(size)) == 1 else ''} {phase}"


class Sweep:
    """One sweep run (see :func:`run_sweep`)."""

    def __init__(self, opts: SweepOptions, *, out: TextIO | None = None, err: TextIO | None = None) -> None:
        if not opts.env:
            from ..measure.env import capture

            opts.env = capture(opts.device)
        self.o = opts
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.dir = Path(opts.out)
        self.csv = self.dir / "results.csv"
        self.run_json = self.dir / "run.json"
        self.meta: dict[str, Any] = {}
        self.preds: dict[tuple[str, tuple[int, int, int], str], Prediction] = {}
        self.budget_rows: list[B.BudgetRow] = []
        self.params: dict[str, int] = {}
        self.reasons: dict[tuple[str, str, str, str], str] = {}

    # -- metadata -----------------------------------------------------------------------------------
    def _write_meta(self, **updates: Any) -> None:
        self.meta.update(updates)
        tmp = self.run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.run_json)

    def _start_meta(self) -> None:
        o, env = self.o, self.o.env
        prev: dict[str, Any] = {}
        if o.resume and self.run_json.exists():
            try:
                prev = json.loads(self.run_json.read_text())
            except json.JSONDecodeError:
                prev = {}
        self.meta = dict(prev)
        resumed = list(prev.get("resumed", []))
        if o.resume and prev:
            resumed.append({"at": _now(), "command": o.command})
        self.meta.update(
            {
                "command": prev.get("command", o.command) if o.resume and prev else o.command,
                "models": o.models,
                "presets": {m: o.presets[m] for m in o.models},
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
                "started": prev.get("started", _now()) if o.resume and prev else _now(),
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
                "out": str(self.dir),
            }
        )
        self._write_meta()

    # -- the run --------------------------------------------------------------------------------------
    def configs(self) -> list[tuple[str, tuple[int, int, int], str]]:
        """Run order: sizes from small to large, every model at a size before the next size (so the
        sweep's time budget reaches every model, and measured rates inform the larger sizes), train
        then sample."""
        sizes = sorted(self.o.sizes, key=lambda s: (math.prod(s), s))
        return [(m, s, ph) for s in sizes for m in self.o.models for ph in self.o.phases]

    def display_order(self) -> list[tuple[str, tuple[int, int, int], str]]:
        """Summary order: model, then size, then phase."""
        sizes = sorted(self.o.sizes, key=lambda s: (math.prod(s), s))
        return [(m, s, ph) for m in self.o.models for s in sizes for ph in self.o.phases]

    def key(self, model: str, size: tuple[int, int, int], phase: str) -> tuple[str, str, str, str]:
        return (model, self.o.presets[model], R.size_label(size), phase)

    def _predictor(self, model: str):
        return predictor(model, self.o.presets[model], batch=self.o.batch, precision=self.o.precision,
                         overrides=self.o.overrides.get(model), seed=self.o.seed)

    def predict_all(self, todo: list[tuple[str, tuple[int, int, int], str]]) -> None:
        t0 = time.monotonic()
        for model in self.o.models:
            tm = time.monotonic()
            mine = [c for c in todo if c[0] == model]
            for (_m, size, phase) in mine:
                self.preds[(model, size, phase)] = self._predictor(model).predict(size, phase)
            fails = [p for p in (self.preds[c] for c in mine) if not p.ok]
            if mine:
                self._log(f"  predicted {model} ({self.o.presets[model]}): {len(mine)} configs in {format_seconds(time.monotonic() - tm)}"
                          + (f"; {len(fails)} failed: {fails[0].error}" if fails else ""))
            for p in (self.preds[c] for c in mine):
                if p.params is not None:
                    self.params[model] = int(p.params)
        if todo:
            self._log(f"predictions done in {format_seconds(time.monotonic() - t0)}")

    def compute_budgets(self) -> None:
        if not self.o.budgets:
            return
        t0 = time.monotonic()
        rows: list[B.BudgetRow] = []
        for model in self.o.models:
            spec = get_spec(model)
            cfg = spec.config(self.o.presets[model], **self.o.overrides.get(model, {}))
            multiple = spec.valid_sides(cfg)
            pr = self._predictor(model)

            def peak_at(side: int, pr=pr) -> int | None:
                p = pr.predict((side, side, side), "train", flops=False)
                return p.peak_bytes if p.ok else None

            known = {
                s[0]: (p.peak_bytes if p.ok else None)
                for (m, s, ph), p in self.preds.items()
                if m == model and ph == "train" and len(set(s)) == 1 and s[0] % multiple == 0
            }
            rows += B.budget_rows(model, self.o.presets[model], self.o.budgets, peak_at, multiple,
                                  batch=self.o.batch, precision=self.o.precision, known=known)
            try:
                self.params.setdefault(model, int(pr.predict((multiple,) * 3, "train", flops=False).params or 0))
            except Exception:
                pass
        self.budget_rows = rows
        B.write_budgets(self.dir / "budgets.csv", rows)
        self._log(f"largest trainable cubes per budget predicted in {format_seconds(time.monotonic() - t0)} -> budgets.csv")

    def _base_row(self, model: str, size: tuple[int, int, int], phase: str, pred: Prediction | None) -> R.ResultRow:
        o, env = self.o, self.o.env
        row = R.ResultRow(
            model=model, preset=o.presets[model], size=R.size_label(size), phase=phase,
            device=o.device, voxels=int(math.prod(size)), batch=o.batch, precision=o.precision,
            steps=0, warmup=o.warmup, torch_version=env.get("torch_version", ""),
            device_name=env.get("device_name", ""), git_rev=env.get("git_rev", ""), seed=o.seed,
            energy_source="none",
        )
        if pred is not None:
            row.params = pred.params
            row.flops_per_step = float(pred.flops) if pred.flops is not None else None
            row.predicted_peak_bytes = pred.peak_bytes
            row.predicted_activation_bytes = pred.activation_bytes
            row.net_shape = "x".join(map(str, pred.net_shape)) if pred.net_shape else ""
        return row

    def predicted_row(self, model: str, size: tuple[int, int, int], phase: str, pred: Prediction, reason: str) -> R.ResultRow:
        row = self._base_row(model, size, phase, pred)
        row.timestamp = _now()
        if pred.ok:
            row.status = R.STATUS_PREDICTED
            row.peak_mem_bytes = pred.peak_bytes
            row.activation_bytes = pred.activation_bytes
            row.mem_source = "predicted"
            row.notes = f"not measured: {reason}"
        else:
            row.status = R.STATUS_ERROR
            row.error = f"prediction failed: {pred.error}"
            row.notes = f"not measured: {reason}"
        return row

    def measured_row(self, model: str, size: tuple[int, int, int], phase: str, pred: Prediction | None, res: dict[str, Any], reason: str) -> R.ResultRow:
        row = self._base_row(model, size, phase, pred)
        row.timestamp = _now()
        row.status = res.get("status", R.STATUS_ERROR)
        if row.status not in R.STATUSES:
            row.status = R.STATUS_ERROR
        row.error = str(res.get("error", "") or "")
        for k in ("peak_mem_bytes", "activation_bytes", "reserved_bytes", "nvml_used_bytes", "rss_peak_bytes"):
            if res.get(k) is not None:
                setattr(row, k, int(res[k]))
        for k in ("step_time_s", "step_time_iqr_s", "voxels_per_s", "energy_j_per_step", "energy_window_s", "loss", "wall_s"):
            if res.get(k) is not None:
                setattr(row, k, float(res[k]))
        if res.get("params") is not None:
            row.params = int(res["params"])
        if res.get("net_shape"):
            row.net_shape = str(res["net_shape"])
        row.steps = int(res.get("steps", 0) or 0)
        if row.status == R.STATUS_OK:
            row.mem_source = str(res.get("mem_source", ""))
            row.energy_source = str(res.get("energy_source", "none") or "none")
        else:
            row.energy_source = "none"
        if row.peak_mem_bytes and row.predicted_peak_bytes:
            row.prediction_ratio = row.peak_mem_bytes / row.predicted_peak_bytes
        notes = [f"measured: {reason}"] if reason else []
        if pred is not None and pred.error:
            notes.append(f"prediction failed: {pred.error}")
        if res.get("notes"):
            notes.append(str(res["notes"]))
        row.notes = "; ".join(notes)
        return row

    def _log(self, line: str) -> None:
        self.err.write(line + "\n")
        self.err.flush()

    def _header(self, todo: int, total: int) -> None:
        o, env = self.o, self.o.env
        presets = sorted(set(o.presets[m] for m in o.models))
        preset = presets[0] if len(presets) == 1 else ", ".join(f"{m}={o.presets[m]}" for m in o.models)
        where = env.get("device_name", "")
        if not o.device.startswith("cuda"):
            where += f", {env.get('cpu_count', '?')} cores"
        self._log(
            f"idmbench sweep: {len(o.models)} model(s) x {len(o.sizes)} size(s) x {len(o.phases)} phase(s) = {total} configs"
            + (f" ({total - todo} already in {self.csv}, skipped)" if total != todo else "")
        )
        self._log(f"  device {o.device} ({where}); preset {preset}; {o.precision}; batch {o.batch}; "
                  f"{o.warmup} warm-up + {o.steps} timed step(s)")
        self._log(f"  output {self.dir}/")

    def run(self) -> int:
        o = self.o
        self.t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        repair_csv(self.csv)
        done = done_keys(self.csv) if o.resume else set()
        allc = self.configs()
        todo = [c for c in allc if self.key(*c) not in done]
        self._header(len(todo), len(allc))
        self._start_meta()
        old_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):  # noqa: ARG001
            raise Interrupted()

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            old_term = None
        code = 0
        try:
            self.predict_all(todo)
            self.compute_budgets()
            self._write_meta(params=self.params)
            self.measure_all(todo)
            self._write_meta(finished=_now(), status="complete")
        except KeyboardInterrupt as exc:
            code = 143 if isinstance(exc, Interrupted) else 130
            self._write_meta(finished=_now(), status="interrupted")
            n = len(R.read_rows(self.csv)) if self.csv.exists() else 0
            self._log("")
            self._log(f"interrupted: {n} finished row(s) kept in {self.csv}")
            self._log(f"resume with: python run_bench.py --resume {shlex.quote(str(self.dir))}")
        finally:
            if old_term is not None:
                try:
                    signal.signal(signal.SIGTERM, old_term)
                except (ValueError, TypeError):
                    pass
        self.summarise()
        if code == 0 and o.report:
            self.report()
        return code

    def measure_all(self, todo: list[tuple[str, tuple[int, int, int], str]]) -> None:
        o = self.o
        from ..measure.env import available_ram_bytes

        is_cuda = o.device.startswith("cuda")
        flop_rate = None
        if not is_cuda and not o.predict_only and todo:
            flop_rate = calibrate_cpu_flop_rate()
        avail = available_ram_bytes()
        policy = Policy(
            device=o.device, predict_only=o.predict_only, max_measure_s=o.max_measure_s,
            deadline=None if math.isinf(o.max_sweep_s) else getattr(self, "t0", time.monotonic()) + o.max_sweep_s,
            cpu_memory_limit=o.cpu_memory_limit_bytes, available_ram=avail, flop_rate=flop_rate,
            steps=o.steps, warmup=o.warmup, min_window_s=o.min_energy_window_s,
        )
        self._write_meta(cpu_flop_rate=flop_rate, available_ram_bytes=avail)
        if not is_cuda and not o.predict_only:
            lim = f"--cpu-memory-limit {format_bytes(o.cpu_memory_limit_bytes)}" if o.cpu_memory_limit_bytes else f"{format_bytes(avail)} RAM available"
            budget = "no time limit" if math.isinf(o.max_measure_s) else f"< {format_seconds(o.max_measure_s)} each (--max-measure-s)"
            if not math.isinf(o.max_sweep_s):
                budget += f", {format_seconds(o.max_sweep_s)} in all (--max-sweep-s)"
            self._log(f"CPU policy: measure configs that fit ({lim}) and take {budget} "
                      f"(calibrated {format_si(flop_rate, 'FLOP/s')}); predict the rest")
        def estimates(start: int) -> list[float]:
            out = []
            for (m, s, ph) in todo[start:]:
                d = policy.decide(m, ph, self.preds.get((m, s, ph)))
                out.append(d.est_s if (d.measure and d.est_s is not None) else (30.0 if d.measure else 0.05))
            return out

        progress = Progress(estimates(0), stream=self.err, t0=getattr(self, "t0", None))
        imports = _plugin_imports(o.models)
        safety = None
        try:
            for i, (model, size, phase) in enumerate(todo):
                if i:  # what was learned so far (rates, time left) re-estimates the rest, for the ETA
                    for j, e in enumerate(estimates(i), start=i):
                        progress.set_estimate(j, e)
                pred = self.preds.get((model, size, phase))
                dec: Decision = policy.decide(model, phase, pred)
                if dec.est_s is not None and dec.measure:
                    progress.set_estimate(i, dec.est_s)
                label = _cfg_label(model, size, phase)
                if not dec.measure:
                    progress.begin(i, label)
                    row = self.predicted_row(model, size, phase, pred, dec.reason) if pred is not None else None
                    if row is None:
                        continue
                    R.append_row(self.csv, row)
                    self.reasons[row.key()] = dec.reason
                    shown = f"{format_bytes(row.peak_mem_bytes)} predicted" if row.peak_mem_bytes else row.error
                    progress.finish(i, f"{label}: {row.status} ({shown}) - not measured: {dec.reason}", measured=False)
                    continue
                note = f"measuring (~{format_seconds(dec.est_s)})" if dec.est_s else "measuring"
                progress.begin(i, label, note if (dec.est_s or 0) > 20 or not progress.tty else "")
                if not is_cuda and not o.cpu_memory_limit_bytes:
                    safety = int(available_ram_bytes() * 0.9)
                cfg = {
                    "model": model, "preset": o.presets[model], "overrides": o.overrides.get(model, {}),
                    "size": list(size), "phase": phase, "batch": o.batch, "steps": o.steps, "warmup": o.warmup,
                    "device": o.device, "precision": o.precision, "seed": o.seed,
                    "min_energy_window_s": o.min_energy_window_s, "imports": imports,
                    "cpu_memory_limit_bytes": o.cpu_memory_limit_bytes if not is_cuda else None,
                    "safety_cap_bytes": safety if not is_cuda else None,
                    "time_budget_s": None if (is_cuda or math.isinf(policy.budget_s())) else max(1.0, policy.budget_s()),
                }
                log = self.dir / "logs" / f"{model}_{o.presets[model]}_{R.size_label(size)}_{phase}.log"
                res = run_worker(cfg, timeout_s=o.timeout_s, log_path=log, progress=progress)
                if res.get("status") == "skipped" and pred is not None:
                    # too slow for --max-measure-s after all (seen from its warm-up step): predicted row
                    warm = res.get("warmup_s") or []
                    if warm and pred.flops:
                        policy.learn(model, phase, pred.flops, float(warm[-1]))
                    reason = str(res.get("error", "too slow"))
                    row = self.predicted_row(model, size, phase, pred, reason)
                    R.append_row(self.csv, row)
                    progress.finish(i, f"{label}: {row.status} ({format_bytes(row.peak_mem_bytes)} predicted) - not measured: {reason}")
                    continue
                row = self.measured_row(model, size, phase, pred, res, dec.reason)
                R.append_row(self.csv, row)
                if row.status == R.STATUS_OK:
                    policy.learn(model, phase, row.flops_per_step, row.step_time_s)
                progress.finish(i, f"{label}: {self._short(row)}")
        finally:
            progress.close()

    @staticmethod
    def _short(r: R.ResultRow) -> str:
        if r.status == R.STATUS_OK:
            s = f"ok  {format_bytes(r.peak_mem_bytes)} {r.mem_source}"
            if r.prediction_ratio:
                s += f" ({r.prediction_ratio:.3f}x predicted)"
            s += f", {format_seconds(r.step_time_s)}/step"
            if r.energy_j_per_step is not None:
                s += f", {r.energy_j_per_step:.3g} J/step {r.energy_source}"
            return s
        return f"{r.status}: {r.error}"

    def summarise(self) -> None:
        rows = R.read_rows(self.csv) if self.csv.exists() else []
        order = {self.key(*c): i for i, c in enumerate(self.display_order())}
        rows.sort(key=lambda r: order.get(r.key(), len(order)))
        w = self.out.write
        w("\n")
        if rows:
            w(summary_table(rows) + "\n")
        else:
            w("no results yet\n")
        if self.budget_rows:
            w("\nlargest trainable cube (predicted training peak + 0.5 GiB CUDA context constant):\n")
            w(budget_table(self.budget_rows) + "\n")
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        w("\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" -> {self.csv}\n")
        predicted = [r for r in rows if r.status == R.STATUS_PREDICTED]
        if predicted:
            w("predicted only (not run on this machine):\n")
            for r in predicted:
                reason = r.notes.replace("not measured: ", "") if r.notes else ""
                w(f"  {r.model} {_size_txt(r.size)} {r.phase}: {reason}\n")
        failed = [r for r in rows if r.status in (R.STATUS_OOM, R.STATUS_ERROR, R.STATUS_TIMEOUT)]
        if failed:
            w("failures:\n")
            for r in failed:
                w(f"  {r.model} {_size_txt(r.size)} {r.phase}: {r.status}: {r.error}\n")
        srcs = sorted({r.energy_source for r in rows if r.status == R.STATUS_OK})
        if "codecarbon-estimate" in srcs:
            w("energy: codecarbon-estimate = TDP x CPU load of the worker, an estimate (no power counter readable here)\n")
        self.out.flush()

    def report(self) -> None:
        try:
            from ..report import build_report

            path = build_report(self.dir)
            self._log(f"report: {path}")
        except Exception as exc:  # noqa: BLE001 - the results are safe; say why the report is missing
            self._log(f"report failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      f"results are in {self.csv}; retry with: python run_bench.py report {shlex.quote(str(self.dir))}")


def _size_txt(s: str) -> str:
    return f"{s}^3" if "x" not in s else s


def run_sweep(opts: SweepOptions, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run a sweep; returns the exit code (0 done, 130 interrupted by Ctrl-C, 143 by SIGTERM)."""
    return Sweep(opts, out=out, err=err).run()
