"""A task's pace under a rate limit it learns from its 429s: AIMD on the rate, stepped in the time
of the limit's own window. `udfs.limits.Governor` owns one: it decides when a cycle ends (a 429
pause that resumes); the pace measures what the window let through, and climbs back after.

Example::

    pace = RatePace(rate=None, ceiling=50.0, learn=True, now=clock())
    pace.begin(now)                                   # the first request: the first cycle starts
    pace.answered(now, paused=False)                  # an answer: counted, and the rate climbs
    pace.resumed(now, measure=True, paused_at=t0, refused_at=t1, probes_refused=2)  # a 429 cycle closed
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

# AI Gateway's windows are a minute; the pace assumes so until it has measured one.
DEFAULT_WINDOW_S = 60.0


@dataclass(frozen=True)
class Learned:
    """What a governor learned of a rate limit: the pace, the rate measured, the window's length."""
    rate: float
    measured: float | None
    window_s: float
    at: float  # time.monotonic() when it was learned


class RatePace:
    """The pace (requests/s; None: unpaced) and what it learned of the limit.

    A 429 pause ends a *cycle* (`resumed`). If the window stayed closed (a probe was refused), the
    requests answered since the cycle began, over the time until it reopened (the middle of the last
    refused probe and the answered one), is the rate the endpoint sustains, its window's pause
    included; if the first probe got through and the task was paced, the paced rate met the limit
    as a window turned, and what the last window let through is the limit's rate. The task resumes
    paced at `decrease` (0.9) times that rate, never less than half the rate it had, climbs back to
    `settle` (0.95) of it within a quarter of a window, then adds `increase` (2%) of it per window
    (`_add`): the window is the limit's own (the first closed cycle, refined by the time between
    reopenings, a whole number of windows: `_learn_window`), so the step is as gentle for a
    minute's window as for a second's. Under a fixed window the task settles just under the
    window's rate instead of bursting into it every window. `ceiling` is never exceeded; without
    `learn` the pace stays what it was given.
    """

    def __init__(self, *, rate: float | None, ceiling: float | None, learn: bool, now: float,
                 decrease: float = 0.9, settle: float = 0.95, increase: float = 0.02) -> None:
        self.ceiling, self.learn = ceiling, learn
        self.rate = min(rate, ceiling) if rate and ceiling else (rate or None)
        self.decrease, self.settle, self.increase = decrease, settle, increase
        self.measured: float | None = None
        self.decreases = 0
        self._base = self.rate  # the rate set at the last decrease
        # The cycle the rate is measured over: its start, its answers, the answers of the last window.
        self._cycle_start: float | None = None
        self._cycle_answers = 0
        self._recent: deque[float] = deque()
        self._first_window: float | None = None  # the first closed cycle's length, or the window handed on
        self._last_turn: float | None = None  # when a closed window last reopened
        self._turn_gap: float | None = None  # the window, refined by the time between two reopenings
        self._last_increase = now

    def learned(self) -> Learned | None:
        """The learned pace, if a 429 cycle measured one."""
        if not (self.learn and self.rate and self.measured):
            return None
        return Learned(self.rate, self.measured, self.window_s, time.monotonic())

    def start_from(self, learned: Learned) -> None:
        """Start at the pace an earlier task of the same endpoint and share settled at."""
        self.rate = self._base = min(learned.rate, self.ceiling) if self.ceiling else learned.rate
        self.measured, self._first_window = learned.measured, learned.window_s

    @property
    def window_s(self) -> float:
        """The limit's window as learned (`_learn_window`), `DEFAULT_WINDOW_S` until measured."""
        if self._turn_gap is not None:
            return self._turn_gap
        return self._first_window if self._first_window is not None else DEFAULT_WINDOW_S

    def begin(self, now: float) -> None:
        """A request is about to go: the first cycle starts with the first one."""
        if self._cycle_start is None:
            self._cycle_start = self._last_increase = now

    def answered(self, now: float, paused: bool) -> None:
        """An answer: counted in the cycle and the last window; unless the task is `paused`, the rate climbs."""
        self._cycle_answers += 1
        self._recent.append(now)
        while self._recent and self._recent[0] < now - self.window_s:
            self._recent.popleft()
        if self.learn and self.rate and not paused:
            self._add(now)

    def resumed(self, now: float, *, measure: bool, paused_at: float, refused_at: float,
                probes_refused: int) -> None:
        """A pause ended at `now` and a new cycle begins; a 429 pause (`measure`) that began at
        `paused_at`, whose endpoint last refused at `refused_at`, after `probes_refused` refused
        probes, first measures the cycle and cuts the rate to what it let through."""
        if self.learn and measure and self._cycle_start is not None:
            measured = self._measure(now, paused_at, refused_at, probes_refused)
            if measured is not None:
                new = measured * self.decrease
                if self.rate:
                    new = max(new, self.rate * 0.5)  # at most a halving per pause
                self.rate = self._base = min(new, self.ceiling) if self.ceiling else new
                self.measured = max(measured, self.rate)
                self.decreases += 1
        self._cycle_start, self._cycle_answers = now, 0
        self._last_increase = now

    def _measure(self, now: float, paused_at: float, refused_at: float, probes_refused: int) -> float | None:
        """The rate the cycle that a 429 closed let through; None: nothing to learn from it."""
        assert self._cycle_start is not None
        reopened = (refused_at + now) / 2
        closed = probes_refused and reopened - self._cycle_start >= 1.0
        if closed:
            # A window that stayed closed: it reopened between the last refused probe and this
            # answer (take the middle). With too few answers to measure (other tasks had the
            # window), an unpaced task stays unpaced: the next window it takes its part and
            # measures it (a guessed slow pace would starve it for windows on end); a paced one
            # keeps its pace and cuts it as below, at most by half.
            self._learn_window(reopened)
        if closed and self._cycle_answers >= 5:
            # What the window let through over the cycle is its rate. (A shorter cycle is a limit
            # on requests in flight seen twice.)
            return self._cycle_answers / (reopened - self._cycle_start)
        if self.rate:
            # Refused, then open again at the first probe (or a closed window gave this task too few
            # answers to measure): the pace met the limit as a window turned.
            # What the last window let through is the limit's rate (the pace, unless the task sent
            # less than it allowed); the cycle, many windows long, says nothing of the window's
            # length. (Unpaced, such a 429 is about concurrency, which `AdaptiveLimiter` halves.)
            start = paused_at - self.window_s
            recent = sum(1 for t in self._recent if start <= t <= paused_at)
            span = min(self.window_s, paused_at - self._cycle_start)
            return min(self.rate, recent / span) if span >= 1.0 else self.rate
        return None

    def _learn_window(self, reopened: float) -> None:
        """Learn the limit's window from a closed window's reopening. The first closed cycle's length
        estimates it; a fixed window turns every `W` seconds, so the time between two reopenings is a
        whole number of windows (a paced task may go many windows between closed ones), and each such
        gap, divided by the whole number nearest to it in first estimates, refines it."""
        assert self._cycle_start is not None
        if self._first_window is None:
            self._first_window = reopened - self._cycle_start
        elif self._last_turn is not None:
            gap = reopened - self._last_turn
            est = gap / max(1, round(gap / self._first_window))
            self._turn_gap = est if self._turn_gap is None else min(self._turn_gap, est)
        self._last_turn = reopened

    def _add(self, now: float) -> None:
        """Increase, in the time of the limit's own window (`window_s`): back to `settle`
        of the measured rate within a quarter of a window, then `increase` of it more per window,
        doubling for each window without a 429."""
        assert self.rate
        dt = now - self._last_increase
        self._last_increase = now
        measured = self.measured or self.rate
        target = self.settle * measured
        dt = min(dt, self.window_s)  # a task that sent nothing for a while learned nothing meanwhile
        if self.rate < target:
            step = (target - (self._base or self.rate)) * dt / (self.window_s / 4)
            self.rate = min(target, self.rate + max(step, 0.0))
        else:
            # Twice the step for each whole window without a 429 (at most 8 times): near the limit
            # the steps stay small, and a share another task left (its rows done) is taken back in
            # a few windows, not dozens.
            windows = (now - self._cycle_start) / self.window_s if self._cycle_start is not None else 0.0
            growth = 2.0 ** min(3, int(windows))
            self.rate = self.rate + growth * self.increase * max(measured, self.rate) * dt / self.window_s
        if self.ceiling:
            self.rate = min(self.rate, self.ceiling)
