"""Table names and schemas: the schema a table's name lives in, and how two table schemas differ.

Example::

    ensure_schema(spark, "main.gold.completions")     # CREATE SCHEMA IF NOT EXISTS main.gold
    schema_problems(existing.schema, wanted)           # ["status (int != string)", ...]
    schema_changes(existing.schema, wanted, ["parsed"])  # (["`parsed`.`topic` STRING"], [])
"""

from __future__ import annotations

from typing import Collection

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


def schema_changes(have: T.StructType, want: T.StructType, growable: Collection[str]) -> tuple[list[str], list[str]]:
    """What `have` lacks of `want`: columns to add (`ALTER TABLE ... ADD COLUMNS` specs) and problems.

    Only the `growable` columns may be added, or grow fields inside them (a struct's new field, at any
    depth, through arrays and maps): Delta adds a column or a nested field in place, old rows read
    null there. Any other difference, a changed type above all, is a problem, as in `schema_problems`.
    """
    types = {f.name: f.dataType for f in have.fields}
    adds: list[str] = []
    problems: list[str] = []
    for f in want.fields:
        if f.name in types and types[f.name] == f.dataType:
            continue
        if f.name not in growable:
            problems += schema_problems(have, T.StructType([f]))
        elif f.name not in types:
            adds.append(f"{_quote(f.name)} {ddl(f.dataType)}")
        else:
            _grow(types[f.name], f.dataType, [f.name], adds, problems)
    return adds, problems


def _grow(have: T.DataType, want: T.DataType, path: list[str], adds: list[str], problems: list[str]) -> None:
    if isinstance(have, T.StructType) and isinstance(want, T.StructType):
        fields = {f.name: f.dataType for f in have.fields}
        for f in want.fields:
            if f.name not in fields:
                adds.append(f"{'.'.join(_quote(p) for p in [*path, f.name])} {ddl(f.dataType)}")
            elif fields[f.name] != f.dataType:
                _grow(fields[f.name], f.dataType, [*path, f.name], adds, problems)
    elif isinstance(have, T.ArrayType) and isinstance(want, T.ArrayType):
        _grow(have.elementType, want.elementType, [*path, "element"], adds, problems)
    elif isinstance(have, T.MapType) and isinstance(want, T.MapType) and have.keyType == want.keyType:
        _grow(have.valueType, want.valueType, [*path, "value"], adds, problems)
    elif have != want:
        problems.append(f"{'.'.join(path)} ({have.simpleString()} != {want.simpleString()})")


def ddl(dt: T.DataType) -> str:
    """A type as DDL, every field name quoted (`simpleString` leaves `my-field` bare, which DDL refuses)."""
    if isinstance(dt, T.StructType):
        return "STRUCT<" + ", ".join(f"{_quote(f.name)}: {ddl(f.dataType)}" for f in dt.fields) + ">"
    if isinstance(dt, T.ArrayType):
        return f"ARRAY<{ddl(dt.elementType)}>"
    if isinstance(dt, T.MapType):
        return f"MAP<{ddl(dt.keyType)}, {ddl(dt.valueType)}>"
    return dt.simpleString().upper()


def columns_ddl(schema: T.StructType) -> str:
    """`` `id` BIGINT, `prompt` STRING, ... ``: a schema as the column list of CREATE TABLE."""
    return ", ".join(f"{_quote(f.name)} {ddl(f.dataType)}" for f in schema.fields)


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"
