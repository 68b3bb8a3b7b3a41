"""Table names and schemas: the schema a table's name lives in, and how two table schemas differ.

Example::

    ensure_schema(spark, "main.gold.completions")     # CREATE SCHEMA IF NOT EXISTS main.gold
    schema_problems(existing.schema, wanted)           # ["status (int != string)", ...]
"""

from __future__ import annotations

from pyspark.sql import SparkSession, types as T


def ensure_schema(spark: SparkSession, name: str) -> None:
    """`CREATE SCHEMA IF NOT EXISTS` for the schema part of `catalog.schema.table` / `schema.table`."""
    parts = name.split(".")
    if len(parts) >= 2:
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {'.'.join(parts[:-1])}")


def schema_problems(have: T.StructType, want: T.StructType) -> list[str]:
    """`name (have != want)` for each column of `want` that `have` lacks or types otherwise."""
    types = {f.name: f.dataType for f in have.fields}
    return [f"{f.name} ({types[f.name].simpleString() if f.name in types else 'missing'} != "
            f"{f.dataType.simpleString()})" for f in want.fields if types.get(f.name) != f.dataType]
