"""Progress of a run on stderr: committed rows per step, their rate and an ETA.

On a terminal each step has a bar that redraws in place (tqdm). Anywhere else (a log file, a CI log,
`lance-ray submit --follow`) each update is one plain line, at most one per step every
`LINE_INTERVAL_S` seconds and always when a step finishes:

    [0:00:12] caption: 40/100 rows committed (2 failed), 3.3 rows/s, ETA 0:00:18
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

LINE_INTERVAL_S = 10.0


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class StepProgress:
    """Progress of the steps of one checkpoint group, fed with counts of committed rows."""

    def __init__(self, pending: dict[str, int], enabled: bool = True, stream: TextIO | None = None,
                 line_interval_s: float = LINE_INTERVAL_S) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and any(pending.values())
        self.pending = pending  # step -> rows to commit in this run
        self.done = dict.fromkeys(pending, 0)
        self.failed = dict.fromkeys(pending, 0)
        self.started = time.monotonic()
        self.line_interval_s = line_interval_s
        self.last_line = dict.fromkeys(pending, float("-inf"))
        self.bars = {}
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            width = max(len(step) for step in pending)
            self.bars = {step: tqdm(total=rows, desc=step.ljust(width), unit="row", file=self.stream,
                                    dynamic_ncols=True) for step, rows in pending.items() if rows}

    def add(self, step: str, ok: int, failed: int) -> None:
        self.done[step] += ok + failed
        self.failed[step] += failed
        if not self.enabled:
            return
        if self.bars:
            bar = self.bars[step]
            bar.update(ok + failed)
            if self.failed[step]:
                bar.set_postfix(failed=self.failed[step], refresh=False)
            return
        now = time.monotonic()
        finished = self.done[step] >= self.pending[step]
        if finished or now - self.last_line[step] >= self.line_interval_s:
            self.last_line[step] = now
            print(self.line(step, now), file=self.stream, flush=True)

    def line(self, step: str, now: float) -> str:
        elapsed = now - self.started
        done, total = self.done[step], self.pending[step]
        rate = done / elapsed if elapsed > 0 else 0.0
        failed = f" ({self.failed[step]} failed)" if self.failed[step] else ""
        if done >= total:
            eta = "done"
        elif rate > 0:
            eta = f"ETA {_clock((total - done) / rate)}"
        else:
            eta = "ETA ?"
        return f"[{_clock(elapsed)}] {step}: {done}/{total} rows committed{failed}, {rate:.1f} rows/s, {eta}"

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
