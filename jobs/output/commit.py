"""Committing: the output table's schema, its creation, and landing one chunk of outcomes in Delta.

Every chunk lands once: ids new to the table are appended idempotently (`txnAppId` = run,
`txnVersion` = chunk), ids it holds are MERGEd on id. The column names are fixed, whatever the
input's; `with_run_columns` stamps each row with the endpoint, the run and the time, and fixes the
order. The schema grows only when the config asks: `parsed` with a response schema, the kept input
columns with `input.keep_columns`; an existing table gains them (and a schema's new fields) in place,
as it gains the outcome columns this job added since it was made (`LATER_COLUMNS`: `sent_at`).

Delta's work is SQL (`CREATE TABLE ... USING DELTA`, `ALTER TABLE ... ADD COLUMNS`, `MERGE INTO`) and
the DataFrame writer, never the Python `DeltaTable` API: that API needs Delta's Connect plugin on a
Spark Connect server, while Delta's SQL extension serves SQL over Connect and classic alike (and
Databricks everywhere). One code path for both kinds of session.

Example::

    landing = ensure_output_table(spark, "main.gold.completions", output_schema(T.LongType(), False))
    counts = commit_chunk(spark, "main.gold.completions", landed, run_id, chunk=0)   # {"ok": 998, "error": 2}
"""

from __future__ import annotations

import re
from typing import Sequence

from pyspark.sql import DataFrame, SparkSession, functions as F, types as T

from jobs.config import JobConfig
from jobs.errors import InputError
from jobs.input.read import Transform, column
from jobs.output.structured import response_type
from jobs.output.tables import columns_ddl, ensure_schema, schema_changes
from udfs.inference import outcome_schema


def with_run_columns(endpoint: str, run_id: str, schema: T.StructType) -> Transform:
    """Stamp endpoint, run and time; the final select fixes the output table's column order and types.

    A column of `schema` the rows lack (one an earlier config added: `parsed`, a kept column) is
    null: MERGE's update-all needs every column of the table. Each column is cast to the table's type
    (a no-op on the executors' rows; rows that came back from the driver as Arrow may carry a looser one).
    """
    def step(df: DataFrame) -> DataFrame:
        # Who answered, from the outcome; a row never sent (and older callers): the primary's name.
        who = F.coalesce(F.col("endpoint"), F.lit(endpoint)) if "endpoint" in df.columns else F.lit(endpoint)
        out = df.withColumns({"endpoint": who, "run_id": F.lit(run_id), "completed_at": F.current_timestamp()})
        if "text" in schema.fieldNames():
            out = out.withColumnRenamed("prompt", "text")
        cols = [(column(f.name) if f.name in out.columns else F.lit(None)).cast(f.dataType).alias(f.name)
                for f in schema.fields]
        return out.select(*cols, *[c for c in ("_exists",) if c in out.columns])
    return step


def output_schema(id_type: T.DataType, embeddings: bool, kept: Sequence[T.StructField] = (),
                  parsed: T.DataType | None = None) -> T.StructType:
    """The output table's columns: id, the kept input columns, prompt, the outcome (with `parsed`
    after `response` for structured output), then the run's stamps."""
    fields = [T.StructField("id", id_type), *kept,
              T.StructField("text" if embeddings else "prompt", T.StringType())]
    for f in outcome_schema(embeddings).fields:
        if f.name == "endpoint":  # with the run's stamps, below
            continue
        fields.append(f)
        if f.name == "response" and parsed is not None:
            fields.append(T.StructField("parsed", parsed))
    fields += [T.StructField("request_hash", T.StringType()), T.StructField("endpoint", T.StringType()),
               T.StructField("run_id", T.StringType()), T.StructField("completed_at", T.TimestampType())]
    return T.StructType(fields)


def table_schema(cfg: JobConfig, input_schema: T.StructType) -> T.StructType:
    """`output_schema` for a job: the input's id type and kept columns, `parsed` for a response schema."""
    e = cfg.endpoint
    return output_schema(input_schema["id"].dataType, e.is_embeddings,
                         kept=[input_schema[c] for c in cfg.input.keep_columns],
                         parsed=response_type(e.response_format.json_schema) if e.response_format else None)


