"""Flow control on an injected clock: rates and AIMD are arithmetic, not wall time.

Each test drives the limiters with a `FakeClock` whose `sleep` advances time instantly, so the
numbers asserted are the README's own ("a 429/503 halves the in-flight limit", "latency above 3 times
the best seen cuts it by a quarter, at most once per round trip", "never above the configured share").
"""

from __future__ import annotations

import asyncio

import pytest

from jobs.plan import plan_tasks
from udfs.limits import AdaptiveLimiter, RateLimiter
from udfs.spec import EngineSpec


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def request_times(rate: RateLimiter, clock: FakeClock, n: int) -> list[float]:
    async def go() -> list[float]:
        times = []
        for _ in range(n):
            await rate.acquire()
            times.append(round(clock.now, 6))
        return times
    return asyncio.run(go())


# -- requests and tokens per minute -----------------------------------------------------------------

def test_requests_per_minute_paces_after_one_seconds_burst():
    clock = FakeClock()
    rate = RateLimiter(requests_per_s=120 / 60, clock=clock, sleep=clock.sleep)  # 120 per minute
    times = request_times(rate, clock, 8)
    assert times == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # a burst of one second's worth, then 2/s


def test_a_minute_of_requests_never_exceeds_the_rate_plus_the_burst():
    clock = FakeClock()
    rate = RateLimiter(requests_per_s=600 / 60, clock=clock, sleep=clock.sleep)
    times = request_times(rate, clock, 1000)
    assert sum(t < 60 for t in times) <= 600 + 10


def test_tokens_per_minute_holds_requests_until_the_reported_usage_is_paid_back():
    clock = FakeClock()
    rate = RateLimiter(tokens_per_s=6000 / 60, clock=clock, sleep=clock.sleep)  # 100 tokens/s, 1000 banked
    request_times(rate, clock, 1)
    rate.charge_tokens(2500)  # the answer reported 2,500 tokens: 1,500 over what was banked
    [t] = request_times(rate, clock, 1)
    assert t == pytest.approx(15.01, abs=0.01)  # (1,500 + 1) / 100 tokens per second
    assert request_times(rate, clock, 1) == [t]  # paid back: the next one goes at once


def test_no_limits_never_wait():
    clock = FakeClock()
    rate = RateLimiter(clock=clock, sleep=clock.sleep)
    assert request_times(rate, clock, 100) == [0.0] * 100 and clock.slept == []


@pytest.mark.parametrize("slots, tasks", [(2, 2), (4, 4), (16, 8)])
def test_job_wide_rates_are_divided_over_the_tasks(slots, tasks):
    """README: requests and tokens per minute are job-wide, split evenly over the tasks."""
    spec = EngineSpec(url="http://127.0.0.1:9/", max_concurrency=8, requests_per_s=10.0, tokens_per_s=1000.0)
    plan = plan_tasks(8, slots)
    per_task = plan.per_task_spec(spec)
    assert plan.partitions == tasks
    assert per_task.requests_per_s * tasks == pytest.approx(10.0)
    assert per_task.tokens_per_s * tasks == pytest.approx(1000.0)


# -- AIMD on the in-flight limit --------------------------------------------------------------------

def held(limiter: AdaptiveLimiter, n: int) -> None:
    async def go() -> None:
        for _ in range(n):
            await limiter.acquire()
    asyncio.run(go())


def test_a_429_or_503_halves_the_limit_once_per_round_trip():
    clock = FakeClock()
    limiter = AdaptiveLimiter(16, clock=clock)
    for _ in range(25):  # a round trip of 0.1 s learned from successes
        held(limiter, 1)
        limiter.release(latency=0.1)
    held(limiter, 3)
    limiter.release(overloaded=True)
    assert limiter.limit == 8
    limiter.release(overloaded=True)  # answers to requests sent together: one signal, not two
    assert limiter.limit == 8
    clock.now += 0.2
    limiter.release(overloaded=True)
    assert (limiter.limit, limiter.cuts) == (4, 2)


def test_the_limit_never_goes_below_one():
    clock = FakeClock()
    limiter = AdaptiveLimiter(4, clock=clock)
    for _ in range(10):
        held(limiter, 1)
        limiter.release(overloaded=True)
        clock.now += 1.0
    assert limiter.limit == 1


def test_latency_above_three_times_the_best_cuts_by_a_quarter_once():
    clock = FakeClock()
    limiter = AdaptiveLimiter(16, clock=clock)
    for _ in range(25):
        held(limiter, 1)
        limiter.release(latency=0.05)
    limits = []
    for _ in range(40):  # the endpoint slows to 0.5 s: the average passes 3 x 0.05 after a few answers
        held(limiter, 1)
        limiter.release(latency=0.5)
        limits.append(limiter.limit)
        clock.now += 0.01
    assert 12 in limits and 16 > min(limits) >= 12  # cut by a quarter, once
    assert limiter.cuts == 1  # the new latency is then the norm: no cut after cut


def test_successes_add_back_one_at_a_time_never_above_the_share():
    clock = FakeClock()
    limiter = AdaptiveLimiter(8, clock=clock)
    held(limiter, 1)
    limiter.release(overloaded=True)
    assert limiter.limit == 4
    for _ in range(200):
        held(limiter, 1)
        limiter.release(latency=0.05)
    assert limiter.limit == 8  # the configured share is the ceiling


def test_without_adaptive_the_limit_stays_where_configured():
    limiter = AdaptiveLimiter(8, adaptive=False, clock=FakeClock())
    held(limiter, 1)
    limiter.release(overloaded=True)
    assert limiter.limit == 8


def test_acquire_waits_for_a_free_slot():
    async def go() -> list[str]:
        limiter = AdaptiveLimiter(2, adaptive=False)
        order: list[str] = []

        async def request(name: str) -> None:
            await limiter.acquire()
            order.append(f"start {name}")
            await asyncio.sleep(0)
            order.append(f"end {name}")
            limiter.release(latency=0.01)

        await asyncio.gather(*(request(n) for n in "abc"))
        assert limiter.peak == 2
        return order
    order = asyncio.run(go())
    assert order.index("start c") > min(order.index("end a"), order.index("end b"))


# -- first come, first served --------------------------------------------------------------------------

def test_a_waiting_request_is_never_overtaken_by_a_newer_one():
    async def scenario() -> list[str]:
        limiter, order = AdaptiveLimiter(1, adaptive=False), []

        async def request(name: str) -> None:
            await limiter.acquire()
            order.append(name)
            await asyncio.sleep(0)
            limiter.release()

        await limiter.acquire()  # the slot is taken
        waiting = asyncio.ensure_future(request("waited"))
        await asyncio.sleep(0)  # "waited" is now queued for the slot
        limiter.release()
        newcomer = asyncio.ensure_future(request("newcomer"))  # arrives before "waited" resumes
        await asyncio.gather(waiting, newcomer)
        assert limiter.peak == 1 and limiter.inflight == 0
        return order

    assert asyncio.run(scenario()) == ["waited", "newcomer"]


def test_a_cancelled_waiter_passes_its_slot_on():
    async def scenario() -> int:
        limiter = AdaptiveLimiter(1, adaptive=False)
        await limiter.acquire()
        first = asyncio.ensure_future(limiter.acquire())
        second = asyncio.ensure_future(limiter.acquire())
        await asyncio.sleep(0)
        limiter.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it runs: `second` must get it
        await asyncio.sleep(0)
        await asyncio.wait_for(second, 1)
        return limiter.inflight

    assert asyncio.run(scenario()) == 1
