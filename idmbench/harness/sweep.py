"""The sweep: models x volume sizes x phases, each config measured in a fresh worker or predicted.

The policy, in order: configs run smallest size first, every model at a size before the next size, train
then sample. Each config is predicted just before its turn (fake tensors, about a second); the policy
(:mod:`.policy`) decides whether to measure it in a worker (:mod:`.runner`) or keep the prediction; its
row is appended to ``results.csv`` the moment it is known; the time estimates learn from every measured
config. The largest trainable cube per memory budget is searched at the end, reusing a resumed folder's
``budgets.csv``.

Output folder ``DIR``:

* ``results.csv`` -- one :class:`~idmbench.results.ResultRow` per (model, preset, size, phase), appended
  and fsync'd as each config finishes, so a Ctrl-C or a kill keeps every finished row; ``--resume DIR``
  skips the configs already there.
* ``run.json`` -- what was run, on what, when (:mod:`.metadata`).
* ``budgets.csv`` -- the largest trainable cube per model and memory budget (predicted, :mod:`.budget`).
* ``logs/`` -- each worker's output, and ``sweep.log`` with every log record of the sweep.
* ``report.html`` etc. -- :func:`idmbench.report.build_report` at the end (a failure there loses nothing).

Workers run here, one at a time, or as Ray tasks (:mod:`.executors`); ``--nproc`` measures training configs
data-parallel, one row per rank, at each world size (:mod:`.parallel`).
"""

from __future__ import annotations

import logging
import math
import shlex
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, TextIO

from .. import results as R
from ..measure.predict import Prediction, predictor
from ..registry import get_spec
from ..units import format_bytes, format_seconds, format_si
from . import budget as B
from . import parallel as P
from .console import header_lines, print_summary, route_logs
from .metadata import RunMeta
from .options import SweepOptions
from .estimate import calibrate_cpu_flop_rate
from .executors import close_quietly, make_executor
from .jobs import JobRecorder, job_tickets, make_job
from .policy import UNKNOWN_MEASURE_S, Policy
from .progress import Progress
from .records import base_row, predicted_row
from .runner import plugin_imports

logger = logging.getLogger(__name__)

