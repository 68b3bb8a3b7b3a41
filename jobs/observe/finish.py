"""The end of a run: its summary from the output table, MLflow, the runs table, and its closing line.

None of it may fail the run: the outcomes are already in Delta, and a job retried for a broken
tracking server would call the endpoint for nothing. Each step that fails is logged as a warning.

Example::

    stats = finish_run(spark, cfg, summary, progress.timeline, started_at)
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import SparkSession

from jobs.config import JobConfig
from jobs.errors import brief
from jobs.observe.lines import closing_line, money
from jobs.observe.progress import ChunkTiming
from jobs.observe.runs_table import append_run, databricks_ids, run_record
from jobs.observe.stats import RunStats, run_cost, run_stats
from jobs.observe.summary import RunSummary
from jobs.observe.tracking import log_to_mlflow
from udfs.prompts import CHARS_PER_TOKEN

log = logging.getLogger("batch_inference")


def finish_run(spark: SparkSession, cfg: JobConfig, summary: RunSummary, timeline: list[ChunkTiming],
               started_at: datetime) -> RunStats | None:
    """Summarise, log to MLflow and append to the runs table (those two only if configured), then log
    the run's closing line (`jobs.observe.lines.closing_line`).

    A failure here is logged, never raised: the run's outcomes are committed already, and a job
    retried for a broken tracking server would call the endpoint for nothing.
    """
    # A no-op rerun is recorded as one (zeros; MLflow tags it and draws no plots), without a query.
    stats: RunStats | None = None if summary.pending_rows else RunStats()
    mlflow_run_id = None
    if summary.pending_rows:
        try:
            stats = run_stats(spark, cfg.output.table, summary.run_id, cfg.endpoint.is_embeddings)
        except Exception as exc:
            log.warning("could not summarise run %s from %s: %s", summary.run_id, cfg.output.table, brief(exc))
    if stats is not None and (cfg.output.runs_table or cfg.mlflow.enabled):
        record = run_record(cfg, summary, stats, started_at, datetime.now(timezone.utc), databricks_ids(spark))
        log.debug("run %s: %s", summary.run_id, summary_text(record))
        if cfg.mlflow.enabled:
            try:
                mlflow_run_id = record["mlflow_run_id"] = log_to_mlflow(spark, cfg, record, stats, timeline)
            except Exception as exc:
                log.warning("MLflow logging failed, the run itself is complete: %s", brief(exc))
        if cfg.output.runs_table:
            try:
                append_run(spark, cfg.output.runs_table, record)
            except Exception as exc:
                log.warning("could not append to output.runs_table %s: %s", cfg.output.runs_table, brief(exc))
    cost = run_cost(stats, cfg.endpoint, [r.endpoint for r in cfg.routes()]) if stats else None
    log.info("%s", closing_line(cfg, summary, stats, cost, mlflow_run_id))
    return stats


def summary_text(record: dict[str, Any]) -> str:
    """`12 rows (11 ok, 1 error), 3.2 rows/s, latency p50/p95/p99 41/80/95 ms, 420 tokens, cost USD 0.0021`."""
    lat = "/".join("-" if record[k] is None else f"{record[k]:.0f}"
                   for k in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms"))
    rate = "-" if record["rows_per_s"] is None else f"{record['rows_per_s']:.1f}"
    est = record["estimated_token_requests"]
    cost = record["estimated_cost"]
    return (f"{record['rows']} rows ({record['rows_ok']} ok, {record['rows_error']} error), {rate} rows/s, "
            f"latency p50/p95/p99 {lat} ms, {record['total_tokens']} tokens"
            + (f" ({est} requests estimated as chars/{CHARS_PER_TOKEN})" if est else "")
            + (f", estimated cost {money(cost, record['cost_unit'])}" if cost is not None else ""))
