"""Flow control on an injected clock: rates and AIMD are arithmetic, not wall time.

Each test drives the limiters with a `FakeClock` whose `sleep` advances time instantly, so the
numbers asserted are the README's own ("a 429/503 halves the in-flight limit", "latency per unit of
work above 1.5 times the lowest window cuts it by a quarter, at most once per round trip", "never above
the configured share").
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import time

import pytest

from jobs.calls.plan import plan_tasks
from udfs.limits import (LEARNED_TTL_S, OVERLOAD, TRANSIENT, UNAVAILABLE, AdaptiveLimiter, EndpointUnavailable,
                         Governor, Learned, OutOfTime, RateLimiter, recall, remember)
from udfs.pace import RatePace
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


class VirtualTime(FakeClock):
    """A fake clock for several coroutines at once: a sleep waits until the clock reaches its end, and
    the clock jumps to the earliest pending end once every coroutine is blocked (`run` drives it)."""

    def __init__(self) -> None:
        super().__init__()
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        fut = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._timers, (self.now + max(0.0, seconds), self._seq, fut))
        await fut

    def run(self, coro):
        async def main():
            task = asyncio.ensure_future(coro)
            while not task.done():
                for _ in range(20):  # let every runnable coroutine reach its next wait
                    await asyncio.sleep(0)
                while self._timers and self._timers[0][2].done():
                    heapq.heappop(self._timers)  # cancelled sleeps
                if self._timers and not task.done():
                    when, _, fut = heapq.heappop(self._timers)
                    self.now = max(self.now, when)
                    fut.set_result(None)
            return task.result()
        return asyncio.run(main())


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


def llm_tokens(i: int) -> int:
    """Output tokens of answer `i`: heavy-tailed (lognormal, median 25, a few over 800), fixed per i."""
    return max(1, int(25 * math.exp(1.04 * random.Random(i).gauss(0.0, 1.0))))


def serve(limiter: AdaptiveLimiter, n: int, seconds_per_token, *, work: bool = True) -> VirtualTime:
    """`n` requests through `limiter` on a virtual clock, as many at once as it lets through; answer i
    takes its tokens times `seconds_per_token(in flight when it was sent)`, plus 50 ms."""
    clock = VirtualTime()
    limiter._clock = clock

    async def one(i: int) -> None:
        await limiter.acquire()
        sent, inflight = clock.now, limiter.inflight
        tokens = llm_tokens(i)
        latency = 0.05 + tokens * seconds_per_token(inflight)
        await clock.sleep(latency)
        limiter.release(latency=latency, work=tokens if work else None, sent_at=sent)

    async def go() -> None:
        await asyncio.gather(*(one(i) for i in range(n)))
    clock.run(go())
    return clock


def test_answers_of_any_length_at_a_steady_rate_per_token_never_cut_the_limit():
    """From 0.05 s to 20 s an answer: a long answer is not overload (the defect of issue 20)."""
    limiter = AdaptiveLimiter(64, slow_start=True)
    serve(limiter, 3000, lambda inflight: 0.02)
    assert (limiter.cuts, limiter.limit, limiter.peak) == (0, 64, 64)


def test_raw_latency_without_a_measure_of_work_never_cuts():
    """A custom model's answer is a string: its latency alone says nothing about load."""
    limiter = AdaptiveLimiter(64)
    serve(limiter, 2000, lambda inflight: 0.02 * (4 if inflight > 16 else 1), work=False)
    assert (limiter.cuts, limiter.limit) == (0, 64)


def test_a_latency_per_token_that_doubles_past_k_in_flight_cuts_the_limit_toward_k():
    """An endpoint overloaded past 16 in flight: slow start measures it unloaded, the cut follows."""
    overloaded = lambda inflight: 0.02 * (2 if inflight > 16 else 1)  # noqa: E731
    limiter = AdaptiveLimiter(64, slow_start=True)
    serve(limiter, 3000, overloaded)
    assert limiter.latency_cuts >= 1 and limiter.limit <= 24
    assert limiter.limit >= limiter.floor == 16  # latency alone never below a quarter of the share
    fixed = AdaptiveLimiter(64, adaptive=False)
    serve(fixed, 3000, overloaded)
    assert fixed.limit == 64


