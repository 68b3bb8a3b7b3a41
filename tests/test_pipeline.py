"""The job end to end on local Spark: real Delta tables, the local endpoint over real HTTP."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from jobs.config import ConfigError
from jobs.errors import InputError, JobFailed
from jobs.local.stand_in import LocalEndpoint, llm_latency
from jobs.pipeline import run_job
from tests.conftest import job_config
from tests.faults import chat_answer

OUTCOME_COLS = ["id", "prompt", "response", "status", "error", "http_status", "attempts",
                "prompt_tokens", "completion_tokens"]
SCHEMA = ("id long, prompt string, response string, status string, error string, http_status int, "
          "attempts int, prompt_tokens long, completion_tokens long")


def view(spark, rows: list[tuple], schema: str = "id long, prompt string") -> str:
    """Small inputs are temporary views (a Delta write per test costs seconds); outputs are Delta."""
    name = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame(rows, schema).createOrReplaceTempView(name)
    return name


def outcomes(spark, name: str):
    return spark.table(name).select(*OUTCOME_COLS)


def proxy(ep: LocalEndpoint, **extra):
    return {"name": "local-proxy", "type": "driver_proxy", "url": f"{ep.url}/", **extra}


def serving(ep: LocalEndpoint, task: str, **extra):
    return {"name": "local-serving", "type": "serving", "task": task, "host": ep.url, **extra}


def test_driver_proxy_app_rows_land_in_delta_with_kwargs_and_stop_on_the_wire(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "alpha beta"), (2, "stop HERE please"), (3, None), (4, "  "), (5, "\t\n \r\n"),
                       (6, "\u3000\u2028")])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=proxy(fresh_endpoint, model_kwargs={"max_tokens": 3, "temperature": 0.1},
                                    stop=["HERE"]))
    summary = run_job(spark, cfg)

    expected = spark.createDataFrame([
        (1, "alpha beta", "Answer to: alpha", "ok", None, 200, 1, None, None),
        (2, "stop HERE please", "Answer to: stop", "ok", None, 200, 1, None, None),
        (3, None, None, "error", "empty_prompt", None, 0, None, None),
        (4, "  ", None, "error", "empty_prompt", None, 0, None, None),
        (5, "\t\n \r\n", None, "error", "empty_prompt", None, 0, None, None),  # blank: any whitespace
        (6, "\u3000\u2028", None, "error", "empty_prompt", None, 0, None, None),
    ], SCHEMA)
    assert_df_equality(outcomes(spark, table_name), expected, ignore_row_order=True, ignore_nullable=True)
    bodies = sorted((r.body for r in fresh_endpoint.received), key=lambda b: b["prompt"])
    assert bodies == [
        {"prompt": "alpha beta", "stop": ["HERE"], "max_tokens": 3, "temperature": 0.1},
        {"prompt": "stop HERE please", "stop": ["HERE"], "max_tokens": 3, "temperature": 0.1},
    ]
    assert summary.by_status == {"ok": 2, "error": 4}


def test_serving_completions_reads_text_and_usage(spark, fresh_endpoint, table_name):
    src = view(spark, [(10, "one two"), (11, "three")])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=serving(fresh_endpoint, "llm/v1/completions", model_kwargs={"max_tokens": 16}))
    run_job(spark, cfg)

    expected = spark.createDataFrame([
        (10, "one two", "Answer to: one two", "ok", None, 200, 1, 2, 4),
        (11, "three", "Answer to: three", "ok", None, 200, 1, 1, 3),
    ], SCHEMA)
    assert_df_equality(outcomes(spark, table_name), expected, ignore_row_order=True, ignore_nullable=True)
    assert {r.path for r in fresh_endpoint.received} == {"/serving-endpoints/local-serving/invocations"}
    assert sorted(r.body["prompt"] for r in fresh_endpoint.received) == ["one two", "three"]


def test_serving_chat_sends_messages_with_system_prompt(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "hi there")])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=serving(fresh_endpoint, "llm/v1/chat", system_prompt="Be brief.",
                                      model_kwargs={"temperature": 0}, stop=["END"]))
    run_job(spark, cfg)

    expected = spark.createDataFrame([(1, "hi there", "Answer to: hi there", "ok", None, 200, 1, 4, 4)], SCHEMA)
    assert_df_equality(outcomes(spark, table_name), expected, ignore_nullable=True)
    [req] = fresh_endpoint.received
    assert req.body == {"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "hi there"}],
                        "temperature": 0, "stop": ["END"]}


def test_custom_model_batches_records_and_always_sends_stop(spark, fresh_endpoint, table_name):
    src = view(spark, [(i, f"p{i}") for i in range(1, 6)])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=serving(fresh_endpoint, "custom", batch_size=5), limits={"max_concurrency": 1})
    run_job(spark, cfg)

    expected = spark.createDataFrame(
        [(i, f"p{i}", f"Answer to: p{i}", "ok", None, 200, 1, None, None) for i in range(1, 6)], SCHEMA)
    assert_df_equality(outcomes(spark, table_name), expected, ignore_row_order=True, ignore_nullable=True)
    [req] = fresh_endpoint.received  # one task, one request carrying all five records
    assert sorted(req.body["dataframe_records"], key=lambda r: r["prompt"]) == [
        {"prompt": f"p{i}", "stop": []} for i in range(1, 6)]


def test_transforms_are_imported_on_executors_and_reach_the_wire(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "quiet words")])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=proxy(fresh_endpoint, transform_input="tests.transforms:add_marker",
                                    transform_output="tests.transforms:shout"))
    run_job(spark, cfg)

    expected = spark.createDataFrame([(1, "quiet words", "ANSWER TO: QUIET WORDS", "ok", None, 200, 1, None, None)],
                                     SCHEMA)
    assert_df_equality(outcomes(spark, table_name), expected, ignore_nullable=True)
    assert fresh_endpoint.received[0].body == {"prompt": "quiet words", "stop": [], "marker": "from-transform"}


def test_server_error_and_malformed_answer_become_error_rows(spark, fresh_endpoint, table_name):
    def fault(req):
        if req.body.get("prompt") == "boom":
            return 500, {}, b'{"error_code": "INTERNAL_ERROR", "message": "model crashed"}'
        if req.body.get("prompt") == "garbage":
            return 200, {"Content-Type": "text/html"}, b"<html>proxy login</html>"
        return None

    fresh_endpoint.fault = fault
    src = view(spark, [(1, "boom"), (2, "garbage"), (3, "fine")])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=proxy(fresh_endpoint), retry={"max_attempts": 2})
    run_job(spark, cfg)

    expected = spark.createDataFrame([
        (1, "boom", None, "error",
         "http_500: INTERNAL_ERROR: model crashed (gave up after 2 attempts)", 500, 2, None, None),
        (2, "garbage", None, "error", "bad_response: answer is not JSON: '<html>proxy login</html>'", 200, 1,
         None, None),
        (3, "fine", "Answer to: fine", "ok", None, 200, 1, None, None),
    ], SCHEMA)
    actual = spark.table(table_name).selectExpr(
        *[c if c != "error" else "regexp_replace(error, ', [0-9.]+s\\\\)', ')') AS error" for c in OUTCOME_COLS])
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)
    assert [r.body["prompt"] for r in fresh_endpoint.received].count("garbage") == 1  # no retry storm


def test_output_table_answers_spark_sql_and_has_run_columns(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "a"), (2, "b"), (3, "")])
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=proxy(fresh_endpoint))
    summary = run_job(spark, cfg)

    counts = spark.sql(f"SELECT status, count(*) AS n, count(DISTINCT run_id) AS runs, "
                       f"min(endpoint) AS endpoint, bool_and(completed_at IS NOT NULL) AS stamped "
                       f"FROM {table_name} GROUP BY status")
    expected = spark.createDataFrame([("ok", 2, 1, "local-proxy", True), ("error", 1, 1, "local-proxy", True)],
                                     "status string, n long, runs long, endpoint string, stamped boolean")
    assert_df_equality(counts, expected, ignore_row_order=True, ignore_nullable=True)
    assert spark.sql(f"SELECT DISTINCT run_id FROM {table_name}").first()[0] == summary.run_id


def test_rerun_skips_finished_rows_and_changed_parameters_make_rows_pending(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "a"), (2, "b")])
    sections = dict(input={"table": src}, output={"table": table_name})
    run_job(spark, job_config(**sections, endpoint=proxy(fresh_endpoint)))
    assert len(fresh_endpoint.received) == 2

    fresh_endpoint.reset()
    second = run_job(spark, job_config(**sections, endpoint=proxy(fresh_endpoint)))
    assert (second.pending_rows, len(fresh_endpoint.received)) == (0, 0)

    third = run_job(spark, job_config(**sections, endpoint=proxy(fresh_endpoint, model_kwargs={"max_tokens": 2})))
    assert (third.pending_rows, len(fresh_endpoint.received)) == (2, 2)
    expected = spark.createDataFrame([(1, "a", "Answer to:", "ok"), (2, "b", "Answer to:", "ok")],
                                     "id long, prompt string, response string, status string")
    assert_df_equality(spark.table(table_name).select("id", "prompt", "response", "status"), expected,
                       ignore_row_order=True, ignore_nullable=True)


def test_identical_prompts_are_sent_once_and_answer_every_id(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "same"), (2, "same"), (3, "other")])
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=proxy(fresh_endpoint))
    run_job(spark, cfg)

    assert sorted(r.body["prompt"] for r in fresh_endpoint.received) == ["other", "same"]
    expected = spark.createDataFrame([(1, "Answer to: same"), (2, "Answer to: same"), (3, "Answer to: other")],
                                     "id long, response string")
    assert_df_equality(spark.table(table_name).select("id", "response"), expected, ignore_row_order=True,
                       ignore_nullable=True)


def test_bad_transform_fails_before_any_call(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "a")])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=proxy(fresh_endpoint, transform_input="tests.transforms:no_such_function"))
    with pytest.raises(ConfigError, match="endpoint.transform_input: cannot import"):
        run_job(spark, cfg)
    assert fresh_endpoint.received == []


def test_duplicate_ids_stop_the_job_before_any_call_and_name_them(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "a"), (1, "b"), (2, "c"), (7, "d"), (7, "e"), (7, "f")])
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=proxy(fresh_endpoint))
    with pytest.raises(InputError, match=r"duplicate ids in the input, e.g. 7 \(x3\), 1 \(x2\)"):
        run_job(spark, cfg)
    assert fresh_endpoint.received == []


def test_missing_column_and_missing_table_are_named(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "a")], schema="id long, text string")
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=proxy(fresh_endpoint))
    with pytest.raises(InputError, match=r"input.prompt_col: column 'prompt' not found .*\['id', 'text'\]"):
        run_job(spark, cfg)
    cfg = job_config(input={"table": "test.no_such_table"}, output={"table": table_name}, endpoint=proxy(fresh_endpoint))
    with pytest.raises(InputError, match="cannot read input test.no_such_table"):
        run_job(spark, cfg)
    assert fresh_endpoint.received == []


def test_fail_on_error_raises_after_writing_every_row(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, "a"), (2, None)])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=proxy(fresh_endpoint), run={"fail_on_error": True})
    with pytest.raises(JobFailed, match="1 row"):
        run_job(spark, cfg)
    expected = spark.createDataFrame([(1, "ok"), (2, "error")], "id long, status string")
    assert_df_equality(spark.table(table_name).select("id", "status"), expected, ignore_row_order=True,
                       ignore_nullable=True)


def test_input_from_a_query_and_from_a_delta_path(spark, fresh_endpoint, table_name, tmp_path):
    path = str(tmp_path / "prompts")
    spark.createDataFrame([("k1", "from path")], "key string, q string").write.format("delta").save(path)
    cfg = job_config(input={"path": path, "id_col": "key", "prompt_col": "q"}, output={"table": table_name},
                     endpoint=proxy(fresh_endpoint))
    run_job(spark, cfg)
    cfg = job_config(input={"query": "SELECT 'k2' AS key, 'from query' AS q", "id_col": "key", "prompt_col": "q"},
                     output={"table": table_name},
                     endpoint=proxy(fresh_endpoint))
    run_job(spark, cfg)
    expected = spark.createDataFrame([("k1", "Answer to: from path"), ("k2", "Answer to: from query")],
                                     "id string, response string")
    assert_df_equality(spark.table(table_name).select("id", "response"), expected, ignore_row_order=True,
                       ignore_nullable=True)
    assert json.loads(json.dumps(sorted(r.body["prompt"] for r in fresh_endpoint.received))) == [
        "from path", "from query"]


def test_limit_takes_pending_rows_so_consecutive_runs_walk_the_whole_table(spark, fresh_endpoint, table_name):
    """README: `--limit ROWS` processes at most ROWS *pending* rows; three runs of 10 cover 25 rows."""
    src = view(spark, [(i, f"prompt {i}") for i in range(25)])
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=proxy(fresh_endpoint),
                     run={"limit": 10, "chunk_rows": 1000, "task_slots": 2})
    sent = []
    for _ in range(4):
        fresh_endpoint.reset()
        run_job(spark, cfg)
        sent.append({r.body["prompt"] for r in fresh_endpoint.received})
    assert [len(s) for s in sent] == [10, 10, 5, 0]
    assert set().union(*sent) == {f"prompt {i}" for i in range(25)}  # distinct prompts, none twice
    assert sent[0] == {f"prompt {i}" for i in range(10)}  # lowest ids first: a stable order
    expected = spark.createDataFrame([(i, "ok") for i in range(25)], "id long, status string")
    assert_df_equality(spark.table(table_name).select("id", "status"), expected, ignore_row_order=True,
                       ignore_nullable=True)


def test_the_next_chunk_calls_while_the_last_one_commits_and_the_limit_holds(spark, fresh_endpoint, table_name,
                                                                            monkeypatch):
    """Driver mode overlaps, asserted by order, not duration: requests arrive while a chunk commits.

    (Executors mode commits inside each chunk's own calling job: nothing separate to overlap.)"""
    import time

    import jobs.calls.driver as driver_calls

    commits: list[tuple[float, float]] = []
    real = driver_calls.commit_chunk

    def timed(*args, **kwargs):
        start = time.monotonic()
        try:
            return real(*args, **kwargs)
        finally:
            commits.append((start, time.monotonic()))

    monkeypatch.setattr(driver_calls, "commit_chunk", timed)
    fresh_endpoint.latency_s = 0.05
    src = view(spark, [(i, f"overlap {i}") for i in range(60)])
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=proxy(fresh_endpoint),
                     limits={"max_concurrency": 2}, run={"calls_from": "driver", "chunk_rows": 12})
    summary = run_job(spark, cfg)

    assert summary.by_status == {"ok": 60} and summary.chunks == len(commits) >= 4
    arrivals = [r.arrived for r in fresh_endpoint.received]
    during = [sum(start < t < end for t in arrivals) for start, end in commits[:-1]]
    assert any(during), (commits, arrivals)  # some chunk called while another committed
    assert fresh_endpoint.peak_inflight <= 2  # commits never call: the job-wide limit holds
    expected = spark.createDataFrame([(i, f"Answer to: overlap {i}") for i in range(60)], "id long, response string")
    assert_df_equality(spark.table(table_name).select("id", "response"), expected, ignore_row_order=True,
                       ignore_nullable=True)


