"""Training progress on stderr: a ``rich`` bar with the running loss on a terminal, plain lines elsewhere.

The running loss is the mean of the last :data:`WINDOW` step losses. Without a terminal (a pipe, CI, a
test) one line is printed about every tenth of the steps and at the end.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any, TextIO

WINDOW = 20


class TrainingProgress:
    """``with TrainingProgress(label, total) as p: p.update(step, loss, seconds)``."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.label, self.total = label, int(total)
        self.stream = stream or sys.stderr
        self.tty = (self.stream.isatty() if hasattr(self.stream, "isatty") else False) if tty is None else tty
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self._every = max(1, self.total // 10)
        self._rich: Any = None
        self._task: Any = None

    @property
    def running_loss(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def __enter__(self) -> "TrainingProgress":
        if self.tty and self.total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._rich = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.label, total=self.total, loss="-")
        return self

    def update(self, step: int, loss: float, seconds: float) -> None:
        """After optimiser step ``step`` (0-based) with ``loss``, ``seconds`` since training began."""
        self.recent.append(float(loss))
        done = step + 1
        if self._rich is not None:
            self._rich.update(self._task, completed=done, loss=f"{self.running_loss:.4f}")
        elif done % self._every == 0 or done == self.total:
            rate = seconds / done if done else 0.0
            print(
                f"  {self.label}: step {done}/{self.total}  loss {self.running_loss:.4f} (mean of last {len(self.recent)})  "
                f"{seconds:.1f} s ({rate:.2f} s/step)",
                file=self.stream, flush=True,
            )

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
