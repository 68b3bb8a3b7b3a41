"""The batch job as DataFrame steps: read prompts, find what is pending, call, merge into Delta.

Each step is `DataFrame -> DataFrame` (or a closure returning one) so the flow reads top to bottom in
`run_job`. Side effects (the endpoint calls, the Delta commits) happen once per chunk, in
`commit_chunk`.

Example::

    summary = run_job(get_spark(), load_config("conf/demo.yml"))
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from delta.tables import DeltaTable
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession, functions as F, types as T
from pyspark.sql.window import Window

from jobs.config import ConfigError, InputConfig, JobConfig
from jobs.endpoint import engine_spec
from jobs.observe import Progress, finish_run
from jobs.plan import TaskPlan, plan_tasks, task_slots
from udfs.engine import EngineSpec
from udfs.inference import inference_udf, outcome_schema
from udfs.prompts import BLANK_REGEX
from udfs.protocols import is_embeddings_task

if TYPE_CHECKING:
    from jobs.dryrun import DryRunReport
    from jobs.observe import RunStats

log = logging.getLogger("batch_inference")

Transform = Callable[[DataFrame], DataFrame]


class InputError(ValueError):
    """The input table is missing, lacks a column, or breaks a rule (duplicate ids)."""


class JobFailed(RuntimeError):
    """`run.fail_on_error` is set and some rows failed (after everything else was written)."""


@dataclass
class RunSummary:
    run_id: str
    output_table: str
    input_rows: int = 0
    pending_rows: int = 0
    chunks: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Latency, tokens, cost: set when output.runs_table or mlflow.enabled asks for them.
    stats: RunStats | None = None
    # A dry run's checks and estimates (run.dry_run); nothing else ran.
    dry_run: DryRunReport | None = None

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.by_status.items() if s != "ok")


# -- reading -----------------------------------------------------------------------------------------

def read_input(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    """The input as `id`, `prompt`; a missing table or column is an `InputError` naming it."""
    try:
        if cfg.table:
            df, where = spark.read.table(cfg.table), f"input.table {cfg.table}"
        elif cfg.path:
            df, where = spark.read.format("delta").load(cfg.path), f"input.path {cfg.path}"
        else:
            df, where = spark.sql(cfg.query or ""), "input.query"
        columns = df.columns
    except AnalysisException as exc:
        source = cfg.table or cfg.path or "input.query"
        raise InputError(f"cannot read input {source}: {_first_line(exc)}") from None
    for key, col in (("input.id_col", cfg.id_col), ("input.prompt_col", cfg.prompt_col)):
        if col not in columns:
            raise InputError(f"{key}: column {col!r} not found in {where} (columns: {columns})")
    return df.select(F.col(cfg.id_col).alias("id"), F.col(cfg.prompt_col).cast("string").alias("prompt"))


def check_ids(df: DataFrame, sample: int = 5) -> None:
    """Stop before any call if an id is null or repeats: one output row per id would be ambiguous."""
    bad = (df.groupBy("id").count().where(F.col("id").isNull() | (F.col("count") > 1))
           .orderBy(F.col("id").isNull().desc(), F.col("count").desc(), "id").limit(sample).collect())
    if bad and bad[0]["id"] is None:
        raise InputError(f"{bad[0]['count']} input row(s) have a null id; every row needs an id")
    if bad:
        shown = ", ".join(f"{r['id']!r} (x{r['count']})" for r in bad)
        raise InputError(f"duplicate ids in the input, e.g. {shown}; ids must be unique")


# -- shaping requests --------------------------------------------------------------------------------

def with_request_hash(fingerprint: str) -> Transform:
    """`request_hash`: what is sent (endpoint, parameters, prompt). Resume and de-duplication key on it."""
    def step(df: DataFrame) -> DataFrame:
        return df.withColumn(
            "request_hash",
            F.sha2(F.concat(F.lit(fingerprint + "\u0000"), F.coalesce(F.col("prompt"), F.lit("\u0001null"))), 256),
        )
    return step


def with_precheck(max_chars: int) -> Transform:
    """`precheck`: the reason a row is not sent at all (blank or over-long prompt), else null.

    Blank is `udfs.prompts`' rule (any Unicode whitespace), the one the engine applies too.
    """
    def step(df: DataFrame) -> DataFrame:
        n = F.length("prompt")
        return df.withColumn(
            "precheck",
            F.when(F.col("prompt").isNull() | F.col("prompt").rlike(BLANK_REGEX), F.lit("empty_prompt"))
            .when(n > max_chars, F.concat(F.lit("prompt_too_long: "), n.cast("string"),
                                          F.lit(f" chars > run.max_prompt_chars {max_chars}"))),
        )
    return step


def read_requests(spark: SparkSession, cfg: JobConfig) -> tuple[DataFrame, DataFrame]:
    """The input, checked, and every row as a request: hashed and prechecked (no `run.limit` yet)."""
    inputs = read_input(spark, cfg.input)
    check_ids(inputs)
    requests = inputs.transform(with_request_hash(cfg.request_fingerprint())).transform(
        with_precheck(cfg.run.max_prompt_chars))
    return inputs, requests


def with_limit(limit: int | None) -> Transform:
    """At most `limit` rows, the lowest ids first.

    Applied to *pending* rows, after the final ones are removed: a limit taken before that would pick
    the same first ids on every run, find them done, and send nothing. In id order, consecutive runs
    with the same limit walk through the whole table.
    """
    def step(df: DataFrame) -> DataFrame:
        return df.orderBy("id").limit(limit) if limit else df
    return step


def without_final(prior: DataFrame | None, retry_errors: bool) -> Transform:
    """Drop rows whose identical request already has a final outcome in the output table.

    Final means `ok`, or any outcome when `retry_errors` is off. A changed request (new prompt or
    parameters: another `request_hash`) is pending again. `_exists` marks ids the table already
    holds, which need a MERGE; the others can be appended.
    """
    def step(df: DataFrame) -> DataFrame:
        if prior is None:
            return df.withColumn("_exists", F.lit(False))
        before = prior.select("id", F.col("request_hash").alias("_hash"), F.col("status").alias("_status"))
        final = (F.col("_hash") == F.col("request_hash")) & ((F.col("_status") == "ok") | F.lit(not retry_errors))
        return (df.join(before, on="id", how="left")
                .where(~F.coalesce(final, F.lit(False)))
                .withColumn("_exists", F.col("_hash").isNotNull())
                .drop("_hash", "_status"))
    return step


# -- calling -----------------------------------------------------------------------------------------

def with_outcomes(spec: EngineSpec, plan: TaskPlan) -> Transform:
    """Call the endpoint once per distinct request; every row gets its outcome columns."""
    embeddings = is_embeddings_task(spec.task)
    udf = inference_udf(plan.per_task_spec(spec), plan.per_task)
    outcome_fields = outcome_schema(embeddings).fields
    fields = [f.name for f in outcome_fields]

    def step(df: DataFrame) -> DataFrame:
        to_call = df.where(F.col("precheck").isNull())
        answered = (
            to_call.select("request_hash", "prompt")
            .repartition(plan.partitions, "request_hash")
            .dropDuplicates(["request_hash"])
            .select("request_hash", udf("prompt").alias("o"))
        )
        called = to_call.join(answered, on="request_hash", how="inner").select("*", "o.*").drop("o")
        skipped = df.where(F.col("precheck").isNotNull()).select(
            "*", *[_not_sent(f) for f in outcome_fields])
        return called.unionByName(skipped.select(*called.columns)).drop("precheck").select(
            "id", "prompt", *fields, "request_hash", *[c for c in ("_exists",) if c in df.columns])
    return step


def _not_sent(f: T.StructField):
    if f.name == "status":
        return F.lit("error").alias("status")
    if f.name == "error":
        return F.col("precheck").alias("error")
    if f.name == "attempts":
        return F.lit(0).cast("int").alias("attempts")
    return F.lit(None).cast(f.dataType).alias(f.name)


def with_dimension_check(expected: int | None, source: str = "endpoint.embedding_dim") -> Transform:
    """An `ok` vector whose length is not the run's dimension becomes an error row, vector dropped.

    `expected` comes from `source` (the config, or rows this run already wrote); without one, the
    most common length among the chunk's `ok` rows is the reference (ties: the shorter). That takes
    windows, not an aggregate joined back: a second read of the outcomes would call the endpoint again.
    """
    def step(df: DataFrame) -> DataFrame:
        ok = F.col("status") == "ok"
        if expected is not None:
            ref, why = F.lit(expected), source
        else:
            df = df.withColumn("_n", F.count(F.when(ok, 1)).over(Window.partitionBy("dim")))
            top = F.max(F.when(ok, F.struct("_n", (-F.col("dim")).alias("_neg")))).over(Window.partitionBy())
            ref, why = -top["_neg"], "the most common length in this chunk"
        bad = ok & (F.col("dim") != ref)
        reason = F.concat(F.lit("dimension_mismatch: "), F.col("dim").cast("string"),
                          F.lit(" values, expected "), ref.cast("string"), F.lit(f" ({why})"))
        return df.withColumns({
            "status": F.when(bad, F.lit("error")).otherwise(F.col("status")),
            "error": F.when(bad, reason).otherwise(F.col("error")),
            "embedding": F.when(bad, F.lit(None)).otherwise(F.col("embedding")),
            "dim": F.when(bad, F.lit(None)).otherwise(F.col("dim")),
        }).drop("_n")
    return step


def dimension_check(spark: SparkSession, table: str, run_id: str, pinned: int | None) -> Transform:
    """`with_dimension_check` against the pinned dimension, else the one this run's earlier chunks wrote.

    Resolved when a chunk's plan is built, after the previous chunk committed, so every chunk of a
    run lands vectors of one length.
    """
    def step(df: DataFrame) -> DataFrame:
        if pinned is not None:
            return df.transform(with_dimension_check(pinned))
        first = (spark.read.table(table).where((F.col("run_id") == run_id) & (F.col("status") == "ok"))
                 .select("dim").limit(1).collect())
        if first:
            return df.transform(with_dimension_check(first[0]["dim"], "the length this run already wrote"))
        return df.transform(with_dimension_check(None))
    return step


def with_run_columns(endpoint: str, run_id: str, schema: T.StructType) -> Transform:
    """Stamp endpoint, run and time; the final select fixes the output table's column order."""
    def step(df: DataFrame) -> DataFrame:
        out = df.withColumns({"endpoint": F.lit(endpoint), "run_id": F.lit(run_id),
                              "completed_at": F.current_timestamp()})
        if "text" in schema.fieldNames():
            out = out.withColumnRenamed("prompt", "text")
        return out.select(*schema.fieldNames(), *[c for c in ("_exists",) if c in out.columns])
    return step


