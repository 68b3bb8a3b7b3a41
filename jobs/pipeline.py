"""The batch job, top to bottom: read, survey, stage, call, commit, observe.

`run_job` reads the requests, counts and checks them in one pass (`jobs.stage.survey`), writes the
pending rows once to a scratch table, then calls the endpoint chunk by chunk and commits each
chunk's outcomes to Delta (`jobs.commit`), reporting progress and, at the end, the run's summary
(`jobs.observe`). `run.dry_run` goes to `jobs.dryrun` instead, before anything is created.

Calls come from the executors (the pandas UDF) or from the driver (`run.calls_from`; `auto` picks
the driver on Spark Connect, where UDFs cannot reach the internet). What overlaps:

- driver: one engine keeps `C` requests in flight across chunk boundaries (the next chunk's rows
  are fetched ahead), and chunk k is committed on the committer thread while chunk k+1 calls;
  the commit holds no request and no task slot the calls need;
- executors: one Spark job per chunk calls and appends (the write of its rows and Delta's log
  commit are the end of the same job), so no commit job ever waits for task slots held by the next
  chunk's calling tasks; between chunks stand only that job's end and the next one's start.
  Chunks that need a MERGE stage their outcomes and merge in turn.

Commits stay in chunk order, each chunk once; a crash loses at most the chunks in flight (driver:
one calling, one committing, one waiting; executors: the one calling).

Example::

    summary = run_job(get_spark(), load_config("conf/demo.yml"))
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from pyspark.sql import DataFrame, Observation, SparkSession, functions as F

from jobs.call import DriverChunk, common_dim, status_counts, with_dimension_check, with_outcomes, with_parsed
from jobs.commit import commit_chunk, ensure_output_table, table_schema, with_run_columns
from jobs.config import JobConfig
from jobs.dryrun import dry_run
from jobs.endpoint_health import EndpointHealth
from jobs.errors import InputError
from jobs.observe.finish import finish_run
from jobs.observe.progress import Progress
from jobs.plan import plan_tasks, task_slots
from jobs.read import check_ids, column, read_requests
from jobs.resolve import engine_spec, preflight
from jobs.session import is_connect
from jobs.stage import (Chunk, ChunkPlanner, Survey, drop_stale_scratch, histogram, pending_rows,
                        scratch_table, stage_pending, survey)
from jobs.summary import RunSummary
from jobs.token_relay import relay_for
from jobs.verdict import judge
from udfs.engine import Engine
from udfs.spec import EngineSpec

log = logging.getLogger("batch_inference")

PENDING_COLS = ("id", "prompt", "request_hash", "precheck", "_exists")


def pending_columns(cfg: JobConfig) -> list:
    """What each chunk reads of the pending rows: the request columns and the kept input columns."""
    return [column(c) for c in (*PENDING_COLS, *cfg.input.keep_columns)]


def calls_from(spark: SparkSession, setting: str) -> tuple[str, str]:
    """(`driver` | `executors`, why) for `run.calls_from`."""
    if setting != "auto":
        return setting, "run.calls_from"
    if is_connect(spark):
        return "driver", ("auto, on Spark Connect (serverless, standard access, Databricks Connect): "
                          "UDFs there may not reach the internet, and one process keeps the limit exact")
    return "executors", "auto, on classic Spark: the pandas UDF calls from the executors"


def run_job(spark: SparkSession, cfg: JobConfig, *, run_id: str | None = None) -> RunSummary:
    run_id = run_id or uuid.uuid4().hex
    if cfg.run.dry_run:  # before anything is created: checks, counts, one probe request, no write
        return dry_run(spark, cfg, run_id=run_id)
    started, started_at = time.monotonic(), datetime.now(timezone.utc)
    spec = engine_spec(cfg, spark)  # resolves URL and credentials: fails here, before any call
    preflight(spec)  # an untrusted TLS certificate stops the run here, not in every task
    summary = RunSummary(run_id=run_id, output_table=cfg.output.table)
    out = cfg.output.table

    inputs, requests = read_requests(spark, cfg, check=False)
    schema = table_schema(cfg, inputs.schema)
    prior = None
    if spark.catalog.tableExists(out):
        # An existing table of another schema stops the run here; one a config grows gains its columns.
        landing = ensure_output_table(spark, out, schema)
        prior = spark.table(out)
    t0 = time.monotonic()
    found = survey(requests, prior, cfg.run.retry_errors, cfg.run.limit)
    log.debug("survey: %.1fs", time.monotonic() - t0)
    if found.null_ids or found.repeated_ids:
        check_ids(inputs)  # names them; a second pass only when the job stops anyway
        raise InputError("the input's ids are null or repeated; ids must be unique")
    if prior is None:
        landing = ensure_output_table(spark, out, schema)
    drop_stale_scratch(spark, out)
    summary.input_rows, summary.pending_rows = found.input_rows, found.pending
    mode, why = calls_from(spark, cfg.run.calls_from)
    log.info("run %s: %d input rows, %d pending -> %s; calls from the %s (%s)", run_id, found.input_rows,
             found.pending, out, mode, why)

    progress = Progress(found.pending, 0)
    if found.pending:
        scratch = [scratch_table(out, run_id, kind) for kind in ("pending", "outcomes")]
        try:
            staged, planner = _chunks(spark, cfg, found, pending_rows(requests, prior, cfg.run.retry_errors,
                                                                      cfg.run.limit), scratch[0])
            run = _Run(spark, cfg, spec, run_id, landing, staged, planner, progress, summary)
            if mode == "driver":
                run.from_driver()
            else:
                with relay_for(spec, spark):  # credentials only the driver refreshes reach the tasks
                    run.from_executors(scratch[1])
        finally:
            for name in scratch:
                if spark.catalog.tableExists(name):
                    spark.sql(f"DROP TABLE IF EXISTS {name}")
    progress.close()
    summary.seconds = time.monotonic() - started
    log.info("run %s finished in %.1fs: %s", run_id, summary.seconds,
             ", ".join(f"{s}={n}" for s, n in sorted(summary.by_status.items())) or "nothing to do")
    summary.stats = finish_run(spark, cfg, summary, progress.timeline, started_at)
    judge(spark, cfg, summary)  # after every row is committed: fail_on_error, max_error_share
    return summary


def _chunks(spark: SparkSession, cfg: JobConfig, found: Survey, pending: DataFrame,
            scratch: str) -> tuple[DataFrame, ChunkPlanner]:
    """The rows chunks read (staged once, unless one chunk takes them all) and the chunk planner."""
    first_rows = 32 * cfg.limits.max_concurrency * cfg.endpoint.rows_per_request
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


class _Run:
    """The chunk loop of one run, in either mode; commits go through a `Committer`."""

    def __init__(self, spark: SparkSession, cfg: JobConfig, spec: EngineSpec, run_id: str, schema: Any,
                 staged: DataFrame, planner: ChunkPlanner, progress: Progress, summary: RunSummary) -> None:
        self.spark, self.cfg, self.spec, self.run_id = spark, cfg, spec, run_id
        self.staged, self.planner, self.progress, self.summary = staged, planner, progress, summary
        # What chunks land: the table's columns, with any an earlier config added.
        self.finish = with_run_columns(cfg.endpoint.name, run_id, schema)
        self.parsed_type = schema["parsed"].dataType if cfg.endpoint.response_format else None
        self.columns = pending_columns(cfg)
        self.embeddings = cfg.endpoint.is_embeddings
        self.dim: int | None = cfg.endpoint.embedding_dim
        self.dim_why = "endpoint.embedding_dim"
        self.called_rows, self.calling_s = 0, 0.0
        self.latency_s: float | None = None
        self.health = EndpointHealth()  # executors: the breaker's report across chunks

    # -- shared -------------------------------------------------------------------------------------

    def rate(self) -> float | None:
        """Rows per second of calls, to size the next chunk.

        From the latency the endpoint answers with (`C` requests in flight of `rows_per_request` rows
        each, one latency apart): what the calls take, not what the run around them takes. Measured
        wall time would count chunk boundaries and commits, and a run of small chunks would keep
        measuring itself small.
        """
        if self.latency_s:
            return self.cfg.limits.max_concurrency * self.cfg.endpoint.rows_per_request / self.latency_s
        return self.called_rows / self.calling_s if self.calling_s > 0 and self.called_rows else None

    def answered(self, latency_ms: float | None) -> None:
        """The mean latency (retries included) of a chunk's answered requests."""
        if latency_ms:
            self.latency_s = latency_ms / 1000

    def next_chunk(self) -> Chunk | None:
        chunk = self.planner.next(self.rate())
        log.debug("next: %s at %s rows/s", chunk, self.rate())
        self.progress.total_chunks = self.planner.estimate(self.rate())
        return chunk

    def committed(self, counts: dict[str, int]) -> None:
        for status, n in counts.items():
            self.summary.by_status[status] = self.summary.by_status.get(status, 0) + n
        self.summary.chunks += 1
        self.progress.chunk_done(counts)

    # -- driver ---------------------------------------------------------------------------------------

    def from_driver(self) -> None:
        """One engine in this process, `C` in flight across chunks; rows come and go as Arrow.

        Its governor spans the run: once its breaker opens (nothing answered for `retry.breaker_s`),
        every row left fails fast as `endpoint_unavailable`, and a rerun sends them again. Refreshable
        credentials refresh themselves in this process.
        """
        c = self.cfg.limits.max_concurrency
        fetched: queue.Queue = queue.Queue(maxsize=1)  # the next chunk's rows, read while this one calls
        stop = threading.Event()
        fetcher = threading.Thread(target=self._fetch, args=(fetched, stop), name="bi-fetch", daemon=True)
        chunks: list[tuple[Chunk, DriverChunk]] = []
        first_call: list[float] = []

        def batches() -> Iterator[list[str]]:
            while True:
                item = fetched.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                chunk, rows = item
                log.debug("chunk %d: to the engine", chunk.index + 1)
                todo = DriverChunk(rows, self.embeddings, structured=self.parsed_type is not None)
                chunks.append((chunk, todo))
                first_call[:] = first_call or [time.monotonic()]
                yield todo.prompts

        with Committer() as committer, Engine(replace(self.spec, max_concurrency=c), max_limit=c) as engine:
            fetcher.start()
            try:
                for outcomes in engine.map_batches(batches()):
                    chunk, todo = chunks.pop(0)
                    log.debug("chunk %d: answered", chunk.index + 1)
                    # Calls run back to back across chunks: the rate is rows over time since the first.
                    self.called_rows += chunk.rows
                    self.calling_s = time.monotonic() - first_call[0]
                    sent = [o.latency_ms for o in outcomes if o.latency_ms is not None]
                    self.answered(sum(sent) / len(sent) if sent else None)
                    committer.submit(self._driver_commit(chunk, todo, outcomes), self.committed)
            finally:
                stop.set()
                while fetcher.is_alive():  # unblock a fetcher waiting to hand over a chunk
                    try:
                        fetched.get_nowait()
                    except queue.Empty:
                        pass
                    fetcher.join(0.05)

    def _fetch(self, fetched: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                chunk = self.next_chunk()
                if chunk is None:
                    break
                rows = chunk.of(self.staged).select(*self.columns).toArrow()
                _put(fetched, (chunk, rows), stop)
        except BaseException as exc:  # handed to the caller's thread, which raises it
            _put(fetched, exc, stop)
            return
        _put(fetched, None, stop)

    def _driver_commit(self, chunk: Chunk, todo: DriverChunk, outcomes: list) -> Callable[[], dict[str, int]]:
        def commit() -> dict[str, int]:
            if self.embeddings and self.dim is None:
                self.dim = common_dim(outcomes)
                self.dim_why = "the most common length in the run's first chunk with vectors"
            table = todo.landed(outcomes, self.dim, self.dim_why)
            landed = self.spark.createDataFrame(table)
            if self.parsed_type is not None:
                landed = landed.transform(with_parsed(self.parsed_type))
            landed = landed.transform(self.finish)
            return commit_chunk(self.spark, self.cfg.output.table, landed, self.run_id, chunk.index,
                                counts=status_counts(table))
        return commit

    # -- executors ------------------------------------------------------------------------------------

    def from_executors(self, outcomes_table: str) -> None:
        """Per chunk ONE Spark job: the UDF calls, and the same job appends the outcomes to Delta.

        No separate commit job, so none waits for slots held by calling tasks; what is left between
        chunks is the end of one job (its write and Delta's log commit) and the start of the next.
        Counts by status come from an `Observation` of that same job. A chunk holding ids the
        table already has needs a MERGE, whose source must be stable: its outcomes are written once to
        a scratch table and merged from there (two jobs, no overlap: a MERGE queued behind the next
        chunk's calling tasks would wait for all of them).
        """
        plan = plan_tasks(self.cfg.limits.max_concurrency, task_slots(self.spark, self.cfg.run.task_slots))
        log.info("executors: %d task(s) x %s in flight", plan.partitions,
                 "/".join(map(str, sorted(set(plan.per_task)))))
        outcomes = with_outcomes(self.spec, plan, self.parsed_type, self.health)
        out = self.cfg.output.table
        while (chunk := self.next_chunk()) is not None:
            t0 = time.monotonic()
            landed = (chunk.of(self.staged).select(*self.columns).transform(outcomes)
                      .transform(self._dims_step()).transform(self.finish))
            if chunk.exists:
                (landed.withColumn("_chunk", F.lit(chunk.index))
                 .write.format("delta").mode("append").saveAsTable(outcomes_table))  # the calls
                stable = self.spark.table(outcomes_table).where(F.col("_chunk") == chunk.index).drop("_chunk")
                counts = commit_chunk(self.spark, out, stable, self.run_id, chunk.index)
            else:
                counts, latency_ms = append_observed(landed.drop("_exists"), out, self.run_id, chunk.index)
                self.answered(latency_ms)
            self.called_rows += chunk.rows
            self.calling_s += time.monotonic() - t0
            log.debug("chunk %d: %d rows called and committed in %.1fs", chunk.index + 1, chunk.rows,
                      time.monotonic() - t0)
            self.health.after_chunk(self.spark, out, self.run_id, chunk.index, counts)
            self.committed(counts)

    def _dims_step(self) -> Callable[[DataFrame], DataFrame]:
        """The run's vector length: pinned, else what its first chunk landed (committed before the next)."""
        if not self.embeddings:
            return _unchanged
        if self.dim is None and self.summary.chunks:
            row = (self.spark.table(self.cfg.output.table)
                   .where((F.col("run_id") == self.run_id) & (F.col("status") == "ok")).select("dim").limit(1).collect())
            if row:
                self.dim, self.dim_why = row[0]["dim"], "the length this run already wrote"
        return with_dimension_check(self.dim, self.dim_why) if self.dim is not None else with_dimension_check(None)


def append_observed(landed: DataFrame, name: str, run_id: str, chunk: int) -> tuple[dict[str, int], float | None]:
    """Append `landed` (ids new to the table) in one job, idempotent per (run, chunk); counts by status
    and the mean latency of its answered rows.

    `writeTo(...).append()`: its plan keeps the `Observation` (on classic Spark `saveAsTable` runs
    Delta's write in a nested query, and the observed counts never arrive).
    """
    seen = Observation(f"chunk_{run_id}_{chunk}")
    (landed.observe(seen, F.count(F.lit(1)).alias("rows"), F.count_if(F.col("status") == "ok").alias("ok"),
                    F.avg("latency_ms").alias("latency_ms"))
     .writeTo(name).option("txnAppId", run_id).option("txnVersion", str(chunk)).append())
    try:
        got = seen.get
    except Exception:  # nothing ran: Delta skipped a (run, chunk) it had already committed
        got = {}
    rows, ok = got.get("rows") or 0, got.get("ok") or 0
    return {k: n for k, n in (("ok", ok), ("error", rows - ok)) if n}, got.get("latency_ms")


class Committer:
    """Commits chunks in order on one thread of its own while the caller goes on calling.

    `submit` waits while one commit runs and another waits (bounded memory, bounded loss on a crash)
    and raises the first commit's failure, so a broken commit stops the calls too.
    """

    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="bi-commit", daemon=True)
        self._thread.start()

    def submit(self, commit: Callable[[], Any], then: Callable[[Any], None]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((commit, then))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[1](item[0]())
                except BaseException as exc:
                    self._error = exc

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Committer:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            self.close()
        else:  # the caller failed: let committed chunks stand, raise the caller's error
            self._queue.put(None)
            self._thread.join()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _unchanged(df: DataFrame) -> DataFrame:
    return df
