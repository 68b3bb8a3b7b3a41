"""Embeddings to Delta: the protocols, the dimension check, and the job end to end over real HTTP."""

from __future__ import annotations

import json
import uuid

import pytest
from chispa import assert_df_equality

from jobs.calls.outcomes import Dimension, with_dimension_check
from jobs.config import ConfigError, parse_config
from jobs.local.stand_in import LocalEndpoint, Request
from jobs.pipeline import run_job
from tests.conftest import job_config
from udfs.protocols import BadResponse, Parsed, make_protocol

ROWS = "id long, text string, embedding array<float>, dim int, status string, error string, http_status int"


def view(spark, rows: list[tuple]) -> str:
    name = f"texts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame(rows, "id long, prompt string").createOrReplaceTempView(name)
    return name


def reply(value, status: int = 200) -> tuple[int, dict[str, str], bytes]:
    return status, {}, json.dumps(value).encode()


def serving(ep: LocalEndpoint, task: str = "llm/v1/embeddings", **extra):
    return {"name": "local-embeddings", "type": "serving", "task": task, "host": ep.url, **extra}


# -- protocols and config (no Spark) -----------------------------------------------------------------

def test_pyfunc_driver_proxy_and_positional_answers_parse_to_vectors():
    pyfunc = make_protocol("custom/embeddings", model_kwargs={"normalize": True})
    assert pyfunc.build(["a", "b"]) == {"inputs": ["a", "b"], "params": {"normalize": True}}
    assert pyfunc.parse({"predictions": [[1, 2], [3.5, 4]]}, ["a", "b"]) == [
        Parsed(embedding=[1.0, 2.0]), Parsed(embedding=[3.5, 4.0])]
    assert pyfunc.parse({"predictions": [0.5, 0.25]}, ["a"]) == [Parsed(embedding=[0.5, 0.25])]
    with pytest.raises(BadResponse, match="1 vectors for 2 inputs"):
        pyfunc.parse({"predictions": [[1.0]]}, ["a", "b"])

    proxy = make_protocol("llm/v1/embeddings", "driver_proxy", model_kwargs={"dimensions": 2})
    assert proxy.build(["a"]) == {"prompt": "a", "stop": [], "dimensions": 2}
    assert proxy.parse([0.1, 0.2], ["a"]) == [Parsed(embedding=[0.1, 0.2])]
    with pytest.raises(BadResponse, match="not a non-empty list"):
        proxy.parse("text, not a vector", ["a"])

    openai = make_protocol("llm/v1/embeddings")  # no `index`: position in `data` is the input's position
    assert openai.parse({"data": [{"embedding": [1]}, {"embedding": [2]}]}, ["x", "y"]) == [
        Parsed(embedding=[1.0]), Parsed(embedding=[2.0])]
    with pytest.raises(BadResponse, match="1 embeddings for 2 inputs"):
        openai.parse({"data": [{"index": 0, "embedding": [1]}]}, ["x", "y"])


@pytest.mark.parametrize("endpoint, expected", [
    ({"name": "bge", "task": "llm/v1/embeddings"}, (True, 32)),
    ({"name": "st", "task": "custom/embeddings", "batch_size": 20}, (True, 20)),
    ({"name": "app", "type": "driver_proxy", "port": 7777, "task": "llm/v1/embeddings"}, (True, 1)),
])
def test_embedding_tasks_select_batching(endpoint, expected):
    cfg = parse_config({"input": {"table": "t"}, "output": {"table": "o"}, "endpoint": endpoint})
    assert (cfg.endpoint.is_embeddings, cfg.endpoint.rows_per_request) == expected


@pytest.mark.parametrize("endpoint, message", [
    ({"task": "llm/v1/chat", "embedding_dim": 8}, r"embedding_dim applies to embeddings tasks only"),
    ({"task": "llm/v1/embeddings", "embedding_dim": 0}, r"endpoint.embedding_dim: Input should be greater"),
    ({"type": "driver_proxy", "port": 7777, "task": "custom/embeddings"},
     r"use task custom or llm/v1/embeddings"),
    ({"type": "driver_proxy", "port": 7777, "task": "llm/v1/embeddings", "batch_size": 8},
     r"driver_proxy apps answer one prompt per request"),
])
def test_embedding_settings_that_cannot_work_are_refused(endpoint, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"input": {"table": "t"}, "output": {"table": "o"},
                      "endpoint": {"name": "e", **endpoint}})


# -- the dimension check -----------------------------------------------------------------------------