# -- writing -----------------------------------------------------------------------------------------

def output_schema(id_type: T.DataType, embeddings: bool) -> T.StructType:
    fields = [T.StructField("id", id_type), T.StructField("text" if embeddings else "prompt", T.StringType())]
    fields += outcome_schema(embeddings).fields
    fields += [T.StructField("request_hash", T.StringType()), T.StructField("endpoint", T.StringType()),
               T.StructField("run_id", T.StringType()), T.StructField("completed_at", T.TimestampType())]
    return T.StructType(fields)


def ensure_output_table(spark: SparkSession, name: str, schema: T.StructType) -> DeltaTable:
    if not spark.catalog.tableExists(name):
        _ensure_schema(spark, name)
        (DeltaTable.createIfNotExists(spark).tableName(name).addColumns(schema)
         .comment("batch-inference outcomes: one row per input id").execute())
    table = DeltaTable.forName(spark, name)
    have = {f.name: f.dataType for f in table.toDF().schema.fields}
    wrong = [f"{f.name} ({have.get(f.name, 'missing')} != {f.dataType.simpleString()})"
             for f in schema.fields if have.get(f.name) != f.dataType]
    if wrong:
        raise InputError(f"output.table {name} exists with another schema: {', '.join(map(str, wrong))}")
    return table


