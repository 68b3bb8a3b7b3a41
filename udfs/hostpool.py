"""Executors mode: the in-flight shares of one run's tasks on one host, pooled through file locks.

Each task of a chunk keeps at most its share `s` of an endpoint's job-wide limit in flight
(`jobs.calls.plan`). A task whose rows have run out waits for its slowest answers (an LLM's take up
to tens of seconds) with most of its share idle, and Spark gives its slot to the next task only when
the last answer is in. So the tasks on one host lend each other what they do not use:

- the pool is a directory in the host's temp dir, one per run, endpoint and share (`key`);
- a task claims a **block** (`block-<i>` under an exclusive `flock`: the first index no live task
  holds, created when all are held); the block's `s` permit files (`permit-<i>-<j>`) are its own.
  Every request in flight holds one permit file locked;
- a task at its own (unreduced) limit may **borrow** a free permit of another block, of a task
  that is draining or of one that ended, unless that block's owner has requests waiting (it holds
  `want-<i>` locked meanwhile); a borrowed permit is handed back when its request ends, so an owner
  gets its share back within one answer, and borrowers give theirs back first.

Why the job-wide limit holds: a block is created only when every existing one is held by a live
task, so a host never has more blocks than it ran tasks at once, which is at most its task slots.
The pool is used only when every task has the same share and the plan runs one task per slot
(`jobs.calls.executors.overlap_chunks`): all hosts' permit files then number at most `S × s ≤ C`.
Locks die with their process, so a task killed mid-request frees its permits and its block. A pool
is a few empty files, left in the temp dir (a job cluster's disks go with it): removing the pool of
a run that may still be going would let its next tasks make a second set of permits.

Example::

    pool = HostPool("run0123.main.32", share=32)
    pool.take_own() or pool.borrow()   # True: a permit is held
    pool.give_back()
    pool.close()
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from udfs.limits import AdaptiveLimiter

log = logging.getLogger("batch_inference")

ROOT = "batch-inference-pool"
# How often the blocks on the host are listed again while borrowing.
RESCAN_S = 0.25


def _try(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class HostPool:
    """One task's view of its host's pool: its own block of `share` permits, and the others'."""

    def __init__(self, key: str, share: int, root: str | Path | None = None) -> None:
        if share < 1:
            raise ValueError("share must be >= 1")
        self.share = share
        base = Path(root or tempfile.gettempdir()) / ROOT
        self.dir = base / re.sub(r"[^\w.-]", "_", key)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        self._held_own: list[str] = []
        self._held_foreign: list[str] = []
        self._blocks: list[int] = []
        self._scanned = -RESCAN_S
        self.block = self._claim()
        self._own = [f"permit-{self.block}-{j}" for j in range(share)]
        for name in self._own:
            self._fd(name)
        self._wanting = False
        self.closed = False

    def __repr__(self) -> str:
        return f"HostPool({self.dir.name!r}, block={self.block}, share={self.share}, held={self.held})"

    @property
    def held(self) -> int:
        return len(self._held_own) + len(self._held_foreign)

    def take_own(self) -> bool:
        """One of this task's own permits, if one is free (a borrower may hold some)."""
        if self.closed:
            return False
        for name in self._own:
            if name not in self._held_own and _try(self._fd(name), fcntl.LOCK_EX):
                self._held_own.append(name)
                return True
        return False

    def borrow(self) -> bool:
        """A free permit of another block whose owner is not waiting for one of its own."""
        if self.closed:
            return False
        now = time.monotonic()
        if now - self._scanned >= RESCAN_S:
            self._blocks = self._scan()
            self._scanned = now
        for b in self._blocks:
            if b == self.block or not self._lendable(b):
                continue
            for j in range(self.share):
                name = f"permit-{b}-{j}"
                if name not in self._held_foreign and _try(self._fd(name), fcntl.LOCK_EX):
                    self._held_foreign.append(name)
                    return True
        return False

    def give_back(self) -> None:
        """A request ended: its permit is free again (a borrowed one first: its owner may want it)."""
        held = self._held_foreign or self._held_own
        if held and not self.closed:
            fcntl.flock(self._fds[held.pop()], fcntl.LOCK_UN)

    def want(self, wanting: bool) -> None:
        """Say whether this task waits for a permit of its own: while it does, no one borrows from its block."""
        if wanting == self._wanting or self.closed:
            return
        fd = self._fd(f"want-{self.block}")
        if wanting:
            # Blocking: a borrower holds it shared only for the instant of its test (`_lendable`). A
            # try that failed then would leave the block lendable until the next change of state.
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._wanting = True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._wanting = False

    def close(self) -> None:
        """Free every permit, the want mark and the block (the task is done)."""
        for fd in self._fds.values():
            os.close(fd)  # closing the only descriptor releases its lock
        self._fds.clear()
        self._held_own.clear()
        self._held_foreign.clear()
        self._wanting = False
        self.closed = True

    def _claim(self) -> int:
        i = 0
        while True:
            name = f"block-{i}"
            fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o600)
            if _try(fd, fcntl.LOCK_EX):
                self._fds[name] = fd
                return i
            os.close(fd)
            i += 1

    def _lendable(self, b: int) -> bool:
        fd = self._fd(f"want-{b}")
        if not _try(fd, fcntl.LOCK_SH):
            return False  # its owner waits for a permit of its own
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True

    def _scan(self) -> list[int]:
        found = []
        for entry in os.scandir(self.dir):
            m = re.fullmatch(r"block-(\d+)", entry.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o600)
        return fd


