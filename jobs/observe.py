"""Seeing a run: progress per chunk, the run's summary, the runs table and MLflow.

`Progress` reports after each committed chunk: one log line in job logs, a redrawn bar on a terminal.
At the end `finish_run` summarises the run from the output table (one aggregation over the rows of
this `run_id`), logs it to MLflow with two plots when `mlflow.enabled` (`jobs.tracking`), and appends
one row to `output.runs_table`. None of that may fail the run: the outcomes are already in Delta.

Example::

    progress = Progress(total_rows=1000, total_chunks=4)
    progress.chunk_done({"ok": 248, "error": 2})   # chunk 1/4: 250/1000 rows (25.0%), ...
    stats = finish_run(spark, cfg, summary, progress.timeline, started_at)
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Callable

from pyspark.sql import SparkSession, functions as F, types as T

from jobs.config import EndpointConfig, JobConfig

log = logging.getLogger("batch_inference")

BAR_WIDTH = 24


# -- progress ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkTiming:
    chunk: int
    seconds: float  # since the first chunk started, when this one was committed
    rows: int
    errors: int


class Progress:
    """Rows done / total, %, rows/s, ETA and errors after each chunk, on one line.

    A terminal gets a bar redrawn in place (`\\r`); anything else (a job's log, a pipe) gets plain log
    lines, since a redrawn bar would be one unreadable line there.
    """

    def __init__(self, total_rows: int, total_chunks: int, *, stream: IO[str] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.total_rows, self.total_chunks = total_rows, total_chunks
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock or time.monotonic
        self.tty = _isatty(self.stream)
        self.started = self.clock()
        self.done = self.errors = 0
        self.timeline: list[ChunkTiming] = []

    def chunk_done(self, by_status: dict[str, int]) -> str:
        rows = sum(by_status.values())
        errors = rows - by_status.get("ok", 0)
        self.done, self.errors = self.done + rows, self.errors + errors
        elapsed = self.clock() - self.started
        self.timeline.append(ChunkTiming(len(self.timeline) + 1, elapsed, rows, errors))
        if self.tty:
            self.stream.write("\r" + self.bar(elapsed))
            self.stream.flush()
        else:
            log.info("%s", self.line(elapsed))
        return self.line(elapsed)

    def close(self) -> None:
        if self.tty and self.timeline:
            self.stream.write("\n")
            self.stream.flush()

    def _numbers(self, elapsed: float) -> tuple[float, float, str]:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total_rows if self.total_rows else 100.0
        left = max(0, self.total_rows - self.done)
        eta = _clock_text(left / rate) if rate > 0 else ("0:00:00" if not left else "?")
        return pct, rate, eta

    def line(self, elapsed: float) -> str:
        pct, rate, eta = self._numbers(elapsed)
        return (f"chunk {len(self.timeline)}/{self.total_chunks}: {self.done}/{self.total_rows} rows "
                f"({pct:.1f}%), {rate:.1f} rows/s, ETA {eta}, errors {self.errors}")

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


# -- the run's summary -------------------------------------------------------------------------------

@dataclass
class RunStats:
    """What a run did, from the rows it wrote. Tokens and latency count each distinct request once:
    identical prompts are sent once and share the answer, so they are paid for once."""

    rows: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    # Requests sent (identical prompts once; rows stopped by a precheck are not sent).
    distinct_requests: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Answered requests without reported usage, whose tokens are estimated as characters / 4.
    estimated_token_requests: int = 0
    # (centroid in ms, requests): Spark's histogram_numeric, 64 uneven bins, for the latency plot.
    latency_histogram: list[tuple[float, float]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _chars_to_tokens(chars: Any) -> Any:
    return F.ceil(chars / 4).cast("long")


def run_stats(spark: SparkSession, table: str, run_id: str, embeddings: bool) -> RunStats:
    """One aggregation over this run's rows: per request first, then rolled up by status and reason."""
    rows = spark.read.table(table).where(F.col("run_id") == run_id)
    ok = F.col("status") == "ok"
    text = "text" if embeddings else "prompt"
    completion = (F.lit(0).cast("long") if embeddings
                  else F.when(ok, F.coalesce("completion_tokens", _chars_to_tokens(F.length("response")))))
    estimated = ok & (F.col("prompt_tokens").isNull()
                      | (F.lit(False) if embeddings else F.col("completion_tokens").isNull()))
    # Every row of one request_hash carries that request's outcome, so max() just picks it.
    per_request = rows.groupBy("request_hash").agg(
        F.count("*").alias("n"),
        F.max("status").alias("status"),
        F.max(F.when(~ok, F.substring_index("error", ":", 1))).alias("reason"),
        F.max("latency_ms").alias("latency_ms"),
        F.max("attempts").alias("attempts"),
        F.max(F.when(ok, F.coalesce("prompt_tokens", _chars_to_tokens(F.length(text))))
              .otherwise(F.col("prompt_tokens"))).alias("pt"),
        F.max(completion).alias("ct"),
        F.max(estimated.cast("int")).alias("estimated"),
    )
    levels = per_request.rollup("status", "reason").agg(
        F.grouping_id().alias("level"),
        F.sum("n").alias("rows"),
        F.count(F.when(F.col("attempts") > 0, 1)).alias("requests"),  # sent: not stopped by a precheck
        F.percentile_approx("latency_ms", [0.5, 0.95, 0.99]).alias("p"),
        F.sum("pt").alias("pt"), F.sum("ct").alias("ct"), F.sum("estimated").alias("estimated"),
        F.histogram_numeric("latency_ms", F.lit(64)).alias("hist"),
    ).collect()
    stats = RunStats()
    for r in levels:
        if r["level"] == 3:  # the grand total
            p = r["p"] or [None, None, None]
            stats.rows, stats.distinct_requests = r["rows"] or 0, r["requests"] or 0
            stats.latency_p50_ms, stats.latency_p95_ms, stats.latency_p99_ms = p
            stats.prompt_tokens, stats.completion_tokens = r["pt"] or 0, r["ct"] or 0
            stats.estimated_token_requests = r["estimated"] or 0
            stats.latency_histogram = [(b["x"], b["y"]) for b in (r["hist"] or [])]
        elif r["level"] == 1:  # one status
            if r["status"] == "ok":
                stats.rows_ok = r["rows"]
            else:
                stats.rows_error += r["rows"]
        elif r["status"] != "ok":
            reason = r["reason"] or "unknown"
            stats.errors_by_reason[reason] = stats.errors_by_reason.get(reason, 0) + r["rows"]
    return stats


def estimate_cost(e: EndpointConfig, prompt_tokens: float, completion_tokens: float) -> float | None:
    """Tokens times the configured per-1k prices; None when the endpoint has no price set."""
    prices = (e.price_per_1k_prompt_tokens, e.price_per_1k_completion_tokens)
    if prices == (None, None):
        return None
    return round(prompt_tokens / 1000 * (prices[0] or 0) + completion_tokens / 1000 * (prices[1] or 0), 6)


# -- Databricks context ------------------------------------------------------------------------------

# Through spark.conf, never sparkContext (absent under Spark Connect); a job cluster's name is
# `job-<job id>-run-<task run id>`, which covers clusters where the job keys are not in the conf.
JOB_KEYS = {"job_id": "spark.databricks.job.id", "job_run_id": "spark.databricks.job.parentRunId",
            "task_run_id": "spark.databricks.job.runId", "task_key": "spark.databricks.job.taskKey"}
_JOB_CLUSTER = re.compile(r"^job-(\d+)-run-(\d+)")


def databricks_ids(spark: SparkSession) -> dict[str, str | None]:
    """The job, job run, task run and task key of this run when on a Databricks job; else None each."""
    ids: dict[str, str | None] = {k: _conf(spark, key) for k, key in JOB_KEYS.items()}
    named = _JOB_CLUSTER.match(_conf(spark, "spark.databricks.clusterUsageTags.clusterName") or "")
    if named:
        ids["job_id"] = ids["job_id"] or named.group(1)
        ids["task_run_id"] = ids["task_run_id"] or named.group(2)
    return ids


def _conf(spark: SparkSession, key: str) -> str | None:
    try:
        return spark.conf.get(key, None) or None
    except Exception:  # Spark Connect may refuse to read some keys: the id is then unknown
        return None


# -- the runs table ----------------------------------------------------------------------------------

RUNS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()), T.StructField("config_hash", T.StringType()),
    T.StructField("endpoint", T.StringType()), T.StructField("task", T.StringType()),
    T.StructField("input", T.StringType()), T.StructField("output_table", T.StringType()),
    T.StructField("started_at", T.TimestampType()), T.StructField("finished_at", T.TimestampType()),
    T.StructField("seconds", T.DoubleType()),
    T.StructField("input_rows", T.LongType()), T.StructField("pending_rows", T.LongType()),
    T.StructField("chunks", T.IntegerType()), T.StructField("rows", T.LongType()),
    T.StructField("rows_ok", T.LongType()), T.StructField("rows_error", T.LongType()),
    T.StructField("errors_by_reason", T.MapType(T.StringType(), T.LongType())),
    T.StructField("distinct_requests", T.LongType()),
    T.StructField("latency_p50_ms", T.DoubleType()), T.StructField("latency_p95_ms", T.DoubleType()),
    T.StructField("latency_p99_ms", T.DoubleType()), T.StructField("rows_per_s", T.DoubleType()),
    T.StructField("prompt_tokens", T.LongType()), T.StructField("completion_tokens", T.LongType()),
    T.StructField("total_tokens", T.LongType()), T.StructField("estimated_token_requests", T.LongType()),
    T.StructField("estimated_cost", T.DoubleType()),
    T.StructField("job_id", T.StringType()), T.StructField("job_run_id", T.StringType()),
    T.StructField("task_run_id", T.StringType()), T.StructField("task_key", T.StringType()),
    T.StructField("mlflow_run_id", T.StringType()),
])


