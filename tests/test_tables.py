"""Table names and schemas: the schema of a dotted name, and how two schemas differ."""

from __future__ import annotations

import uuid

from pyspark.sql import types as T

from jobs.output.tables import ddl, ensure_schema, schema_changes, schema_problems

S, L, B = T.StringType(), T.LongType(), T.BooleanType()


def struct(*fields: tuple[str, T.DataType]) -> T.StructType:
    return T.StructType([T.StructField(n, t, nullable=True) for n, t in fields])


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


def test_an_existing_table_may_grow_parsed_fields_but_not_change_their_types():
    have = T.StructType([T.StructField("id", L), T.StructField("status", S),
                         T.StructField("parsed", struct(("a", S), ("items", T.ArrayType(struct(("x", L))))))])
    want = T.StructType([T.StructField("id", L), T.StructField("status", S), T.StructField("product", S),
                         T.StructField("parsed", struct(("a", S), ("b-c", L),
                                                        ("items", T.ArrayType(struct(("x", L), ("y", B))))))])
    assert schema_changes(have, want, ["parsed", "product"]) == (
        ["`product` STRING", "`parsed`.`b-c` BIGINT", "`parsed`.`items`.`element`.`y` BOOLEAN"], [])
    changed = T.StructType([T.StructField("id", S), T.StructField("parsed", struct(("a", L)))])
    assert schema_changes(have, changed, ["parsed"]) == ([], ["id (bigint != string)", "parsed.a (string != bigint)"])
    assert ddl(struct(("a b", T.MapType(S, L)))) == "STRUCT<`a b`: MAP<STRING, BIGINT>>"
