"""Reading: the input as requests, and which of them are pending.

Steps are `DataFrame -> DataFrame` (or closures returning one): the input becomes `id`, `prompt`
(one column as it is, or `input.template` rendered over several) and the `input.keep_columns`,
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
from pyspark.sql import Column, DataFrame, SparkSession, functions as F

from jobs.config import InputConfig, JobConfig, template_parts
from jobs.errors import InputError, first_line
from udfs import reasons
from udfs.prompts import BLANK_REGEX

Transform = Callable[[DataFrame], DataFrame]
# Under `input.null_fields: error`, the template's columns that are null in a row (["product"]).
NULL_FIELDS = "_null_fields"


def read_input(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    """The input as `id`, `prompt` and the kept columns; a missing table or column is an `InputError`
    naming it and its key, raised before any Spark job runs (only the input's schema is read)."""
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
    wanted = [("input.id_col", cfg.id_col)]
    wanted += [("input.template", c) for c in cfg.template_fields] if cfg.template is not None else [
        ("input.prompt_col", cfg.prompt_col)]
    wanted += [("input.keep_columns", c) for c in cfg.keep_columns]
    missing = [(key, col) for key, col in wanted if col not in columns]
    if missing:
        named = "; ".join(f"{key}: column {col!r}" for key, col in missing)
        raise InputError(f"{named} not found in {where} (columns: {columns})")
    kept = [column(c) for c in cfg.keep_columns]
    if cfg.template is None:
        return df.select(column(cfg.id_col).alias("id"), column(cfg.prompt_col).cast("string").alias("prompt"), *kept)
    prompt, nulls = render_template(cfg.template, cfg.null_fields)
    return df.select(column(cfg.id_col).alias("id"), prompt.alias("prompt"), *kept,
                     *([nulls.alias(NULL_FIELDS)] if nulls is not None else []))


def render_template(template: str, null_fields: str) -> tuple[Column, Column | None]:
    """The prompt `template` makes of its columns (each cast to string as Spark casts), and, when a
    null column is an error, the names of the null ones (an empty array when none is).

    `null_fields: empty` renders a null as "", so the row is sent; `error` leaves the prompt null and
    the row stops at the precheck as `null_field`.
    """
    pieces: list[Column] = []
    for literal, field in template_parts(template):
        if literal:
            pieces.append(F.lit(literal))
        if field is not None:
            value = column(field).cast("string")
            pieces.append(F.coalesce(value, F.lit("")) if null_fields == "empty" else value)
    prompt = F.concat(*pieces)
    if null_fields == "empty":
        return prompt, None
    fields = list(dict.fromkeys(f for _, f in template_parts(template) if f is not None))
    return prompt, F.array_compact(F.array(*[F.when(column(f).isNull(), F.lit(f)) for f in fields]))


def column(name: str) -> Column:
    """A top-level column by its exact name (a dot or a space in it is part of the name)."""
    return F.col(f"`{name.replace('`', '``')}`")


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
    """`request_hash`: what is sent (endpoint, parameters, prompt). Resume and de-duplication key on it.

    A prompt is hashed after `fingerprint` and a NUL; a null prompt after `fingerprint` and \x01, so
    that no text (not even "\x01null") can share a null's hash.
    """
    def step(df: DataFrame) -> DataFrame:
        text = F.sha2(F.concat(F.lit(fingerprint + "\u0000"), F.col("prompt")), 256)
        null = F.sha2(F.lit(fingerprint + "\u0001null"), 256)
        return df.withColumn("request_hash", F.when(F.col("prompt").isNull(), null).otherwise(text))
    return step


def with_precheck(max_chars: int) -> Transform:
    """`precheck`: the reason a row is not sent at all (a null template column, a blank or over-long
    prompt), else null.

    Blank is `udfs.prompts`' rule (any Unicode whitespace), the one the engine applies too.
    """
    def step(df: DataFrame) -> DataFrame:
        n = F.length("prompt")
        nulls = F.col(NULL_FIELDS) if NULL_FIELDS in df.columns else F.array().cast("array<string>")
        null_field = F.concat(F.lit(f"{reasons.NULL_FIELD}: "), F.array_join(nulls, ", "),
                              F.when(F.size(nulls) > 1, F.lit(" are null")).otherwise(F.lit(" is null")))
        return df.withColumn(
            "precheck",
            F.when(F.size(nulls) > 0, null_field)
            .when(F.col("prompt").isNull() | F.col("prompt").rlike(BLANK_REGEX), F.lit(reasons.EMPTY_PROMPT))
            .when(n > max_chars, F.concat(F.lit(f"{reasons.PROMPT_TOO_LONG}: "), n.cast("string"),
                                          F.lit(f" chars > run.max_prompt_chars {max_chars}"))),
        ).drop(NULL_FIELDS)
    return step


def read_requests(spark: SparkSession, cfg: JobConfig, *, check: bool = True) -> tuple[DataFrame, DataFrame]:
    """The input, checked, and every row as a request: hashed and prechecked (no `run.limit` yet).

    `check=False` leaves the id check to the caller: the run folds it into its one counting pass
    (`jobs.input.stage.survey`) and calls `check_ids` only to name the culprits.
    """
    inputs = read_input(spark, cfg.input)
    if check:
        check_ids(inputs)
    requests = inputs.transform(with_request_hash(cfg.request_fingerprint())).transform(
        with_precheck(cfg.run.max_prompt_chars))
    return inputs, requests


def with_limit(limit: int | None, order: str = "id") -> Transform:
    """At most `limit` rows, the lowest ids first (`order` "id"), or spread over the whole table by a
    hash of the request (`order` "spread": the forecast's sample, which the first ids could bias).

    Applied to *pending* rows, after the final ones are removed: a limit taken before that would pick
    the same first ids on every run, find them done, and send nothing. In id order, consecutive runs
    with the same limit walk through the whole table.
    """
    def step(df: DataFrame) -> DataFrame:
        if not limit:
            return df
        keys = [F.xxhash64("request_hash"), "id"] if order == "spread" else ["id"]
        return df.orderBy(*keys).limit(limit)
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
