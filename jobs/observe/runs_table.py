"""The runs table: one Delta row per run (counts, latency, tokens, cost, the Databricks job run).

Example::

    record = run_record(cfg, summary, stats, started_at, finished_at, databricks_ids(spark))
    append_run(spark, "demo.runs", record)
"""

from __future__ import annotations

import logging
import random
import re
import time
from datetime import datetime
from typing import Any

from pyspark.sql import SparkSession, types as T

from jobs.config import JobConfig
from jobs.errors import brief
from jobs.observe.stats import RunStats, run_cost
from jobs.observe.summary import RunSummary
from jobs.output.tables import ensure_schema
from jobs.session import conf_get

log = logging.getLogger("batch_inference")


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
    return conf_get(spark, key)  # Spark Connect may refuse to read some keys: the id is then unknown


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
    # What estimated_cost is in (endpoint.price_unit): last, so tables made before it gain it on append.
    T.StructField("cost_unit", T.StringType()),
    # run.budget: why the run stopped early (`budget`), its caps and what it spent (tokens, requests,
    # cost). Added after the first release: older tables gain them on the next append (mergeSchema).
    T.StructField("stopped", T.StringType()),
    T.StructField("budget", T.MapType(T.StringType(), T.DoubleType())),
    T.StructField("spent", T.MapType(T.StringType(), T.DoubleType())),
    # Per endpoint of the run (`endpoints:`; one entry for a single endpoint): who answered how much.
    T.StructField("endpoints", T.ArrayType(T.StructType([
        T.StructField("endpoint", T.StringType()), T.StructField("role", T.StringType()),
        T.StructField("rows", T.LongType()), T.StructField("rows_ok", T.LongType()),
        T.StructField("rows_error", T.LongType()), T.StructField("requests", T.LongType()),
        T.StructField("prompt_tokens", T.LongType()), T.StructField("completion_tokens", T.LongType()),
        T.StructField("latency_p50_ms", T.DoubleType()), T.StructField("latency_p95_ms", T.DoubleType()),
        T.StructField("estimated_cost", T.DoubleType())]))),
])


def run_record(cfg: JobConfig, summary: RunSummary, stats: RunStats, started_at: datetime, finished_at: datetime,
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
        "estimated_cost": run_cost(stats, cfg.endpoint, [r.endpoint for r in cfg.routes()]),
        **{k: ids.get(k) for k in JOB_KEYS}, "mlflow_run_id": None, "cost_unit": cfg.endpoint.price_unit,
        "stopped": summary.stopped,
        "budget": {k: float(v) for k, v in summary.budget.items()} if summary.budget else None,
        "spent": {k: float(v) for k, v in summary.spent.items()} if summary.spent else None,
        "endpoints": endpoint_rows(cfg, stats),
    }


def endpoint_rows(cfg: JobConfig, stats: RunStats) -> list[dict[str, Any]]:
    """The `endpoints` column: one entry per endpoint of the run, in config order (an endpoint that
    answered nothing has zeros), each priced at its own prices (`run_cost` filled them in)."""
    roles = {r.endpoint.name: r.role for r in cfg.routes()}
    out = []
    for name in [*roles, *[n for n in stats.by_endpoint if n not in roles]]:
        e = stats.by_endpoint.get(name)
        out.append({"endpoint": name, "role": roles.get(name), "rows": e.rows if e else 0,
                    "rows_ok": e.rows_ok if e else 0, "rows_error": e.rows_error if e else 0,
                    "requests": e.requests if e else 0, "prompt_tokens": e.prompt_tokens if e else 0,
                    "completion_tokens": e.completion_tokens if e else 0,
                    "latency_p50_ms": e.latency_p50_ms if e else None,
                    "latency_p95_ms": e.latency_p95_ms if e else None, "estimated_cost": e.cost if e else None})
    return out


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
                     brief(exc))
            time.sleep(random.uniform(0.5, 1.5) * pause_s * attempt)
