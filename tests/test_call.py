"""Calling: each distinct request once, its answer to every row that asked, prechecked rows untouched."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
from chispa import assert_df_equality

from jobs.calls.outcomes import DriverChunk, common_dim, with_outcomes
from jobs.calls.plan import plan_tasks
from udfs.outcome import Outcome
from udfs.spec import EngineSpec


def rows(*items: tuple) -> pa.Table:
    ids, prompts, hashes, prechecks = zip(*items)
    return pa.table({"id": list(ids), "country": ["FR"] * len(ids), "prompt": list(prompts),
                     "request_hash": list(hashes), "precheck": list(prechecks), "_exists": [False] * len(ids)})


def test_a_driver_chunk_sends_each_distinct_request_once_and_lands_every_row():
    chunk = DriverChunk(rows((1, "a", "ha", None), (2, "a", "ha", None), (3, "", "hb", "empty_prompt"),
                             (4, "c", "hc", None)), embeddings=False)
    assert chunk.prompts == ["a", "c"]
    landed = chunk.landed([Outcome(response="A", http_status=200, attempts=1, sent_at=1735689600.5),
                           Outcome.failed("http_500: down", http_status=500, attempts=6, sent_at=1735689601.0)])
    assert landed.column_names[:3] == ["id", "country", "prompt"]  # kept columns ride after the id
    got = list(zip(*(landed.column(c).to_pylist() for c in ("id", "response", "status", "error", "attempts"))))
    assert got == [(1, "A", "ok", None, 1), (2, "A", "ok", None, 1), (3, None, "error", "empty_prompt", 0),
                   (4, None, "error", "http_500: down", 6)]
    assert landed.schema.field("sent_at").type == pa.timestamp("us", tz="UTC")
    at = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert landed.column("sent_at").to_pylist() == [at + timedelta(seconds=0.5), at + timedelta(seconds=0.5), None,
                                                    at + timedelta(seconds=1)]  # rows sharing a call share its time


def test_a_driver_chunk_turns_a_vector_of_another_length_into_an_error_row():
    chunk = DriverChunk(rows((1, "a", "ha", None), (2, "b", "hb", None)), embeddings=True)
    outcomes = [Outcome(embedding=[0.1, 0.2]), Outcome(embedding=[0.1, 0.2, 0.3])]
    assert common_dim(outcomes + [Outcome(embedding=[1.0, 2.0, 3.0])]) == 3
    landed = chunk.landed(outcomes, dim=2, why="endpoint.embedding_dim")
    assert landed.column("dim").to_pylist() == [2, None]
    assert landed.column("error").to_pylist() == [
        None, "dimension_mismatch: 3 values, expected 2 (endpoint.embedding_dim)"]


def test_with_outcomes_calls_once_per_request_and_joins_the_answer_back(spark, fresh_endpoint):
    spec = EngineSpec(url=f"{fresh_endpoint.url}/", task="custom", endpoint_type="driver_proxy")
    df = spark.createDataFrame([(1, "FR", "same", "h1", None), (2, "DE", "same", "h1", None),
                                (3, "IT", "", "h2", "empty_prompt")],
                               "id long, country string, prompt string, request_hash string, precheck string")
    called = df.transform(with_outcomes(spec, plan_tasks(2, 2))).select("id", "country", "response", "status", "error")
    out = spark.createDataFrame(called.collect(), called.schema)  # one action: each action calls again
    expected = spark.createDataFrame([(1, "FR", "Answer to: same", "ok", None), (2, "DE", "Answer to: same", "ok", None),
                                      (3, "IT", None, "error", "empty_prompt")],
                                     "id long, country string, response string, status string, error string")
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)
    assert [r.body["prompt"] for r in fresh_endpoint.received] == ["same"]
