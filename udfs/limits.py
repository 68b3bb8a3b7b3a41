"""Flow control for one task: the governor (pauses, probes, the breaker; its learned rate is
`udfs.pace`), an adaptive in-flight limit, and request/token rate limits.

All live in the engine's event loop (one thread, so no locks) and take an injected clock. The job
gives each task its share of the job-wide limits (see `jobs.calls.plan`), so the sum over the tasks running
at once never exceeds what the config allows.

Example::

    limiter = AdaptiveLimiter(16, slow_start=True)
    await limiter.acquire(); ...; limiter.release(latency=2.4, work=120, sent_at=t0)  # 120 output tokens
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable

from udfs.pace import Learned, RatePace

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

log = logging.getLogger("batch_inference")


# What the last task of each endpoint (and share of the limit) in this process learned. In executors
# mode each chunk is a new Spark job, so a new task and a new governor; Python workers are reused
# across tasks, so the next chunk's task starts at the pace the last one settled at instead of
# bursting into a window the last chunk may already have used up, and learning it all again.
_LEARNED: dict[Hashable, Learned] = {}
LEARNED_TTL_S = 600.0


def remember(key: Hashable, governor: Governor) -> None:
    learned = governor.learned()
    if learned is not None:
        _LEARNED[key] = learned


def recall(key: Hashable, now: float | None = None) -> Learned | None:
    """What a governor of `key` learned in this process within `LEARNED_TTL_S`, if anything."""
    learned = _LEARNED.get(key)
    now = time.monotonic() if now is None else now
    return learned if learned is not None and now - learned.at <= LEARNED_TTL_S else None


class EndpointUnavailable(Exception):
    """The task's breaker is open: nothing has answered for `breaker_s`; the rest of the rows fail fast."""


class OutOfTime(Exception):
    """A row's budget would run out while the task waits for the endpoint to come back."""


# How a failed request bears on the task's sending (`Governor.failed`).
OVERLOAD = "overload"        # 429: the rate is over the endpoint's limit; pause, probe, learn the rate
UNAVAILABLE = "unavailable"  # 503, or no connection at all: pause and probe; not a rate signal
TRANSIENT = "transient"      # a 5xx, a timeout, a reset: the row retries on its own backoff