def run_record(cfg: JobConfig, summary: Any, stats: RunStats, started_at: datetime, finished_at: datetime,
               ids: dict[str, str | None]) -> dict[str, Any]:
    """The runs-table row (and MLflow's metrics) for one run, as a dict in `RUNS_SCHEMA` order."""
    i = cfg.input
    return {
        "run_id": summary.run_id, "config_hash": cfg.config_hash(), "endpoint": cfg.endpoint.name,
        "task": cfg.endpoint.task, "input": i.table or i.path or "(query)", "output_table": cfg.output.table,
        "started_at": started_at, "finished_at": finished_at, "seconds": round(summary.seconds, 3),
        "input_rows": summary.input_rows, "pending_rows": summary.pending_rows, "chunks": summary.chunks,
        "rows": stats.rows, "rows_ok": stats.rows_ok, "rows_error": stats.rows_error,
        "errors_by_reason": dict(stats.errors_by_reason), "distinct_requests": stats.distinct_requests,
        "latency_p50_ms": stats.latency_p50_ms, "latency_p95_ms": stats.latency_p95_ms,
        "latency_p99_ms": stats.latency_p99_ms,
        "rows_per_s": round(stats.rows / summary.seconds, 3) if summary.seconds > 0 else None,
        "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.total_tokens, "estimated_token_requests": stats.estimated_token_requests,
        "estimated_cost": estimate_cost(cfg.endpoint, stats.prompt_tokens, stats.completion_tokens),
        **{k: ids.get(k) for k in JOB_KEYS}, "mlflow_run_id": None,
    }