def _ensure_schema(spark: SparkSession, name: str) -> None:
    parts = name.split(".")
    if len(parts) >= 2:
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {'.'.join(parts[:-1])}")


def commit_chunk(table: DeltaTable, name: str, outcomes: DataFrame, run_id: str, chunk: int) -> dict[str, int]:
    """Land one chunk: append the ids new to the table, MERGE the ones it holds; counts by status.

    The append is idempotent per (run, chunk) through Delta's `txnAppId`/`txnVersion`; the MERGE
    upserts by id. Either way a retried chunk or a rerun never adds a second row for an id. The
    outcomes are materialised first: the endpoint is called here, once, and MERGE (which may read
    its source twice) reads the checkpoint.
    """
    materialised = outcomes.localCheckpoint(eager=True)
    counts = materialised.groupBy("status", "_exists").count().collect()
    if any(not r["_exists"] for r in counts):
        (materialised.where(~F.col("_exists")).drop("_exists").write.format("delta").mode("append")
         .option("txnAppId", run_id).option("txnVersion", chunk).saveAsTable(name))
    if any(r["_exists"] for r in counts):
        (table.alias("t").merge(materialised.where(F.col("_exists")).drop("_exists").alias("s"), "t.id = s.id")
         .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())
    by_status: dict[str, int] = {}
    for r in counts:
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["count"]
    return by_status


