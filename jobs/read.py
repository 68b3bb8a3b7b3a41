"""Reading: the input as requests, and which of them are pending.

Steps are `DataFrame -> DataFrame` (or closures returning one): the input becomes `id`, `prompt`,
checked (unique, non-null ids), then each row gets its `request_hash` (what would be sent) and its
`precheck` (why it would not be sent at all); rows whose identical request is already final in the
output table are set aside, and `run.limit` cuts what is left.

Example::

    inputs, requests = read_requests(spark, cfg)
    pending = requests.transform(without_final(spark.read.table(cfg.output.table), True)).transform(with_limit(10))
"""

from __future__ import annotations

from typing import Callable

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession, functions as F

from jobs.config import InputConfig, JobConfig
from jobs.errors import InputError, first_line
from udfs import reasons
from udfs.prompts import BLANK_REGEX

Transform = Callable[[DataFrame], DataFrame]


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
        raise InputError(f"cannot read input {source}: {first_line(exc)}") from None
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
            F.when(F.col("prompt").isNull() | F.col("prompt").rlike(BLANK_REGEX), F.lit(reasons.EMPTY_PROMPT))
            .when(n > max_chars, F.concat(F.lit(f"{reasons.PROMPT_TOO_LONG}: "), n.cast("string"),
                                          F.lit(f" chars > run.max_prompt_chars {max_chars}"))),
        )
    return step


def read_requests(spark: SparkSession, cfg: JobConfig, *, check: bool = True) -> tuple[DataFrame, DataFrame]:
    """The input, checked, and every row as a request: hashed and prechecked (no `run.limit` yet).

    `check=False` leaves the id check to the caller: the run folds it into its one counting pass
    (`jobs.stage.survey`) and calls `check_ids` only to name the culprits.
    """
    inputs = read_input(spark, cfg.input)
    if check:
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
        return df.transform(with_pending(prior, retry_errors)).where(F.col("_pending")).drop("_pending")
    return step


def with_pending(prior: DataFrame | None, retry_errors: bool) -> Transform:
    """`without_final`'s rule as two columns on every row: `_pending` (to call) and `_exists`."""
    def step(df: DataFrame) -> DataFrame:
        if prior is None:
            return df.withColumns({"_pending": F.lit(True), "_exists": F.lit(False)})
        before = prior.select("id", F.col("request_hash").alias("_hash"), F.col("status").alias("_status"))
        final = (F.col("_hash") == F.col("request_hash")) & ((F.col("_status") == "ok") | F.lit(not retry_errors))
        return (df.join(before, on="id", how="left")
                .withColumns({"_pending": ~F.coalesce(final, F.lit(False)),
                              "_exists": F.col("_hash").isNotNull()})
                .drop("_hash", "_status"))
    return step
