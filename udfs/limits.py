"""Flow control for one task: an adaptive in-flight limit and request/token rate limits.

Both live in the engine's event loop (one thread, so no locks). The job gives each task its share of
the job-wide limits (see `jobs.plan`), so the sum over the tasks running at once never exceeds what
the config allows.

Example::

    limiter = AdaptiveLimiter(16)
    await limiter.acquire(); ...; limiter.release(overloaded=False, latency=0.05)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class AdaptiveLimiter:
    """AIMD on the number of requests in flight, never above `max_limit` nor below 1.

    An overload signal (429/503) halves the limit; latency above `latency_factor` times the best seen
    cuts it by a quarter. At most one cut per round trip, as TCP does, so a burst of 429s answering
    requests sent together counts once. A run of `limit` successes adds one.
    """

    def __init__(self, max_limit: int, *, adaptive: bool = True, latency_factor: float = 3.0,
                 clock: Clock = time.monotonic) -> None:
        if max_limit < 1:
            raise ValueError("max_limit must be >= 1")
        self._clock = clock
        self.max_limit = max_limit
        self.limit = float(max_limit)
        self.adaptive = adaptive
        self.latency_factor = latency_factor
        self.inflight = 0
        self.peak = 0
        self.cuts = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._streak = 0
        self._best = math.inf
        self._ewma: float | None = None
        self._samples = 0
        self._last_cut = -math.inf

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

    def release(self, *, overloaded: bool = False, latency: float | None = None) -> None:
        if self.adaptive:
            self._adapt(overloaded, latency)
        self._hand_over(self.inflight - 1)

    def _hand_over(self, inflight: int) -> None:
        self.inflight = inflight
        while self.inflight < max(1, int(self.limit)) and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(None)

    def _adapt(self, overloaded: bool, latency: float | None) -> None:
        slow = False
        if latency is not None and not overloaded:
            self._samples += 1
            self._best = min(self._best, latency)
            self._ewma = latency if self._ewma is None else 0.9 * self._ewma + 0.1 * latency
            slow = self._samples > 20 and self._ewma > self.latency_factor * self._best
        if overloaded or slow:
            now = self._clock()
            rtt = self._ewma if self._ewma is not None else 0.1
            if now - self._last_cut >= rtt:
                self.limit = max(1.0, self.limit * (0.5 if overloaded else 0.75))
                self._last_cut = now
                self.cuts += 1
                if slow:  # the new normal is the current latency; do not keep cutting on it
                    self._best = self._ewma or self._best
            self._streak = 0
        elif latency is not None:
            self._streak += 1
            if self._streak >= int(self.limit) and self.limit < self.max_limit:
                self.limit = min(float(self.max_limit), math.floor(self.limit) + 1.0)
                self._streak = 0


class RateLimiter:
    """Requests per second and tokens per second for one task; `None` means unlimited.

    Requests are paced by reservation (each caller books the next free slot), with a burst of one
    second's worth. Tokens are charged after the answer reports usage, so the bucket may go below
    zero; new requests then wait until it refills.
    """

    def __init__(self, requests_per_s: float | None = None, tokens_per_s: float | None = None, *,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self._clock, self._sleep = clock, sleep
        self._interval = 1.0 / requests_per_s if requests_per_s else 0.0
        self._burst = max(1.0, requests_per_s or 0.0)
        self._next = -math.inf  # the first second's worth may go at once
        self._tps = tokens_per_s
        self._capacity = max(1.0, (tokens_per_s or 0.0) * 10)  # ten seconds of tokens
        self._tokens = self._capacity
        self._stamp = clock()

    async def acquire(self) -> float:
        """Wait until a request may go; returns the seconds waited."""
        waited = 0.0
        while self._tps:
            self._refill()
            if self._tokens > 0:
                break
            pause = (1 - self._tokens) / self._tps
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

    def charge_tokens(self, n: int | None) -> None:
        if self._tps and n:
            self._refill()
            self._tokens -= n

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * (self._tps or 0.0))
        self._stamp = now
