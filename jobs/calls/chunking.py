"""Chunking, in one place: how a run's pending rows are cut into chunks, and the pace they follow.

- `plan_chunks`: the rows chunks read (staged once to a scratch table by `jobs.input.stage`, unless one
  chunk takes them all: the one-chunk shortcut) and the `ChunkPlanner` over them.
- `ChunkPlanner`: chunks are runs of consecutive hash buckets (identical requests share a bucket, so
  each is sent once per run). With `run.chunk_rows` set, chunks hold about that many rows; unset, the
  first chunk is small (`FIRST_CHUNK_REQUESTS_PER_SLOT` requests per slot of the limit: it measures
  the endpoint); chunks planned before any latency is known (executors mode plans the next ones
  while the first is out) double, so that chunks side by side start and end at different times;
  each next one holds `run.chunk_seconds` of calls, and at least
  `TAIL_CHUNK_FACTOR` times the p99 latency (a chunk ends waiting for its slowest answers), at the
  measured rate, at most 8 times the previous one and at most `run.max_chunk_rows`; a remainder under
  a quarter of that joins the chunk before it.
- `Pace`: the rate and the latency tail the chunks follow, learned from each chunk's answers (`C`
  requests in flight, one mean latency apart: the calls' own pace, not the run's), which the
  progress line's ETA uses too; `estimate_chunks` is the dry run's count.

Example::

    staged, planner = plan_chunks(spark, cfg, found, pending_rows(...), scratch)
    pace = Pace(cfg)
    chunk = planner.next(pace.rate(), pace.tail_s)   # Chunk(index=0, lo=0, hi=311, rows=1021)
    pace.learn(*latency_stats([412.0, 95.1, 3020.7]))
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession, functions as F

from jobs.config import JobConfig
from jobs.input.stage import BUCKETS, Survey, histogram, stage_pending

log = logging.getLogger("batch_inference")

# The first chunk, unless run.chunk_rows: this many requests per slot of the limit.
FIRST_CHUNK_REQUESTS_PER_SLOT = 32
# A chunk's calls last at least this many times the slowest answers' latency (p99): the end of a
# chunk waits for them with fewer requests in flight, and an LLM's slowest answers take tens of seconds.
TAIL_CHUNK_FACTOR = 10.0


def plan_chunks(spark: SparkSession, cfg: JobConfig, found: Survey, pending: DataFrame,
            scratch: str) -> tuple[DataFrame, ChunkPlanner]:
    """The rows chunks read (staged once, unless one chunk takes them all) and the chunk planner."""
    first_rows = FIRST_CHUNK_REQUESTS_PER_SLOT * cfg.limits.max_concurrency * cfg.endpoint.rows_per_request
    sizing: dict[str, Any] = dict(fixed_rows=cfg.run.chunk_rows, max_rows=cfg.run.max_chunk_rows,
                                  seconds=cfg.run.chunk_seconds, first_rows=first_rows)
    if found.pending <= (cfg.run.chunk_rows or first_rows):
        # One chunk: its own job reads the pending rows once; nothing to stage. (`exists` may count
        # rows run.limit leaves out: at worst a MERGE where an append would do.)
        return pending, ChunkPlanner({0: found.pending}, **{**sizing, "fixed_rows": found.pending},
                                     exists={0: sum(found.exists.values())})
    t0 = time.monotonic()
    staged = stage_pending(spark, pending, scratch, found.pending)
    log.debug("staged %d pending rows in %.1fs", found.pending, time.monotonic() - t0)
    counts, exists = histogram(staged) if found.pending < found.pending_all else (found.histogram, found.exists)
    return staged, ChunkPlanner(counts, exists=exists, **sizing)


def estimate_chunks(cfg: JobConfig, pending: int) -> int:
    """Chunks a run of `pending` rows takes at least, before any latency is known (the dry run)."""
    return math.ceil(pending / (cfg.run.chunk_rows or cfg.run.max_chunk_rows))


class Pace:
    """The calls' pace, learned from each chunk's answers: what sizes chunks and the ETA."""

    def __init__(self, cfg: JobConfig) -> None:
        self.slots = cfg.limits.max_concurrency * cfg.endpoint.rows_per_request
        self.called_rows, self.calling_s = 0, 0.0
        self.latency_s: float | None = None
        self.tail_s: float | None = None  # the p99 latency of the last chunk's answers

    def rate(self) -> float | None:
        """Rows per second of calls, to size the next chunk.

        From the latency the endpoint answers with (`C` requests in flight of `rows_per_request` rows
        each, one latency apart): what the calls take, not what the run around them takes. Measured
        wall time would count chunk boundaries and commits, and a run of small chunks would keep
        measuring itself small.
        """
        if self.latency_s:
            return self.slots / self.latency_s
        return self.called_rows / self.calling_s if self.calling_s > 0 and self.called_rows else None

    def learn(self, mean_ms: float | None, p99_ms: float | None) -> None:
        """A chunk's latency (retries included) over its answered requests: the mean sizes the rate,
        the p99 the chunk (`ChunkPlanner.seconds_for`)."""
        if mean_ms:
            self.latency_s = mean_ms / 1000
        if p99_ms:
            self.tail_s = p99_ms / 1000


def latency_stats(latencies_ms: list[float]) -> tuple[float | None, float | None]:
    """Mean and p99 of a chunk's latencies (the driver has them as a list)."""
    if not latencies_ms:
        return None, None
    ordered = sorted(latencies_ms)
    return sum(ordered) / len(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@dataclass(frozen=True)
class Chunk:
    index: int
    lo: int  # first bucket
    hi: int  # last bucket, inclusive
    rows: int
    exists: int = 0  # rows whose id the output table holds: they need a MERGE

    def of(self, staged: DataFrame) -> DataFrame:
        return staged.where(F.col("_bucket").between(self.lo, self.hi))


class ChunkPlanner:
    """Consecutive bucket ranges of about `fixed_rows`, or sized by the measured rate (see module doc)."""

    def __init__(self, histogram: dict[int, int], *, fixed_rows: int | None, first_rows: int,
                 max_rows: int = 100_000, seconds: float = 30.0, exists: dict[int, int] | None = None) -> None:
        self.counts = [histogram.get(b, 0) for b in range(BUCKETS)]
        self.exists = exists or {}
        self.total = sum(self.counts)
        self.fixed, self.first, self.max_rows, self.seconds = fixed_rows, first_rows, max_rows, seconds
        self.next_bucket, self.index, self.planned = 0, 0, 0
        self.last_target: int | None = None

    def seconds_for(self, tail_s: float | None) -> float:
        """A chunk's calls last `seconds`, and at least `TAIL_CHUNK_FACTOR` times the latency tail: a
        chunk ends waiting for its slowest answers, so that wait must be a small share of it."""
        return max(self.seconds, TAIL_CHUNK_FACTOR * (tail_s or 0.0))

    def target(self, rate: float | None, tail_s: float | None = None) -> int:
        if self.fixed:
            return self.fixed
        if self.last_target is None:
            return max(1, min(self.first, self.max_rows))
        if rate is None:  # planned before the first answers: twice the one before
            return max(1, min(2 * self.last_target, self.max_rows))
        wanted = rate * self.seconds_for(tail_s)
        return max(1, int(min(self.max_rows, 8 * self.last_target, max(self.first, wanted))))

    def next(self, rate: float | None = None, tail_s: float | None = None) -> Chunk | None:
        """The next chunk; `rate` is the rows per second of calls measured so far (None: not yet),
        `tail_s` the latency of the slowest answers (p99)."""
        while self.next_bucket < BUCKETS and not self.counts[self.next_bucket]:
            self.next_bucket += 1
        if self.next_bucket >= BUCKETS:
            return None
        target = self.last_target = self.target(rate, tail_s)
        lo, rows, b = self.next_bucket, 0, self.next_bucket
        while b < BUCKETS and (rows == 0 or rows + self.counts[b] <= target):
            rows += self.counts[b]
            b += 1
        left = self.total - self.planned - rows
        if not self.fixed and left < target // 4:  # no runt last chunk: its commit would not overlap anything
            rows, b = rows + left, BUCKETS
        self.next_bucket = b
        chunk = Chunk(self.index, lo, b - 1, rows, sum(n for k, n in self.exists.items() if lo <= k < b))
        self.index += 1
        self.planned += rows
        return chunk

    @property
    def left(self) -> int:
        """Rows no chunk has taken yet."""
        return self.total - self.planned

    def estimate(self, rate: float | None = None, tail_s: float | None = None) -> int:
        """Chunks in all: exact with `run.chunk_rows`; with sizing by rate, the count so far plus the rest
        at the current target."""
        if self.fixed:
            return self._simulate(self.fixed)
        left = self.total - self.planned
        return self.index + (math.ceil(left / self.target(rate, tail_s)) if left else 0)

    def _simulate(self, target: int) -> int:
        n, rows = 0, 0
        for c in self.counts:
            if not c:
                continue
            if rows and rows + c > target:
                n, rows = n + 1, 0
            rows += c
        return n + (1 if rows else 0)
