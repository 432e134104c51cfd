"""Progress a person can follow anywhere: a rich bar on a terminal, a plain log line per log step elsewhere.

When stdout is not a terminal (a SLURM log, ``> run.log``, a pipe) a line like::

    [distill] step 20/300 | loss 1.2345 | cr@1 0.912 cr@2 0.512 or@5 0.634 | 5321 tok/s | 0:00:12 elapsed, ETA 0:02:48

goes through the ``rlkd.engine`` logger every ``trainer.log_every`` steps, and one per validation.
``trainer.progress=false`` turns both off (the log file and ``metrics.jsonl`` are unaffected).
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any, Mapping

log = logging.getLogger("rlkd.engine")

_SHOWN = ("cr@1", "cr@2", "or@5")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0.0))))


def summary_text(record: Mapping[str, Any], validation: bool = False) -> str:
    """``loss 1.234 | cr@1 0.912 cr@2 0.512 or@5 0.634`` from a metrics record (the keys it has)."""
    parts = [f"{'val ' if validation else ''}loss {record.get('loss', float('nan')):.4f}"]
    rates = [f"{k} {record[k]:.3f}" for k in _SHOWN if isinstance(record.get(k), (int, float))]
    return " | ".join(parts + ([" ".join(rates)] if rates else []))


class Progress:
    """The run's progress display (a no-op when disabled or on processes other than the first)."""

    def __init__(self, *, enabled: bool, total: int, start: int, label: str, terminal: bool | None = None):
        self.enabled, self.total, self.start, self.label = enabled, total, start, label
        self.t0 = time.perf_counter()
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.bar = None
        if enabled and self.terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                    transient=False)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def line(self, step: int, record: Mapping[str, Any]) -> str:
        """The plain progress line for ``step`` (see the module docstring)."""
        elapsed = time.perf_counter() - self.t0
        done = max(step - self.start, 0)
        eta = elapsed / done * (self.total - step) if done else float("nan")
        speed = record.get("tokens_per_s")
        speed_text = f" | {speed:.0f} tok/s" if isinstance(speed, (int, float)) else ""
        eta_text = _clock(eta) if eta == eta else "?"
        return (f"[{self.label}] step {step}/{self.total} | {summary_text(record)}{speed_text} | "
                f"{_clock(elapsed)} elapsed, ETA {eta_text}")

    def update(self, step: int, record: Mapping[str, Any] | None = None, validation: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            info = summary_text(record, validation) if record is not None else None
            self.bar.update(self.task, completed=step, **({"info": info} if info else {}))
        elif record is not None:
            if validation:
                log.info("[%s] validation at step %d/%d | %s", self.label, step, self.total,
                         summary_text(record, validation=True))
            else:
                log.info("%s", self.line(step, record))

    def count(self, done: int) -> None:
        """Counting progress (items, not training steps): the bar, or a plain line every tenth of the total."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
            return
        if done >= getattr(self, "_next", 0) or done >= self.total:
            elapsed = time.perf_counter() - self.t0
            moved = max(done - self.start, 0)
            eta = elapsed / moved * (self.total - done) if moved else float("nan")
            log.info("[%s] %d/%d | %s elapsed, ETA %s", self.label, done, self.total, _clock(elapsed),
                     _clock(eta) if eta == eta else "?")
            self._next = done + max(self.total // 10, 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