# -- the job -----------------------------------------------------------------------------------------

def run_job(spark: SparkSession, cfg: JobConfig, *, run_id: str | None = None) -> RunSummary:
    run_id = run_id or uuid.uuid4().hex
    if cfg.run.dry_run:  # before anything is created: checks, counts, one probe request, no write
        from jobs.dryrun import dry_run

        return dry_run(spark, cfg, run_id=run_id)
    started, started_at = time.monotonic(), datetime.now(timezone.utc)
    e = cfg.endpoint
    spec = engine_spec(cfg, spark)  # resolves URL and credentials: fails here, before any call
    embeddings = e.is_embeddings
    summary = RunSummary(run_id=run_id, output_table=cfg.output.table)

    inputs, requests = read_requests(spark, cfg)
    schema = output_schema(inputs.schema["id"].dataType, embeddings)
    table = ensure_output_table(spark, cfg.output.table, schema)
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
    outcomes = with_outcomes(spec, plan)
    finish = with_run_columns(e.name, run_id, schema)
    dims = dimension_check(spark, cfg.output.table, run_id, e.embedding_dim) if embeddings else _unchanged
    progress = Progress(summary.pending_rows, n_chunks)
    for k in range(n_chunks):
        chunk = chunked.where(F.col("_chunk") == k).drop("_chunk")
        landed = chunk.transform(outcomes).transform(dims).transform(finish)
        counts = commit_chunk(table, cfg.output.table, landed, run_id, k)
        for status, n in counts.items():
            summary.by_status[status] = summary.by_status.get(status, 0) + n
        progress.chunk_done(counts)
    progress.close()
    summary.seconds = time.monotonic() - started
    log.info("run %s finished in %.1fs: %s", run_id, summary.seconds,
             ", ".join(f"{s}={n}" for s, n in sorted(summary.by_status.items())) or "nothing to do")
    summary.stats = finish_run(spark, cfg, summary, progress.timeline, started_at)
    if cfg.run.fail_on_error and summary.errors:
        raise JobFailed(f"{summary.errors} row(s) failed in run {run_id}; see {cfg.output.table} "
                        "WHERE status != 'ok' (run.fail_on_error is set)")
    return summary


def _unchanged(df: DataFrame) -> DataFrame:
    return df


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300]


__all__ = ["ConfigError", "InputError", "JobFailed", "RunSummary", "run_job"]
