"""``python -m idmbench.quality ...``: the quality command on its own (same flags as ``run_bench.py quality``)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from .cli import EXIT_USAGE, add_arguments, run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2 (argparse would print the usage too)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m idmbench.quality",
        description="Train every model on the same budget, score held-out denoising (PSNR, SSIM, MAE), "
        "generate samples; writes quality.csv, training.csv, samples/ and run.json.",
    )
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return run(ns)


if __name__ == "__main__":
    sys.exit(main())
