"""Before the first call: the one counting pass, scratch tables beside the output, chunks by bucket."""

from __future__ import annotations

import uuid

import pytest

from jobs.calls.chunking import ChunkPlanner
from jobs.input.read import with_request_hash
from jobs.input.stage import BUCKETS, drop_stale_scratch, scratch_table, survey


def requests(spark, rows: list[tuple]):
    df = spark.createDataFrame(rows, "id long, prompt string").transform(with_request_hash("fp"))
    return df.withColumn("precheck", df["prompt"].isNull().cast("string"))


def test_survey_counts_ids_and_pending_in_one_pass(spark):
    prior = spark.createDataFrame(
        [(1, "x", "ok"), (2, "x", "error")], "id long, request_hash string, status string")
    reqs = requests(spark, [(1, "a"), (2, "b"), (3, "c"), (3, "d"), (None, "e")])
    hashed = {r["id"]: r["request_hash"] for r in reqs.collect() if r["id"] == 1}
    prior = prior.withColumn("request_hash", prior["request_hash"]).replace({"x": hashed[1]}, subset=["request_hash"])
    s = survey(reqs, prior, retry_errors=True, limit=2)
    # id 1 is final (same request, ok); 2 (another request), both 3s and the null id are pending.
    assert (s.input_rows, s.null_ids, s.repeated_ids, s.pending_all, s.pending) == (5, 1, 2, 4, 2)
    assert sum(s.histogram.values()) == 4 and all(0 <= b < BUCKETS for b in s.histogram)


def test_fixed_chunks_pack_buckets_up_to_chunk_rows():
    planner = ChunkPlanner({3: 2, 10: 1, 11: 1, 400: 3, 4095: 1}, fixed_rows=3, first_rows=99)
    chunks = []
    while (c := planner.next()) is not None:
        chunks.append((c.lo, c.hi, c.rows))
    # Identical requests share a bucket and so a chunk; every bucket is in exactly one chunk.
    assert chunks == [(3, 10, 3), (11, 399, 1), (400, 4094, 3), (4095, 4095, 1)]
    assert ChunkPlanner({3: 2, 10: 1, 11: 1, 400: 3, 4095: 1}, fixed_rows=3, first_rows=99).estimate() == 4


def test_chunks_by_rate_start_small_grow_at_most_eightfold_and_stop_at_the_cap():
    planner = ChunkPlanner({b: 100 for b in range(BUCKETS)}, fixed_rows=None, first_rows=1000,
                           max_rows=50_000, seconds=30)
    sizes = [planner.next(rate).rows for rate in (None, 1000.0, 1000.0, 3000.0, 10.0)]
    # 1,000 to measure; then 30 s at 1,000 rows/s, but at most 8x the last; then 30 s; capped at
    # 50,000; a slow endpoint shrinks the chunk back to the first size.
    assert sizes == [1000, 8000, 30000, 50000, 1000]
    # The rest at the next target: 8x the last chunk's 1,000.
    assert planner.estimate(1000.0) == 5 + -(-(409_600 - 90_000) // 8000)


def test_chunks_planned_before_any_latency_is_known_double():
    """Executors mode plans the next chunks while the first is out: they double (so chunks side by side
    start and end at different times), and the measured rate takes over once known."""
    planner = ChunkPlanner({b: 100 for b in range(BUCKETS)}, fixed_rows=None, first_rows=1000,
                           max_rows=50_000, seconds=30)
    sizes = [planner.next(rate).rows for rate in (None, None, None, 100.0)]
    assert sizes == [1000, 2000, 4000, 3000]
    assert planner.left == 409_600 - 10_000


def test_scratch_tables_sit_beside_the_output_and_a_crashed_runs_are_dropped(spark):
    name = f"test.out_{uuid.uuid4().hex[:8]}"
    assert scratch_table(name, "0123456789abcdef", "pending") == f"test.`{name[5:]}__bi_pending_0123456789ab`"
    assert scratch_table("main.gold.`t`", "ab", "outcomes") == "main.gold.`t__bi_outcomes_ab`"
    spark.sql("CREATE SCHEMA IF NOT EXISTS test")
    left = scratch_table(name, uuid.uuid4().hex, "pending")
    spark.sql(f"CREATE TABLE {left} (id long) USING DELTA")
    other = f"test.other_{uuid.uuid4().hex[:8]}"
    spark.sql(f"CREATE TABLE {other} (id long) USING DELTA")
    assert drop_stale_scratch(spark, name) == [left]
    assert not spark.catalog.tableExists(left) and spark.catalog.tableExists(other)


@pytest.mark.parametrize("histogram", [{}, {0: 0}])
def test_nothing_pending_plans_no_chunk(histogram):
    assert ChunkPlanner(histogram, fixed_rows=None, first_rows=10).next() is None
