"""Committing: the output table's schema, its creation, and landing one chunk of outcomes in Delta.

Every chunk lands once: ids new to the table are appended idempotently (`txnAppId` = run,
`txnVersion` = chunk), ids it holds are MERGEd on id. The column names are fixed, whatever the
input's; `with_run_columns` stamps each row with the endpoint, the run and the time, and fixes the
order. The schema grows only when the config asks: `parsed` with a response schema, the kept input
columns with `input.keep_columns`; an existing table gains them (and a schema's new fields) in place.

Example::

    table = ensure_output_table(spark, "main.gold.completions", output_schema(T.LongType(), False))
    landing = table.toDF().schema  # what every chunk lands: the table's own columns
    counts = commit_chunk(table, "main.gold.completions", landed, run_id, chunk=0)   # {"ok": 998, "error": 2}
"""

from __future__ import annotations

from typing import Sequence

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, functions as F, types as T

from jobs.config import JobConfig
from jobs.errors import InputError
from jobs.tables import ensure_schema, schema_changes
from jobs.read import Transform, column
from jobs.structured import response_type
from udfs.inference import outcome_schema


def with_run_columns(endpoint: str, run_id: str, schema: T.StructType) -> Transform:
    """Stamp endpoint, run and time; the final select fixes the output table's column order.

    A column of `schema` the rows lack (one an earlier config added: `parsed`, a kept column) is
    null: MERGE's update-all needs every column of the table.
    """
    def step(df: DataFrame) -> DataFrame:
        out = df.withColumns({"endpoint": F.lit(endpoint), "run_id": F.lit(run_id),
                              "completed_at": F.current_timestamp()})
        if "text" in schema.fieldNames():
            out = out.withColumnRenamed("prompt", "text")
        cols = [column(f.name) if f.name in out.columns else F.lit(None).cast(f.dataType).alias(f.name)
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


def growable_columns(schema: T.StructType, embeddings: bool) -> list[str]:
    """The columns of `schema` a config adds (`parsed`, kept columns): an existing table may gain them."""
    fixed = set(output_schema(T.NullType(), embeddings).fieldNames())
    return [n for n in schema.fieldNames() if n not in fixed]


def ensure_output_table(spark: SparkSession, name: str, schema: T.StructType) -> DeltaTable:
    """The output table, created if missing; an existing one gains the columns and nested fields the
    config adds (Delta's ALTER TABLE ADD COLUMNS: old rows read null there). Any other difference
    with `schema` is an `InputError` naming the columns. Land rows with the table's own schema
    (`table.toDF().schema`): it may hold more than `schema`, columns and fields earlier configs added.
    """
    if not spark.catalog.tableExists(name):
        ensure_schema(spark, name)
        (DeltaTable.createIfNotExists(spark).tableName(name).addColumns(schema)
         .comment("batch-inference outcomes: one row per input id").execute())
    table = DeltaTable.forName(spark, name)
    embeddings = "embedding" in schema.fieldNames()
    adds, wrong = schema_changes(table.toDF().schema, schema, growable_columns(schema, embeddings))
    if wrong:
        raise InputError(f"output.table {name} exists with another schema: {', '.join(wrong)}; Delta cannot "
                         "change a column's type in place: write to another output.table")
    if adds:
        spark.sql(f"ALTER TABLE {name} ADD COLUMNS ({', '.join(adds)})")
        table = DeltaTable.forName(spark, name)
    return table


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