def append_run(spark: SparkSession, table: str, record: dict[str, Any], *, attempts: int = 5,
               pause_s: float = 0.5) -> None:
    """One row per run, appended; `txnAppId` makes a retried append of the same run a no-op.

    Two tasks of one job (completions and embeddings) may record their first runs at the same moment.
    Writers racing to create a Delta table conflict (`ProtocolChangedException`: "creating the table
    ahead of time will avoid this conflict"), so the table is created first, on its own, and the
    create-then-append is retried after a jittered pause: the loser of a race then finds the table
    and appends, which Delta lets concurrent writers do.
    """
    row = tuple(record[f.name] for f in RUNS_SCHEMA.fields)
    for attempt in range(1, attempts + 1):
        try:
            ensure_schema(spark, table)
            columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in RUNS_SCHEMA.fields)
            spark.sql(f"CREATE TABLE IF NOT EXISTS {table} ({columns}) USING DELTA "
                      "COMMENT 'batch-inference: one row per run'")
            (spark.createDataFrame([row], RUNS_SCHEMA).write.format("delta").mode("append")
             .option("mergeSchema", "true").option("txnAppId", f"runs-{record['run_id']}")
             .option("txnVersion", 0).saveAsTable(table))
            return
        except Exception as exc:
            if attempt == attempts:
                raise
            log.info("runs table %s: attempt %d raced another writer (%s); retrying", table, attempt,
                     _brief(exc))
            time.sleep(random.uniform(0.5, 1.5) * pause_s * attempt)


