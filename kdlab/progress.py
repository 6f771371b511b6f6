"""Progress of a training run: a live bar with images/s and ETA on a terminal, plain lines elsewhere (CI, logs).

Without a terminal (a log file, a scheduler) a line with the steps done, images/s and the ETA is
printed every PLAIN_SECONDS (`KDLAB_PROGRESS_SECONDS` overrides it), so a long epoch is not silence.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

PLAIN_SECONDS = 30.0


def is_terminal() -> bool:
    from kdlab import distributed

    return sys.stderr.isatty() and distributed.is_main()  # one bar per job, not one per rank


def plain_interval() -> float:
    raw = os.environ.get("KDLAB_PROGRESS_SECONDS", "")
    try:
        value = float(raw)
    except ValueError:
        return PLAIN_SECONDS
    return value if value > 0 else PLAIN_SECONDS


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"lr {row['lr']:.4g}", f"loss {row['train_loss']:.4f}"]
    parts += [
        f"{k[6:]} {v:.4f}" for k, v in row.items() if k.startswith("train_") and k not in ("train_loss", "train_top1")
    ]
    if "test_top1" in row:
        parts.append(f"test top1 {row['test_top1']:.2f} top5 {row['test_top5']:.2f}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


class Progress:
    def __init__(self, total_epochs: int, steps_per_epoch: int, batch_size: int, log: Callable[[str], None]):
        self.total_epochs, self.steps_per_epoch, self.batch_size, self.log = (
            total_epochs,
            steps_per_epoch,
            batch_size,
            log,
        )
        self.steps_done = 0
        self.epoch = 0
        self._bar = None
        self._task = None
        self._t0 = time.perf_counter()
        self._interval = plain_interval()
        self._train_seconds: float | None = None
        if is_terminal():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[speed]}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._bar.start()

    def start_epoch(self, epoch: int) -> None:
        self.steps_done = 0
        self.epoch = epoch
        self._epoch_t0 = self._last_line = time.perf_counter()
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(
                f"epoch {epoch + 1}/{self.total_epochs}", total=self.steps_per_epoch, speed=""
            )

    def step(self, step: int) -> None:
        self.steps_done += 1
        if self._bar is not None:
            if step % 5 == 0 or self.steps_done == self.steps_per_epoch:
                dt = max(time.perf_counter() - self._epoch_t0, 1e-9)
                self._bar.update(
                    self._task, completed=self.steps_done, speed=f"{self.steps_done * self.batch_size / dt:,.0f} img/s"
                )
            return
        now = time.perf_counter()  # the host clock only: no device sync inside the step
        if now - self._last_line >= self._interval and self.steps_done < self.steps_per_epoch:
            self._last_line = now
            self.log(self.plain_line(now))

    def plain_line(self, now: float) -> str:
        dt = max(now - self._epoch_t0, 1e-9)
        rate = self.steps_done / dt  # steps/s of this epoch's training so far
        left_epoch = (self.steps_per_epoch - self.steps_done) / rate
        left_run = left_epoch + (self.total_epochs - self.epoch - 1) * self.steps_per_epoch / rate
        return (
            f"epoch {self.epoch + 1}/{self.total_epochs} step {self.steps_done}/{self.steps_per_epoch} | "
            f"{self.steps_done * self.batch_size / dt:,.0f} img/s | ETA epoch {format_duration(left_epoch)}, "
            f"run {format_duration(left_run)} (training only)"
        )

    def training_done(self, seconds: float) -> None:
        """The epoch's training time, before its evaluation: the epoch line's img/s counts training alone."""
        self._train_seconds = seconds

    def end_epoch(self, row: dict) -> None:
        seconds = self._train_seconds
        self._train_seconds = None
        dt = max(row["seconds"] if seconds is None else seconds, 1e-9)
        self.log(format_row(row) + f" | {self.steps_done * self.batch_size / dt:,.0f} img/s training")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