class Governor:
    """The task's sending as a whole: one pause for the task, not a retry storm per row.

    - **Pause and probe.** A 429, a 503 or an endpoint that takes no connection pauses every request of
      the task. After the pause (the server's `Retry-After`, else `probe_first_s`; after a refused
      probe, half the time paused so far, up to `probe_max_s`) exactly one request goes as a probe;
      the task resumes when it is answered. Requests already in flight finish; their answers do not end the pause.
    - **A learned rate** (`udfs.pace.RatePace`). A pause caused by a 429 ends a *cycle*, and the pace
      learns from it what the endpoint's window lets through; the task resumes paced at that. A
      pause voids every paced slot reserved before it. Until the first such 429 the task is unpaced,
      unless a starting `rate` is known (the endpoint's AI Gateway limits,
      `limits.requests_per_minute`); `ceiling` (requests/s) is never exceeded. A 429 whose first probe
      gets through while unpaced is about requests in flight (`AdaptiveLimiter` halves those) and
      teaches no rate; nor do 503s and lost connections: an endpoint scaling from zero says nothing
      about its rate. A first probe that got through halves the next pause's first wait (down to
      50 ms), so that a limit that reopens at once costs little.
    - **A breaker.** When nothing has answered for `breaker_s` while requests failed, the breaker opens:
      every waiting and later `acquire` raises `EndpointUnavailable`, and the rows fail fast. Started
      `half_open` (the run's endpoint was unavailable in an earlier chunk) the task sends one probe
      first, and the breaker opens if it fails.
    - **A long rate limit pauses, it does not fail.** While every failure since the last answer is a 429
      (an hourly query limit answers 429 for up to an hour), the pause may last `max_pause_s`: the breaker
      waits that long instead of `breaker_s`, no row runs out of time while it lasts (`acquire` ignores
      its deadline, and `rate_paused_s` is what callers leave out of a row's budget), and the log says
      "paused: rate limit, resuming at HH:MM". Past `max_pause_s` the breaker opens.

    One event loop, no locks; `clock` and `sleep` are injected so that tests run on a fake clock.

    Example::

        probe = await governor.acquire(deadline)      # waits out pauses and pacing
        ... send ...
        governor.answered(probe)   # or governor.failed(OVERLOAD, probe, retry_after, "http_429: ...")
    """

    def __init__(self, *, rate: float | None = None, ceiling: float | None = None, learn: bool = True,
                 breaker_s: float = 480.0, max_pause_s: float = 3600.0, half_open: str | None = None,
                 probe_first_s: float = 0.5, probe_max_s: float = 10.0,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
                 jitter: Callable[[float, float], float] = random.uniform) -> None:
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        now = clock()
        self.pace = RatePace(rate=rate, ceiling=ceiling, learn=learn, now=now)  # its step sizes: `udfs.pace`
        self.breaker_s = breaker_s
        self.max_pause_s = max_pause_s
        # Every failure since the last answer a 429; seconds spent in such pauses before this one;
        # whether this pause was announced in the log.
        self._only_429 = True
        self._rate_paused_before = 0.0
        self._announced = False
        self.probe_first_s, self.probe_max_s = probe_first_s, probe_max_s
        # The breaker: when the endpoint last answered, and what failed since.
        self._last_alive = now - breaker_s if half_open else now
        self._failures = 0
        self._half_open = half_open
        self._last_failure = ""
        self.open_reason: str | None = None
        # The pause: started half-open, the first request is a probe.
        self.paused = bool(half_open)
        self._probing = False
        self._probe_at = now
        self._probe_delay = probe_first_s
        self._refused_at = now  # the last moment the endpoint was known to refuse
        self._paused_at = now
        self._probes_refused = 0
        # The first probe's delay: halved each time the first probe got through (a limit that reopens
        # at once, as a concurrency limit does), back to probe_first_s when one is refused.
        self._first_probe = probe_first_s
        self._rate_pause = False
        # Pacing: the next free slot.
        self._next = -math.inf
        self._waiters: list[asyncio.Future[None]] = []
        self.pauses = self.probes = 0
        self.answered_once = False  # any answer in this governor's life: the endpoint was up

    # -- what is learned, to hand on ---------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """The pace (requests/s), None while unpaced."""
        return self.pace.rate

    @property
    def decreases(self) -> int:
        """How many times a 429 cycle cut the pace."""
        return self.pace.decreases

    def learned(self) -> Learned | None:
        """The learned pace, if this governor learned one (a 429 cycle measured it)."""
        return self.pace.learned()

    def start_from(self, learned: Learned) -> None:
        """Start at the pace an earlier governor of the same endpoint and share settled at."""
        self.pace.start_from(learned)

    # -- sending ---------------------------------------------------------------------------------

    def ready_in(self, now: float | None = None) -> float | None:
        """Seconds until `acquire` would let a request go without waiting (0: now); None while it waits
        on something other than time (a probe in flight) or the breaker is open. For a router choosing
        between endpoints (`udfs.router`), which must not queue a row behind a pause."""
        now = self._clock() if now is None else now
        if self.open_reason is not None:
            return None
        if self.paused:
            return None if self._probing else max(0.0, self._probe_at - now)
        return max(0.0, self._next - now) if self.rate else 0.0

    async def acquire(self, deadline: float | None = None) -> bool:
        """Wait until a request may go; True if it goes as the probe of a pause.

        Raises `EndpointUnavailable` once the breaker is open, `OutOfTime` if `deadline` (clock time)
        passes while the task is paused.
        """
        while True:
            if self.open_reason is not None:
                raise EndpointUnavailable(self.open_reason)
            now = self._clock()
            self.pace.begin(now)
            if self.paused:
                self._check_breaker(now)
                if self.open_reason is not None:
                    continue
                if not self._probing and now >= self._probe_at:
                    self._probing = True
                    self.probes += 1
                    return True
                if self._rate_limited(now):
                    deadline = None  # a long rate limit: the rows wait, up to max_pause_s
                if deadline is not None and now >= deadline:
                    raise OutOfTime
                wait = None if self._probing else self._probe_at - now
                if deadline is not None:
                    wait = deadline - now if wait is None else min(wait, deadline - now)
                await self._wait(wait)
                continue
            if self.rate:
                # Paced by reservation, no burst: a fixed window punishes a burst at its start.
                slot = max(self._next, now)
                self._next = slot + 1.0 / self.rate
                if slot > now:
                    pauses = self.pauses
                    await self._sleep(slot - now)
                    if self.paused or self.open_reason is not None or self.pauses != pauses:
                        # A pause began meanwhile (and may have ended: the resume hands out slots
                        # afresh): the slot is void.
                        continue
            return False

    def answered(self, probe: bool = False) -> None:
        """The endpoint answered (a 2xx, or a refusal of this request such as 400 or 401): it is up."""
        self.answered_once = True
        now = self._clock()
        self._last_alive, self._failures, self._half_open = now, 0, None
        self._only_429 = True
        if probe and self.paused:
            self._resume(now)
        self.pace.answered(now, paused=self.paused)

    def failed(self, kind: str, probe: bool = False, retry_after: float | None = None, reason: str = "") -> None:
        """A request failed: `OVERLOAD` or `UNAVAILABLE` pause the task, `TRANSIENT` only counts."""
        now = self._clock()
        self._failures += 1
        if self._only_429 and kind != OVERLOAD and self.paused and self._rate_pause:
            # A rate-limit pause turns into something else (a 503, no connection): the time it was a rate
            # limit stays out of the rows' budgets, and its 429s were answers, so the breaker counts from here.
            self._rate_paused_before += now - self._paused_at
            self._last_alive = max(self._last_alive, now)
        self._only_429 = self._only_429 and kind == OVERLOAD
        self._last_failure = reason or self._last_failure
        wait = None if retry_after is None else retry_after + self._jitter(0, min(1.0, 0.1 + retry_after * 0.05))
        if probe and self.paused:
            self._probing = False
            self._refused_at = now
            self._probes_refused += 1
            # Half the time paused so far: a probe comes at most a third late after the limit reopens,
            # and a minute's window costs about fifteen probes.
            self._probe_delay = max(self._first_probe, min(self.probe_max_s, 0.5 * (now - self._paused_at)))
            self._probe_at = now + (wait if wait is not None else self._probe_delay)
            self._announce(now, wait)
        elif kind in (OVERLOAD, UNAVAILABLE):
            if not self.paused:
                self._pause(now, kind == OVERLOAD)
                self._probe_at = now + (wait if wait is not None else self._probe_delay)
            elif wait is not None:
                self._probe_at = max(self._probe_at, now + wait)
            self._refused_at = now
        self._check_breaker(now)
        self._wake()

    # -- state -----------------------------------------------------------------------------------

    def rate_paused_s(self, now: float | None = None) -> float:
        """Seconds this task has spent in rate-limit pauses (429s only) so far, the current one included:
        time a row's budget does not count."""
        now = self._clock() if now is None else now
        current = now - self._paused_at if self.paused and self._rate_pause and self._only_429 else 0.0
        return self._rate_paused_before + current

    def _rate_limited(self, now: float) -> bool:
        """In a pause of 429s alone, within `max_pause_s`."""
        return (self.paused and self._rate_pause and self._only_429 and self._half_open is None
                and now - self._paused_at < self.max_pause_s)

    def _announce(self, now: float, wait: float | None) -> None:
        """Once per rate-limit pause, at its second refused probe (a window that stays closed): say so."""
        if self._announced or not (self._rate_pause and self._only_429) or self._probes_refused < 2:
            return
        self._announced = True
        latest = self._paused_at + self.max_pause_s
        resume = min(latest, now + wait) if wait is not None else latest
        at = time.strftime("%H:%M", time.gmtime(time.time() + (resume - now)))
        how = "as the endpoint's Retry-After says" if wait is not None else (
            f"at the latest (retry.max_pause_s: {self.max_pause_s:.0f}s); probing every {self.probe_max_s:.0f}s "
            "or sooner")
        log.warning("paused: rate limit, resuming at %s UTC %s; rows wait, they do not fail (last: %s)",
                    at, how, self._last_failure or "429")

    def _pause(self, now: float, rate_signal: bool) -> None:
        self.paused = True
        self.pauses += 1
        self._paused_at, self._probes_refused = now, 0
        self._rate_pause = rate_signal
        self._probe_delay = self._first_probe

    def _resume(self, now: float) -> None:
        if self._rate_pause and self._only_429:
            self._rate_paused_before += now - self._paused_at
        if self._announced:
            log.warning("resumed after a rate-limit pause of %.0fs", now - self._paused_at)
            self._announced = False
        self.pace.resumed(now, measure=self._rate_pause, paused_at=self._paused_at, refused_at=self._refused_at,
                          probes_refused=self._probes_refused)
        self._first_probe = (max(0.05, self._first_probe / 2) if self._probes_refused == 0
                             else self.probe_first_s)
        self.paused = self._probing = self._rate_pause = False
        self._next = now + (1.0 / self.rate if self.rate else 0.0)  # the probe took this slot
        self._wake()

    def _check_breaker(self, now: float) -> None:
        if self.open_reason is None and self._failures and self._rate_limited(now):
            return  # a long rate limit: the endpoint answers (429), the task waits up to max_pause_s
        if self.open_reason is None and self._failures and now - self._last_alive >= self.breaker_s:
            if self._half_open is not None:
                reason = f"{self._half_open}; probed again in this chunk"
            elif self.paused and self._rate_pause and self._only_429:
                reason = (f"rate limited (429) for {now - self._paused_at:.0f}s, longer than retry.max_pause_s "
                          f"({self.max_pause_s:.0f}s)")
            else:
                reason = f"nothing answered for {now - self._last_alive:.0f}s"
            self.open_reason = f"{reason} (last: {self._last_failure})" if self._last_failure else reason
            self._wake()

    async def _wait(self, timeout: float | None) -> None:
        """Until `_wake` (a pause ended, a probe failed, the breaker opened) or `timeout` seconds."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            if timeout is None:
                await fut
                return
            sleeper = asyncio.ensure_future(self._sleep(max(0.0, timeout)))
            try:
                await asyncio.wait({fut, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
        finally:
            if not fut.done():
                fut.cancel()
                self._waiters = [w for w in self._waiters if w is not fut]

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


# Latency cuts (`AdaptiveLimiter`): the per-unit latency of a window of answers against the lowest of
# the recent windows. An LLM's answer takes time in proportion to what it generates, so only latency
# per unit of work (per output token, per embedded row) says anything about load.
LATENCY_WINDOW = 16        # answers per window (sent after the last cut)
BASELINE_WINDOWS = 64      # windows the baseline (their median per-unit latency) remembers
SLOW_WINDOWS = 3           # consecutive slow windows before a cut: one is noise (a mix of prompts)
ABOVE_CALM_SLOWER = 8      # additive increase past the last calm limit: once per 8 round trips
LATENCY_FLOOR_SHARE = 0.25  # latency alone never takes the limit below this share of the maximum
SLOW_START_SHARE = 0.125    # where a limit that measures latency starts: 1/8 of its maximum


@dataclass(frozen=True)
class LimiterState:
    """What a task's in-flight limit learned, handed to the next chunk's task (as `Learned` is)."""
    limit: float
    baseline: float | None
    calm: float
    slow_start: bool
    at: float


_LIMITS: dict[Hashable, LimiterState] = {}


class AdaptiveLimiter:
    """AIMD on the number of requests in flight, never above `max_limit` nor below 1.

    - **Overload said by the endpoint** (429, 503): the limit halves, at most once per round trip, as
      TCP does, so a burst of 429s answering requests sent together counts once.
    - **Overload seen in latency, per unit of work**: each answer reports its latency and its work
      (output tokens from `usage`, rows for embeddings; none for a custom model's string). Answers are
      taken in windows of `LATENCY_WINDOW`; a window's latency per unit is its summed latency over its
      summed work, which a few long answers of an LLM dominate as they dominate its time. The
      baseline is the median of the last `BASELINE_WINDOWS` windows. `SLOW_WINDOWS` windows in a
      row above `latency_factor` times the baseline cut the limit by a quarter (one slow window is a
      mix of prompts, not load), and only requests sent after a cut count toward the next (at most
      one cut per round trip). Latency alone never cuts below `LATENCY_FLOOR_SHARE` of `max_limit`:
      it cannot tell our load from the endpoint's other users, so a lasting slowdown of the
      endpoint's own becomes the norm once it fills half the baseline's windows, and meanwhile costs
      at most three quarters of the limit. Raw latency never cuts: a long answer is not overload.
    - **Slow start** (`slow_start`, for a limiter that measures work): the limit starts at
      `SLOW_START_SHARE` of its maximum and doubles after each window of answers sent at it (one round
      trip: as many answers as the limit, 4 to `LATENCY_WINDOW`) that is not slow, until it reaches the maximum; a slow window halves it back to the last good step and
      ends slow start. So the baseline is measured at low load, before we could overload the
      endpoint, and a knee in the endpoint's latency is found on the way up.
    - **Additive increase**: after slow start, a run of `limit` answers adds one; past `calm` (the
      limit a latency cut last came down to), a run of `ABOVE_CALM_SLOWER` times as many.
    """

    def __init__(self, max_limit: int, *, adaptive: bool = True, latency_factor: float = 1.5,
                 slow_start: bool = False, clock: Clock = time.monotonic) -> None:
        if max_limit < 1:
            raise ValueError("max_limit must be >= 1")
        self._clock = clock
        self.max_limit = max_limit
        self.adaptive = adaptive
        self.slow_start = adaptive and slow_start and max_limit > 1
        self.limit = float(max(1, math.ceil(max_limit * SLOW_START_SHARE)) if self.slow_start else max_limit)
        self.latency_factor = latency_factor
        self.floor = max(1.0, math.floor(max_limit * LATENCY_FLOOR_SHARE))
        self.inflight = 0
        self.peak = 0
        self.cuts = self.latency_cuts = 0
        # Called after each release (a slot may be free): a router waiting for one of several endpoints.
        self.on_release: Callable[[], None] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._streak = 0
        self._ewma: float | None = None
        # Since when answers count toward a window: the last cut or slow-start step (once per round trip).
        self._epoch = -math.inf
        self._window = [0.0, 0.0, 0]  # latency, work, answers
        self._windows: deque[float] = deque(maxlen=BASELINE_WINDOWS)  # per-unit latency of each window
        self._slow = 0  # consecutive windows above the baseline's bound
        self.calm = float(max_limit)  # the highest limit known not to slow the endpoint down
        self._floored = False  # latency cut the limit to the floor, and windows are slow still
        self.baseline: float | None = None

    def state(self) -> LimiterState:
        return LimiterState(self.limit, self.baseline, self.calm, self.slow_start, time.monotonic())

    def start_from(self, state: LimiterState) -> None:
        """Go on where the last task of the same endpoint and share left off (no second slow start)."""
        self.limit = min(float(self.max_limit), max(1.0, state.limit))
        self.slow_start = self.slow_start and state.slow_start
        self.calm = min(float(self.max_limit), state.calm)
        if state.baseline is not None:
            self.baseline = state.baseline
            self._windows.append(state.baseline)

    async def acquire(self) -> None:
        """A slot, first come first served: a request that waited is never overtaken by a newer one.

        `release` hands its slot straight to the oldest waiter. Were the woken waiter to compete again,
        a newcomer could take the slot first, again and again: one request of an early batch could
        then wait behind whole later batches, and the batch, handed back in order, with it.
        """
        if self.inflight < max(1, int(self.limit)) and not self._waiters:
            self.inflight += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # on wake-up the slot is ours: `release` counted it
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._hand_over(self.inflight - 1)  # given a slot while being cancelled: pass it on
                raise
        self.peak = max(self.peak, self.inflight)

    def release(self, *, overloaded: bool = False, latency: float | None = None, work: float | None = None,
                sent_at: float | None = None) -> None:
        """A request is done: `overloaded` (429/503), or answered after `latency` seconds for `work`
        units (None: the answer does not say), sent at `sent_at` (the limiter's clock)."""
        if self.adaptive:
            self._adapt(overloaded, latency, work, sent_at)
        self._hand_over(self.inflight - 1)
        if self.on_release is not None:
            self.on_release()

    def held_back(self, n: int) -> None:
        """`n` more (or fewer) requests wait before this limiter, held by the governor (a pause, pacing):
        nothing to do here; a pooled limiter lends none of its share meanwhile (`udfs.hostpool`)."""

    def has_room(self) -> bool:
        """Whether `acquire` would take a slot now, without waiting."""
        return self.inflight < max(1, int(self.limit)) and not self._waiters

    def _hand_over(self, inflight: int) -> None:
        self.inflight = inflight
        while self.inflight < max(1, int(self.limit)) and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(None)

    def _adapt(self, overloaded: bool, latency: float | None, work: float | None, sent_at: float | None) -> None:
        if overloaded:
            now = self._clock()
            rtt = self._ewma if self._ewma is not None else 0.1
            if now - self._epoch >= rtt:
                self._cut(0.5, 1.0, now)
            self._streak = 0
            return
        if latency is None:
            return
        self._ewma = latency if self._ewma is None else 0.9 * self._ewma + 0.1 * latency
        if work and work > 0 and (sent_at is None or sent_at >= self._epoch):
            self._window_add(latency, work)
        if self.slow_start:
            return  # slow start steps once per window (`_window_end`)
        self._streak += 1
        # Past the last calm limit, where latency was seen to climb, the limit grows 8 times slower: a
        # probe above a knee costs windows of slow answers.
        if self._streak >= int(self.limit) * (ABOVE_CALM_SLOWER if self.limit >= self.calm else 1) \
                and self.limit < self.max_limit:
            self.limit = min(float(self.max_limit), math.floor(self.limit) + 1.0)
            self._streak = 0

    def _window_add(self, latency: float, work: float) -> None:
        w = self._window
        w[0], w[1], w[2] = w[0] + latency, w[1] + work, w[2] + 1
        # In slow start a step lasts one round trip (a window as large as the limit, at least 4 answers),
        # so a small limit does not send for long at a fraction of its share.
        if w[2] >= (min(LATENCY_WINDOW, max(4, int(self.limit))) if self.slow_start else LATENCY_WINDOW):
            self._window = [0.0, 0.0, 0]
            self._window_end(w[0] / w[1])

    def _window_end(self, per_unit: float) -> None:
        """A window of answers sent since the last change of the limit: compare, then step or cut."""
        base = self.baseline
        slow = base is not None and per_unit > self.latency_factor * base
        # The baseline learns from windows that were not slow at a load known to be calm (at most the
        # last step of slow start that was not slow: above it, a latency creeping up with the load
        # would become the norm step by step), and from windows at the floor: there cutting is over,
        # so a slowdown is the endpoint's own, and it becomes the norm.
        if (not slow and self.limit <= self.calm) or (slow and self._floored):
            self._windows.append(per_unit)
            self.baseline = statistics.median(self._windows)
            if slow and per_unit <= self.latency_factor * self.baseline:
                self.calm = float(self.max_limit)  # the slowdown is the norm now: no knee known
        self._floored = self._floored and slow
        now = self._clock()
        if self.slow_start:
            if slow:  # back to the last step's limit, which was not slow
                self._cut(0.5, 1.0, now)
                self.calm = self.limit
                self.latency_cuts += 1
            else:
                self.limit = min(float(self.max_limit), 2 * self.limit)
                self.slow_start = self.limit < self.max_limit
                self._epoch = now
            return
        self._slow = self._slow + 1 if slow else 0
        if self._slow >= SLOW_WINDOWS and not self._floored:
            self._cut(0.75, self.floor, now)
            self._floored = self.limit <= self.floor
            self.calm = self.limit
            self.latency_cuts += 1

    def _cut(self, factor: float, floor: float, now: float) -> None:
        self.limit = max(floor, self.limit * factor)
        self._epoch = now
        self.cuts += 1
        self.slow_start = False
        self._streak = self._slow = 0
        self._window = [0.0, 0.0, 0]


def remember_limit(key: Hashable, limiter: AdaptiveLimiter) -> None:
    if limiter.adaptive:
        _LIMITS[key] = limiter.state()


def recall_limit(key: Hashable, now: float | None = None) -> LimiterState | None:
    """What a limiter of `key` learned in this process within `LEARNED_TTL_S`, if anything."""
    state = _LIMITS.get(key)
    now = time.monotonic() if now is None else now
    return state if state is not None and now - state.at <= LEARNED_TTL_S else None


class RateLimiter:
    """Requests per second and tokens per second for one task; `None` means unlimited.

    Requests are paced by reservation (each caller books the next free slot), with a burst of one
    second's worth. Tokens are counted as AI Gateway counts them: a request reserves its estimated
    prompt tokens plus `max_tokens` (when set) before it is sent, and the answer's `usage` (prompt and
    completion tokens, counted separately) then replaces the reservation. The bucket may go below zero;
    new requests then wait until it refills.

    Where input and output tokens are limited separately (Foundation Model APIs' pay-per-token limits:
    input tokens per minute and output tokens per minute), each has a bucket of its own: the estimated
    prompt tokens are reserved from the input bucket, `max_tokens` (`completion`) from the output
    bucket, and the answer's prompt and completion tokens settle each. A request waits until every
    bucket that limits it has tokens.
    """

    def __init__(self, requests_per_s: float | None = None, tokens_per_s: float | None = None, *,
                 input_tokens_per_s: float | None = None, output_tokens_per_s: float | None = None,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self._clock, self._sleep = clock, sleep
        self._interval = 1.0 / requests_per_s if requests_per_s else 0.0
        self._burst = max(1.0, requests_per_s or 0.0)
        self._next = -math.inf  # the first second's worth may go at once
        self._tps = tokens_per_s
        self._capacity = max(1.0, (tokens_per_s or 0.0) * 10)  # ten seconds of tokens
        self._tokens = self._capacity
        self._stamp = clock()
        self._input = _TokenBucket(input_tokens_per_s, clock) if input_tokens_per_s else None
        self._output = _TokenBucket(output_tokens_per_s, clock) if output_tokens_per_s else None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    async def acquire(self, reserve: int = 0, completion: int = 0) -> float:
        """Wait until a request may go, then reserve `reserve` tokens for it (`completion` of them its
        output: `max_tokens`); returns the seconds waited."""
        waited = 0.0
        while self._tps or self._input or self._output:
            pause = 0.0
            if self._tps:
                self._refill()
                pause = max(pause, (1 - self._tokens) / self._tps if self._tokens <= 0 else 0.0)
            for bucket in (self._input, self._output):
                if bucket is not None:
                    pause = max(pause, bucket.wait())
            if pause <= 0:
                if self._tps:
                    self._tokens -= reserve
                if self._input is not None:
                    self._input.take(reserve - completion)
                if self._output is not None:
                    self._output.take(completion)
                break
            await self._sleep(pause)
            waited += pause
        if self._interval:
            now = self._clock()
            slot = max(self._next, now - (self._burst - 1) * self._interval)
            self._next = slot + self._interval
            if slot > now:
                await self._sleep(slot - now)
                waited += slot - now
        return waited

    def settle(self, reserved: int, prompt_tokens: int | None, completion_tokens: int | None,
               completion: int = 0) -> None:
        """The answer's usage replaces the reservation (`completion` of it for output); without usage the
        reservation stands."""
        self.prompt_tokens += prompt_tokens or 0
        self.completion_tokens += completion_tokens or 0
        if prompt_tokens is None and completion_tokens is None:
            return
        if self._tps:
            self._refill()
            self._tokens += reserved - (prompt_tokens or 0) - (completion_tokens or 0)
        if self._input is not None:
            self._input.take((prompt_tokens or 0) - (reserved - completion))
        if self._output is not None:
            self._output.take((completion_tokens or 0) - completion)

    def refund(self, reserved: int, completion: int = 0) -> None:
        """A request that was refused (429, an error) consumed nothing: its reservation comes back."""
        if self._tps and reserved:
            self._refill()
            self._tokens += reserved
        if self._input is not None:
            self._input.take(completion - reserved)
        if self._output is not None:
            self._output.take(-completion)

    def charge_tokens(self, n: int | None) -> None:
        if self._tps and n:
            self._refill()
            self._tokens -= n
        if self._input is not None and n:
            self._input.take(n)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * (self._tps or 0.0))
        self._stamp = now


class _TokenBucket:
    """One token budget of `RateLimiter` (input or output tokens): ten seconds of tokens banked, may go
    below zero; a request waits until it is above."""

    def __init__(self, per_s: float, clock: Clock) -> None:
        self.per_s, self._clock = per_s, clock
        self.capacity = max(1.0, per_s * 10)
        self.level = self.capacity
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.per_s)
        self._stamp = now

    def wait(self) -> float:
        """Seconds until a request may take from it (0: now)."""
        self._refill()
        return 0.0 if self.level > 0 else (1 - self.level) / self.per_s

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n
