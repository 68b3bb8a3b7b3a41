"""Progress of a run: after each committed chunk, rows done of the total, rate, ETA and errors.

One log line per chunk in a job's log; a bar redrawn in place on a terminal.

Example::

    progress = Progress(total_rows=1000, total_chunks=4)
    progress.chunk_done({"ok": 248, "error": 2})   # chunk 1/4: 250/1000 rows (25.0%), ...
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Callable

from jobs.observe.waiting import Waiting

log = logging.getLogger("batch_inference")

BAR_WIDTH = 24


@dataclass(frozen=True)
class ChunkTiming:
    chunk: int
    seconds: float  # since the first chunk started, when this one was committed
    rows: int
    errors: int
    # When it was committed, on the wall clock (epoch seconds): where the throughput plot marks it
    # against the rows' `sent_at`. Not compared: a timeline on a fake clock equals its expected one.
    at: float | None = field(default=None, compare=False)


class Progress:
    """Rows done / total, %, rows/s, ETA and errors after each chunk, on one line.

    A terminal gets a bar redrawn in place (`\\r`); anything else (a job's log, a pipe) gets plain log
    lines, since a redrawn bar would be one unreadable line there.
    """

    def __init__(self, total_rows: int, total_chunks: int, *, stream: IO[str] | None = None,
                 clock: Callable[[], float] | None = None, watch: Waiting | None = None) -> None:
        self.total_rows, self.total_chunks = total_rows, total_chunks
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock or time.monotonic
        self.tty = _isatty(self.stream)
        self.started = self.clock()
        self.done = self.errors = 0
        self.timeline: list[ChunkTiming] = []
        # What the endpoint's answers say of the rest (set by the run from each chunk's latency): rows/s
        # at the limit in flight (C over the mean latency), and the p99 latency that the last wait takes.
        self.calls_rate: float | None = None
        self.tail_s: float | None = None
        # run.budget: what the run has spent against it, as text (`spent 1,200 of 5,000 output tokens`).
        self.spend: Callable[[], str] | None = None
        self.closed = False
        # Between chunks: what the run waits for, once nothing has come back for a while.
        self.watch = watch
        if watch is not None and total_rows:
            watch.start(lambda: self.last_change, lambda: len(self.timeline) + 1)

    @property
    def last_change(self) -> float:
        """When a chunk last came back (or the calls started), on `clock`."""
        return self.started + (self.timeline[-1].seconds if self.timeline else 0.0)

    def chunk_done(self, by_status: dict[str, int]) -> str:
        rows = sum(by_status.values())
        errors = rows - by_status.get("ok", 0)
        self.done, self.errors = self.done + rows, self.errors + errors
        elapsed = self.clock() - self.started
        self.timeline.append(ChunkTiming(len(self.timeline) + 1, elapsed, rows, errors, time.time()))
        if self.tty:
            self.stream.write("\r" + self.bar(elapsed))
            self.stream.flush()
        else:
            log.info("%s", self.line(elapsed))
        return self.line(elapsed)

    def close(self) -> None:
        """End the bar's line and stop watching; a second call does nothing."""
        if self.watch is not None:
            self.watch.stop()
        if self.tty and self.timeline and not self.closed:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True

    def _numbers(self, elapsed: float) -> tuple[float, float, str]:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total_rows if self.total_rows else 100.0
        left = max(0, self.total_rows - self.done)
        return pct, rate, (_clock_text(s) if (s := self.seconds_left(left, rate)) is not None else "?")

    def seconds_left(self, left: int, rate: float) -> float | None:
        """The rest at the rate the endpoint's latency allows, then the wait for the slowest answers;
        before any latency is known, at the rate so far (the first chunk's start-up slows that one)."""
        if not left:
            return 0.0
        if self.calls_rate:
            return left / self.calls_rate + (self.tail_s or 0.0)
        return left / rate if rate > 0 else None

    def line(self, elapsed: float) -> str:
        pct, rate, eta = self._numbers(elapsed)
        return (f"chunk {len(self.timeline)}/{self.total_chunks}: {self.done}/{self.total_rows} rows "
                f"({pct:.1f}%), {rate:.1f} rows/s, ETA {eta}, errors {self.errors}"
                + (f", {self.spend()}" if self.spend else ""))

    def bar(self, elapsed: float) -> str:
        pct, rate, eta = self._numbers(elapsed)
        filled = min(BAR_WIDTH, int(BAR_WIDTH * pct / 100))
        return (f"{pct:5.1f}%|{'#' * filled}{'-' * (BAR_WIDTH - filled)}| {self.done}/{self.total_rows} rows "
                f"[{_clock_text(elapsed)}<{eta}, {rate:.1f} rows/s, errors {self.errors}, "
                f"chunk {len(self.timeline)}/{self.total_chunks}]")


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-less stream is not a terminal
        return False


def _clock_text(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def chunk_rates(timeline: list[ChunkTiming]) -> list[float]:
    """Rows per second of each chunk, over its own wall time."""
    rates, before = [], 0.0
    for c in timeline:
        span = c.seconds - before
        rates.append(c.rows / span if span > 0 else 0.0)
        before = c.seconds
    return rates
