"""Committing: the output table's schema, its creation, and landing one chunk of outcomes in Delta.

Every chunk lands once: ids new to the table are appended idempotently (`txnAppId` = run,
`txnVersion` = chunk), ids it holds are MERGEd on id. The column names are fixed, whatever the
input's; `with_run_columns` stamps each row with the endpoint, the run and the time, and fixes the
order.

Delta's work is SQL (`CREATE TABLE ... USING DELTA`, `MERGE INTO`) and the DataFrame writer, never
the Python `DeltaTable` API: that API needs Delta's Connect plugin on a Spark Connect server, while
Delta's SQL extension serves SQL over Connect and classic alike (and Databricks everywhere). One
code path for both kinds of session.

Example::

    ensure_output_table(spark, "main.gold.completions", output_schema(T.LongType(), False))
    counts = commit_chunk(spark, "main.gold.completions", landed, run_id, chunk=0)   # {"ok": 998, "error": 2}
"""

from __future__ import annotations

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


def ensure_output_table(spark: SparkSession, name: str, schema: T.StructType) -> None:
    """Create the output table if missing (in SQL: Connect and classic alike); refuse a wrong schema."""
    if not spark.catalog.tableExists(name):
        ensure_schema(spark, name)
        spark.sql(f"CREATE TABLE IF NOT EXISTS {name} ({ddl(schema)}) USING DELTA "
                  "COMMENT 'batch-inference outcomes: one row per input id'")
    wrong = schema_problems(spark.table(name).schema, schema)
    if wrong:
        raise InputError(f"output.table {name} exists with another schema: {', '.join(wrong)}")


def ddl(schema: T.StructType) -> str:
    """`id bigint, prompt string, ...`: a schema as the column list of CREATE TABLE."""
    return ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in schema.fields)


def status_counts(outcomes: DataFrame) -> list[tuple[str, bool, int]]:
    """(status, _exists, rows) of a chunk's outcomes: one small aggregation."""
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
    counts = status_counts(outcomes) if counts is None else counts
    if any(not exists and n for _, exists, n in counts):
        (outcomes.where(~F.col("_exists")).drop("_exists").write.format("delta").mode("append")
         .option("txnAppId", run_id).option("txnVersion", chunk).saveAsTable(name))
    if any(exists and n for _, exists, n in counts):
        view = f"_bi_merge_{run_id}_{chunk}"
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
