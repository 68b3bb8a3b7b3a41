"""Several endpoints in one engine: which endpoint each request goes to, and where a row goes next.

Each endpoint is a `Lane`: its own connection pool, in-flight limiter, governor (pauses, learned rate,
breaker), rate limits and `Caller`, sized to this task's share of that endpoint's limits. A `Router`
over the lanes follows their roles (`jobs.config.RoutedEndpoint`):

- **primary, then overflow.** A request goes to the first endpoint of the chain (primary, then each
  overflow in config order) that can take it *now*: a free in-flight slot and no pause. When none
  can, it waits for the first that frees a slot (or ends its pause). So the primary stays at its
  limit and an overflow gets only the excess. A row the primary answers with 429 or 503, or cannot
  reach, is handed on at once (`HANDED_OFF`) instead of waiting out the primary's pause; the last
  endpoint of the chain keeps it and waits as a single endpoint would.
- **fallback.** A row that failed for the endpoint's sake (`for_fallback`: the breaker, retries
  of 429/5xx/timeouts exhausted, a refused token, an unusable answer) is sent to each fallback in
  turn; a row refused for its content (400, `invalid_output`) is not: another endpoint would refuse
  it too, and pay for it.
- **split.** With a split the row's endpoint was chosen from its id before it got here (`lane`
  given): it goes there, then to the fallbacks if it failed.

Every outcome records the endpoint that answered it (the last one tried); attempts and latency add up
over the endpoints tried.

Example::

    router = Router([Lane(primary_spec, 8), Lane(overflow_spec, 32)])
    outcomes = await router.acall(["What is Delta Lake?"])      # outcomes[0].endpoint: who answered
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import replace
from typing import Callable, Sequence

from udfs import reasons
from udfs.auth import Secret
from udfs.budget import Budget
from udfs.caller import Caller, governor_for
from udfs.hostpool import PooledLimiter, pooled_limiter
from udfs.limits import (LEARNED_TTL_S, RateLimiter, recall, recall_limit, remember,
                         remember_limit)
from udfs.outcome import HANDED_OFF, Outcome
from udfs.protocols import is_embeddings_task
from udfs.spec import EngineSpec
from udfs.transport import TransportError, make_transport

# Reason codes of a failure that says nothing about the row: another endpoint may answer it.
ENDPOINT_FAULTS = frozenset({reasons.ENDPOINT_UNAVAILABLE, reasons.TIMEOUT, reasons.CONNECTION_ERROR,
                             reasons.CREDENTIAL_REFUSED, reasons.BAD_RESPONSE})
# HTTP statuses about the endpoint, not the request: not found, a refused token, a timeout, too many
# requests, and every 5xx.
ENDPOINT_STATUSES = frozenset({401, 403, 404, 408, 429})
# The longest a router sleeps before it looks at its endpoints again (a pause's end, a pace's slot).
RECHECK_S = 0.5


def for_fallback(o: Outcome) -> bool:
    """Whether a failed row may go to a fallback endpoint: the endpoint failed, not the row."""
    if o.status != "error" or not o.error:
        return False
    code = o.error.split(":", 1)[0]
    if code in ENDPOINT_FAULTS:
        return True
    return code.startswith("http_") and o.http_status is not None and (
        o.http_status in ENDPOINT_STATUSES or o.http_status >= 500)


class Lane:
    """One endpoint in a task: its caller and the flow control it owns, started from what an earlier
    task of the same endpoint and share learned in this process."""

    def __init__(self, spec: EngineSpec, max_limit: int, budget: Budget | None = None) -> None:
        self.spec, self.name, self.role = spec, spec.name, spec.role
        self.max_limit = max_limit
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        headers.update({k: v.reveal() if isinstance(v, Secret) else v for k, v in spec.headers.items()})
        # Latency says something about load only per unit of work: output tokens (LLM tasks, from
        # `usage`) or rows (embeddings). Such a limit starts slow, to measure the endpoint unloaded.
        self.limiter = pooled_limiter(spec.pool_key, spec.name, max_limit, adaptive=spec.adaptive,
                                      latency_factor=spec.latency_cut_factor, slow_start=measures_work(spec.task))
        # In flight at most: the share, and with a host pool what it may borrow (`udfs.hostpool`).
        self.capacity = self.limiter.capacity if isinstance(self.limiter, PooledLimiter) else max_limit
        self.transport = make_transport(spec.http_client, spec.url, headers, pool_size=self.capacity,
                                        connect_timeout=spec.connect_timeout_s, read_timeout=spec.read_timeout_s)
        # What an earlier task of this endpoint and share learned in this process (the last chunk):
        # the pace, the in-flight limit with its latency baseline, and whether its breaker opened.
        self.learned_key = (spec.url, max_limit, spec.requests_per_s)
        down = _DOWN.get(spec.url)
        if down is not None and not spec.endpoint_down and time.monotonic() - down[1] <= LEARNED_TTL_S:
            # Chunks overlap in executors mode: the next chunk's task may start before the driver has
            # read that the last one's breaker opened. It probes once first, as a half-open task does.
            spec = replace(spec, endpoint_down=down[0])
        self.governor = governor_for(spec)
        earlier = recall(self.learned_key) if spec.adaptive and not spec.endpoint_down else None
        if earlier is not None:
            self.governor.start_from(earlier)
        limit = recall_limit(self.learned_key) if spec.adaptive else None
        if limit is not None:
            self.limiter.start_from(limit)
        rate = RateLimiter(spec.requests_per_s, spec.tokens_per_s, input_tokens_per_s=spec.input_tokens_per_s,
                           output_tokens_per_s=spec.output_tokens_per_s)
        self.caller = Caller(spec, self.transport, self.limiter, rate, self.governor, budget)

    def __repr__(self) -> str:
        return f"Lane({self.name!r}, role={self.role!r}, max_limit={self.max_limit})"

    def ready_in(self, now: float) -> float | None:
        """Seconds until a request could go here without queueing (0: now); None: not by time alone."""
        if not self.limiter.has_room():
            return None
        return self.governor.ready_in(now)

    def close(self) -> None:
        """The task is done: its permits and block in the host's pool are free (`udfs.hostpool`)."""
        if isinstance(self.limiter, PooledLimiter):
            self.limiter.close()

    def remember(self) -> None:
        """Hand what this task learned to the next task of the endpoint in this process."""
        remember(self.learned_key, self.governor)
        remember_limit(self.learned_key, self.limiter)
        if self.governor.open_reason is not None:
            _DOWN[self.spec.url] = (DOWN_IN_THIS_PROCESS, time.monotonic())
        elif self.governor.answered_once:
            _DOWN.pop(self.spec.url, None)