@pytest.mark.parametrize("calls_from", ["executors", "driver"])
def test_answers_from_50_ms_to_2_s_keep_the_endpoint_at_its_limit(spark, fresh_endpoint, table_name, calls_from):
    """Issue 20, scaled down: LLM-like latency per prompt (heavy-tailed, 0.05 s to 2 s) must not shrink
    the job to a few requests in flight. The server's own count: the peak reaches C and never passes
    it, and over the calls the time-weighted mean in flight is at least 0.7 C (two chunks: their
    boundary must not leave the endpoint idle)."""
    fresh_endpoint.latency_of = lambda raw: llm_latency(raw, 0.1, 0.05, 2.0)
    src = view(spark, [(i, f"question {i}") for i in range(480)])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=serving(fresh_endpoint, "llm/v1/chat"),
                     limits={"max_concurrency": 8}, run={"calls_from": calls_from, "chunk_rows": None})
    summary = run_job(spark, cfg)

    assert summary.by_status == {"ok": 480} and summary.chunks == 2
    assert fresh_endpoint.peak_inflight == 8
    assert fresh_endpoint.mean_inflight() >= 0.7 * 8, fresh_endpoint.mean_inflight()


@pytest.mark.parametrize("calls_from", ["executors", "driver"])
def test_sent_at_is_when_each_request_left_and_the_run_s_series_holds_c_in_flight(spark, fresh_endpoint, table_name,
                                                                                 calls_from):
    """`sent_at`: each sent row's first send, within the run, its latency ending before the run did;
    null for a row a precheck stopped; shared by rows that asked the same. The run's series from them
    (`flight_series`): never more than C in flight, its area the requests' latencies, which hold the
    server's own time in flight, and every sent row answered once on it."""
    import time

    from jobs.observe.stats import flight_series

    fresh_endpoint.latency_s = 0.2
    src = view(spark, [(i, f"q {i}") for i in range(12)] + [(12, ""), (13, "q 0")])  # blank; same as id 0
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=proxy(fresh_endpoint),
                     limits={"max_concurrency": 2}, run={"calls_from": calls_from, "chunk_rows": 6})
    before = time.time()
    summary = run_job(spark, cfg)
    after = time.time()

    assert summary.by_status == {"ok": 13, "error": 1} and len(fresh_endpoint.received) == 12
    rows = {r["id"]: r for r in spark.table(table_name).select(
        "id", F.unix_micros("sent_at").alias("us"), "latency_ms").collect()}
    assert rows[12]["us"] is None  # empty_prompt: never sent
    assert rows[0]["us"] == rows[13]["us"]  # one request, one send, for both ids
    for i in [*range(12), 13]:
        start, ms = rows[i]["us"] / 1e6, rows[i]["latency_ms"]
        assert before <= start and ms >= 200 and start + ms / 1000 <= after, (i, before, start, ms, after)

    series = flight_series(spark, table_name, summary.run_id)
    n = len(series.in_flight)
    lengths = [series.bucket_s] * (n - 1) + [series.span_s - (n - 1) * series.bucket_s]
    assert 60 <= n <= 150 or series.bucket_s == 0.001
    assert max(series.in_flight) <= 2 + 1e-3  # C: up to float rounding of the microseconds
    busy = sum(f * s for f, s in zip(series.in_flight, lengths))
    latencies = sum(r["latency_ms"] for i, r in rows.items() if i not in (12, 13)) / 1000  # 12 requests
    assert busy == pytest.approx(latencies, rel=1e-4)
    assert busy >= fresh_endpoint.inflight_area  # the client's time in flight holds the server's
    # 13 rows were sent; rates are over whole buckets, the last one too
    assert sum(r * series.bucket_s for r in series.rows_per_s) == pytest.approx(13)


