"""A run's spending cap (`run.budget`): cost, input tokens, output tokens, requests.

Every request reserves its worst case before it is sent (its prompt's estimated tokens, `max_tokens`
or `reserve_output_tokens` of output, one request, and their cost) and settles from the answer's
`usage` after, as AI Gateway counts tokens; a request that did not fit waits while others are in
flight (their settling may free room), and once nothing is in flight and it still does not fit the
budget is spent: that request and every later one are not sent (`UNSENT`: the row stays pending, for
the next run). So a run passes its budget only by what an answer's `usage` exceeds its reservation:
an input estimate (characters / 4) below the real count, or output past `reserve_output_tokens`
when `max_tokens` is unset.

One event loop, no locks, like the other limits. `BudgetSpec` is plain data, shipped to the tasks
(each gets its share, `share`); `Budget` lives in one engine.

Example::

    budget = Budget(BudgetSpec(max_output_tokens=10_000, price_out=2e-6))
    held = await budget.reserve(input_tokens=120, output_tokens=256)   # None: spent, do not send
    ...; budget.settle(held, prompt_tokens=118, completion_tokens=40)
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace

from udfs.prompts import CHARS_PER_TOKEN

# Output tokens a request reserves when the endpoint's `max_tokens` is unset (`run.budget`).
DEFAULT_RESERVE_OUTPUT_TOKENS = 1024


class BudgetSpent(Exception):
    """The run's budget (or this task's share of it) has no room for another request."""


@dataclass(frozen=True)
class BudgetSpec:
    """Limits (None: no limit on that) and prices per token (None: cost unknown, so `max_cost` cannot
    be checked and the config refuses it)."""
    max_cost: float | None = None
    max_input_tokens: float | None = None
    max_output_tokens: float | None = None
    max_requests: float | None = None
    price_in: float = 0.0
    price_out: float = 0.0
    reserve_output_tokens: int = DEFAULT_RESERVE_OUTPUT_TOKENS

    def share(self, parts: int) -> BudgetSpec:
        """Each of `parts` tasks' share: the sum of the shares never exceeds the whole."""
        def cut(v: float | None) -> float | None:
            return None if v is None else v / parts
        return replace(self, max_cost=cut(self.max_cost), max_input_tokens=cut(self.max_input_tokens),
                       max_output_tokens=cut(self.max_output_tokens), max_requests=cut(self.max_requests))

    def less(self, spent: Spend) -> BudgetSpec:
        """What is left after `spent`."""
        def left(v: float | None, used: float) -> float | None:
            return None if v is None else max(0.0, v - used)
        return replace(self, max_cost=left(self.max_cost, spent.cost),
                       max_input_tokens=left(self.max_input_tokens, spent.input_tokens),
                       max_output_tokens=left(self.max_output_tokens, spent.output_tokens),
                       max_requests=left(self.max_requests, spent.requests))

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return input_tokens * self.price_in + output_tokens * self.price_out


@dataclass
class Spend:
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    requests: float = 0.0
    cost: float = 0.0

    def add(self, other: Spend, sign: float = 1.0) -> None:
        self.input_tokens += sign * other.input_tokens
        self.output_tokens += sign * other.output_tokens
        self.requests += sign * other.requests
        self.cost += sign * other.cost

    def as_dict(self) -> dict[str, float]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "requests": self.requests, "cost": round(self.cost, 10)}


class Budget:
    """Reservations against `BudgetSpec`'s limits: `spent` (settled) plus `held` (in flight)."""

    def __init__(self, spec: BudgetSpec) -> None:
        self.spec = spec
        self.spent = Spend()
        self.held = Spend()
        self.in_flight = 0
        self.exhausted = False
        self._changed: asyncio.Event | None = None

    def _fits(self, want: Spend) -> bool:
        s = self.spec
        total = Spend()
        total.add(self.spent)
        total.add(self.held)
        total.add(want)
        return all(limit is None or used <= limit + 1e-9 for limit, used in (
            (s.max_cost, total.cost), (s.max_input_tokens, total.input_tokens),
            (s.max_output_tokens, total.output_tokens), (s.max_requests, total.requests)))

    async def reserve(self, input_tokens: int, output_tokens: int | None, *,
                      prices: tuple[float, float] | None = None) -> Spend:
        """Hold a request's worst case; raises `BudgetSpent` when it can never fit. `prices` (per input
        and output token): the endpoint's own, when several endpoints share the budget."""
        out = self.spec.reserve_output_tokens if output_tokens is None else output_tokens
        want = Spend(float(input_tokens), float(out), 1.0, self._cost(input_tokens, out, prices))
        while not self.exhausted:
            if self._fits(want):
                self.held.add(want)
                self.in_flight += 1
                return want
            if not self.in_flight:
                self.exhausted = True  # nothing to settle could free room
                break
            self._changed = self._changed or asyncio.Event()
            await self._changed.wait()
        self._wake()
        raise BudgetSpent("run.budget spent")

    def settle(self, held: Spend, prompt_tokens: int | None, completion_tokens: int | None, *,
               sent: bool = True, prices: tuple[float, float] | None = None) -> None:
        """The answer's usage replaces the reservation (without usage, the reservation stands); a
        request that was never sent (`sent=False`) costs nothing."""
        self.held.add(held, -1.0)
        self.in_flight -= 1
        if sent:
            used = Spend(held.input_tokens if prompt_tokens is None else float(prompt_tokens),
                         held.output_tokens if completion_tokens is None else float(completion_tokens), 1.0)
            used.cost = self._cost(used.input_tokens, used.output_tokens, prices)
            self.spent.add(used)
        self._wake()

    def _cost(self, input_tokens: float, output_tokens: float, prices: tuple[float, float] | None) -> float:
        if prices is None:
            return self.spec.cost(input_tokens, output_tokens)
        return input_tokens * prices[0] + output_tokens * prices[1]

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


def estimate_tokens(chars: int) -> int:
    """Tokens of a text from its length, as the job estimates them everywhere (`CHARS_PER_TOKEN`)."""
    return math.ceil(chars / CHARS_PER_TOKEN)
