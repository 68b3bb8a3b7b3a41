"""Committing: the output table created in SQL, grown when a config asks, and each chunk landed once."""

from __future__ import annotations

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F, types as T

from jobs.errors import InputError
from jobs.output.commit import commit_chunk, ensure_output_table, output_schema, with_run_columns

SCHEMA = output_schema(T.LongType(), embeddings=False)


def outcomes(spark, rows: list[tuple]):
    """`rows` of (id, status, _exists) as a landed chunk: the output's columns plus `_exists`."""
    df = spark.createDataFrame(rows, "id long, status string, _exists boolean").withColumn("prompt", F.lit("p"))
    return df.transform(with_run_columns("e", "run-1", SCHEMA))


def test_the_table_is_created_then_refused_if_a_column_changed_type(spark, table_name):
    landing = ensure_output_table(spark, table_name, SCHEMA)
    assert landing.fieldNames() == SCHEMA.fieldNames()
    other = output_schema(T.StringType(), embeddings=False)  # ids were bigint, now string
    with pytest.raises(InputError, match=rf"output.table {table_name} exists with another schema: id \(bigint != string\)"):
        ensure_output_table(spark, table_name, other)


def test_a_config_that_adds_kept_columns_or_parsed_grows_the_table_in_place(spark, table_name):
    ensure_output_table(spark, table_name, SCHEMA)
    grown = output_schema(T.LongType(), False, kept=[T.StructField("country", T.StringType())],
                          parsed=T.StructType([T.StructField("label", T.StringType())]))
    landing = ensure_output_table(spark, table_name, grown)
    assert {"country", "parsed"} <= set(landing.fieldNames())
    assert landing["parsed"].dataType.simpleString() == "struct<label:string>"


def test_a_table_made_before_sent_at_gains_it_at_its_end(spark, table_name):
    older = T.StructType([f for f in SCHEMA.fields if f.name != "sent_at"])
    ensure_output_table(spark, table_name, older)
    landing = ensure_output_table(spark, table_name, SCHEMA)
    assert landing.fieldNames() == older.fieldNames() + ["sent_at"]
    assert landing["sent_at"].dataType == T.TimestampType()
    assert commit_chunk(spark, table_name, outcomes(spark, [(1, "ok", False)]).transform(
        with_run_columns("e", "run-1", landing)), "run-1", 0) == {"ok": 1}


def test_a_chunk_lands_once_new_ids_appended_and_known_ids_merged(spark, table_name):
    ensure_output_table(spark, table_name, SCHEMA)
    first = outcomes(spark, [(1, "ok", False), (2, "error", False)])
    assert commit_chunk(spark, table_name, first, "run-1", 0) == {"ok": 1, "error": 1}
    assert commit_chunk(spark, table_name, first, "run-1", 0) == {"ok": 1, "error": 1}  # a retried commit
    again = outcomes(spark, [(2, "ok", True), (3, "ok", False)])  # id 2 retried and now ok; id 3 new
    assert commit_chunk(spark, table_name, again, "run-2", 0) == {"ok": 2}
    expected = spark.createDataFrame([(1, "ok"), (2, "ok"), (3, "ok")], "id long, status string")
    assert_df_equality(spark.table(table_name).select("id", "status"), expected, ignore_row_order=True,
                       ignore_nullable=True)
