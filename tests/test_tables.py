"""Table names and schemas: the schema of a dotted name, and how two schemas differ."""

from __future__ import annotations

import uuid

from pyspark.sql import types as T

from jobs.tables import ensure_schema, schema_problems


def test_schema_problems_name_each_missing_or_mistyped_column():
    have = T.StructType([T.StructField("id", T.LongType()), T.StructField("status", T.IntegerType())])
    want = T.StructType([T.StructField("id", T.LongType()), T.StructField("status", T.StringType()),
                         T.StructField("error", T.StringType())])
    assert schema_problems(have, want) == ["status (int != string)", "error (missing != string)"]
    assert schema_problems(want, want) == []


def test_ensure_schema_creates_the_schema_of_a_dotted_name(spark):
    schema = f"s_{uuid.uuid4().hex[:8]}"
    ensure_schema(spark, f"{schema}.t")
    ensure_schema(spark, f"{schema}.t")  # idempotent
    ensure_schema(spark, "bare_table_name")  # no schema part: nothing to create
    assert spark.catalog.databaseExists(schema)
