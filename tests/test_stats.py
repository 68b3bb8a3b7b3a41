"""A run's numbers from the rows it wrote: each request counted once, reasons rolled up, tokens estimated."""

from __future__ import annotations

import uuid

import pytest

from jobs.commit import output_schema
from pyspark.sql import types as T

from jobs.observe.stats import estimate_cost, run_stats
from jobs.tables import ensure_schema
from tests.conftest import job_config

COLS = ["id", "prompt", "response", "status", "error", "attempts", "latency_ms", "prompt_tokens",
        "completion_tokens", "request_hash", "run_id"]


def write_rows(spark, rows: list[tuple]) -> str:
    name = f"test.stats_{uuid.uuid4().hex[:8]}"
    schema = output_schema(T.LongType(), embeddings=False)
    df = spark.createDataFrame(rows, ", ".join(f"{c} {schema[c].dataType.simpleString()}" for c in COLS))
    ensure_schema(spark, name)
    df.write.format("delta").saveAsTable(name)
    return name


def test_identical_requests_count_once_and_errors_roll_up_by_reason(spark):
    table = write_rows(spark, [
        # ids 1 and 2 asked the same thing: one request, one bill.
        (1, "same", "Answer", "ok", None, 1, 50.0, 3, 4, "h-same", "r1"),
        (2, "same", "Answer", "ok", None, 1, 50.0, 3, 4, "h-same", "r1"),
        # no usage reported: 12 + 8 characters -> 3 + 2 tokens, estimated
        (3, "twelve chars", "eight ch", "ok", None, 2, 150.0, None, None, "h-est", "r1"),
        (4, "slow", None, "error", "http_503: busy (gave up after 6 attempts, 13.0s)", 6, 13000.0, None, None,
         "h-503", "r1"),
        (5, "", None, "error", "empty_prompt", 0, None, None, None, "h-empty", "r1"),
        (6, "other run", "x", "ok", None, 1, 10.0, 100, 100, "h-other", "r0"),
    ])
    stats = run_stats(spark, table, "r1", embeddings=False)
    assert (stats.rows, stats.rows_ok, stats.rows_error) == (5, 3, 2)
    assert stats.errors_by_reason == {"http_503": 1, "empty_prompt": 1}
    assert stats.distinct_requests == 3  # h-same, h-est, h-503; the empty prompt was never sent
    assert (stats.prompt_tokens, stats.completion_tokens, stats.estimated_token_requests) == (3 + 3, 4 + 2, 1)
    assert stats.latency_p50_ms == 150.0 and stats.latency_p99_ms == 13000.0


def test_cost_is_tokens_times_the_configured_prices():
    e = job_config(endpoint={"name": "e", "type": "driver_proxy", "port": 3000,
                             "price_per_1k_prompt_tokens": 0.5, "price_per_1k_completion_tokens": 1.5}).endpoint
    assert estimate_cost(e, 2000, 1000) == pytest.approx(2.5)
    assert estimate_cost(job_config().endpoint, 2000, 1000) is None  # no prices, no guess