def test_dimension_check_uses_pinned_then_run_then_chunk_majority(spark):
    schema = "id long, embedding array<float>, dim int, status string, error string"
    chunk = spark.createDataFrame([
        (1, [1.0, 0.0], 2, "ok", None),
        (2, [0.0, 1.0], 2, "ok", None),
        (3, [1.0, 0.0, 0.0], 3, "ok", None),
        (4, None, None, "error", "http_500: boom"),
    ], schema)
    majority = chunk.transform(with_dimension_check(None))
    assert_df_equality(majority, spark.createDataFrame([
        (1, [1.0, 0.0], 2, "ok", None),
        (2, [0.0, 1.0], 2, "ok", None),
        (3, None, None, "error",
         "dimension_mismatch: 3 values, expected 2 (the most common length in this chunk)"),
        (4, None, None, "error", "http_500: boom"),
    ], schema), ignore_row_order=True, ignore_nullable=True)

    pinned = chunk.transform(with_dimension_check(3))
    assert sorted((r.id, r.status, r.error) for r in pinned.collect()) == [
        (1, "error", "dimension_mismatch: 2 values, expected 3 (endpoint.embedding_dim)"),
        (2, "error", "dimension_mismatch: 2 values, expected 3 (endpoint.embedding_dim)"),
        (3, "ok", None), (4, "error", "http_500: boom")]

    # A later chunk of the same run follows what the run already wrote, even against its own majority.
    written = f"written_{uuid.uuid4().hex[:8]}"  # the output table, as far as run_id, status and dim go
    spark.createDataFrame([(9, "ok", 3, "run-a"), (8, "ok", 2, "run-b")],
                          "id long, status string, dim int, run_id string").createOrReplaceTempView(written)
    dim = Dimension(None)
    later = chunk.transform(dim.check(spark, written, "run-a")).collect()
    assert (dim.value, dim.why) == (3, "the length this run already wrote")  # kept for the run's next chunks
    assert sorted((r.id, r.status, r.error) for r in later)[:2] == [
        (1, "error", "dimension_mismatch: 2 values, expected 3 (the length this run already wrote)"),
        (2, "error", "dimension_mismatch: 2 values, expected 3 (the length this run already wrote)")]
    assert sorted((r.id, r.status) for r in later)[2:] == [(3, "ok"), (4, "error")]


# -- the job end to end ------------------------------------------------------------------------------

VECTORS = {"cat": [1.0, 0.0, 0.0], "kitten": [1.0, 1.0, 0.0], "car": [0.0, 0.0, 1.0], "dog": [0.0, 1.0, 0.0],
           "truck": [0.0, 0.0, 2.0]}


def reversed_by_index(req: Request):
    """Answer the vectors in reverse order, each tagged with its input's index; usage = total characters."""
    texts = req.body["input"]
    data = [{"object": "embedding", "index": i, "embedding": VECTORS[t]} for i, t in enumerate(texts)][::-1]
    n = sum(len(t) for t in texts)
    return reply({"object": "list", "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}})


def test_vectors_land_by_index_in_few_requests_and_answer_cosine_in_sql(spark, fresh_endpoint, table_name):
    fresh_endpoint.fault = reversed_by_index
    src = view(spark, [(1, "cat"), (2, "kitten"), (3, "car"), (4, "dog"), (5, "truck"), (6, "")])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=serving(fresh_endpoint, batch_size=2,
                                      model_kwargs={"encoding_format": "float"}),
                     limits={"max_concurrency": 1})
    summary = run_job(spark, cfg)

    expected = spark.createDataFrame([
        (1, "cat", [1.0, 0.0, 0.0], 3, "ok", None, 200, 3),
        (2, "kitten", [1.0, 1.0, 0.0], 3, "ok", None, 200, 6),
        (3, "car", [0.0, 0.0, 1.0], 3, "ok", None, 200, 3),
        (4, "dog", [0.0, 1.0, 0.0], 3, "ok", None, 200, 3),
        (5, "truck", [0.0, 0.0, 2.0], 3, "ok", None, 200, 5),
        (6, "", None, None, "error", "empty_prompt", None, None),
    ], ROWS + ", prompt_tokens long")
    actual = spark.table(table_name).select(*expected.columns)
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)
    # Five texts, two per request, one task: ceil(5 / 2) = 3 requests, each a list of at most two.
    bodies = [r.body for r in fresh_endpoint.received]
    assert len(bodies) == 3 and all(len(b["input"]) <= 2 and b["encoding_format"] == "float" for b in bodies)
    assert sorted(t for b in bodies for t in b["input"]) == ["car", "cat", "dog", "kitten", "truck"]
    assert [(f.name, f.dataType.simpleString()) for f in spark.table(table_name).schema.fields] == [
        ("id", "bigint"), ("text", "string"), ("embedding", "array<float>"), ("dim", "int"),
        ("status", "string"), ("error", "string"), ("http_status", "int"), ("attempts", "int"),
        ("sent_at", "timestamp"), ("latency_ms", "double"), ("prompt_tokens", "bigint"), ("request_hash", "string"),
        ("endpoint", "string"), ("run_id", "string"), ("completed_at", "timestamp")]
    # The texts of one request share its send and its latency: three calls (what the in-flight plot counts).
    calls = spark.table(table_name).where("sent_at IS NOT NULL").select("sent_at", "latency_ms").distinct()
    assert calls.count() == 3
    assert summary.by_status == {"ok": 5, "error": 1}

    cosine = spark.sql(f"""
        SELECT b.text,
               round(aggregate(zip_with(a.embedding, b.embedding, (x, y) -> x * y), 0D, (s, v) -> s + v)
                     / sqrt(aggregate(a.embedding, 0D, (s, v) -> s + v * v))
                     / sqrt(aggregate(b.embedding, 0D, (s, v) -> s + v * v)), 6) AS cosine
        FROM {table_name} a JOIN {table_name} b ON a.text = 'cat' AND b.text IN ('kitten', 'car', 'cat')""")
    assert_df_equality(cosine, spark.createDataFrame([("kitten", 0.707107), ("car", 0.0), ("cat", 1.0)],
                                                     "text string, cosine double"),
                       ignore_row_order=True, ignore_nullable=True)


