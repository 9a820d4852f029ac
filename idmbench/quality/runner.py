"""The quality run: every model trains on the identical budget, then is scored and sampled; rows as they come.

For each model in turn (weights seeded with the run's seed, built with ``create_model(name,
in_channels=C, out_channels=C, preset=P)``):

1. train ``train_steps`` steps (:mod:`.train`), appending ``training.csv`` per step, then save the weights
   to ``checkpoints/<model>.pt`` (so ``--resume`` can score and sample without training again);
2. score held-out denoising at every ``eval_t`` (:mod:`.metrics`), appending one ``quality.csv`` row per t;
3. generate ``samples`` volumes with DDIM and save their mid-slices (:mod:`.samples`).

A model that fails (out of memory, a diverging loss, any exception) gets ``error`` rows with a one-line
reason and the run goes on. Ctrl-C (or SIGTERM) keeps every row written so far and marks ``run.json`` interrupted;
``--resume DIR`` skips models whose rows and samples are complete.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import torch

from . import files as Q
from .options import QualityOptions

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


class QualityRun:
    """``QualityRun(opts).prepare()`` loads the data (raising ``DataError``); ``.run()`` returns the exit code."""

    def __init__(self, opts: QualityOptions, *, err: TextIO | None = None, out: TextIO | None = None) -> None:
        self.o = opts
        self.err = err or sys.stderr
        self.stdout = out or sys.stdout
        self.dir = Path(opts.out)
        self.csv = self.dir / Q.QUALITY_CSV
        self.training_csv = self.dir / Q.TRAINING_CSV
        self.data: Any = None
        self.meta: dict[str, Any] = {}
        self.env: dict[str, Any] = {}
        self.failed: list[str] = []

    def _log(self, msg: str) -> None:
        print(msg, file=self.err, flush=True)

    # -- data ------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load, preprocess and split the data; every skipped file is reported on stderr."""
        from ..data import load_dataset

        o = self.o
        self.data = load_dataset(
            o.data, o.size, modalities=o.modalities, seed=o.seed, heldout_fraction=o.heldout_fraction,
            synthetic_count=o.synthetic_volumes, max_volumes=o.max_volumes,
            on_skip=lambda f, why: self._log(f"skipped {f}: {why}"),
        )
        ds = self.data
        self._log(ds.describe())
        if ds.skipped:
            self._log(f"note: {len(ds.skipped)} unreadable file(s) skipped (listed above)")
        if ds.heldout_is_train:
            self._log("note: fewer than two volumes: the held-out set is the training set, so the scores measure "
                      "fitting, not generalisation")

    # -- metadata --------------------------------------------------------------------------------------
    def _write_meta(self, **updates: Any) -> None:
        self.meta.update(updates)
        Q.update_run_json(self.dir, self.meta, self.env)

    def _start_meta(self) -> None:
        import json

        from ..measure.env import capture

        o, ds = self.o, self.data
        self.env = capture(o.device)
        prev: dict[str, Any] = {}
        rj = self.dir / Q.RUN_JSON
        if o.resume and rj.exists():
            try:
                prev = dict(json.loads(rj.read_text()).get("quality") or {})
            except (ValueError, AttributeError):
                prev = {}
        resumed = list(prev.get("resumed", []))
        if prev:
            resumed.append({"at": _now(), "command": o.command()})
        self.meta = dict(prev)
        self.meta.update({
            "command": prev.get("command", o.command()), "models": list(o.models), "presets": dict(o.presets),
            "size": o.size_label, "data": ds.label, "data_kind": ds.kind, "modalities": list(ds.modalities),
            "n_train": len(ds.train), "n_heldout": len(ds.heldout), "heldout_is_train": bool(ds.heldout_is_train),
            "train_names": list(ds.train_names), "heldout_names": list(ds.heldout_names),
            "skipped_files": [{"file": f, "reason": r} for f, r in ds.skipped],
            "train_steps": o.train_steps, "batch": o.batch, "lr": o.lr, "seed": o.seed, "eval_t": list(o.eval_t),
            "noise_draws": o.noise_draws, "samples": o.samples, "sample_steps": o.sample_steps,
            "device": o.device, "precision": o.precision, "data_range": 2.0,
            "metrics": "x0-hat from one forward pass at each eval t vs the clean held-out x0, clipped to [-1, 1]; "
                       "MONAI PSNRMetric(max_val=2), SSIMMetric(spatial_dims=3, data_range=2, gaussian sigma 1.5, "
                       "window 11 or the largest odd side that fits) on x+1, MAEMetric; mean and std over "
                       "held-out volumes x noise draws",
            "started": prev.get("started", _now()), "finished": None, "status": "running",
            "settings": o.settings(), "resumed": resumed, "environment": self.env, "params": prev.get("params", {}),
            "errors": {},
        })
        self._write_meta()

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train, score and sample every model; returns 0, 1 (every model failed) or 130 (interrupted)."""
        if self.data is None:
            self.prepare()
        self.dir.mkdir(parents=True, exist_ok=True)
        Q.repair_csv(self.csv)
        self._start_meta()
        o = self.o
        self._log(f"quality run: {', '.join(o.models)} | {o.size_label} | {o.train_steps} steps x batch {o.batch} | "
                  f"lr {o.lr:g} | seed {o.seed} | {o.device} {o.precision} -> {self.dir}")

        def on_term(signum: int, frame: Any) -> None:  # noqa: ARG001 - a kill ends like Ctrl-C: rows kept
            raise KeyboardInterrupt()

        try:
            old_term = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            old_term = None
        from ..invertible.conv import onednn_for_every_conv3d

        try:
            # every model on the same CPU kernels (run.json: cpu_conv3d); PyTorch's own again afterwards
            with onednn_for_every_conv3d(enabled=not str(o.device).startswith("cuda")):
                for i, name in enumerate(o.models):
                    self.run_model(name, i)
        except KeyboardInterrupt:
            self._write_meta(finished=_now(), status="interrupted")
            n = len(Q.read_csv(self.csv))
            self._log(f"\ninterrupted: {n} scored row(s) kept in {self.csv}")
            self._log(f"resume with: python run_bench.py quality --resume {shlex.quote(str(self.dir))}")
            self.summarise()
            return 130
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        self._write_meta(finished=_now(), status="complete")
        self.summarise()
        return 1 if self.failed and len(self.failed) == len(o.models) else 0

    def _build(self, name: str) -> torch.nn.Module:
        from ..registry import create_model

        torch.manual_seed(self.o.seed)
        c = self.data.channels
        return create_model(name, in_channels=c, out_channels=c, preset=self.o.presets[name])

    def run_model(self, name: str, i: int) -> None:
        """Train (or load), score and sample ``name``; a failure becomes error rows."""
        from ..registry import count_parameters, get_spec

        o = self.o
        todo_t = [t for t in o.eval_t if t not in Q.scored_timesteps(self.csv, name)]
        todo_k = [k for k in range(o.samples) if not Q.sample_path(self.dir, name, k).exists()]
        head = f"[{i + 1}/{len(o.models)}] {name} ({o.presets[name]})"
        if not todo_t and not todo_k:
            self._log(f"{head}: already complete, skipped")
            return
        spec = get_spec(name)
        cfg = spec.config(o.presets[name])
        ckpt = self.dir / Q.CHECKPOINTS_DIR / f"{name}.pt"
        dev = torch.device(o.device)
        train: dict[str, Any] = {}
        params = None
        try:
            model = self._build(name).to(dev)
            params = count_parameters(model)
            self._write_meta(params={**self.meta.get("params", {}), name: params})
            if o.resume and ckpt.exists():
                state = torch.load(ckpt, map_location=dev, weights_only=True)
                model.load_state_dict(state["model"])
                train = dict(state["train"])
                self._log(f"{head}: {params:,} parameters; trained weights loaded from {ckpt}")
            else:
                Q.drop_model_rows(self.training_csv, name, Q.TRAINING_COLUMNS)
                Q.drop_model_rows(self.csv, name, Q.QUALITY_COLUMNS)
                todo_t, todo_k = list(o.eval_t), list(range(o.samples))  # new weights: score and sample anew
                train = self._train(name, model, spec, cfg, head, params)
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                tmp = ckpt.with_suffix(".pt.tmp")
                torch.save({"model": model.state_dict(), "train": train, "settings": o.settings()}, tmp)
                os.replace(tmp, ckpt)
            Q.drop_model_rows(self.csv, name, Q.QUALITY_COLUMNS, keep=lambda r: r.get("status") == Q.STATUS_OK)
            self._score(name, model, spec, cfg, todo_t, train, params)
            self._sample(name, model, spec, cfg, todo_k)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one model's failure becomes rows, the run goes on
            from ..harness.worker import is_oom, reason_line

            why = ("out of memory: " if is_oom(exc) else "") + reason_line(exc)
            logger.debug("%s failed", name, exc_info=True)
            self._log(f"{head}: error: {why}")
            self.failed.append(name)
            self._write_meta(errors={**self.meta.get("errors", {}), name: why})  # also a failure after the rows
            done = Q.scored_timesteps(self.csv, name)
            for t in [t for t in o.eval_t if t not in done]:
                Q.append_quality_row(self.csv, self._row(name, t, None, train, params, error=why))
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    def _train(self, name: str, model: torch.nn.Module, spec: Any, cfg: dict, head: str, params: int) -> dict[str, Any]:
        from ..data import training_order
        from .progress import TrainingProgress
        from .train import train_model

        o, ds = self.o, self.data
        order = training_order(len(ds.train), o.train_steps, o.batch, o.seed)
        self._log(f"{head}: {params:,} parameters; training {o.train_steps} steps on {len(ds.train)} volume(s)")
        with Q.TrainingLog(self.training_csv, name, o.presets[name]) as log, TrainingProgress(f"{name} train", o.train_steps, stream=self.err) as bar:

            def on_step(step: int, loss: float, seconds: float) -> None:
                log.log(step, loss, seconds)
                bar.update(step, loss, seconds)

            res = train_model(
                model, spec, cfg, ds.train, order, lr=o.lr, seed=o.seed, device=o.device, precision=o.precision,
                on_step=on_step, probe=lambda: self._build(name),
            )
        self._write_meta(training={**self.meta.get("training", {}), name: res.to_dict()})
        from ..units import format_bytes, format_seconds

        energy = "no energy figure" if res.train_energy_j is None else f"{res.train_energy_j:.4g} J ({res.energy_source})"
        self._log(f"{head}: trained in {format_seconds(res.train_time_s)}, {energy}, peak "
                  f"{format_bytes(res.peak_train_mem_bytes)} ({res.mem_source}), loss of the last steps "
                  f"{'-' if res.final_loss is None else f'{res.final_loss:.4f}'}")
        return res.to_dict()

    def _row(self, name: str, t: int, score: Any, train: dict[str, Any], params: int | None, *, error: str = "") -> Q.QualityRow:
        o = self.o
        e = train.get("train_energy_j")
        row = Q.QualityRow(
            model=name, preset=o.presets[name], size=o.size_label, train_steps=o.train_steps, t=int(t),
            data=self.data.label, params=params, batch=o.batch, lr=o.lr, seed=o.seed, device=o.device,
            precision=o.precision, train_time_s=train.get("train_time_s"), train_energy_j=e,
            energy_source=train.get("energy_source", "none") if train else "none",
            energy_per_param_j=(e / params) if (e is not None and params) else None,
            peak_train_mem_bytes=train.get("peak_train_mem_bytes"), mem_source=train.get("mem_source", ""),
            final_loss=train.get("final_loss"), status=Q.STATUS_ERROR if error else Q.STATUS_OK, error=error,
            timestamp=_now(),
        )
        if score is not None:
            for k in ("psnr", "ssim", "mae", "psnr_std", "ssim_std", "mae_std", "n_volumes", "n_noise", "data_range"):
                setattr(row, k, getattr(score, k))
        return row

    def _score(self, name: str, model: torch.nn.Module, spec: Any, cfg: dict, todo_t: list[int], train: dict, params: int | None) -> None:
        from ..measure.workload import autocast_dtype
        from .metrics import score_denoising

        o = self.o
        for t in todo_t:
            s = score_denoising(
                model, spec, cfg, self.data.heldout, t, n_noise=o.noise_draws, seed=o.seed, batch=o.batch,
                device=o.device, autocast_dtype=autocast_dtype(o.precision),
            )
            Q.append_quality_row(self.csv, self._row(name, t, s, train, params))
            self._log(f"  {name} t={t}: PSNR {s.psnr:.2f} dB  SSIM {s.ssim:.4f}  MAE {s.mae:.4f}  "
                      f"({s.n_volumes} volume(s) x {s.n_noise} noise draws)")

    def _sample(self, name: str, model: torch.nn.Module, spec: Any, cfg: dict, todo_k: list[int]) -> None:
        from ..measure.workload import autocast_dtype
        from .samples import generate_sample, save_mid_slices

        o = self.o
        shape = (self.data.channels, *o.size)
        for k in todo_k:
            t0 = time.perf_counter()
            vol = generate_sample(model, spec, cfg, shape, k=k, steps=o.sample_steps, seed=o.seed, device=o.device,
                                  autocast_dtype=autocast_dtype(o.precision))
            path = save_mid_slices(vol, Q.sample_path(self.dir, name, k), channel_names=self.data.modalities,
                                   title=f"{name} ({o.presets[name]}, {o.train_steps} steps) - sample {k} - "
                                         f"DDIM {o.sample_steps} steps")
            self._log(f"  {name} sample {k}: {path} ({time.perf_counter() - t0:.1f} s)")

    def summarise(self) -> None:
        """Print the quality table of this folder to stdout."""
        from ..units import format_bytes, format_seconds

        rows = Q.read_csv(self.csv)
        if not rows:
            return
        head = ["model", "t", "PSNR dB", "SSIM", "MAE", "train time", "train energy", "peak train mem", "status"]

        def num(v: str, fmt: str) -> str:
            try:
                return format(float(v), fmt)
            except (TypeError, ValueError):
                return "-"

        table = []
        for r in rows:
            energy = "-" if not r.get("train_energy_j") else f"{float(r['train_energy_j']):.4g} J ({r.get('energy_source')})"
            mem = "-" if not r.get("peak_train_mem_bytes") else f"{format_bytes(int(float(r['peak_train_mem_bytes'])))} ({r.get('mem_source')})"
            tt = "-" if not r.get("train_time_s") else format_seconds(float(r["train_time_s"]))
            table.append([r["model"], r["t"], num(r.get("psnr"), ".2f"), num(r.get("ssim"), ".4f"), num(r.get("mae"), ".4f"),
                          tt, energy, mem, r.get("status", "") + (f": {r['error']}" if r.get("error") else "")])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        print(f"\nquality ({self.dir / Q.QUALITY_CSV}):", file=self.stdout)
        print(line(head), file=self.stdout)
        for r in table:
            print(line(r), file=self.stdout)
        self.stdout.flush()
