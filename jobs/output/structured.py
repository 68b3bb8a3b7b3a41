"""Structured output on the Spark side: the `parsed` column's type from the response schema, and the step
that fills it from the canonical JSON the engine made of each valid answer.

JSON Schema -> Spark: `string` (and a string `enum`) -> string, `integer` -> bigint, `number` -> double,
`boolean` -> boolean, an object with `properties` -> struct (in property order), an object with only
`additionalProperties: {schema}` -> map<string, ...>, an array -> array of its `items`. Every field is
nullable, required or not: `required` is enforced on the answer (a missing one is `invalid_output`),
while Spark's `from_json` and a row that failed leave fields null, and a NOT NULL nested field would
make Delta refuse a whole chunk. What has no single type is refused at config time
(`udfs.structured`).

Example::

    parsed = response_type({"type": "object", "properties": {"sentiment": {"enum": ["pos", "neg"]}}})
    # StructType([StructField("sentiment", StringType())])
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import Column, functions as F, types as T

from udfs.structured import Node, check_schema

_SCALARS: dict[str, T.DataType] = {"string": T.StringType(), "long": T.LongType(), "double": T.DoubleType(),
                                   "boolean": T.BooleanType()}


def spark_type(node: Node) -> T.DataType:
    """The Spark type that holds values of `node`'s shape."""
    if node.kind in _SCALARS:
        return _SCALARS[node.kind]
    if node.kind == "struct":
        return T.StructType([T.StructField(name, spark_type(sub), nullable=True) for name, sub in node.fields])
    if node.kind == "array" and node.item is not None:
        return T.ArrayType(spark_type(node.item), containsNull=True)
    if node.kind == "map" and node.item is not None:
        return T.MapType(T.StringType(), spark_type(node.item), valueContainsNull=True)
    raise ValueError(f"no Spark type for a {node.kind} node")


def response_type(schema: dict[str, Any]) -> T.StructType:
    """The `parsed` column's type for a response schema (a JSON Schema object)."""
    out = spark_type(check_schema(schema))
    if not isinstance(out, T.StructType):  # check_schema refuses any other top level
        raise TypeError(f"a response schema lands as a struct, not {out.simpleString()}")
    return out


def parsed_column(canonical_json: Column, parsed_type: T.DataType) -> Column:
    """`from_json` over the engine's canonical JSON: the engine validated it and wrote its numbers in
    the column types' exact form, so nothing is lost or silently nulled here. `parsed_type` is the
    output table's own (it may hold fields an earlier schema had: those read null)."""
    return F.from_json(canonical_json, parsed_type)