# How often a task waiting for a permit tries the pool again (other processes free them: no wake-up).
POLL_S = 0.005
# A task may borrow up to this many shares beyond its own (its connection pool is sized for it).
BORROW_SHARES = 3
_BORROWED = "borrowed"


class PooledLimiter(AdaptiveLimiter):
    """`AdaptiveLimiter` whose every request in flight holds a permit of the host's `HostPool`, and
    which, at its full limit (no cut, slow start over, the endpoint has answered), borrows the idle
    permits of the tasks beside it. Its own slots follow AIMD as ever; a borrowed slot is extra, and a 429/503 that cuts the
    limit ends the borrowing."""

    def __init__(self, max_limit: int, pool: HostPool, **kwargs: Any) -> None:
        super().__init__(max_limit, **kwargs)
        self.pool = pool
        self.borrowed = 0
        self.borrowed_peak = 0
        # Borrowing waits for the endpoint's first answer: an endpoint scaling from zero (503s) or
        # down must not draw a wave of borrowed requests before the limit could react.
        self.answered = False
        self._poller: asyncio.Task[None] | None = None
        self._own_waiting = 0
        self._held_back = 0  # requests the governor holds (a pause, pacing): work waiting all the same

    @property
    def capacity(self) -> int:
        """The most this task may have in flight: its share and what it may borrow."""
        return self.max_limit * (1 + BORROW_SHARES)

    def may_borrow(self) -> bool:
        return (self.answered and not self.slow_start and self.limit >= self.max_limit
                and self.borrowed < self.max_limit * BORROW_SHARES)

    async def acquire(self) -> None:
        if self.has_room():
            self.inflight += 1
            await self._own_permit()
        elif self.may_borrow() and self.pool.borrow():
            self._borrowed_one()
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self.pool.want(True)  # work waits here: no one borrows from this block meanwhile
            self._ensure_poller()
            try:
                got = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # given a slot while being cancelled
                    if waiter.result() == _BORROWED:
                        self.borrowed -= 1
                        self.pool.give_back()
                    else:
                        self._hand_over(self.inflight - 1)
                raise
            finally:
                self._update_want()
            if got != _BORROWED:
                await self._own_permit()
        self.peak = max(self.peak, self.inflight + self.borrowed)

    def release(self, *, overloaded: bool = False, latency: float | None = None, work: float | None = None,
                sent_at: float | None = None) -> None:
        self.pool.give_back()
        if latency is not None and not overloaded:
            self.answered = True
        if not self.borrowed:
            super().release(overloaded=overloaded, latency=latency, work=work, sent_at=sent_at)
            return
        self.borrowed -= 1  # the request that ended counts as a borrowed one: the counts are what matter
        if self.adaptive:
            self._adapt(overloaded, latency, work, sent_at)
        self._hand_over(self.inflight)  # the limit may have grown
        if self.on_release is not None:
            self.on_release()

    def close(self) -> None:
        """The task is done (from any thread: a poller still running finds the pool closed and ends)."""
        self.pool.close()

    async def _own_permit(self) -> None:
        """A permit for a slot of this task's own share: its own, else a lendable one; while neither is
        free (borrowers hold its own), its block is marked wanted, so they hand them back."""
        self._own_waiting += 1
        try:
            while not (self.pool.take_own() or self.pool.borrow()):
                self.pool.want(True)
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:
            self._hand_over(self.inflight - 1)
            raise
        finally:
            self._own_waiting -= 1
            self._update_want()

    def held_back(self, n: int) -> None:
        """Requests held by the governor count as waiting: a task waiting out a rate-limit pause, or
        paced, lends nothing. A neighbour borrowing its share then would take the window's requests
        it waits for, and draw the 429s it avoids."""
        self._held_back += n
        self._update_want()

    def _update_want(self) -> None:
        """This block is wanted while any of this task's requests waits: for a slot, for a permit, or
        held by the governor."""
        self.pool.want(bool(self._own_waiting or self._held_back or any(not w.done() for w in self._waiters)))

    def _borrowed_one(self) -> None:
        self.borrowed += 1
        self.borrowed_peak = max(self.borrowed_peak, self.borrowed)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """While requests wait for a slot: borrow a permit freed elsewhere on the host for the oldest."""
        while self._waiters and not self.pool.closed:
            if self.may_borrow() and self.pool.borrow():
                while self._waiters:
                    waiter = self._waiters.popleft()
                    if not waiter.done():
                        self._borrowed_one()
                        waiter.set_result(_BORROWED)
                        break
                else:
                    self.pool.give_back()  # the waiters went meanwhile
                continue
            await asyncio.sleep(POLL_S)


def pooled_limiter(key: str | None, name: str, share: int, **kwargs: Any) -> AdaptiveLimiter:
    """The lane's limiter: pooled on the host when the run gave a pool `key`, else a task's own. A temp
    dir that cannot take the pool's files leaves the task with its own share, as without a pool."""
    if key is not None:
        try:
            return PooledLimiter(share, HostPool(f"{key}.{name or 'endpoint'}.{share}", share), **kwargs)
        except OSError as exc:
            log.warning("in-flight permits not pooled on this host (%s: %s); this task keeps its own share",
                        type(exc).__name__, exc)
    return AdaptiveLimiter(share, **kwargs)
