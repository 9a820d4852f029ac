"""``run_bench.py quality`` -- the command line of a quality run (train to one budget, score, sample).

Two public functions, so that any top-level parser can mount the command as a subcommand:

* :func:`add_arguments` adds every flag (with converters and a help text that names its unit);
* :func:`run` validates what argparse cannot (models, presets, sizes each model can take, the device, the
  data folder, ``--resume``), runs, and returns the exit code: 0 done (rows may still say ``error``),
  1 every model failed, 2 bad input (one ``error: ...`` line on stderr, nothing started), 130 interrupted.

``python -m idmbench.quality ...`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .options import (
    DEFAULT_BATCH,
    DEFAULT_EVAL_T,
    DEFAULT_HELDOUT_FRACTION,
    DEFAULT_LR,
    DEFAULT_NOISE_DRAWS,
    DEFAULT_PRESET,
    DEFAULT_SAMPLE_STEPS,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    DEFAULT_SIZE,
    DEFAULT_SYNTHETIC_VOLUMES,
    DEFAULT_TRAIN_STEPS,
    PRECISIONS,
    UsageError,
    options_from_namespace,
    split_list,
)

__all__ = ["UsageError", "add_arguments", "run"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# --------------------------------------------------------------------------------------------------
# argparse converters: each raises ArgumentTypeError with one line naming the valid form


def _name_list(text: str) -> list[str]:
    items: list[str] = []
    for t in split_list(text):
        if t not in items:
            items.append(t)
    if not items:
        raise argparse.ArgumentTypeError(f"empty list {text!r}; give comma-separated names like idm,unet")
    return items


def _whole(minimum: int):
    def conv(text: str) -> int:
        try:
            v = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}; got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {v}")
        return v

    conv.__name__ = f"whole number >= {minimum}"
    return conv


def _positive_float(text: str) -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number; got {text!r}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1); got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1); got {text!r}")
    return v


def _size(text: str) -> tuple[int, int, int]:
    from ..results import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timesteps(text: str) -> list[int]:
    from ..diffusion import NUM_TRAIN_TIMESTEPS

    out: list[int] = []
    for t in split_list(text):
        try:
            v = int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"timesteps are whole numbers in 0..{NUM_TRAIN_TIMESTEPS - 1}, comma-separated; got {t!r}"
            ) from None
        if not 0 <= v < NUM_TRAIN_TIMESTEPS:
            raise argparse.ArgumentTypeError(f"timestep {v} is outside 0..{NUM_TRAIN_TIMESTEPS - 1}")
        if v not in out:
            out.append(v)
    if not out:
        raise argparse.ArgumentTypeError(f"empty list {text!r}; give timesteps like 50,250,500")
    return sorted(out)


def _lower_name_list(text: str) -> list[str]:
    return [t.lower() for t in _name_list(text)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``quality`` flags to ``parser``.

    Every flag defaults to ``None`` here and its documented default is applied by :func:`run`, so that a
    resumed run can tell a flag given again from one left out.
    """
    a = parser.add_argument
    a("--models", type=_name_list, metavar="M1,M2",
      help="registered model names, comma-separated (default: every registered model, one per network family: "
           "unet-ckpt trains the same network as unet)")
    a("--data", metavar="DIR|synthetic",
      help="a folder of *.nii / *.nii.gz volumes (one volume per file), a BraTS-layout folder (subject folders "
           "BraTS20_Training_NNN/..._{t1,t1ce,t2,flair,seg}.nii[.gz], also one folder deeper), or 'synthetic': "
           "seeded brain-like volumes generated in memory (default synthetic)")
    a("--size", type=_size, metavar="S|DxHxW",
      help=f"volume size in voxels every volume is resampled (aspect kept) and padded to: a cube side (32) or "
           f"DxHxW (default {DEFAULT_SIZE})")
    a("--modalities", type=_lower_name_list, metavar="M1,M2",
      help="BraTS layout only: modalities stacked as channels, e.g. t1,flair (default: the first one present, "
           "in the order t1, t1ce, t2, flair, then alphabetical; 'seg' is a label map, not an image)")
    a("--train-steps", type=_whole(0), metavar="N",
      help=f"optimiser steps every model trains for (default {DEFAULT_TRAIN_STEPS}; 0 scores the untrained network)")
    a("--batch", type=_whole(1), metavar="N", help=f"volumes per training step (default {DEFAULT_BATCH})")
    a("--lr", type=_positive_float, metavar="X", help=f"AdamW learning rate, the same for every model (default {DEFAULT_LR:g})")
    a("--preset", metavar="P",
      help=f"model preset: one name for all (tiny, small, paper) or per model, e.g. 'small,patchddm=paper' "
           f"(default {DEFAULT_PRESET}: parameter-matched across models, so quality is compared at equal size)")
    a("--device", metavar="D", help="auto | cpu | cuda | cuda:N (default auto: cuda if a GPU is visible, else cpu)")
    a("--precision", choices=PRECISIONS, help="autocast dtype of training, scoring and sampling (default fp32)")
    a("--seed", type=_whole(0), metavar="N",
      help=f"seed of the weights, the train/held-out split, the data order, the noise draws and the samples "
           f"(default {DEFAULT_SEED})")
    a("--eval-t", type=_timesteps, metavar="T1,T2",
      help="diffusion timesteps (0..999 of the 1000-step linear schedule) at which held-out denoising is scored "
           f"(default {','.join(map(str, DEFAULT_EVAL_T))})")
    a("--noise-draws", type=_whole(1), metavar="N",
      help=f"fixed noise draws per held-out volume and timestep that the metrics average over (default {DEFAULT_NOISE_DRAWS})")
    a("--samples", type=_whole(0), metavar="K", help=f"volumes generated per model with DDIM (default {DEFAULT_SAMPLES})")
    a("--sample-steps", type=_whole(1), metavar="M", help=f"DDIM denoising steps per generated volume (default {DEFAULT_SAMPLE_STEPS})")
    a("--heldout-fraction", type=_fraction, metavar="F",
      help=f"fraction of the volumes held out for scoring, at least one (default {DEFAULT_HELDOUT_FRACTION:g}); "
           "with a single volume the held-out set is the training set")
    a("--synthetic-volumes", type=_whole(1), metavar="N",
      help=f"--data synthetic: number of volumes generated (default {DEFAULT_SYNTHETIC_VOLUMES})")
    a("--max-volumes", type=_whole(1), metavar="N",
      help="use only the first N volumes / subjects of --data DIR in name order (default all)")
    a("--out", metavar="DIR",
      help="output folder (default reports/quality-<YYYYmmdd-HHMMSS>/); may hold a sweep's results, but not a "
           "quality run already (use --resume)")
    a("--resume", metavar="DIR",
      help="continue the quality run in DIR: models already scored are skipped; the budget comes from "
           "DIR/run.json (giving a budget flag again with another value is refused)")


def run(ns: argparse.Namespace) -> int:
    """Validate ``ns``, run the quality benchmark, return the exit code (2 on bad input, one line on stderr)."""
    from ..data import DataError

    try:
        opts = options_from_namespace(ns)
        from .runner import QualityRun

        qr = QualityRun(opts)
        qr.prepare()  # loads and splits the data: its errors are bad input too
    except (UsageError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return qr.run()
