"""The pandas UDF's contract: one output row per input row, nulls included, dtypes as declared."""

from __future__ import annotations

import pandas as pd
from pyspark.sql import functions as F

from udfs.inference import COMPLETION_SCHEMA, EMBEDDING_SCHEMA, inference_udf, outcomes_frame
from udfs.outcome import Outcome
from udfs.spec import EngineSpec


def test_the_frame_has_the_struct_s_columns_and_nullable_integer_dtypes():
    frame = outcomes_frame([Outcome(response="a", http_status=200, attempts=1, latency_ms=1.5, prompt_tokens=3),
                            Outcome.failed("empty_prompt")], embeddings=False)
    assert list(frame.columns) == COMPLETION_SCHEMA.fieldNames()
    assert [str(frame[c].dtype) for c in ("http_status", "attempts", "prompt_tokens", "completion_tokens")] == [
        "Int32", "Int32", "Int64", "Int64"]
    assert frame["http_status"].isna().tolist() == [False, True]  # a null stays null, not 0 or NaN-as-float


def test_sent_at_is_a_utc_timestamp_in_microseconds_and_null_when_never_sent():
    frame = outcomes_frame([Outcome(response="a", sent_at=1735689600.25), Outcome.failed("empty_prompt")],
                           embeddings=False)
    assert str(frame["sent_at"].dtype) == "datetime64[us, UTC]"
    assert frame["sent_at"][0] == pd.Timestamp("2025-01-01 00:00:00.25", tz="UTC") and pd.isna(frame["sent_at"][1])


def test_embedding_frames_carry_the_vector_and_its_length():
    frame = outcomes_frame([Outcome(embedding=[0.5, 0.25]), Outcome.failed("bad_response: x")], embeddings=True)
    assert list(frame.columns) == EMBEDDING_SCHEMA.fieldNames()
    assert frame["dim"].tolist()[0] == 2 and frame["dim"].isna().tolist() == [False, True]


def test_every_input_row_gets_exactly_one_outcome_row(spark, fresh_endpoint):
    spec = EngineSpec(url=f"{fresh_endpoint.url}/", task="custom", endpoint_type="driver_proxy")
    df = spark.createDataFrame([(i, None if i % 3 == 0 else f"p{i}") for i in range(10)], "id int, prompt string")
    out = df.repartition(2).select("id", "prompt", inference_udf(spec, [2, 2])("prompt").alias("o")).select(
        "id", "prompt", "o.*").collect()
    assert sorted(r["id"] for r in out) == list(range(10))
    assert all((r["status"], r["response"]) == (("ok", f"Answer to: {r['prompt']}") if r["prompt"] else
                                                 ("error", None)) for r in out)
    assert {r["error"] for r in out if r["prompt"] is None} == {"empty_prompt"}
    assert all((r["sent_at"] is None) == (r["prompt"] is None) for r in out)  # sent rows only
    assert out and F is not None
