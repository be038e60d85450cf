"""Progress of a long command-line run, printed as lines a person can follow (the app shows a bar instead)."""

from __future__ import annotations

import sys
import time


class ConsoleProgress:
    """An `on_progress(fraction, message)` for the pipelines' CLIs: prints `[ 12%] message` when the stage
    changes, every `step` of the whole run, or at least every `every` seconds, so a run that spends its
    first minutes on an evaluation does not look hung, and a log file does not fill with every image."""

    def __init__(self, stream=None, step: float = 0.05, every: float = 30.0, clock=time.monotonic):
        self.stream, self.step, self.every, self.clock = stream or sys.stdout, step, every, clock
        self.last_fraction, self.last_time, self.last_stage = -1.0, None, None

    def __call__(self, fraction: float, message: str) -> None:
        stage = (message or "").split(":")[0].split(" ")[0]  # "eval: image 3/1200" -> "eval"
        now = self.clock()
        # The first call always differs in stage (last_stage starts as None), so last_time is set before it is read.
        due = (stage != self.last_stage or fraction >= self.last_fraction + self.step or fraction >= 1.0
               or now - self.last_time >= self.every)
        if not due or (fraction == self.last_fraction and stage == self.last_stage):
            return
        self.last_fraction, self.last_time, self.last_stage = fraction, now, stage
        print(f"[{100 * fraction:3.0f}%] {message}", file=self.stream, flush=True)