def answers(limiter: AdaptiveLimiter, n: int, latency: float, tokens: int, sent_at: float) -> None:
    for _ in range(n):
        held(limiter, 1)
        limiter.release(latency=latency, work=tokens, sent_at=sent_at)


def test_slow_start_doubles_per_window_from_an_eighth_and_hands_over_to_the_next_task():
    clock = FakeClock()
    limiter = AdaptiveLimiter(64, slow_start=True, clock=clock)
    assert limiter.limit == 8
    answers(limiter, 8, 1.0, 50, 0.0)  # a round trip at the start limit: the baseline, 20 ms a token
    assert (limiter.limit, limiter.slow_start, limiter.baseline) == (16, True, 0.02)
    clock.now = 1.0
    answers(limiter, 15, 1.0, 50, 0.5)  # sent before the step: not this step's window
    assert limiter.limit == 16
    answers(limiter, 16, 1.0, 50, 1.0)
    assert (limiter.limit, limiter.slow_start) == (32, True)
    clock.now = 2.0
    answers(limiter, 16, 1.0, 50, 2.0)  # windows stay at 16 answers past 16 in flight
    assert (limiter.limit, limiter.slow_start) == (64, False)
    after = AdaptiveLimiter(64, slow_start=True, clock=clock)
    after.start_from(limiter.state())
    assert (after.limit, after.slow_start, after.baseline) == (64, False, 0.02)


def test_a_slow_window_in_slow_start_steps_back_to_the_last_calm_limit():
    clock = FakeClock()
    limiter = AdaptiveLimiter(64, slow_start=True, clock=clock)
    answers(limiter, 8, 1.0, 50, 0.0)
    clock.now = 1.0
    answers(limiter, 16, 1.6, 50, 1.0)  # at 16 in flight, 32 ms a token: over 1.5 times 20 ms
    assert (limiter.limit, limiter.slow_start, limiter.calm, limiter.latency_cuts) == (8, False, 8, 1)


def test_three_slow_windows_in_a_row_cut_by_a_quarter_and_count_only_answers_sent_after_the_cut():
    clock = FakeClock()
    limiter = AdaptiveLimiter(64, clock=clock)
    answers(limiter, 16, 1.0, 50, 0.0)  # 20 ms a token
    clock.now = 10.0
    answers(limiter, 32, 2.0, 50, 9.0)  # 40 ms a token: two slow windows are not yet load
    assert (limiter.limit, limiter.latency_cuts) == (64, 0)
    answers(limiter, 16, 1.0, 50, 9.0)  # a calm window between: the count starts again
    answers(limiter, 32, 2.0, 50, 9.0)
    assert limiter.latency_cuts == 0
    answers(limiter, 16, 2.0, 50, 9.0)  # the third slow window in a row
    assert (limiter.limit, limiter.latency_cuts) == (48, 1)
    answers(limiter, 64, 2.0, 50, 9.5)  # slow answers sent before the cut: the cut answered them
    assert limiter.latency_cuts == 1
    assert (limiter.limit, limiter.calm) == (48, 48)  # past the last calm limit it grows 8 times slower
    answers(limiter, 48, 2.0, 50, 10.5)  # still slow after the cut: once more
    assert (limiter.limit, limiter.latency_cuts) == (36, 2)
    assert limiter.baseline == 0.02  # slow windows above the floor never teach the baseline


def test_a_lasting_slowdown_at_the_floor_becomes_the_norm():
    """Latency alone never cuts below a quarter: a slowdown that cutting does not cure is the endpoint's."""
    clock = FakeClock()
    limiter = AdaptiveLimiter(64, clock=clock)
    answers(limiter, 16, 1.0, 50, 0.0)
    for step in range(1, 200):
        clock.now = float(step)
        answers(limiter, 16, 2.0, 50, step - 0.5)
    assert limiter.limit >= limiter.floor == 16
    assert limiter.baseline == 0.04  # the new norm: then no more cuts, and the limit climbs back
    cuts = limiter.latency_cuts
    answers(limiter, 64 * 40, 2.0, 50, 500.0)
    assert limiter.latency_cuts == cuts and limiter.limit == 64


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


