"""A run's numbers from the rows it wrote: each request counted once, reasons rolled up, tokens estimated."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from jobs.output.commit import output_schema
from pyspark.sql import functions as F, types as T

from jobs.observe.stats import FlightSeries, bucket_us, estimate_cost, flight_series_of, run_cost, run_stats
from jobs.output.tables import ensure_schema
from tests.conftest import job_config

COLS = ["id", "prompt", "response", "status", "error", "attempts", "latency_ms", "prompt_tokens",
        "completion_tokens", "request_hash", "run_id"]


def write_rows(spark, rows: list[tuple], cols: list[str] = COLS) -> str:
    """The rows as an output table; without an `endpoint` column, every row's endpoint is `e`."""
    name = f"test.stats_{uuid.uuid4().hex[:8]}"
    schema = output_schema(T.LongType(), embeddings=False)
    df = spark.createDataFrame(rows, ", ".join(f"{c} {schema[c].dataType.simpleString()}" for c in cols))
    if "endpoint" not in cols:
        df = df.withColumn("endpoint", F.lit("e"))
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
    e = stats.by_endpoint["e"]
    assert (e.rows, e.rows_ok, e.rows_error, e.requests, e.prompt_tokens, e.completion_tokens) == (5, 3, 2, 3, 6, 6)


def test_per_endpoint_numbers_count_a_request_once_per_endpoint_it_went_to_and_price_each_its_own_way(spark):
    # A split sent the same prompt (one request_hash) to both endpoints: two requests, two bills.
    table = write_rows(spark, [
        (1, "same", "A", "ok", None, 1, 40.0, 10, 20, "h", "r1", "a"),
        (2, "same", "B", "ok", None, 1, 80.0, 10, 30, "h", "r1", "b"),
        (3, "same", "A", "ok", None, 1, 40.0, 10, 20, "h", "r1", "a"),
        (4, "bad", None, "error", "http_503: down", 3, 900.0, None, None, "h2", "r1", "b"),
    ], COLS + ["endpoint"])
    stats = run_stats(spark, table, "r1", embeddings=False)
    assert stats.distinct_requests == 3 and (stats.prompt_tokens, stats.completion_tokens) == (20, 50)
    got = {n: (e.rows, e.rows_ok, e.rows_error, e.requests, e.prompt_tokens, e.completion_tokens)
           for n, e in stats.by_endpoint.items()}
    assert got == {"a": (2, 2, 0, 1, 10, 20), "b": (2, 1, 1, 2, 10, 30)}
    a = job_config(endpoint={"name": "a", "type": "driver_proxy", "port": 3000, "price_per_1k_prompt_tokens": 1.0,
                             "price_per_1k_completion_tokens": 2.0}).endpoint
    b = job_config(endpoint={"name": "b", "type": "driver_proxy", "port": 3000, "price_per_1k_prompt_tokens": 10.0,
                             "price_per_1k_completion_tokens": 20.0}).endpoint
    assert run_cost(stats, a, [a, b]) == pytest.approx((10 * 1 + 20 * 2 + 10 * 10 + 30 * 20) / 1000)
    assert stats.by_endpoint["b"].cost == pytest.approx((10 * 10 + 30 * 20) / 1000)


def test_cost_is_tokens_times_the_configured_prices():
    e = job_config(endpoint={"name": "e", "type": "driver_proxy", "port": 3000,
                             "price_per_1k_prompt_tokens": 0.5, "price_per_1k_completion_tokens": 1.5}).endpoint
    assert estimate_cost(e, 2000, 1000) == pytest.approx(2.5)
    assert estimate_cost(job_config().endpoint, 2000, 1000) is None  # no prices, no guess


T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def calls(spark, rows: list[tuple]):
    """(request_hash, seconds after T0 sent, latency_ms, status) rows, as the output table has them."""
    return spark.createDataFrame([(h, None if at is None else T0 + timedelta(seconds=at), ms, st)
                                  for h, at, ms, st in rows],
                                 "request_hash string, sent_at timestamp, latency_ms double, status string")


def test_requests_in_flight_per_bucket_count_each_call_once_and_rows_each(spark):
    got = flight_series_of(calls(spark, [
        ("a", 0.0, 3000.0, "ok"),                          # in flight over [0, 3)
        ("b", 1.0, 1000.0, "ok"), ("b", 1.0, 1000.0, "ok"),  # [1, 2): one call, two rows that asked it
        ("c", 2.5, 2700.0, "error"),                       # [2.5, 5.2): the run's last answer
        ("p", None, None, "error"),                        # a precheck stopped it: never sent, not on the plot
    ]), most=6)  # 5.2 s in at most 6 buckets: 1 s each, the last one 0.2 s
    assert (got.start, got.bucket_s, got.span_s, got.seconds) == (T0, 1.0, 5.2, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert got.in_flight == [1.0, 2.0, 1.5, 1.0, 1.0, 1.0]
    # b's two rows end at 2.0 (bucket 2), a's at 3.0, c's at 5.2: rates over the bucket's whole second
    # (not the last bucket's 0.2 s, which would read one answer as 5 rows/s).
    assert got.rows_per_s == [0.0, 0.0, 2.0, 1.0, 0.0, 1.0]
    assert got.errors_per_s == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # exact: integer microseconds


def test_buckets_are_1_2_or_5_times_a_power_of_ten_between_60_and_150_of_them():
    assert bucket_us(5_000_000) == 50_000  # 5 s: 100 buckets of 50 ms
    assert bucket_us(3_600_000_000) == 50_000_000  # an hour: 72 buckets of 50 s
    assert bucket_us(10) == 1000  # 1 ms at least
    for span in (7_777_777, 123_456_789_012):
        assert 60 <= -(-span // bucket_us(span)) <= 150


def test_a_run_that_sent_nothing_has_no_series(spark):
    assert flight_series_of(calls(spark, [("p", None, None, "error")])) == FlightSeries()
