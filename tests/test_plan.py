"""Job-wide concurrency: the per-task split, and the peak a real multi-partition run puts on the server."""

from __future__ import annotations

import uuid

import pytest

from jobs.calls.plan import plan_tasks, split_limit, task_slots
from jobs.pipeline import run_job
from tests.conftest import job_config


@pytest.mark.parametrize("total, parts, expected", [(7, 3, (3, 2, 2)), (64, 2, (32, 32)), (1, 1, (1,))])
def test_split_limit_sums_to_the_total(total, parts, expected):
    assert split_limit(total, parts) == expected


def test_plan_never_runs_more_tasks_than_slots_or_requests():
    assert (plan_tasks(64, 8).partitions, plan_tasks(64, 8).per_task) == (8, (8,) * 8)
    assert (plan_tasks(3, 8).partitions, plan_tasks(3, 8).per_task) == (3, (1, 1, 1))
    # Slots unknown (Spark Connect without run.task_slots): one request per task, C tasks.
    assert (plan_tasks(5, None).partitions, plan_tasks(5, None).per_task) == (5, (1,) * 5)


def test_task_slots_read_from_the_session_conf(spark):
    assert task_slots(spark) == 2  # the suite's session is local[2]
    assert task_slots(spark, configured=16) == 16


@pytest.mark.parametrize("max_concurrency", [1, 3])
def test_peak_in_flight_never_exceeds_max_concurrency_across_partitions(spark, fresh_endpoint, max_concurrency):
    fresh_endpoint.latency_s = 0.05
    src = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.range(40).selectExpr("id", "concat('prompt ', id) AS prompt").createOrReplaceTempView(src)
    cfg = job_config(input={"table": src}, output={"table": f"test.peak_{uuid.uuid4().hex[:8]}"},
                     endpoint={"name": "p", "type": "driver_proxy", "url": f"{fresh_endpoint.url}/"},
                     limits={"max_concurrency": max_concurrency}, run={"task_slots": 2})
    summary = run_job(spark, cfg)
    assert summary.by_status == {"ok": 40}
    assert len(fresh_endpoint.received) == 40
    # Never above the limit, and (with two tasks sharing C = 3 as 2 + 1) really concurrent.
    assert max(1, max_concurrency - 1) <= fresh_endpoint.peak_inflight <= max_concurrency
