"""One request's life against a real server on 127.0.0.1: budgets, splitting, latency with retries.

Each test is a promise of the README's "Speed and limits" and "Failure and resume" sections, with the
README's numbers.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from jobs.local.stand_in import LocalEndpoint
from udfs.engine import Engine
from udfs.spec import EngineSpec, RetrySpec


@pytest.fixture
def ep():
    with LocalEndpoint() as endpoint:
        yield endpoint


def spec(ep: LocalEndpoint, **kw) -> EngineSpec:
    return EngineSpec(url=f"{ep.url}/", task="custom", endpoint_type="driver_proxy", **kw)


def test_row_budget_bounds_the_retries_before_max_attempts_does(ep):
    """`retry.row_budget_s`: total seconds across attempts and waits; past it the row fails."""
    ep.fault = lambda req: (503, {"Retry-After": "1"}, b'{"message": "scaling up"}')
    policy = RetrySpec(max_attempts=100, backoff_base_s=0.01, row_budget_s=1.5)
    with Engine(spec(ep, retry=policy)) as engine:
        [o] = engine.call(["x"])
    # Attempt 1 at 0 s, attempt 2 after the 1 s Retry-After; a third would start past 1.5 s.
    assert (o.status, o.attempts, o.http_status) == ("error", 2, 503)
    assert o.error.startswith("http_503: scaling up (gave up after 2 attempts, ")
    assert len(ep.received) == 2


@pytest.mark.parametrize("status", [413, 422])
def test_a_batch_refused_as_too_large_is_split_until_it_fits(ep, status):
    def fault(req):
        records = req.body["dataframe_records"]
        if len(records) > 2:  # the endpoint takes at most two records per request
            return status, {}, b'{"error_code": "BAD_REQUEST", "message": "request too large"}'
        return None

    ep.fault = fault
    batch = EngineSpec(url=f"{ep.url}/serving-endpoints/m/invocations", task="custom", rows_per_request=8)
    with Engine(batch) as engine:
        out = engine.call([f"p{i}" for i in range(8)])
    assert [(o.status, o.response) for o in out] == [("ok", f"Answer to: p{i}") for i in range(8)]
    sizes = sorted(len(r.body["dataframe_records"]) for r in ep.received)
    assert sizes == [2, 2, 2, 2, 4, 4, 8]  # 8 refused, two 4s refused, four 2s answered


def test_retry_after_as_an_http_date_is_honoured(ep):
    first: set[str] = set()

    def fault(req):
        if req.body["prompt"] not in first:
            first.add(req.body["prompt"])
            when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=2), usegmt=True)
            return 429, {"Retry-After": when}, b'{"message": "window full"}'
        return None

    ep.fault = fault
    with Engine(spec(ep, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        [o] = engine.call(["x"])
    first_at, second_at = (r.arrived for r in ep.received)
    assert (o.status, o.attempts) == ("ok", 2)
    assert second_at - first_at >= 1.0  # the date is whole seconds: 2 s ahead is at least 1 s of wait


def test_latency_ms_counts_the_whole_row_retries_and_waits_included(ep):
    """README: `latency_ms` is the wall time from the first attempt to the final answer, retries included."""
    first: set[str] = set()

    def fault(req):
        if req.body["prompt"] not in first:
            first.add(req.body["prompt"])
            return 503, {"Retry-After": "1"}, b'{"message": "busy"}'
        return None

    ep.fault = fault
    with Engine(spec(ep, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        [o] = engine.call(["x"])
    assert (o.status, o.attempts) == ("ok", 2)
    assert o.latency_ms >= 1000


@pytest.mark.parametrize("status", [429, 503])
def test_an_overload_answer_halves_the_task_s_in_flight_limit(ep, status):
    """README: a 429/503 halves the in-flight limit (AIMD); other errors do not."""
    first: set[str] = set()

    def fault(req):
        if req.body["prompt"] not in first:
            first.add(req.body["prompt"])
            return status, {}, b'{"message": "overloaded"}'
        return None

    ep.fault = fault
    with Engine(spec(ep, max_concurrency=8, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        [o] = engine.call(["x"])
        assert (o.status, engine.limiter.limit, engine.limiter.cuts) == ("ok", 4, 1)


def test_a_server_error_is_retried_without_cutting_the_limit(ep):
    ep.fault = lambda req: (500, {}, b'{"message": "bug"}') if len(ep.received) == 1 else None
    with Engine(spec(ep, max_concurrency=8, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        [o] = engine.call(["x"])
        assert (o.status, o.attempts, engine.limiter.limit) == ("ok", 2, 8)