# -- the governor: pause, probe, a learned rate, the breaker ------------------------------------------
# One sender on the fake clock: `acquire` waits by sleeping, which moves the clock; a request's
# outcome is reported at once (zero latency) unless a test says otherwise.

def governor(clock: FakeClock, **kw) -> Governor:
    return Governor(clock=clock, sleep=clock.sleep, jitter=lambda a, b: 0.0, **kw)


def run(coro):
    return asyncio.run(coro)


def test_a_429_pauses_the_whole_task_then_one_probe_goes_before_the_rest():
    clock = VirtualTime()
    gov = governor(clock)

    async def go() -> list[tuple[str, float, bool]]:
        events: list[tuple[str, float, bool]] = []
        assert await gov.acquire() is False
        gov.failed(OVERLOAD, False, None, "http_429: window full")
        assert gov.paused

        async def row(name: str) -> None:
            probe = await gov.acquire()
            events.append((name, clock.now, probe))
            if probe:
                gov.answered(probe)

        await asyncio.gather(row("a"), row("b"), row("c"))
        return events
    events = clock.run(go())
    assert events[0] == ("a", 0.5, True)  # one probe, after probe_first_s
    assert [(n, p) for n, _, p in events[1:]] == [("b", False), ("c", False)]  # the rest once it answered
    assert (gov.paused, gov.pauses, gov.probes) == (False, 1, 1)


def test_refused_probes_wait_half_the_time_paused_so_far_up_to_the_cap_and_a_retry_after_in_full():
    """A probe comes at most a third late after the limit reopens: a minute's window costs about
    fifteen probes, not one per row per retry."""
    clock = FakeClock()
    gov = governor(clock, probe_max_s=3.0)

    async def go() -> list[float]:
        await gov.acquire()
        gov.failed(UNAVAILABLE, False, None, "http_503: scaling from zero")
        times = []
        for _ in range(7):
            assert await gov.acquire() is True
            times.append(clock.now)
            gov.failed(UNAVAILABLE, True, None, "http_503: scaling from zero")
        assert await gov.acquire() is True
        times.append(clock.now)
        gov.failed(OVERLOAD, True, 7.0, "http_429")  # Retry-After: 7
        assert await gov.acquire() is True
        times.append(clock.now)
        return times
    times = run(go())
    assert [round(b - a, 3) for a, b in zip([0.0] + times, times)] == [0.5, 0.5, 0.5, 0.75, 1.125, 1.688, 2.531, 3.0, 7.0]