Config = tuple[str, tuple[int, int, int], str]  # (model, size, phase)


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler (and used for Ctrl-C)."""


def cfg_label(model: str, size: tuple[int, int, int], phase: str) -> str:
    return f"{model} {R.size_text(R.size_label(size))} {phase}"


class Sweep:
    """One sweep run (see :func:`run_sweep`).

    Args:
        opts: the request.
        out / err: where the summary / the progress and messages go (default stdout / stderr).
        on_row: called with every row right after it is appended to ``results.csv``.
    """

    def __init__(self, opts: SweepOptions, *, out: TextIO | None = None, err: TextIO | None = None,
                 on_row: Callable[[R.ResultRow], None] | None = None) -> None:
        if not opts.env:
            from ..measure.env import capture

            opts.env = capture(opts.device)
        self.o = opts
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.on_row = on_row
        self.dir = Path(opts.out)
        self.csv = self.dir / "results.csv"
        self.meta = RunMeta(self.dir / "run.json")
        self.preds: dict[Config, Prediction] = {}
        self.budget_rows: list[B.BudgetRow] = []
        self.params: dict[str, int] = {}
        self.progress: Progress | None = None
        self.policy: Policy | None = None
        self._search_s: list[tuple[str, float]] = []  # (model, seconds) of each budget search done
        self._search_models: list[str] = []  # the models whose budget search is to do, in order
        self.t0 = time.monotonic()
        self.executor: Any = make_executor(opts.executor, device=opts.device, ray_address=opts.ray_address,
                                           ray_cpus_per_task=opts.ray_cpus_per_task)
        self._missing_ws: dict[Config, list[int]] = {}  # world sizes a config still needs (resume)
        self.jobs: JobRecorder | None = None  # turns finished jobs into rows

    # -- plan ---------------------------------------------------------------------------------------
    def configs(self) -> list[Config]:
        """Run order: sizes from small to large, every model at a size before the next size (so the
        sweep's time budget reaches every model, and measured rates inform the larger sizes), train
        then sample."""
        sizes = sorted(self.o.sizes, key=lambda s: (math.prod(s), s))
        return [(m, s, ph) for s in sizes for m in self.o.models for ph in self.o.phases]

    def display_order(self) -> list[Config]:
        """Summary order: model, then size, then phase."""
        sizes = sorted(self.o.sizes, key=lambda s: (math.prod(s), s))
        return [(m, s, ph) for m in self.o.models for s in sizes for ph in self.o.phases]

    def key(self, model: str, size: tuple[int, int, int], phase: str) -> tuple[str, str, str, str]:
        return (model, self.o.presets[model], R.size_label(size), phase)

    # -- predictions and estimates --------------------------------------------------------------------
    def _predictor(self, model: str):
        return predictor(model, self.o.presets[model], batch=self.o.batch, precision=self.o.precision,
                         overrides=self.o.overrides.get(model), seed=self.o.seed)

    def predict(self, model: str, size: tuple[int, int, int], phase: str) -> Prediction:
        p = self._predictor(model).predict(size, phase)
        self.preds[(model, size, phase)] = p
        if p.params is not None:
            self.params[model] = int(p.params)
        return p

    def _predict_s(self, model: str | None = None) -> float:
        """Mean seconds a prediction took (of ``model`` when it has any; 2 s before the first)."""
        mine = [p.seconds for (m, _s, _ph), p in self.preds.items() if m == model]
        done = mine or [p.seconds for p in self.preds.values()]
        return sum(done) / len(done) if done else 2.0

    def _search_estimate(self, model: str) -> tuple[float, bool]:
        """Seconds a budget search of ``model`` should take, and whether that is a guess: the searches
        done so far, per prediction second of their model, else ~5 predictions."""
        if self._search_s:
            per = sum(t / self._predict_s(m) for m, t in self._search_s) / len(self._search_s)
            return per * self._predict_s(model), False
        return 5 * self._predict_s(model), True

    def _guess_prediction(self, model: str, size: tuple[int, int, int], phase: str) -> Any:
        """The prediction if made, else one scaled by voxels from the nearest predicted size of the same
        model and phase (for the ETA only), else None."""
        p = self.preds.get((model, size, phase))
        if p is not None:
            return p
        known = [(s, q) for (m, s, ph), q in self.preds.items() if m == model and ph == phase and q.ok and q.flops]
        if not known:
            return None
        v = math.prod(size)
        s, q = min(known, key=lambda sq: abs(math.log(math.prod(sq[0]) / v)))
        r = v / math.prod(s)
        return SimpleNamespace(ok=True, peak_bytes=int(q.peak_bytes * r), flops=q.flops * r)

    def forecast(self, todo: list[Config], start: int) -> None:
        """Re-estimate configs ``start..`` and the budget searches for the ETA from what is known now."""
        assert self.progress is not None and self.policy is not None
        for j, model in enumerate(self._search_models, start=len(todo)):
            if not self.progress.done_flags[j]:
                self.progress.set_estimate(j, *self._search_estimate(model))
        for j in range(start, len(todo)):
            m, s, ph = todo[j]
            guess = self._guess_prediction(m, s, ph)
            cost = 0.0 if (m, s, ph) in self.preds else self._predict_s(m)
            if guess is None:
                measure = not self.o.predict_only
                self.progress.set_estimate(j, cost + (UNKNOWN_MEASURE_S if measure else 0.0), guess=True)
                continue
            d = self.policy.decide(m, ph, guess)
            est = d.est_s if d.measure else 0.0
            self.progress.set_estimate(j, cost + (est if est is not None else UNKNOWN_MEASURE_S),
                                       guess=(d.guess and d.measure) or (m, s, ph) not in self.preds)

    # -- output -------------------------------------------------------------------------------------
    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress.log(line)
        else:
            logger.info(line)
            self.err.write(line + "\n")
            self.err.flush()

    def _append(self, row: R.ResultRow) -> None:
        R.append_row(self.csv, row)
        if self.on_row is not None:
            self.on_row(row)

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> int:
        o = self.o
        self.t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        R.repair_csv(self.csv)
        done = R.done_world_sizes(self.csv) if o.resume else {}
        allc = self.configs()
        self._missing_ws = {c: P.missing_world_sizes(done.get(self.key(*c), set()), c[2], o.nproc, o.launch) for c in allc}
        todo = [c for c in allc if self._missing_ws[c]]
        searches = self._search_models = self._budget_models()
        self.progress = Progress([0.0] * (len(todo) + len(searches)), stream=self.err, t0=self.t0)
        routing = route_logs(self.progress.console if self.progress.tty else self.err, self.dir / "logs" / "sweep.log")
        old_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):  # noqa: ARG001
            raise Interrupted()

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            old_term = None
        code = 0
        try:
            for line in header_lines(o, self.csv, len(todo), len(allc)):
                self._say(line)
            self.meta.start(o)
            self.measure_all(todo)
            close_quietly(self.executor)
            self.search_budgets(searches, first=len(todo))
            self.meta.update(params={**self.meta.data.get("params", {}), **self.params})
            self.meta.finish("complete")
        except KeyboardInterrupt as exc:
            code = 143 if isinstance(exc, Interrupted) else 130
            if self.jobs is not None:
                self.jobs.salvage(self.executor)
            self.meta.update(params={**self.meta.data.get("params", {}), **self.params})
            self.meta.finish("interrupted")
            n = len(R.read_rows(self.csv)) if self.csv.exists() else 0
            self._say("")
            self._say(f"interrupted: {n} finished row(s) kept in {self.csv}" if n
                      else "interrupted before any config finished: no results written")
            self._say(f"resume with: python run_bench.py --resume {shlex.quote(str(self.dir))}")
        except Exception:
            # a bug, not a config's failure (those are rows): keep the rows, say so, and let it surface
            logger.exception("the sweep stopped on an unexpected error; the rows so far are in %s", self.csv)
            self.meta.finish("failed")
            raise
        finally:
            close_quietly(self.executor)
            if old_term is not None:
                try:
                    signal.signal(signal.SIGTERM, old_term)
                except (ValueError, TypeError) as exc:
                    logger.debug("could not restore the SIGTERM handler (%s)", exc)
            self.progress.close()
            self.progress = None
            routing.close()
        self.summarise()
        if code == 0 and o.report:
            self.report()
        return code

    def _make_policy(self, todo: list[Config]) -> Policy:
        o = self.o
        from ..measure.env import available_ram_bytes

        is_cuda = o.device.startswith("cuda")
        flop_rate = calibrate_cpu_flop_rate() if (not is_cuda and not o.predict_only and todo) else None
        avail = available_ram_bytes()
        policy = Policy(
            device=o.device, predict_only=o.predict_only, max_measure_s=o.max_measure_s,
            deadline=None if math.isinf(o.max_sweep_s) else self.t0 + o.max_sweep_s,
            cpu_memory_limit=o.cpu_memory_limit_bytes, available_ram=avail, flop_rate=flop_rate,
            steps=o.steps, warmup=o.warmup, min_window_s=o.min_energy_window_s,
            family_of=lambda m: get_spec(m).family or m,
        )
        self.meta.update(cpu_flop_rate=flop_rate, available_ram_bytes=avail)
        if not is_cuda and not o.predict_only and todo:
            lim = (f"--cpu-memory-limit {format_bytes(o.cpu_memory_limit_bytes)}" if o.cpu_memory_limit_bytes
                   else f"{format_bytes(avail)} RAM available")
            budget = "no time limit" if math.isinf(o.max_measure_s) else f"< {format_seconds(o.max_measure_s)} each (--max-measure-s)"
            if not math.isinf(o.max_sweep_s):
                budget += f", {format_seconds(o.max_sweep_s)} in all (--max-sweep-s)"
            self._say(f"CPU policy: measure configs that fit ({lim}) and take {budget} "
                      f"(calibrated {format_si(flop_rate, 'FLOP/s')}); predict the rest")
        return policy

    def measure_all(self, todo: list[Config]) -> None:
        """Predict, decide, measure or keep the prediction, and append the row -- config by config."""
        o, progress = self.o, self.progress
        assert progress is not None
        self.policy = policy = self._make_policy(todo)
        self.jobs = jobs = JobRecorder(self._append, policy, progress)
        imports = plugin_imports(o.models)
        self.forecast(todo, 0)
        for i, (model, size, phase) in enumerate(todo):
            label = cfg_label(model, size, phase)
            progress.begin(i, label, "predicting" if progress.tty else "")
            pred = self.predict(model, size, phase)
            base = base_row(model, o.presets[model], size, phase, device=o.device, batch=o.batch,
                            precision=o.precision, seed=o.seed, env=o.env, pred=pred)
            dec = policy.decide(model, phase, pred)
            if not dec.measure:
                row = predicted_row(base, pred, dec.reason)
                self._append(row)
                shown = f"{format_bytes(row.peak_mem_bytes)} predicted" if row.status == R.STATUS_PREDICTED else row.error
                why = "" if o.predict_only else f" - not measured: {dec.reason}"
                progress.finish(i, f"{label}: {row.status} ({shown}){why}", measured=False)
                self.forecast(todo, i + 1)
                continue
            if dec.est_s is not None:
                progress.set_estimate(i, dec.est_s, dec.guess)
            est = f" (~{format_seconds(dec.est_s)}{', a guess' if dec.guess else ''})" if dec.est_s else ""
            progress.begin(i, label, f"submitted to {self.executor.name}{est}" if self.executor.concurrent
                           else f"measuring{est}" if (dec.est_s or 0) > 20 or progress.tty else "")
            job = make_job(o, model, size, phase, imports, policy.budget_s())
            tickets = job_tickets(i, job, self._missing_ws.get((model, size, phase)) or [1], o.launch,
                                  self.dir / "logs", o.timeout_s, context=(label, base, pred, dec.reason))
            jobs.expect(i, len(tickets))
            for ticket in tickets:
                jobs.record(self.executor.submit(ticket, progress))
            self.forecast(todo, i + 1)
        jobs.record(self.executor.drain(progress))

    # -- budgets ----------------------------------------------------------------------------------------
    def _budget_models(self) -> list[str]:
        """Models whose budget search is still to do (all of them, less what a resumed ``budgets.csv``
        already holds for the same preset, budgets, batch and precision)."""
        if not self.o.budgets:
            return []
        kept: list[B.BudgetRow] = []
        if self.o.resume:
            try:
                kept = B.read_budgets(self.dir / "budgets.csv")
            except ValueError as exc:
                logger.warning("%s; searching the budgets again", exc)
        wanted = {(lbl, b) for lbl, b in self.o.budgets}
        self.budget_rows = [
            r for r in kept
            if r.model in self.o.models and r.preset == self.o.presets[r.model] and (r.budget, r.budget_bytes) in wanted
            and r.batch == self.o.batch and r.precision == self.o.precision
        ]
        have = {(r.model, r.budget) for r in self.budget_rows}
        return [m for m in self.o.models if any((m, lbl) not in have for lbl, _ in self.o.budgets)]

    def search_budgets(self, models: list[str], first: int) -> None:
        """The largest trainable cube per budget for ``models`` (progress items ``first..``), written to
        ``budgets.csv`` after each model, beside the rows a resumed folder already had."""
        progress = self.progress
        assert progress is not None
        for k, model in enumerate(models):
            i = first + k
            t0 = time.monotonic()
            progress.begin(i, f"largest cube per budget: {model}", "predicting" if progress.tty else "")
            rows = B.search_model(model, self.o.presets[model], self.o.budgets, self._predictor(model),
                                  known=self.preds, overrides=self.o.overrides.get(model, {}), batch=self.o.batch,
                                  precision=self.o.precision, params=self.params)
            self.budget_rows = [r for r in self.budget_rows if r.model != model] + rows
            B.write_budgets(self.dir / "budgets.csv", self._ordered_budgets())
            self._search_s.append((model, time.monotonic() - t0))
            for j in range(i + 1, progress.n):
                progress.set_estimate(j, *self._search_estimate(models[j - first]))
            cells = ", ".join(f"{r.budget}: {'none' if r.largest_side is None else f'{r.largest_side}^3'}" for r in rows)
            progress.finish(i, f"largest trainable cube, {model} ({self.o.presets[model]}, predicted): {cells} "
                               f"[{format_seconds(time.monotonic() - t0)}]", measured=False)
        if models:
            self._say(f"largest trainable cubes per budget -> {self.dir / 'budgets.csv'}")

    def _ordered_budgets(self) -> list[B.BudgetRow]:
        order = {m: i for i, m in enumerate(self.o.models)}
        return sorted(self.budget_rows, key=lambda r: (order.get(r.model, len(order)), r.budget_bytes))

    # -- the end ------------------------------------------------------------------------------------------
    def summarise(self) -> None:
        rows = R.read_rows(self.csv) if self.csv.exists() else []
        order = {self.key(*c): i for i, c in enumerate(self.display_order())}
        rows.sort(key=lambda r: order.get(r.key(), len(order)))
        print_summary(self.out, rows, self._ordered_budgets(), self.csv)

    def report(self) -> None:
        try:
            from ..report import build_report

            path = build_report(self.dir)
            self._say(f"report: {path}")
        except Exception as exc:  # noqa: BLE001 - the results are safe; say why the report is missing
            logger.debug("report failed", exc_info=True)
            self._say(f"report failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      f"results are in {self.csv}; retry with: python run_bench.py report {shlex.quote(str(self.dir))}")


def run_sweep(opts: SweepOptions, *, out: TextIO | None = None, err: TextIO | None = None,
              on_row: Callable[[R.ResultRow], None] | None = None) -> int:
    """Run a sweep; returns the exit code (0 done, 130 interrupted by Ctrl-C, 143 by SIGTERM).

    ``on_row`` is called with each row right after it is written (a hook for callers and tests)."""
    return Sweep(opts, out=out, err=err, on_row=on_row).run()