def test_null_ids_stop_the_job_before_any_call(spark, fresh_endpoint, table_name):
    """README: duplicate or null ids stop the job before any call, naming them."""
    src = view(spark, [(1, "a"), (None, "b")])
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=proxy(fresh_endpoint))
    with pytest.raises(InputError, match=r"1 input row\(s\) have a null id"):
        run_job(spark, cfg)
    assert fresh_endpoint.received == []
    assert not spark.catalog.tableExists(table_name)


# -- structured output: typed columns, invalid_output rows, the re-ask, a schema change -------------

REVIEW_SCHEMA = {
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
    return serving(ep, "llm/v1/chat", name="local-chat", **extra)


@pytest.mark.parametrize("calls_from", ["executors", "driver"])
def test_typed_columns_land_and_bad_answers_are_invalid_output_rows_with_the_raw_text(spark, fresh_endpoint,
                                                                                       table_name, calls_from):
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
    cfg = job_config(input={"table": src}, output={"table": table_name}, run={"calls_from": calls_from},
                     endpoint=chat(fresh_endpoint, response_format={"schema": REVIEW_SCHEMA, "name": "review"}))
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
    assert json.loads(wire) == {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW_SCHEMA,
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


# -- prompt templates over several columns, kept columns --------------------------------------------

REVIEWS = [(1, "Kettle", "It leaks.", "FR", 4.5), (2, "Mug", "Lovely {colour}", "DE", None),
           (3, None, "No product named.", "FR", 1.0), (4, "Mug", "Lovely {colour}", "IT", 2.0)]
REVIEW_COLUMNS = "id long, product string, body string, country string, score double"
TEMPLATE = "Classify this review of {product} ({score}): {body} {{json}}"


@pytest.mark.parametrize("calls_from", ["executors", "driver"])
def test_a_template_fills_from_several_columns_and_kept_columns_land_beside_the_outcome(spark, fresh_endpoint,
                                                                                         table_name, calls_from):
    src = view(spark, REVIEWS, REVIEW_COLUMNS)
    cfg = job_config(input={"table": src, "template": TEMPLATE, "keep_columns": ["country", "product"]},
                     output={"table": table_name}, endpoint=proxy(fresh_endpoint), run={"calls_from": calls_from})
    run_job(spark, cfg)

    kettle = "Classify this review of Kettle (4.5): It leaks. {json}"
    expected = spark.createDataFrame([
        (1, "FR", "Kettle", kettle, f"Answer to: {kettle}", "ok", None),
        (2, "DE", "Mug", None, None, "error", "null_field: score is null"),
        (3, "FR", None, None, None, "error", "null_field: product is null"),
        (4, "IT", "Mug", "Classify this review of Mug (2.0): Lovely {colour} {json}",
         "Answer to: Classify this review of Mug (2.0): Lovely {colour} {json}", "ok", None),
    ], "id long, country string, product string, prompt string, response string, status string, error string")
    assert_df_equality(spark.table(table_name).select(*expected.columns), expected, ignore_row_order=True,
                       ignore_nullable=True)
    # The kept columns sit after the id, in the order given; the rendered prompt is what was sent.
    assert spark.table(table_name).columns[:4] == ["id", "country", "product", "prompt"]
    assert sorted(r.body["prompt"] for r in fresh_endpoint.received) == [
        kettle, "Classify this review of Mug (2.0): Lovely {colour} {json}"]


def test_null_fields_empty_sends_the_row_and_a_null_in_several_columns_is_named(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, None, None, "FR", 1.0)], REVIEW_COLUMNS)
    errors = job_config(input={"table": src, "template": TEMPLATE}, output={"table": table_name},
                        endpoint=proxy(fresh_endpoint))
    run_job(spark, errors)
    assert spark.table(table_name).select("error").first()[0] == "null_field: product, body are null"
    assert fresh_endpoint.received == []

    other = f"test.t_{uuid.uuid4().hex[:10]}"
    empty = job_config(input={"table": src, "template": TEMPLATE, "null_fields": "empty"}, output={"table": other},
                       endpoint=proxy(fresh_endpoint))
    run_job(spark, empty)
    [req] = fresh_endpoint.received
    assert req.body["prompt"] == "Classify this review of  (1.0):  {json}"


def test_a_missing_template_or_kept_column_is_refused_before_any_spark_job_or_call(spark, fresh_endpoint,
                                                                                     table_name):
    src = view(spark, REVIEWS, REVIEW_COLUMNS)
    cfg = job_config(input={"table": src, "template": "Review of {product}: {text}", "keep_columns": ["region"]},
                     output={"table": table_name}, endpoint=proxy(fresh_endpoint))
    group = f"refused-{uuid.uuid4().hex[:8]}"
    spark.sparkContext.setJobGroup(group, "a config naming missing columns")
    try:
        with pytest.raises(InputError, match=r"^input.template: column 'text'; input.keep_columns: column 'region' "
                                             r"not found in input.table \w+ \(columns: \['id', 'product', 'body', "
                                             r"'country', 'score'\]\)$"):
            run_job(spark, cfg)
        assert list(spark.sparkContext.statusTracker().getJobIdsForGroup(group)) == []
        spark.range(1).count()  # the tracker does see this group's jobs: the check above is not vacuous
        assert len(spark.sparkContext.statusTracker().getJobIdsForGroup(group)) >= 1
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
    assert fresh_endpoint.received == []
    assert not spark.catalog.tableExists(table_name)