def fixed_window(limit: int, window_s: float, seconds: float, latency: float = 0.003, start: Learned | None = None,
                 **kw) -> tuple[Governor, list[tuple[float, bool]]]:
    """One sender against a fixed window of `limit` requests per `window_s`, no Retry-After."""
    clock = FakeClock()
    gov = governor(clock, **kw)
    if start is not None:
        gov.start_from(start)
    served: dict[int, int] = {}
    log: list[tuple[float, bool]] = []

    async def go() -> None:
        while clock.now < seconds:
            probe = await gov.acquire()
            w = int(clock.now // window_s)
            served[w] = served.get(w, 0) + 1
            clock.now += latency
            ok = served[w] <= limit
            log.append((clock.now, ok))
            if ok:
                gov.answered(probe)
            else:
                gov.failed(OVERLOAD, probe, None, "http_429: REQUEST_LIMIT_EXCEEDED")
    run(go())
    return gov, log


@pytest.mark.parametrize("limit, window_s", [(60, 10.0), (1000, 60.0), (20, 2.0)])
def test_under_a_fixed_window_the_rate_settles_just_under_it(limit, window_s):
    """README: the learned rate settles under a window of `limit` per `window_s` instead of bursting
    into it every window: over 30 windows at least 85% of the limit is answered, under 3% refused."""
    gov, log = fixed_window(limit, window_s, 30 * window_s)
    answered = sum(ok for _, ok in log)
    assert answered / (30 * limit) >= 0.85
    assert 1 - answered / len(log) <= 0.03
    assert gov.rate is not None and gov.rate <= 1.15 * limit / window_s


def test_without_learning_every_window_is_burst_into():
    """What the learned rate saves: unpaced, the task pauses and probes its way through every window."""
    learned, log = fixed_window(60, 10.0, 300.0)
    fixed, fixed_log = fixed_window(60, 10.0, 300.0, learn=False)
    assert fixed.rate is None and fixed.pauses == 30
    assert learned.pauses < fixed.pauses
    assert sum(not ok for _, ok in log) < sum(not ok for _, ok in fixed_log) / 3


def test_the_next_task_starts_at_the_pace_the_last_one_learned():
    """Executors mode: each chunk is a new task with a new governor. Started from what the last task
    learned, its first windows are neither burst into nor learned again."""
    first, _ = fixed_window(60, 10.0, 300.0)
    learned = first.learned()
    assert learned is not None and 0.85 * 6 <= learned.rate <= 1.15 * 6  # 60 per 10 s
    _, cold = fixed_window(60, 10.0, 40.0)
    _, warm = fixed_window(60, 10.0, 40.0, start=learned)
    refused = lambda log: sum(not ok for _, ok in log)  # noqa: E731
    answered = lambda log: sum(ok for _, ok in log)  # noqa: E731
    assert refused(warm) <= 1 < refused(cold)
    assert answered(warm) >= 0.85 * 4 * 60


def test_what_was_learned_is_recalled_per_endpoint_and_share_for_a_while():
    first, _ = fixed_window(60, 10.0, 100.0)
    remember(("http://e/", 4, None), first)
    now = time.monotonic()
    got = recall(("http://e/", 4, None), now)
    assert got is not None and (got.rate, got.measured) == (first.rate, first.pace.measured)
    assert recall(("http://e/", 2, None), now) is None  # another share of the limit
    assert recall(("http://e/", 4, None), now + LEARNED_TTL_S + 1) is None  # stale
    assert governor(FakeClock(), learn=True).learned() is None  # nothing learned, nothing to hand on


def test_the_rate_is_cut_at_most_by_half_per_pause_and_never_above_the_ceiling():
    clock = FakeClock()
    gov = governor(clock, rate=10.0, ceiling=12.0)

    async def go() -> None:
        for _ in range(3):  # three answers in the first 0.2 s of a cycle
            gov.answered(await gov.acquire())
        clock.now += 60.0  # then a long silence, and a 429: the measured rate is tiny
        await gov.acquire()
        gov.failed(OVERLOAD, False, None, "http_429")
        gov.answered(await gov.acquire())
    run(go())
    assert gov.rate == pytest.approx(5.0, rel=0.01)  # halved, not cut to the 3-in-60-s measurement
    for _ in range(2000):  # 5% more per cycle (a minute until one is measured): the ceiling stops it
        clock.now += 10.0
        gov.answered()
    assert gov.rate == 12.0


def test_a_known_rate_paces_from_the_first_request():
    clock = FakeClock()
    gov = governor(clock, rate=4.0, learn=False)

    async def go() -> list[float]:
        times = []
        for _ in range(5):
            await gov.acquire()
            times.append(clock.now)
        return times
    assert run(go()) == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("kind, learns", [(OVERLOAD, True), (UNAVAILABLE, False)], ids=["429", "503"])
def test_a_window_that_stays_closed_teaches_a_rate_after_a_429_never_after_a_503(kind, learns):
    """Ten answers in the first second, then refusals until a probe is answered at 2 s: after a 429
    that is a window of 10 per 1.75 s (the middle of the refused probe and the answered one); after a
    503 (an endpoint scaling from zero) it says nothing of a rate, and the task resumes unpaced."""
    clock = FakeClock()
    gov = governor(clock)

    async def go() -> None:
        for _ in range(10):
            gov.answered(await gov.acquire())
            clock.now += 0.1
        await gov.acquire()
        gov.failed(kind, False, None, "refused")         # at 1.0 s: the task pauses
        assert await gov.acquire() is True                # the probe, at 1.5 s: refused too
        gov.failed(kind, True, None, "refused")
        assert await gov.acquire() is True                # the next, at 2.0 s: answered
        gov.answered(True)
    run(go())
    assert (clock.now, gov.pauses, gov.probes, gov.paused) == (2.0, 1, 2, False)
    if learns:
        assert gov.decreases == 1
        assert gov.rate == pytest.approx(0.9 * 10 / 1.75)  # `decrease` times the rate measured
    else:
        assert (gov.rate, gov.decreases, gov.learned()) == (None, 0, None)


def test_above_the_settled_rate_the_increase_doubles_per_quiet_window_up_to_eight_times():
    """README: `increase` (2%) of the rate per window, doubling for each whole window without a 429, at
    most 8 times: near the limit the steps stay small, a share another task left is taken back fast."""
    clock = FakeClock()
    gov = governor(clock)
    gov.start_from(Learned(rate=10.0, measured=10.0, window_s=10.0, at=0.0))  # settled: above 0.95 of 10/s

    async def go() -> None:
        await gov.acquire()  # the cycle starts at 0 s
    run(go())
    growth = []
    for _ in range(60):  # an answer a second for six windows of 10 s
        before = gov.rate
        clock.now += 1.0
        gov.answered()
        # One second of a 10 s window: the step is `increase` x rate x 1/10, times the window's growth.
        growth.append(round((gov.rate - before) / (0.02 * before * 1.0 / 10.0), 6))
    per_window = [sorted(set(growth[w * 10:(w + 1) * 10])) for w in range(6)]
    # The answer at the window's end (10 s, 20 s, ...) already counts the window as whole.
    assert per_window == [[1.0, 2.0], [2.0, 4.0], [4.0, 8.0], [8.0], [8.0], [8.0]]


def test_a_pause_voids_every_paced_slot_reserved_before_it():
    """Requests asleep on slots reserved before a pause re-reserve after it: the resumed task hands out
    new slots from its resume, so if the old ones still went the task would send at twice its pace, and
    the more requests wait (a task that may borrow slots has more), the longer it would."""
    clock = VirtualTime()
    gov = governor(clock, rate=10.0, learn=False)
    sent: list[float] = []

    async def sender() -> None:
        while clock.now < 4.0:
            probe = await gov.acquire()
            sent.append(clock.now)
            if len(sent) == 3:  # the third request, at 0.2 s, is refused: a pause of 0.5 s, then a probe
                gov.failed(OVERLOAD, probe, None, "http_429: window full")
            else:
                gov.answered(probe)

    async def go() -> None:
        await asyncio.gather(*(sender() for _ in range(20)))
    clock.run(go())
    assert gov.pauses == 1 and 0.7 in sent
    busiest = max(sum(t <= s < t + 1.0 for s in sent) for t in sent)
    assert busiest <= 10 + 1  # never more than the pace in any second, the pause's sides included


def shared_window(seed: int, rows: tuple[int, int], limit: int = 40, window_s: float = 2.0) -> dict:
    """Two tasks of 8 workers, each with its own governor and its `rows`, against one fixed window of
    `limit` per `window_s` (no Retry-After), answers in 40 to 75 ms. Requests per window, requests,
    429s, and when each task had its last answer."""
    clock = VirtualTime()
    rng = random.Random(seed)
    govs = [governor(clock), governor(clock)]
    left = list(rows)
    served: dict[int, int] = {}
    got = {"requests": 0, "refused": 0, "done": [0.0, 0.0]}

    async def worker(i: int) -> None:
        while left[i] > 0:
            left[i] -= 1
            while True:
                probe = await govs[i].acquire()
                w = int(clock.now // window_s)
                served[w] = served.get(w, 0) + 1
                ok = served[w] <= limit
                got["requests"] += 1
                await clock.sleep(0.05 * rng.uniform(0.8, 1.5))
                if ok:
                    govs[i].answered(probe)
                    got["done"][i] = clock.now
                    break
                got["refused"] += 1
                govs[i].failed(OVERLOAD, probe, None, "http_429: REQUEST_LIMIT_EXCEEDED")

    async def go() -> None:
        await asyncio.gather(*(worker(i) for i in (0, 1) for _ in range(8)))
    clock.run(go())
    got["windows"] = [served.get(w, 0) for w in range(max(served) + 1)]
    return got


@pytest.mark.parametrize("seed", range(4))
def test_a_share_a_finished_task_left_is_taken_back(seed):
    """Each task learns its part of a shared window and paces under it. When one task finishes, the
    other must take the whole window back: its increase steps once per window, and the window it
    learned is the limit's own even when its closed windows (a 429 that lasts until the window turns)
    are many windows apart: the time between two is a whole number of windows, not one. Learned
    from that time the window was tens of seconds, and the task stayed near two thirds of the limit
    for the rest of the run."""
    got = shared_window(seed, rows=(300, 900))
    alone = got["windows"][int(got["done"][0] // 2.0) + 1:-1]  # whole windows after the first task ended
    assert len(alone) >= 8
    assert sum(alone) / len(alone) >= 0.75 * 40
    assert got["refused"] / got["requests"] <= 0.05


def test_a_window_handed_on_is_kept_when_the_next_closed_one_comes_windows_later():
    """A task started from what the last one learned (a 2 s window) is paced, so its first closed
    window may come many windows in: the time since its start is not the window, and what it hands on
    is still 2 s."""
    clock = FakeClock()
    gov = governor(clock)
    gov.start_from(Learned(rate=10.0, measured=10.5, window_s=2.0, at=0.0))

    async def go() -> None:
        while clock.now < 8.0:  # four windows of answers at the pace
            gov.answered(await gov.acquire())
        await gov.acquire()
        gov.failed(OVERLOAD, False, None, "http_429")  # the window is full
        assert await gov.acquire() is True
        gov.failed(OVERLOAD, True, None, "http_429")  # still closed: a closed window
        gov.answered(await gov.acquire())
    run(go())
    learned = gov.learned()
    assert gov.decreases == 1 and learned is not None and learned.window_s == 2.0


def test_the_window_is_the_first_closed_cycle_refined_by_the_gaps_between_reopenings():
    """The first closed cycle runs from the task's first request to the window's reopening, which is
    found between a refused probe and an answered one: here it measures 2.6 s of a 2 s window. A fixed
    window reopens every window, so two reopenings are a whole number of windows apart, and each gap
    between them, over that number, is a new estimate; the lowest stands. Windows that reopen at 6 s
    and 8 s teach 2 s, and the pace's increase steps in 2 s from then on."""
    pace = RatePace(rate=None, ceiling=None, learn=True, decrease=0.9, settle=0.95, increase=0.02, now=0.0)
    pace.begin(0.0)

    def reopens(at: float, found_within: float) -> None:  # a closed window: refused, then answered
        pace.resumed(at + found_within / 2, measure=True, paused_at=at - 1.0, refused_at=at - found_within / 2,
                     probes_refused=2)

    reopens(2.6, 0.8)
    assert pace.window_s == pytest.approx(2.6)
    reopens(6.0, 0.1)
    reopens(8.0, 0.1)
    assert pace.window_s == pytest.approx(2.0)
    reopens(14.1, 0.2)  # three windows on, found a little late: 6.1 s over round(6.1 / 2.6) = 2 is 3.05 s
    assert pace.window_s == pytest.approx(2.0)


def test_a_first_probe_that_gets_through_halves_the_next_pause_s_first_wait_down_to_50_ms():
    """A limit that reopens at once (on requests in flight) costs less each time; one refused probe puts
    the first wait back at `probe_first_s`."""
    clock = FakeClock()
    gov = governor(clock)

    async def pause(refused: bool = False) -> float:
        await gov.acquire()
        gov.failed(UNAVAILABLE, False, None, "http_503")
        start = clock.now
        assert await gov.acquire() is True
        waited = clock.now - start
        if refused:
            gov.failed(UNAVAILABLE, True, None, "http_503")
            assert await gov.acquire() is True
        gov.answered(True)
        return round(waited, 6)

    async def go() -> list[float]:
        return [await pause() for _ in range(6)] + [await pause(refused=True), await pause()]
    assert run(go()) == [0.5, 0.25, 0.125, 0.0625, 0.05, 0.05, 0.05, 0.5]


def test_the_breaker_opens_when_nothing_answered_for_breaker_s_and_fails_every_waiter():
    clock = VirtualTime()
    gov = governor(clock, breaker_s=30.0, probe_max_s=4.0)

    async def go() -> list[str]:
        await gov.acquire()
        gov.failed(UNAVAILABLE, False, None, "connection_error: ConnectionRefusedError")
        outcomes: list[str] = []

        async def row() -> None:
            try:
                while True:
                    probe = await gov.acquire()
                    gov.failed(UNAVAILABLE, probe, None, "connection_error: ConnectionRefusedError")
            except EndpointUnavailable as exc:
                outcomes.append(str(exc))

        await asyncio.gather(*(row() for _ in range(3)))
        return outcomes
    outcomes = clock.run(go())
    # Probes at 0.5, 1, 1.5, 2.25, 3.375, 5.06, 7.59, 11.39 (half the time paused so far), then every
    # 4 s: the one due at 31.39 s finds 30 s without an answer.
    assert outcomes == ["nothing answered for 31s (last: connection_error: ConnectionRefusedError)"] * 3
    assert (round(clock.now, 2), gov.probes) == (31.39, 12)  # twelve requests in 31 s, not one per row per retry


def test_a_half_open_task_probes_once_and_opens_at_once_if_the_probe_fails():
    clock = FakeClock()
    gov = governor(clock, breaker_s=30.0, half_open="nothing answered for 30s (last: http_503: down)")

    async def go() -> None:
        assert await gov.acquire() is True  # the first request is a probe, at once
        gov.failed(UNAVAILABLE, True, None, "http_503: still down")
        with pytest.raises(EndpointUnavailable, match=r"^nothing answered for 30s \(last: http_503: down\); "
                                                      r"probed again in this chunk \(last: http_503: still down\)$"):
            await gov.acquire()
    run(go())
    assert clock.now == 0.0


def test_a_half_open_task_whose_probe_is_answered_runs_as_usual():
    clock = FakeClock()
    gov = governor(clock, breaker_s=30.0, half_open="down earlier")

    async def go() -> None:
        gov.answered(await gov.acquire())
        assert await gov.acquire() is False
        gov.failed(TRANSIENT, False, None, "http_500")
    run(go())
    assert gov.open_reason is None and not gov.paused


def test_a_row_out_of_budget_stops_waiting_for_the_pause():
    clock = FakeClock()
    gov = governor(clock, probe_first_s=5.0)

    async def go() -> None:
        await gov.acquire()
        gov.failed(UNAVAILABLE, False, None, "http_503")
        with pytest.raises(OutOfTime):
            await gov.acquire(deadline=2.0)
    run(go())
    assert clock.now == 2.0


def test_a_pause_of_429s_alone_keeps_the_rows_waiting_past_their_budget_and_the_breaker_up_to_max_pause_s():
    """An hourly query limit answers 429 for up to an hour: the rows wait (their budget does not run,
    `rate_paused_s` says how long), the breaker does not open, until `max_pause_s`."""
    clock = FakeClock()
    gov = governor(clock, probe_first_s=5.0, breaker_s=8.0, max_pause_s=100.0)

    async def go() -> None:
        await gov.acquire()
        gov.failed(OVERLOAD, False, None, "http_429")
        while clock.now < 90:  # every probe refused, for 90 s: past the row's deadline and the breaker
            assert await gov.acquire(deadline=2.0) is True
            gov.failed(OVERLOAD, True, None, "http_429")
        assert gov.open_reason is None and gov.rate_paused_s() == pytest.approx(clock.now)
        with pytest.raises(EndpointUnavailable, match=r"^rate limited \(429\) for 10\ds, longer than "
                                                      r"retry.max_pause_s \(100s\)"):
            while True:
                assert await gov.acquire(deadline=2.0) is True
                gov.failed(OVERLOAD, True, None, "http_429")
    run(go())
    assert clock.now < 111


def test_a_rate_limit_pause_that_turns_into_a_503_keeps_its_time_out_of_the_budget_and_the_breaker():
    clock = FakeClock()
    gov = governor(clock, probe_first_s=5.0, breaker_s=8.0, max_pause_s=100.0)

    async def go() -> None:
        await gov.acquire()
        gov.failed(OVERLOAD, False, None, "http_429")
        while clock.now < 50:
            assert await gov.acquire() is True
            gov.failed(OVERLOAD, True, None, "http_429")
        paused = gov.rate_paused_s()
        assert await gov.acquire() is True
        gov.failed(UNAVAILABLE, True, None, "http_503")  # now a 503: breaker_s counts from here
        assert gov.open_reason is None and gov.rate_paused_s() == pytest.approx(clock.now) and clock.now >= paused
        with pytest.raises(EndpointUnavailable, match=r"^nothing answered for (8|9|10)s"):
            while True:
                assert await gov.acquire() is True
                gov.failed(UNAVAILABLE, True, None, "http_503")
    run(go())


# -- tokens as AI Gateway counts them -------------------------------------------------------------------

def test_max_tokens_are_reserved_before_sending_and_usage_replaces_the_reservation():
    clock = FakeClock()
    rate = RateLimiter(tokens_per_s=100.0, clock=clock, sleep=clock.sleep)  # 1,000 tokens banked

    async def go() -> list[float]:
        times = []
        for _ in range(3):  # each reserves 25 prompt tokens + max_tokens 500
            await rate.acquire(reserve=525)
            times.append(clock.now)
        return times
    assert run(go()) == [0.0, 0.0, pytest.approx(0.51, abs=0.01)]  # the third waits for the bucket
    rate.settle(525, prompt_tokens=20, completion_tokens=30)  # the first answer used 50, not 525
    assert (rate.prompt_tokens, rate.completion_tokens) == (20, 30)
    rate.refund(525)  # the second was refused: it used nothing
    assert rate._tokens == pytest.approx(1000 - 3 * 525 + 51 + 475 + 525, abs=1)


def minute_of_requests(rate: RateLimiter, clock: FakeClock, prompt: int, completion: int) -> int:
    """Requests sent in a minute, each reserving `prompt` tokens (as estimated) and `completion` (its
    max_tokens) for output, and using exactly that."""
    async def go() -> int:
        sent = 0
        while True:
            await rate.acquire(prompt + completion, completion)
            if clock.now >= 60:
                return sent
            sent += 1
            rate.settle(prompt + completion, prompt, completion, completion)
    return run(go())


@pytest.mark.parametrize("prompt, completion, bound", [(20, 10, "output"), (400, 1, "input")])
def test_input_and_output_tokens_per_minute_are_two_budgets_each_binding_in_turn(prompt, completion, bound):
    """Foundation Model APIs limit input and output tokens per minute separately: 6,000 in, 600 out. A
    shared budget would either be the stricter (600 for both: a third of what output alone allows) or
    the sum (6,600: output at 2,200 a minute, refused). Two budgets use each to the full, never above."""
    clock = FakeClock()
    rate = RateLimiter(input_tokens_per_s=6000 / 60, output_tokens_per_s=600 / 60, clock=clock, sleep=clock.sleep)
    sent = minute_of_requests(rate, clock, prompt, completion)
    banked_in, banked_out = 1000, 100  # ten seconds of each
    assert sent * prompt <= 6000 + banked_in + prompt and sent * completion <= 600 + banked_out + completion
    if bound == "output":  # output tokens bind: 10 a second, 10 a request
        assert sent == pytest.approx((600 + banked_out) / completion, abs=1)
        shared = FakeClock()
        assert minute_of_requests(RateLimiter(tokens_per_s=600 / 60, clock=shared, sleep=shared.sleep),
                                  shared, prompt, completion) < sent / 2
    else:  # input tokens bind: 100 a second, 400 a request
        assert sent == pytest.approx((6000 + banked_in) / prompt, abs=1)


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