def ensure_schema(spark: SparkSession, table: str) -> None:
    """`CREATE SCHEMA IF NOT EXISTS` for the schema part of `catalog.schema.table` / `schema.table`."""
    parts = table.split(".")
    if len(parts) >= 2:
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {'.'.join(parts[:-1])}")


# -- the end of a run --------------------------------------------------------------------------------

def finish_run(spark: SparkSession, cfg: JobConfig, summary: Any, timeline: list[ChunkTiming],
               started_at: datetime) -> RunStats | None:
    """Summarise, log to MLflow, append to the runs table; only if one of them is configured.

    A failure here is logged, never raised: the run's outcomes are committed already, and a job
    retried for a broken tracking server would call the endpoint for nothing.
    """
    if not (cfg.output.runs_table or cfg.mlflow.enabled):
        return None
    finished_at = datetime.now(timezone.utc)
    try:
        stats = run_stats(spark, cfg.output.table, summary.run_id, cfg.endpoint.is_embeddings)
    except Exception as exc:
        log.warning("could not summarise run %s from %s: %s", summary.run_id, cfg.output.table, _brief(exc))
        return None
    record = run_record(cfg, summary, stats, started_at, finished_at, databricks_ids(spark))
    log.info("run %s: %s", summary.run_id, summary_text(record))
    if cfg.mlflow.enabled:
        try:
            from jobs.tracking import log_to_mlflow

            record["mlflow_run_id"] = log_to_mlflow(spark, cfg, record, stats, timeline)
        except Exception as exc:
            log.warning("MLflow logging failed, the run itself is complete: %s", _brief(exc))
    if cfg.output.runs_table:
        try:
            append_run(spark, cfg.output.runs_table, record)
            log.info("run %s recorded in %s", summary.run_id, cfg.output.runs_table)
        except Exception as exc:
            log.warning("could not append to output.runs_table %s: %s", cfg.output.runs_table, _brief(exc))
    return stats


def summary_text(record: dict[str, Any]) -> str:
    """`12 rows (11 ok, 1 error), 3.2 rows/s, latency p50/p95/p99 41/80/95 ms, 420 tokens, cost 0.0021`."""
    lat = "/".join("-" if record[k] is None else f"{record[k]:.0f}"
                   for k in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms"))
    rate = "-" if record["rows_per_s"] is None else f"{record['rows_per_s']:.1f}"
    est = record["estimated_token_requests"]
    cost = record["estimated_cost"]
    return (f"{record['rows']} rows ({record['rows_ok']} ok, {record['rows_error']} error), {rate} rows/s, "
            f"latency p50/p95/p99 {lat} ms, {record['total_tokens']} tokens"
            + (f" ({est} requests estimated as chars/4)" if est else "")
            + (f", estimated cost {cost:.4f}" if cost is not None else ""))


def _brief(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


__all__ = ["RUNS_SCHEMA", "ChunkTiming", "Progress", "RunStats", "databricks_ids", "estimate_cost",
           "finish_run", "run_stats"]
