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


def test_chunks_side_by_side_take_half_the_slots_each_and_keep_each_task_s_share_of_c_and_of_rates():
    """Two chunks run side by side (`jobs.calls.executors`): each on half the slots, every task still
    `C // S`, so any `S` tasks of either chunk stay within `C`; rates split over all `S` tasks."""
    from udfs.spec import EngineSpec

    plan = plan_tasks(64, 8).even().halved()
    assert (plan.partitions, plan.per_task, plan.tasks_at_once) == (4, (8,) * 4, 8)
    assert sum(plan.per_task) * 2 == 64
    spec = plan.per_task_spec(EngineSpec(url="http://x/", requests_per_s=80.0, tokens_per_s=800.0))
    assert (spec.requests_per_s, spec.tokens_per_s) == (10.0, 100.0)
    # One slot: nothing to halve.
    assert plan_tasks(64, 1).even().halved().partitions == 1
    # Several endpoints: every lane halved alike.
    two = plan_tasks([64, 16], 8).even().halved()
    assert two.per_lane == ((8,) * 4, (2,) * 4)


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
