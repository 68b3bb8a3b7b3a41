"""Structured output's schemas: JSON Schema -> Spark type (jobs/output/structured.py), what is refused, and
answers checked against a schema (udfs/structured.py). Pure: no Spark job, no HTTP."""

from __future__ import annotations

import json

import pytest
from pyspark.sql import types as T

from jobs.output.structured import response_type
from udfs.structured import AnswerChecker, InvalidOutput, UnsupportedSchema, check_schema, wire_format

S, L, D, B = T.StringType(), T.LongType(), T.DoubleType(), T.BooleanType()

REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "product": {"type": "string"},
        "refund_requested": {"type": "boolean"},
    },
    "required": ["sentiment", "refund_requested"],
    "additionalProperties": False,
}


def struct(*fields: tuple[str, T.DataType]) -> T.StructType:
    return T.StructType([T.StructField(n, t, nullable=True) for n, t in fields])


@pytest.mark.parametrize("prop, spark", [
    ({"type": "string"}, S),
    ({"type": "string", "format": "date-time", "maxLength": 30}, S),  # formats and limits: checked, not typed
    ({"type": "integer", "minimum": 0}, L),
    ({"type": "number"}, D),
    ({"type": "boolean"}, B),
    ({"enum": ["a", "b"]}, S),                       # an enum of strings lands as a string
    ({"type": "string", "enum": ["a", "b"]}, S),
    ({"enum": [1, 2, 3]}, L),
    ({"enum": [1, 2.5]}, D),
    ({"const": True}, B),
    ({"type": ["string", "null"]}, S),               # nullable: every field is nullable anyway
    ({"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}, L),  # Pydantic's Optional[int]
    ({"type": "array", "items": {"type": "string"}}, T.ArrayType(S, True)),
    ({"type": "array", "items": {"type": "array", "items": {"type": "number"}}}, T.ArrayType(T.ArrayType(D))),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, T.MapType(S, L, True)),
    ({"type": "object", "properties": {"b": {"type": "boolean"}, "a": {"type": "integer"}}},
     struct(("b", B), ("a", L))),                   # property order is kept
])
def test_each_json_schema_type_maps_to_its_spark_type(prop, spark):
    schema = {"type": "object", "properties": {"x": prop}}
    assert response_type(schema) == struct(("x", spark))


def test_nested_objects_and_arrays_of_objects_and_required_vs_optional():
    schema = {
        "type": "object",
        "properties": {
            "sentiment": {"type": "string", "enum": ["positive", "negative"]},
            "product": {"type": "object",
                        "properties": {"name": {"type": "string"}, "price": {"type": "number"}},
                        "required": ["name"]},
            "mentions": {"type": "array",
                         "items": {"type": "object",
                                   "properties": {"text": {"type": "string"}, "start": {"type": "integer"}}}},
        },
        "required": ["sentiment", "product"],
    }
    assert response_type(schema) == struct(
        ("sentiment", S),
        ("product", struct(("name", S), ("price", D))),
        ("mentions", T.ArrayType(struct(("text", S), ("start", L)), True)),
    )
    # Required or not, a field is nullable: `required` is enforced on the answer instead (a missing
    # one is invalid_output), and a NOT NULL nested field would make Delta refuse a whole chunk.
    node = check_schema(schema)
    assert (node.required, node.fields[1][1].required) == (("sentiment", "product"), ("name",))
    checker = AnswerChecker(schema)
    with pytest.raises(InvalidOutput, match=r"^\$\.product: 'name' is a required property"):
        checker.check('{"sentiment": "positive", "product": {"price": 3}}')
    assert json.loads(checker.check('{"sentiment": "negative", "product": {"name": "kettle"}}')) == {
        "sentiment": "negative", "product": {"name": "kettle"}}


def test_pydantic_style_refs_and_optional_models_are_followed():
    schema = {
        "$defs": {"Product": {"type": "object", "title": "Product",
                              "properties": {"name": {"type": "string", "title": "Name"}}}},
        "type": "object",
        "properties": {"product": {"anyOf": [{"$ref": "#/$defs/Product"}, {"type": "null"}]},
                       "others": {"type": "array", "items": {"$ref": "#/$defs/Product"}}},
    }
    assert response_type(schema) == struct(("product", struct(("name", S))),
                                           ("others", T.ArrayType(struct(("name", S)))))


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"x": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}},
     r"at /properties/x: oneOf is not supported"),
    ({"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
     r"at /properties/x: anyOf with several branches"),
    ({"type": "object", "properties": {"x": {"description": "anything"}}}, r"at /properties/x: no type"),
    ({"type": "object", "properties": {"x": {"type": ["string", "integer"]}}}, r"at /properties/x: type .* union"),
    ({"type": "object", "properties": {"x": {"type": "array"}}}, r"at /properties/x: an array needs items"),
    ({"type": "object", "properties": {"x": {"type": "object"}}}, r"at /properties/x: an object needs properties"),
    ({"type": "object", "properties": {"x": {"enum": ["a", 1]}}}, r"enum values of several types"),
    ({"type": "object", "properties": {"x": {"type": "null"}}}, r"type 'null' alone"),
    ({"type": "object", "properties": {"a b": {"type": "string"}}}, r"property 'a b' has ' '; Delta column names"),
    ({"type": "object", "properties": {"Name": {"type": "string"}, "name": {"type": "string"}}},
     r"'Name' and 'name' differ only in case"),
    ({"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}},
      "type": "object", "properties": {"head": {"$ref": "#/$defs/N"}}}, r"\$ref #/\$defs/N is recursive"),
    ({"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}}, r"only references inside"),
    ({"type": "array", "items": {"type": "string"}}, r"top level must be an object"),
    ({"type": "object", "properties": {"x": {"type": "strng"}}}, r"not a valid JSON Schema at /properties/x/type"),
])
def test_what_has_no_single_column_type_is_refused_naming_where(schema, message):
    with pytest.raises(UnsupportedSchema, match=message):
        check_schema(schema)


@pytest.mark.parametrize("answer, message", [
    ("Sure! Here is the JSON you asked for.", r"^not JSON: Expecting value \(line 1, column 1\)$"),
    ('{"sentiment": "positive", "refund_requested": false', r"^not JSON: Expecting ',' delimiter"),
    ('{"sentiment": NaN, "refund_requested": false}', r"^not JSON: NaN is not a JSON value"),
    ('{"sentiment": "ecstatic", "refund_requested": false}',
     r"^\$\.sentiment: 'ecstatic' is not one of \['positive', 'negative', 'neutral'\]$"),
    ('{"sentiment": "positive"}', r"^\$: 'refund_requested' is a required property$"),
    ('{"sentiment": "positive", "refund_requested": "yes"}', r"^\$\.refund_requested: 'yes' is not of type 'boolean'$"),
    ('{"sentiment": "positive", "refund_requested": true, "mood": 1}', r"^\$: Additional properties"),
    ('["positive"]', r"^\$: \['positive'\] is not of type 'object'$"),
])
def test_an_answer_that_is_not_json_or_breaks_the_schema_names_the_first_failing_path(answer, message):
    with pytest.raises(InvalidOutput, match=message):
        AnswerChecker(REVIEW).check(answer)


def test_canonical_json_fits_the_column_types_exactly():
    checker = AnswerChecker({"type": "object", "properties": {
        "n": {"type": "integer"}, "x": {"type": "number"}, "tags": {"type": "array", "items": {"type": "integer"}},
        "inner": {"type": "object", "properties": {"k": {"type": "string"}}}}})
    # JSON Schema takes 3.0 as an integer, from_json would land it null: it is written 3. Keys the
    # struct lacks are dropped (they stay in `response`); non-ASCII text stays as it is.
    assert checker.check('{"n": 3.0, "x": 2, "tags": [1.0, 2], "inner": {"k": "café", "extra": 1}, "z": 0}') == (
        '{"n":3,"x":2.0,"tags":[1,2],"inner":{"k":"café"}}')
    with pytest.raises(InvalidOutput, match=r"^\$\.n: 9223372036854775808 is out of range for a bigint$"):
        checker.check('{"n": 9223372036854775808}')
    with pytest.raises(InvalidOutput, match=r"^\$\.x: inf is out of range for a double$"):
        checker.check('{"x": 1e400}')


def test_wire_format_is_the_documented_response_format():
    assert wire_format(REVIEW, "review", strict=True) == {
        "type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW, "strict": True}}