def test_one_bad_input_fails_alone_and_a_wrong_length_vector_is_an_error_row(spark, fresh_endpoint,
                                                                             table_name):
    seen: list[tuple[list[str], int]] = []
    vectors = {"alpha": [1.0, 0.0, 0.0], "beta": [0.0, 1.0, 0.0], "gamma": [0.0, 0.0, 1.0],
               "short": [1.0, 1.0]}

    def fault(req: Request):
        texts = req.body["input"]
        status = 400 if "BAD" in texts else 200
        seen.append((texts, status))
        if status == 400:  # like a provider refusing a whole batch for one invalid input
            return reply({"error_code": "BAD_REQUEST", "message": "input 'BAD' is invalid"}, 400)
        return reply({"data": [{"index": i, "embedding": vectors[t]} for i, t in enumerate(texts)]})

    fresh_endpoint.fault = fault
    src = view(spark, [(1, "alpha"), (2, "BAD"), (3, "beta"), (4, "short"), (5, "gamma")])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=serving(fresh_endpoint, batch_size=5), limits={"max_concurrency": 1})
    run_job(spark, cfg)

    expected = spark.createDataFrame([
        (1, "alpha", [1.0, 0.0, 0.0], 3, "ok", None, 200),
        (2, "BAD", None, None, "error", "http_400: BAD_REQUEST: input 'BAD' is invalid", 400),
        (3, "beta", [0.0, 1.0, 0.0], 3, "ok", None, 200),
        (4, "short", None, None, "error",
         "dimension_mismatch: 2 values, expected 3 (the most common length in this chunk)", 200),
        (5, "gamma", [0.0, 0.0, 1.0], 3, "ok", None, 200),
    ], ROWS)
    assert_df_equality(spark.table(table_name).select(*expected.columns), expected, ignore_row_order=True,
                       ignore_nullable=True)
    # The batch of five was refused, split until the bad input stood alone; every good text was
    # answered exactly once.
    assert len(seen[0][0]) == 5 and seen[0][1] == 400
    answered = sorted(t for texts, status in seen if status == 200 for t in texts)
    assert answered == ["alpha", "beta", "gamma", "short"]
    assert [texts for texts, status in seen if status == 400 and len(texts) == 1] == [["BAD"]]


def test_pyfunc_predictions_and_driver_proxy_lists_land_as_vectors(spark, fresh_endpoint, table_name):
    def fault(req: Request):
        if req.path == "/embeddings":  # a driver-proxy app: one prompt in, a list of floats out
            return reply({"one": [0.25, 0.75], "two": [0.5, 0.5]}[req.body["prompt"]])
        pyfunc = {"one": [1.0, 0.0, 0.0], "two": [0.0, 1.0]}
        return reply({"predictions": [pyfunc[t] for t in req.body["inputs"]]})

    fresh_endpoint.fault = fault
    src = view(spark, [(1, "one"), (2, "two")])
    pyfunc_table = table_name + "_pyfunc"
    run_job(spark, job_config(input={"table": src}, output={"table": pyfunc_table},
                              endpoint=serving(fresh_endpoint, "custom/embeddings", embedding_dim=3)))
    run_job(spark, job_config(input={"table": src}, output={"table": table_name},
                              endpoint={"name": "app", "type": "driver_proxy", "task": "llm/v1/embeddings",
                                        "url": f"{fresh_endpoint.url}/embeddings"}))

    assert_df_equality(spark.table(pyfunc_table).select("id", "text", "embedding", "dim", "status", "error",
                                                        "http_status"),
                       spark.createDataFrame([
                           (1, "one", [1.0, 0.0, 0.0], 3, "ok", None, 200),
                           (2, "two", None, None, "error",
                            "dimension_mismatch: 2 values, expected 3 (endpoint.embedding_dim)", 200),
                       ], ROWS), ignore_row_order=True, ignore_nullable=True)
    assert_df_equality(spark.table(table_name).select("id", "embedding", "dim", "status"),
                       spark.createDataFrame([(1, [0.25, 0.75], 2, "ok"), (2, [0.5, 0.5], 2, "ok")],
                                             "id long, embedding array<float>, dim int, status string"),
                       ignore_row_order=True, ignore_nullable=True)
    proxied = sorted(json.dumps(r.body) for r in fresh_endpoint.received if r.path == "/embeddings")
    assert proxied == ['{"prompt": "one", "stop": []}', '{"prompt": "two", "stop": []}']
    [served] = [r for r in fresh_endpoint.received if r.path != "/embeddings"]  # both texts in one request
    assert (served.path, sorted(served.body), sorted(served.body["inputs"])) == (
        "/serving-endpoints/local-embeddings/invocations", ["inputs"], ["one", "two"])
