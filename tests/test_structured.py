"""Structured output without Spark jobs: schema -> Spark type, answers checked, the re-ask, table growth."""

from __future__ import annotations

import json
import threading

import pytest
from pyspark.sql import types as T

from jobs.commit import output_schema
from jobs.config import RESERVED_COLUMNS
from jobs.local.stand_in import LocalEndpoint, fit
from jobs.structured import response_type
from jobs.tables import ddl, schema_changes
from udfs.engine import Engine
from udfs.spec import EngineSpec, RetrySpec
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


def test_the_stand_in_answers_json_that_fits_the_schema_deterministically():
    prompt = "Classify this review of Kettle Pro: I want a refund, it leaks. Is it negative?"
    schema = {**REVIEW, "properties": {**REVIEW["properties"], "words": {"type": "integer", "maximum": 10},
                                      "names": {"type": "array", "items": {"type": "string"}}}}
    value = fit(schema, prompt)
    assert value == fit(schema, prompt)
    assert value["sentiment"] == "negative" and value["refund_requested"] is True  # word found; ends with "?"
    assert (value["words"], value["names"]) == (10, ["Kettle", "Pro"])
    AnswerChecker(schema).check(json.dumps(value))


def test_reserved_names_are_the_output_tables_columns_and_the_jobs_own():
    names = set(output_schema(L, False).fieldNames()) | set(output_schema(L, True).fieldNames())
    assert RESERVED_COLUMNS == names | {"parsed", "precheck"}


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


# -- the engine: answers checked, asked again ------------------------------------------------------

def chat_spec(ep: LocalEndpoint, **kw) -> EngineSpec:
    kw.setdefault("retry", RetrySpec(backoff_base_s=0.01, backoff_max_s=0.05))
    return EngineSpec(url=f"{ep.url}/serving-endpoints/c/invocations", task="llm/v1/chat", response_schema=REVIEW,
                      **kw)


def chat_answer(content: str) -> tuple[int, dict[str, str], bytes]:
    body = {"choices": [{"message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
    return 200, {}, json.dumps(body).encode()


def flaky(bad: str, times: int = 1):
    """A fault: each prompt's first `times` answers are `bad`; later ones come from the model."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def fault(req):
        prompt = req.body["messages"][-1]["content"]
        with lock:
            seen[prompt] = seen.get(prompt, 0) + 1
            n = seen[prompt]
        return chat_answer(bad) if n <= times else None
    return fault


def test_one_re_ask_fixes_a_flaky_answer_and_both_attempts_are_counted():
    with LocalEndpoint(fault=flaky("not json at all")) as ep, Engine(chat_spec(ep)) as engine:
        [o] = engine.call(["I love it, no refund needed."])
    # Both answers were paid for: the bad one's usage (5 + 7) plus the model's (6 words in, its words out).
    assert (o.status, o.error, o.attempts, o.prompt_tokens, o.completion_tokens) == (
        "ok", None, 2, 5 + 6, 7 + len(o.response.split()))
    assert json.loads(o.parsed_json) == json.loads(o.response) == fit(REVIEW, "I love it, no refund needed.")
    assert [r.body["response_format"] for r in ep.received] == [wire_format(REVIEW)] * 2


def test_an_answer_still_invalid_after_the_re_asks_keeps_its_raw_text():
    bad = '{"sentiment": "ecstatic", "refund_requested": false}'
    with LocalEndpoint(fault=flaky(bad, times=5)) as ep:
        with Engine(chat_spec(ep)) as engine:
            [o] = engine.call(["so good"])
        assert (o.status, o.response, o.attempts, o.http_status, o.parsed_json, o.prompt_tokens) == (
            "error", bad, 2, 200, None, 10)
        assert o.error == "invalid_output: $.sentiment: 'ecstatic' is not one of ['positive', 'negative', 'neutral']"
        assert len(ep.received) == 2  # one answer, one re-ask (retry.invalid_output_attempts: 1)

        ep.received.clear()
        with Engine(chat_spec(ep, retry=RetrySpec(invalid_output_attempts=0))) as engine:
            [o] = engine.call(["so good"])
        assert (o.status, o.attempts, len(ep.received)) == ("error", 1, 1)


def test_in_a_batch_only_the_invalid_rows_are_asked_again():
    calls = []

    def fault(req):
        records = req.body["dataframe_records"]
        calls.append([r["prompt"] for r in records])
        if len(calls) == 1:  # the first request: "b" answers garbage, the others fit
            return 200, {}, json.dumps({"predictions": [
                "garbage" if r["prompt"] == "b" else json.dumps(fit(REVIEW, r["prompt"])) for r in records]}).encode()
        return None

    with LocalEndpoint(fault=fault) as ep:
        spec = EngineSpec(url=f"{ep.url}/serving-endpoints/m/invocations", task="custom", rows_per_request=3,
                          response_schema=REVIEW, response_format_at="params.response_format")
        with Engine(spec) as engine:
            out = engine.call(["a", "b", "c"])
    assert [(o.status, o.attempts) for o in out] == [("ok", 1), ("ok", 2), ("ok", 1)]
    assert calls == [["a", "b", "c"], ["b"]]
    assert ep.received[0].body["params"] == {"response_format": wire_format(REVIEW)}
