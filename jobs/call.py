"""Calling: every pending row gets its outcome columns from the endpoint, through the pandas UDF.

Identical requests are sent once (one `request_hash`, one call) and their answer is joined back to
every row that asked; rows a precheck stopped get their error without a call. Kept input columns ride
along. With structured output, each valid answer's canonical JSON becomes the typed `parsed` column.
For embeddings, a vector whose length is not the run's becomes an error row.

Example::

    landed = chunk.transform(with_outcomes(spec, plan)).transform(with_dimension_check(1024))
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession, functions as F, types as T
from pyspark.sql.window import Window

from jobs.endpoint_health import EndpointHealth
from jobs.plan import TaskPlan
from jobs.read import Transform, column
from jobs.structured import parsed_column, response_type
from udfs import reasons
from udfs.inference import PARSED_JSON, inference_udf, outcome_schema
from udfs.protocols import is_embeddings_task
from udfs.spec import EngineSpec


# The request columns `jobs.read` makes; any other input column is a kept one, carried to the output.
_REQUEST_COLUMNS = ("id", "prompt", "request_hash", "precheck", "_exists")


def with_outcomes(spec: EngineSpec, plan: TaskPlan, parsed_type: T.DataType | None = None,
                  health: EndpointHealth | None = None) -> Transform:
    """Call the endpoint once per distinct request; every row gets its outcome columns.

    With a response schema, `parsed` is read with `parsed_type` (the output table's type of it, which
    may hold fields of earlier schemas), by default the schema's own. The UDF is built anew for each
    chunk (each call of the step), from `health.for_chunk(spec)`: the credentials as they are when the
    chunk starts, and half-open tasks if the endpoint was down in an earlier chunk.
    """
    embeddings = is_embeddings_task(spec.task)
    structured = spec.response_schema is not None
    if structured and parsed_type is None:
        parsed_type = response_type(spec.response_schema or {})
    health = health or EndpointHealth()
    outcome_fields = outcome_schema(embeddings, structured).fields
    fields = [f.name for f in outcome_fields if f.name != PARSED_JSON] + (["parsed"] if structured else [])

    def step(df: DataFrame) -> DataFrame:
        udf = inference_udf(plan.per_task_spec(health.for_chunk(spec)), plan.per_task)
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
        out = called.unionByName(skipped.select(*called.columns)).drop("precheck")
        if structured and parsed_type is not None:
            out = out.withColumn("parsed", parsed_column(F.col(PARSED_JSON), parsed_type))
        carried = [c for c in df.columns if c not in _REQUEST_COLUMNS]
        return out.select("id", *[column(c) for c in carried], "prompt", *fields, "request_hash",
                          *[c for c in ("_exists",) if c in df.columns])
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
        reason = F.concat(F.lit(f"{reasons.DIMENSION_MISMATCH}: "), F.col("dim").cast("string"),
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
