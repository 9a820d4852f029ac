"""The progress display of a sweep on stderr, with an ETA that says when it is a guess.

On a terminal it is a ``rich`` progress bar (done / total, elapsed, ETA, the config running now and for
how long) under a scrolling log of finished configs; anywhere else (a pipe, a log file, CI) every event is
one plain line, ``[3/12] idm 64^3 train: ok ...  elapsed 1:02  ETA 4:10``, and nothing is redrawn.

The ETA is the sum of the per-config estimates still to run (the sweep re-estimates them after every
config from what it has measured, :mod:`.estimate`) times the speed-up measured so far (actual /
estimated seconds of the finished configs whose estimate was not a guess, kept within 0.5x-2x). It is
marked ``(guess)`` while any remaining estimate rests on priors rather than on a measured rate of that
model.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from ..units import format_clock
from .console import render_table  # noqa: F401  (idmbench.check imports it from here)

__all__ = ["Progress", "render_table"]

logger = logging.getLogger(__name__)

#: the measured speed-up applies only once this many estimated seconds have finished
MIN_FINISHED_EST_S = 5.0


class _Live(ProgressColumn):
    """A column computed from the :class:`Progress` at every redraw, so its clocks run between events."""

    def __init__(self, owner: "Progress") -> None:
        super().__init__()
        self.owner = owner

    def render(self, task: object) -> Text:
        return Text(self.owner.status_text())


class Progress:
    """``n`` configs with estimated seconds each: call :meth:`begin`, :meth:`tick` (while waiting) and
    :meth:`finish` per config; :meth:`log` prints a line above the bar.

    Args:
        estimates: seconds each config is expected to take (see :meth:`set_estimate`).
        stream: where to draw (default ``sys.stderr``).
        tty: bars (True) or plain lines (False); default: whether ``stream`` is a terminal.
        title: a word in front of the bar.
        t0: ``time.monotonic()`` the elapsed time counts from (default: now).
        guesses: per config, whether its estimate is a guess (default: all are).
    """

    def __init__(self, estimates: list[float], *, stream: TextIO | None = None, tty: bool | None = None,
                 title: str = "sweep", t0: float | None = None, guesses: list[bool] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else bool(tty)
        self.est = [max(0.0, float(e)) for e in estimates]
        self.guess = list(guesses) if guesses is not None else [True] * len(self.est)
        self.done_flags = [False] * len(self.est)
        self.t0 = time.monotonic() if t0 is None else t0
        self.current: int | None = None
        self.current_label = ""
        self.current_t0 = self.t0
        self.actual_sum = 0.0
        self.est_sum_done = 0.0
        self.console = Console(file=self.stream, force_terminal=self.tty, highlight=False, soft_wrap=not self.tty,
                               width=None if self.tty else 10_000)
        self._rich: RichProgress | None = None
        self._task = None
        if self.tty:
            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(), _Live(self),
                console=self.console, auto_refresh=True, refresh_per_second=2, transient=True,
                redirect_stdout=False, redirect_stderr=False,
            )
            self._task = self._rich.add_task(title, total=max(1, self.n))
            self._rich.start()

    @property
    def n(self) -> int:
        return len(self.est)

    @property
    def finished(self) -> int:
        return sum(self.done_flags)

    def set_estimate(self, i: int, est_s: float, guess: bool | None = None) -> None:
        """Config ``i`` is now expected to take ``est_s`` seconds (``guess``: on priors, not measured rates)."""
        self.est[i] = max(0.0, float(est_s))
        if guess is not None:
            self.guess[i] = bool(guess)

    def speedup(self) -> float:
        """Actual / estimated seconds of the finished configs with measured-rate estimates (0.5-2; 1 before)."""
        if self.est_sum_done < MIN_FINISHED_EST_S:
            return 1.0
        return min(2.0, max(0.5, self.actual_sum / self.est_sum_done))

    def eta_s(self) -> float:
        """Estimated seconds until every config is done."""
        f = self.speedup()
        rem = 0.0
        for i, (e, d) in enumerate(zip(self.est, self.done_flags)):
            if d:
                continue
            if i == self.current:
                rem += max(e * f - (time.monotonic() - self.current_t0), 0.0)
            else:
                rem += e * f
        return max(0.0, rem)

    def is_guess(self) -> bool:
        """Whether the ETA rests on a guessed estimate."""
        return any(g for g, d in zip(self.guess, self.done_flags) if not d)

    def eta_text(self) -> str:
        """``"4:10"``, or ``"~4:10 (guess)"``."""
        eta = format_clock(self.eta_s())
        return f"~{eta} (guess)" if self.is_guess() else eta

    def _elapsed(self) -> str:
        return format_clock(time.monotonic() - self.t0)

    def status_text(self) -> str:
        """``elapsed 1:02  ETA ~4:10 (guess)  idm 64^3 train: measuring (0:12)`` -- the bar's text."""
        cur = ""
        if self.current is not None and not self.done_flags[self.current]:
            cur = f"  {self.current_label} ({format_clock(time.monotonic() - self.current_t0)})"
        return f"elapsed {self._elapsed()}  ETA {self.eta_text()}{cur}"

    def _update(self) -> None:
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, completed=self.finished)

    def log(self, line: str) -> None:
        """Print ``line`` above the bar (a plain line off a terminal); also kept in the sweep's log file."""
        line = line.rstrip("\n")
        logger.info(line)
        if self._rich is not None:
            self.console.print(line, markup=False, highlight=False, overflow="ignore", crop=False)
            self._update()
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _count(self, k: int) -> str:
        return f"[{k:>{len(str(self.n))}}/{self.n}]"

    def begin(self, i: int, label: str, note: str = "") -> None:
        """Config ``i`` (``label``) starts; ``note`` (e.g. ``measuring (~30 s)``) is printed when given."""
        self.current = i
        self.current_label = label + (f": {note}" if note and self.tty else "")
        self.current_t0 = time.monotonic()
        if note and not self.tty:
            self.log(f"{self._count(self.finished + 1)} {label}: {note}")
        self._update()

    def tick(self) -> None:
        """Called while waiting on a worker: refresh the bar's clocks."""
        self._update()

    def finish(self, i: int, line: str, *, measured: bool = True) -> None:
        """Config ``i`` is done; ``line`` says how. ``measured``: it ran for real (its time informs the
        speed-up when its estimate was not a guess)."""
        spent = time.monotonic() - self.current_t0 if self.current == i else 0.0
        if not self.done_flags[i]:
            self.done_flags[i] = True
            if measured and self.est[i] > 0 and not self.guess[i]:
                self.actual_sum += spent
                self.est_sum_done += self.est[i]
        self.current = None
        self.log(f"{self._count(self.finished)} {line}  elapsed {self._elapsed()}  ETA {self.eta_text()}")

    def close(self) -> None:
        """Remove the bar (a terminal) and flush."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        self.stream.flush()