class Router:
    """The task's endpoints by role; `acall` sends one request's rows where they should go."""

    def __init__(self, lanes: Sequence[Lane]) -> None:
        self.lanes = list(lanes)
        primaries = [lane for lane in self.lanes if lane.role == "primary"]
        self.chain = primaries[:1] + [lane for lane in self.lanes if lane.role == "overflow"]
        self.fallbacks = [lane for lane in self.lanes if lane.role == "fallback"]
        for lane in self.chain[:-1]:
            lane.caller.hand_off = True
        self._waiters: deque[asyncio.Future[None]] = deque()
        if len(self.chain) > 1:
            for lane in self.chain:
                lane.limiter.on_release = self._wake

    @property
    def fatal(self) -> TransportError | None:
        """The first fatal transport error any endpoint met (the engine stops on it)."""
        return next((lane.caller.fatal for lane in self.lanes if lane.caller.fatal is not None), None)

    @property
    def batch(self) -> int:
        """Rows per request: the smallest any endpoint takes, so every one can take a request."""
        return min(lane.caller.batch for lane in self.lanes)

    async def acall(self, prompts: Sequence[str], lane: int | None = None) -> list[Outcome]:
        """Send `prompts` (one request's rows) to lane `lane` (a split's choice) or down the chain; then
        the rows that failed for the endpoint's sake to each fallback. One outcome per prompt."""
        if lane is not None:
            outcomes = await self._on(self.lanes[lane], prompts)
        else:
            took = await self._pick(self.chain)
            outcomes = await self._on(took, prompts)
            while any(o.status == HANDED_OFF for o in outcomes):  # never from the chain's last endpoint
                rest = self.chain[self.chain.index(took) + 1:]
                took = await self._pick(rest)
                outcomes = await self._again(outcomes, _is_handed_off, took, prompts)
        for fallback in self.fallbacks:
            if not any(for_fallback(o) for o in outcomes):
                break
            outcomes = await self._again(outcomes, for_fallback, fallback, prompts)
        return outcomes

    async def _on(self, lane: Lane, prompts: Sequence[str]) -> list[Outcome]:
        outcomes = await lane.caller.acall(prompts)
        for o in outcomes:
            o.endpoint = lane.name
        return outcomes

    async def _again(self, outcomes: list[Outcome], which: Callable[[Outcome], bool], lane: Lane,
                     prompts: Sequence[str]) -> list[Outcome]:
        """The rows `which` picks, sent again to `lane` as one request."""
        picked = [i for i, o in enumerate(outcomes) if which(o)]
        again = await self._on(lane, [prompts[i] for i in picked])
        out = list(outcomes)
        for i, new in zip(picked, again):
            old = outcomes[i]
            # The row's time runs from its first send, on whichever endpoint that was, to its last answer
            # (the wait for the next endpoint's slot included).
            latency = _plus(old.latency_ms, new.latency_ms)
            if old.sent_at is not None and new.sent_at is not None and new.latency_ms is not None:
                latency = round((new.sent_at - old.sent_at) * 1000 + new.latency_ms, 3)
            out[i] = replace(new, attempts=old.attempts + new.attempts, sent_at=old.sent_at or new.sent_at,
                             latency_ms=latency)
        return out

    async def _pick(self, lanes: list[Lane]) -> Lane:
        """The first of `lanes` that can take a request now; else wait for one to free a slot or end
        a pause. If every one's breaker is open, the first (its rows fail fast, for the fallbacks)."""
        if len(lanes) == 1:
            return lanes[0]
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            waits = []
            for lane in lanes:
                wait = lane.ready_in(now)
                if wait == 0:
                    return lane
                if wait is not None:
                    waits.append(wait)
            if all(lane.governor.open_reason is not None for lane in lanes):
                return lanes[0]
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait([waiter], timeout=min([RECHECK_S, *waits]))
            finally:
                if not waiter.done():
                    waiter.cancel()

    def _wake(self) -> None:
        """A slot was released on some endpoint: the longest-waiting request looks again."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def remember(self) -> None:
        for lane in self.lanes:
            lane.remember()


def _is_handed_off(o: Outcome) -> bool:
    return o.status == HANDED_OFF


def _plus(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else round((a or 0.0) + (b or 0.0), 3)


def measures_work(task: str) -> bool:
    """Whether answers of `task` say how much work they were: output tokens in `usage`, or rows."""
    return task in ("llm/v1/chat", "llm/v1/completions") or is_embeddings_task(task)


# Endpoints whose breaker opened in a task of this process (url -> why, when): the next task starts
# half-open (`Lane`), until one answers again.
_DOWN: dict[str, tuple[str, float]] = {}
DOWN_IN_THIS_PROCESS = "unavailable in an earlier task of this run"
