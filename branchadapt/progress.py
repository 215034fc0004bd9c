"""Training progress: a rich live bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def format_metrics(metrics: Mapping[str, float], limit: int | None = None) -> str:
    """``key=value`` pairs; with ``limit``, the phases' totals first, then the terms, that many."""
    items = list(metrics.items())
    if limit is not None:
        items = sorted(items, key=lambda kv: not kv[0].startswith("total/"))[:limit]
    return " ".join(f"{k}={v:.4g}" for k, v in items)


class ProgressReporter:
    """Shows stage, step/total, loss values, it/s and ETA."""

    def __init__(
        self, mode: Literal["auto", "rich", "plain", "none"] = "auto", console: Console | None = None
    ):
        self.console = console or Console(stderr=True, soft_wrap=True, markup=False)
        if mode == "auto":
            mode = "rich" if self.console.is_terminal else "plain"
        self.mode = mode
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._stage = ""
        self._total = 0
        self._t0 = 0.0
        self._start_step = 0

    def start_stage(self, stage: str, total: int, start_step: int = 0) -> None:
        self._stage, self._total, self._start_step = stage, total, start_step
        self._t0 = time.perf_counter()
        if self.mode == "rich":
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                stage, total=total, completed=start_step, rate="", metrics=""
            )
        elif self.mode == "plain":
            resumed = f" (resuming at step {start_step})" if start_step else ""
            print(f"[{stage}] {total} steps{resumed}", file=sys.stderr, flush=True)

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self._t0
        done = step - self._start_step
        return done / elapsed if elapsed > 0 and done > 0 else 0.0

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        rate = self.rate(step)
        if self.mode == "rich" and self._progress is not None and self._task is not None:
            text = format_metrics(metrics or {}, limit=6)  # one terminal line; the log has every value
            self._progress.update(self._task, completed=step, rate=f"{rate:.2f} it/s", metrics=text)
        elif self.mode == "plain" and metrics is not None:
            text = format_metrics(metrics)
            eta = (self._total - step) / rate if rate else float("nan")
            print(
                f"[{self._stage}] step {step}/{self._total} {rate:.2f} it/s eta {eta:.0f}s {text}",
                file=sys.stderr,
                flush=True,
            )

    def end_stage(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def message(self, text: str) -> None:
        if self.mode != "none":
            self.console.print(text, highlight=False)