# Outcome columns added after output tables were first written: a table made before gains them in
# place (at its end; its older rows read null there).
LATER_COLUMNS = ("sent_at",)


def growable_columns(schema: T.StructType, embeddings: bool) -> list[str]:
    """The columns of `schema` an existing table may gain: those a config adds (`parsed`, kept columns),
    and `LATER_COLUMNS`."""
    fixed = set(output_schema(T.NullType(), embeddings).fieldNames()) - set(LATER_COLUMNS)
    return [n for n in schema.fieldNames() if n not in fixed]


def ensure_output_table(spark: SparkSession, name: str, schema: T.StructType) -> T.StructType:
    """The output table, created if missing; returns its schema, which is what every chunk lands.

    An existing table gains the columns and nested fields the config adds, and `LATER_COLUMNS` (Delta's
    ALTER TABLE ADD COLUMNS: old rows read null there); it may hold more than `schema` (what earlier
    configs added).
    Any other difference with `schema` is an `InputError` naming the columns.
    """
    if not spark.catalog.tableExists(name):
        ensure_schema(spark, name)
        spark.sql(f"CREATE TABLE IF NOT EXISTS {name} ({columns_ddl(schema)}) USING DELTA "
                  "COMMENT 'batch-inference outcomes: one row per input id'")
    embeddings = "embedding" in schema.fieldNames()
    adds, wrong = schema_changes(spark.table(name).schema, schema, growable_columns(schema, embeddings))
    if wrong:
        raise InputError(f"output.table {name} exists with another schema: {', '.join(wrong)}; Delta cannot "
                         "change a column's type in place: write to another output.table")
    if adds:
        spark.sql(f"ALTER TABLE {name} ADD COLUMNS ({', '.join(adds)})")
    return spark.table(name).schema


def spark_status_counts(outcomes: DataFrame) -> list[tuple[str, bool, int]]:
    """(status, _exists, rows) of a chunk's outcomes: one small aggregation, a Spark job. (The driver
    counts an Arrow chunk it holds without one: `jobs.calls.outcomes.status_counts`.)"""
    return [(r["status"], bool(r["_exists"]), r["count"])
            for r in outcomes.groupBy("status", "_exists").count().collect()]


def commit_chunk(spark: SparkSession, name: str, outcomes: DataFrame, run_id: str, chunk: int,
                 counts: list[tuple[str, bool, int]] | None = None) -> dict[str, int]:
    """Land one chunk: append the ids new to the table, MERGE the ones it holds; counts by status.

    The append is idempotent per (run, chunk) through Delta's `txnAppId`/`txnVersion`; the MERGE
    upserts by id. Either way a retried chunk or a rerun never adds a second row for an id.
    `outcomes` must be stable (a local relation from the driver, or a staged table): the endpoint is
    not called here, and MERGE may read its source twice. `counts` ((status, _exists, rows), known to
    the driver in driver mode) saves the aggregation that otherwise finds them.
    """
    counts = spark_status_counts(outcomes) if counts is None else counts
    if any(not exists and n for _, exists, n in counts):
        (outcomes.where(~F.col("_exists")).drop("_exists").write.format("delta").mode("append")
         .option("txnAppId", run_id).option("txnVersion", chunk).saveAsTable(name))
    if any(exists and n for _, exists, n in counts):
        view = re.sub(r"\W", "_", f"_bi_merge_{run_id}_{chunk}")  # a view name takes word characters only
        outcomes.where(F.col("_exists")).drop("_exists").createOrReplaceTempView(view)
        try:
            spark.sql(f"MERGE INTO {name} AS t USING {view} AS s ON t.id = s.id "
                      "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *")
        finally:
            spark.catalog.dropTempView(view)
    by_status: dict[str, int] = {}
    for status, _, n in counts:
        by_status[status] = by_status.get(status, 0) + n
    return by_status
