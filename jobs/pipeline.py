"""The batch job, top to bottom: read, survey, stage, call, commit, observe.

`run_job` reads the requests, counts and checks them in one pass (`jobs.input.stage.survey`), writes the
pending rows once to a scratch table when the run takes more than one chunk (`jobs.calls.chunking`), then
calls the endpoint chunk by chunk and commits each chunk's outcomes to Delta (`jobs.output.commit`),
from the driver (`jobs.calls.driver`) or the executors (`jobs.calls.executors`), reporting progress
and, at the end, the run's summary (`jobs.observe`) and verdict (`jobs.observe.verdict`). `run.dry_run` goes
to `jobs.dryrun.checks` instead (then `jobs.dryrun.forecast`'s sample, for real).

Calls come from the executors (the pandas UDF) or from the driver (`run.calls_from`; `auto` picks
the driver on Spark Connect, where UDFs cannot reach the internet). What overlaps:

- driver: one engine keeps `C` requests in flight across chunk boundaries (the next chunk's rows
  are fetched ahead), and chunk k is committed on the committer thread while chunk k+1 calls;
  the commit holds no request and no task slot the calls need;
- executors: one Spark job per chunk calls and appends (the write of its rows and Delta's log
  commit are the end of the same job); two chunk jobs run side by side on half the slots each and a
  third waits, so while one chunk's tasks wait for their slowest answers the other's borrow the
  share they leave idle (`udfs.hostpool`, tasks on one host), and the third takes each slot they
  free. Chunks that need a MERGE stage their outcomes and merge alone.

Each chunk is committed once; a crash loses at most the chunks in flight (driver: one calling, one
committing, one waiting; executors: the three in flight).

Example::

    summary = run_job(get_spark(), load_config("conf/demo.yml"))
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from typing import Iterator

from pyspark.sql import DataFrame, SparkSession, types as T

from jobs.calls.chunking import plan_chunks
from jobs.calls.driver import DriverRun
from jobs.calls.executors import ExecutorsRun
from jobs.config import JobConfig
from jobs.dryrun.checks import dry_run
from jobs.dryrun.forecast import forecast_from, forecast_lines, sample_config
from jobs.endpoint.resolve import engine_specs, preflight
from jobs.endpoint.token_relay import relay_for
from jobs.errors import InputError
from jobs.input.read import check_ids, read_requests
from jobs.input.stage import Survey, drop_stale_scratch, pending_rows, scratch_table, survey
from jobs.observe.finish import finish_run
from jobs.observe.progress import Progress
from jobs.observe.summary import RunSummary
from jobs.observe.verdict import judge
from jobs.observe.waiting import Waiting
from jobs.output.commit import ensure_output_table, table_schema
from jobs.session import is_connect

log = logging.getLogger("batch_inference")


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
    if cfg.run.dry_run:  # before anything is created: checks, counts, one probe; then the forecast
        return forecast_run(spark, cfg, run_id)
    started, started_at = time.monotonic(), datetime.now(timezone.utc)
    specs = engine_specs(cfg, spark)  # resolves URLs and credentials: fails here, before any call
    spec = next(s for s in specs if s.role == "primary")
    for each in specs:  # an untrusted TLS certificate or nothing listening stops the run here
        preflight(each)
    summary = RunSummary(run_id=run_id, output_table=cfg.output.table)
    found, requests, prior, landing = read_and_survey(spark, cfg)
    summary.input_rows, summary.pending_rows = found.input_rows, found.pending
    mode, why = calls_from(spark, cfg.run.calls_from)
    log.info("run %s: %d input rows, %d pending -> %s; calls from the %s (%s)", run_id, found.input_rows,
             found.pending, cfg.output.table, mode, why)
    progress = Progress(found.pending, 0, watch=Waiting(spec.url, cfg.retry.breaker_s))
    if found.pending:
        with scratch_tables(spark, cfg.output.table, run_id) as (pending_table, outcomes_table):
            try:
                pending = pending_rows(requests, prior, cfg.run.retry_errors, cfg.run.limit, cfg.run.limit_order)
                staged, planner = plan_chunks(spark, cfg, found, pending, pending_table)
                args = (spark, cfg, specs, run_id, landing, staged, planner, progress, summary)
                if mode == "driver":
                    DriverRun(*args).call()
                else:
                    with ExitStack() as relays:  # credentials only the driver refreshes reach the tasks
                        for each in specs:
                            relays.enter_context(relay_for(each, spark))
                        ExecutorsRun(*args).call(outcomes_table)
            finally:
                progress.close()  # stops the waiting watch, whatever happened
    progress.close()
    summary.seconds = time.monotonic() - started
    log.debug("run %s finished in %.1fs: %s", run_id, summary.seconds,
              ", ".join(f"{s}={n}" for s, n in sorted(summary.by_status.items())) or "nothing to do")
    summary.stats = finish_run(spark, cfg, summary, progress.timeline, started_at)
    judge(spark, cfg, summary)  # after every row is committed: fail_on_error, max_error_share
    return summary


def read_and_survey(spark: SparkSession, cfg: JobConfig) -> tuple[Survey, DataFrame, DataFrame | None, T.StructType]:
    """The requests, the output table as it was (None: new), the landing schema, and the survey: one
    counting pass; null or repeated ids stop the run here, naming them, before any call."""
    out = cfg.output.table
    inputs, requests = read_requests(spark, cfg, check=False)
    schema = table_schema(cfg, inputs.schema)
    prior, landing = None, None
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
    if landing is None:
        landing = ensure_output_table(spark, out, schema)
    drop_stale_scratch(spark, out)
    return found, requests, prior, landing


@contextmanager
def scratch_tables(spark: SparkSession, output: str, run_id: str) -> Iterator[tuple[str, str]]:
    """The run's scratch tables beside the output (pending rows, MERGE sources), dropped at the end."""
    names = (scratch_table(output, run_id, "pending"), scratch_table(output, run_id, "outcomes"))
    try:
        yield names
    finally:
        for name in names:
            if spark.catalog.tableExists(name):
                spark.sql(f"DROP TABLE IF EXISTS {name}")


def forecast_run(spark: SparkSession, cfg: JobConfig, run_id: str) -> RunSummary:
    """The dry run's checks; then, if they pass, `run.forecast_rows` pending rows for real, and the
    forecast for the rest from them (`jobs.dryrun.forecast`)."""
    summary = dry_run(spark, cfg, run_id=run_id)
    if cfg.run.forecast_rows and summary.pending_rows and not cfg.run.dry_run_all:
        sample = run_job(spark, sample_config(cfg, summary.pending_rows), run_id=run_id)
        sent = sum(sample.by_status.values())
        report = summary.dry_run
        report.forecast = forecast_from(spark, cfg, run_id, max(0, summary.pending_rows - sent))
        for line in forecast_lines(report.forecast, cfg) if report.forecast else []:
            log.info("forecast: %s", line)
    return summary
