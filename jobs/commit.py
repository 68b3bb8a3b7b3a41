"""Committing: the output table's schema, its creation, and landing one chunk of outcomes in Delta.

Every chunk lands once: ids new to the table are appended idempotently (`txnAppId` = run,
`txnVersion` = chunk), ids it holds are MERGEd on id. The column names are fixed, whatever the
input's; `with_run_columns` stamps each row with the endpoint, the run and the time, and fixes the
order.

Example::

    table = ensure_output_table(spark, "main.gold.completions", output_schema(T.LongType(), False))
    counts = commit_chunk(table, "main.gold.completions", landed, run_id, chunk=0)   # {"ok": 998, "error": 2}
"""

from __future__ import annotations

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, functions as F, types as T

from jobs.errors import InputError
from jobs.tables import ensure_schema, schema_problems
from jobs.read import Transform
from udfs.inference import outcome_schema


def with_run_columns(endpoint: str, run_id: str, schema: T.StructType) -> Transform:
    """Stamp endpoint, run and time; the final select fixes the output table's column order."""
    def step(df: DataFrame) -> DataFrame:
        out = df.withColumns({"endpoint": F.lit(endpoint), "run_id": F.lit(run_id),
                              "completed_at": F.current_timestamp()})
        if "text" in schema.fieldNames():
            out = out.withColumnRenamed("prompt", "text")
        return out.select(*schema.fieldNames(), *[c for c in ("_exists",) if c in out.columns])
    return step


def output_schema(id_type: T.DataType, embeddings: bool) -> T.StructType:
    fields = [T.StructField("id", id_type), T.StructField("text" if embeddings else "prompt", T.StringType())]
    fields += outcome_schema(embeddings).fields
    fields += [T.StructField("request_hash", T.StringType()), T.StructField("endpoint", T.StringType()),
               T.StructField("run_id", T.StringType()), T.StructField("completed_at", T.TimestampType())]
    return T.StructType(fields)


def ensure_output_table(spark: SparkSession, name: str, schema: T.StructType) -> DeltaTable:
    if not spark.catalog.tableExists(name):
        ensure_schema(spark, name)
        (DeltaTable.createIfNotExists(spark).tableName(name).addColumns(schema)
         .comment("batch-inference outcomes: one row per input id").execute())
    table = DeltaTable.forName(spark, name)
    wrong = schema_problems(table.toDF().schema, schema)
    if wrong:
        raise InputError(f"output.table {name} exists with another schema: {', '.join(wrong)}")
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
