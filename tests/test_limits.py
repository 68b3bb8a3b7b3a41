"""The in-flight limiter: first come, first served, and never above its limit."""

from __future__ import annotations

import asyncio

from udfs.limits import AdaptiveLimiter


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
