"""The chunk loop's shared part: what a run in either calling mode keeps while it walks its chunks.

Example::

    run = DriverRun(spark, cfg, spec, run_id, landing, staged, planner, progress, summary)
    run.call()
"""

from __future__ import annotations

import logging
import threading

from pyspark.sql import DataFrame, SparkSession, types as T

from jobs.calls.chunking import Chunk, ChunkPlanner, Pace
from jobs.calls.outcomes import LANE, REQUEST_COLUMNS, Dimension
from jobs.config import JobConfig
from jobs.endpoint.health import EndpointHealth
from jobs.endpoint.routing import split_lanes
from jobs.input.read import column
from jobs.observe.lines import spend_text
from jobs.observe.progress import Progress
from jobs.observe.summary import RunSummary
from jobs.output.commit import with_run_columns
from udfs.budget import Spend
from udfs.spec import EngineSpec

log = logging.getLogger("batch_inference")

def pending_columns(cfg: JobConfig) -> list:
    """What each chunk reads of the pending rows: the request columns and the kept input columns, and
    with a split each row's endpoint (`jobs.endpoint.routing`)."""
    lane = split_lanes(cfg)
    return [column(c) for c in (*REQUEST_COLUMNS, *cfg.input.keep_columns)] + (
        [lane.alias(LANE)] if lane is not None else [])


class ChunkRun:
    """What both calling modes share: the chunks, their pace, the summary and progress, the vectors' length.

    `DriverRun` (`jobs.calls.driver`) and `ExecutorsRun` (`jobs.calls.executors`) each add `call()`.
    `committed` may run on a committer or chunk thread: it holds a lock.
    """

    def __init__(self, spark: SparkSession, cfg: JobConfig, spec: EngineSpec | list[EngineSpec], run_id: str,
                 landing: T.StructType, staged: DataFrame, planner: ChunkPlanner, progress: Progress,
                 summary: RunSummary) -> None:
        # Every endpoint of the run, in config order (`udfs.router`), and the primary's spec.
        self.specs = [spec] if isinstance(spec, EngineSpec) else list(spec)
        self.spec = next(s for s in self.specs if s.role == "primary")
        self.spark, self.cfg, self.run_id = spark, cfg, run_id
        self.staged, self.planner, self.progress, self.summary = staged, planner, progress, summary
        # What chunks land: the table's columns, with any an earlier config added.
        self.finish = with_run_columns(cfg.endpoint.name, run_id, landing)
        self.parsed_type = landing["parsed"].dataType if cfg.endpoint.response_format else None
        self.columns = pending_columns(cfg)
        self.embeddings = cfg.endpoint.is_embeddings
        self.dim = Dimension(cfg.endpoint.embedding_dim)  # vectors only: the run's one length
        self.pace = Pace(cfg)
        self.health = EndpointHealth(endpoints=tuple(s.name for s in self.specs))  # executors: breakers across chunks
        self._lock = threading.Lock()  # commits land from the committer or chunk threads
        self.spent = Spend()  # executors: what committed chunks spent, against `spec.budget`
        if self.spec.budget is not None:
            summary.budget = cfg.run.budget.caps
            progress.spend = lambda: spend_text(self.summary.spent or {}, self.summary.budget or {})

    def learn_latency(self, mean_ms: float | None, p99_ms: float | None) -> None:
        self.pace.learn(mean_ms, p99_ms)
        self.progress.calls_rate, self.progress.tail_s = self.pace.rate(), self.pace.tail_s

    def next_chunk(self) -> Chunk | None:
        rate, tail = self.pace.rate(), self.pace.tail_s
        chunk = self.planner.next(rate, tail)
        log.debug("next: %s at %s rows/s, p99 %s s", chunk, rate, tail)
        self.progress.total_chunks = self.planner.estimate(rate, tail)
        return chunk

    def committed(self, counts: dict[str, int], unsent: int = 0) -> None:
        with self._lock:
            for status, n in counts.items():
                self.summary.by_status[status] = self.summary.by_status.get(status, 0) + n
            self.summary.chunks += 1
            if unsent:
                self.summary.stopped = "budget"
                self.summary.unsent_rows += unsent
            self.progress.chunk_done(counts)
