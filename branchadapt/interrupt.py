"""Ctrl-C during training: finish the step, checkpoint it, then stop.

The first SIGINT only sets a flag that the training loop reads between steps, so that every step
trained is checkpointed before the run stops and a re-run resumes right after it; a second SIGINT
interrupts at once. Installed only in the main thread of a single process: under ``torchrun`` the
ranks could see the signal at different steps and wait for each other forever, so there the
default handling stays (the latest periodic checkpoint is kept). Nor where SIGINT is ignored, as
the shell does for a background job of a script: it stays ignored.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class StopRequest:
    """A context in which the first Ctrl-C sets :attr:`requested` instead of interrupting."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        if (
            self.enabled
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # e.g. a `cmd &` of a script
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
