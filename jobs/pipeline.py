"""The batch job, top to bottom: read, plan, call, commit, observe.

`run_job` reads the pending requests once (`jobs.read`), plans the tasks (`jobs.plan`), then per
chunk calls the endpoint (`jobs.call`) and commits the outcomes to Delta (`jobs.commit`), reporting
progress and, at the end, the run's summary (`jobs.observe`). `run.dry_run` goes to `jobs.dryrun`
instead, before anything is created.

Example::

    summary = run_job(get_spark(), load_config("conf/demo.yml"))
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from datetime import datetime, timezone

from pyspark.sql import DataFrame, SparkSession, functions as F

from jobs.call import dimension_check, with_outcomes
from jobs.commit import commit_chunk, ensure_output_table, table_schema, with_run_columns
from jobs.config import JobConfig
from jobs.dryrun import dry_run
from jobs.endpoint_health import EndpointHealth
from jobs.observe.finish import finish_run
from jobs.observe.progress import Progress
from jobs.plan import plan_tasks, task_slots
from jobs.read import read_requests, with_limit, without_final
from jobs.resolve import engine_spec, preflight
from jobs.summary import RunSummary
from jobs.verdict import judge

log = logging.getLogger("batch_inference")


def run_job(spark: SparkSession, cfg: JobConfig, *, run_id: str | None = None) -> RunSummary:
    run_id = run_id or uuid.uuid4().hex
    if cfg.run.dry_run:  # before anything is created: checks, counts, one probe request, no write
        return dry_run(spark, cfg, run_id=run_id)
    started, started_at = time.monotonic(), datetime.now(timezone.utc)
    e = cfg.endpoint
    spec = engine_spec(cfg, spark)  # resolves URL and credentials: fails here, before any call
    preflight(spec)  # an untrusted TLS certificate stops the run here, not in every task
    embeddings = e.is_embeddings
    summary = RunSummary(run_id=run_id, output_table=cfg.output.table)

    inputs, requests = read_requests(spark, cfg)
    table = ensure_output_table(spark, cfg.output.table, table_schema(cfg, inputs.schema))
    schema = table.toDF().schema  # what chunks land: the table's columns, with any an earlier config added
    summary.input_rows = requests.count()
    # Which rows to call is decided once, up front, and kept: every chunk reads this set rather than
    # re-reading the input and re-joining the output. Identical requests share a chunk (hash of the
    # request), so each is sent once per run.
    pending = (requests.transform(without_final(spark.read.table(cfg.output.table), cfg.run.retry_errors))
               .transform(with_limit(cfg.run.limit))
               .localCheckpoint(eager=True))
    summary.pending_rows = pending.count()
    n_chunks = max(1, math.ceil(summary.pending_rows / cfg.run.chunk_rows)) if summary.pending_rows else 0
    summary.chunks = n_chunks
    plan = plan_tasks(cfg.limits.max_concurrency, task_slots(spark, cfg.run.task_slots))
    log.info("run %s: %d input rows, %d pending, %d chunk(s) of about %d; %d task(s) x %s in flight -> %s",
             run_id, summary.input_rows, summary.pending_rows, n_chunks, cfg.run.chunk_rows,
             plan.partitions, "/".join(map(str, sorted(set(plan.per_task)))), cfg.output.table)

    chunked = pending.withColumn("_chunk", F.pmod(F.xxhash64("request_hash"), F.lit(max(1, n_chunks))))
    health = EndpointHealth()  # the breaker's report across chunks
    outcomes = with_outcomes(spec, plan, schema["parsed"].dataType if e.response_format else None, health)
    finish = with_run_columns(e.name, run_id, schema)
    dims = dimension_check(spark, cfg.output.table, run_id, e.embedding_dim) if embeddings else _unchanged
    progress = Progress(summary.pending_rows, n_chunks)
    for k in range(n_chunks):
        chunk = chunked.where(F.col("_chunk") == k).drop("_chunk")
        landed = chunk.transform(outcomes).transform(dims).transform(finish)
        counts = commit_chunk(table, cfg.output.table, landed, run_id, k)
        health.after_chunk(spark, cfg.output.table, run_id, k, counts)
        for status, n in counts.items():
            summary.by_status[status] = summary.by_status.get(status, 0) + n
        progress.chunk_done(counts)
    progress.close()
    summary.seconds = time.monotonic() - started
    log.info("run %s finished in %.1fs: %s", run_id, summary.seconds,
             ", ".join(f"{s}={n}" for s, n in sorted(summary.by_status.items())) or "nothing to do")
    summary.stats = finish_run(spark, cfg, summary, progress.timeline, started_at)
    judge(spark, cfg, summary)  # after every row is committed: fail_on_error, max_error_share
    return summary


def _unchanged(df: DataFrame) -> DataFrame:
    return df
