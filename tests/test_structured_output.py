"""Structured output end to end on local Spark: typed `parsed` columns in Delta, `invalid_output` rows,
the re-ask, and a schema change that makes rows pending again."""

from __future__ import annotations

import json
import threading

from chispa import assert_df_equality

from jobs.local.stand_in import LocalEndpoint
from jobs.pipeline import run_job
from tests.conftest import job_config
from tests.test_pipeline import view

REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "refund_requested": {"type": "boolean"},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "product": {"type": "object", "properties": {"names": {"type": "array", "items": {"type": "string"}}}},
    },
    "required": ["sentiment", "refund_requested"],
}
PARSED = ("struct<sentiment:string,refund_requested:boolean,stars:bigint,"
          "product:struct<names:array<string>>>")


def chat(ep: LocalEndpoint, **extra):
    return {"name": "local-chat", "type": "serving", "task": "llm/v1/chat", "host": ep.url, **extra}


def chat_answer(content: str) -> tuple[int, dict[str, str], bytes]:
    body = {"choices": [{"message": {"role": "assistant", "content": content}}]}
    return 200, {}, json.dumps(body).encode()


def test_typed_columns_land_and_bad_answers_are_invalid_output_rows_with_the_raw_text(spark, fresh_endpoint,
                                                                                       table_name):
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def fault(req):
        prompt = req.body["messages"][-1]["content"]
        with lock:
            seen[prompt] = seen.get(prompt, 0) + 1
        if prompt.startswith("garbled"):
            return chat_answer("Sure! The sentiment is positive.")
        if prompt.startswith("off-schema"):
            return chat_answer('{"sentiment": "ecstatic", "refund_requested": false}')
        if prompt.startswith("flaky") and seen[prompt] == 1:  # wrong once, right when asked again
            return chat_answer('{"sentiment": "positive"}')
        return None

    fresh_endpoint.fault = fault
    src = view(spark, [(1, "negative: broken on arrival, refund for my Kettle Pro?"), (2, "A positive note on the Lovely Mug"),
                       (3, "garbled one"), (4, "off-schema one"), (5, "flaky but negative"), (6, None)])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=chat(fresh_endpoint, response_format={"schema": REVIEW, "name": "review"}))
    summary = run_job(spark, cfg)

    assert spark.table(table_name).schema["parsed"].dataType.simpleString() == PARSED
    expected = spark.createDataFrame([
        (1, "ok", None, ("negative", True, 5, (["Kettle", "Pro"],)), 1),
        (2, "ok", None, ("positive", False, 5, (["Lovely", "Mug"],)), 1),
        (3, "error", "invalid_output: not JSON: Expecting value (line 1, column 1)", None, 2),
        (4, "error", "invalid_output: $.sentiment: 'ecstatic' is not one of ['positive', 'negative', 'neutral']",
         None, 2),
        (5, "ok", None, ("negative", False, 3, ([],)), 2),                   # fixed by the one re-ask
        (6, "error", "empty_prompt", None, 0),
    ], f"id long, status string, error string, parsed {PARSED}, attempts int")
    assert_df_equality(spark.table(table_name).select("id", "status", "error", "parsed", "attempts"), expected,
                       ignore_row_order=True, ignore_nullable=True)
    raw = {r["id"]: r["response"] for r in spark.table(table_name).select("id", "response").collect()}
    assert (raw[3], raw[4]) == ("Sure! The sentiment is positive.",
                                '{"sentiment": "ecstatic", "refund_requested": false}')
    assert summary.by_status == {"ok": 3, "error": 3}
    [wire] = {json.dumps(r.body["response_format"], sort_keys=True) for r in fresh_endpoint.received}
    assert json.loads(wire) == {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW,
                                                                       "strict": True}}

    by_sentiment = spark.sql(f"""
        SELECT parsed.sentiment AS sentiment, count(*) AS n, max(parsed.stars) AS top,
               count_if(parsed.refund_requested) AS refunds
        FROM {table_name} WHERE status = 'ok' GROUP BY parsed.sentiment""")
    assert_df_equality(by_sentiment, spark.createDataFrame(
        [("negative", 2, 5, 1), ("positive", 1, 5, 0)], "sentiment string, n long, top long, refunds long"),
        ignore_row_order=True, ignore_nullable=True)
    reasons = spark.sql(f"SELECT substring_index(error, ':', 1) AS reason, count(*) AS n FROM {table_name} "
                        "WHERE status = 'error' GROUP BY 1")
    assert_df_equality(reasons, spark.createDataFrame([("invalid_output", 2), ("empty_prompt", 1)],
                                                      "reason string, n long"),
                       ignore_row_order=True, ignore_nullable=True)


def test_a_schema_change_makes_the_rows_pending_again_and_grows_the_table(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "positive about the Kettle"), (2, "bad")])
    sections = dict(input={"table": src}, output={"table": table_name})
    first = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]}}}
    second = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "bad"]},
                                               "names": {"type": "array", "items": {"type": "string"}}}}

    def run(schema=None, **retry):
        fresh_endpoint.reset()
        endpoint = chat(fresh_endpoint, **({"response_format": schema} if schema else {}))
        summary = run_job(spark, job_config(**sections, endpoint=endpoint, retry=retry))
        return summary.pending_rows, len(fresh_endpoint.received)

    assert run() == (2, 2)                                   # plain text first: no parsed column yet
    assert "parsed" not in spark.table(table_name).columns
    assert run(first) == (2, 2)                              # a schema: new requests, a new column
    assert run(first) == (0, 0)                              # unchanged: nothing pending
    assert run(first, invalid_output_attempts=3) == (0, 0)   # re-asks shape no request
    assert run(second) == (2, 2)                             # changed: every row again, the struct grows

    expected = spark.createDataFrame([(1, ("positive", ["Kettle"])), (2, ("bad", []))],
                                     "id long, parsed struct<sentiment:string,names:array<string>>")
    assert_df_equality(spark.table(table_name).select("id", "parsed"), expected, ignore_row_order=True,
                       ignore_nullable=True)
    assert run() == (2, 2)                                   # back to plain text: parsed reads null
    assert [r["parsed"] for r in spark.table(table_name).select("parsed").collect()] == [None, None]
