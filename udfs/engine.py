"""The request engine for one task: prompts in, one `Outcome` per prompt out, never an exception.

The engine is the task's runner. It keeps up to the task's limit of requests in flight across input
batches (a pipeline, not a pool drained at each batch boundary), groups rows into requests of
`rows_per_request`, and hands each request to its `Router` (`udfs.router`: which endpoint, when the
run has several), whose endpoint's `Caller` (`udfs.caller`: retries, splitting, parsing) sends it. No Spark here: `udfs.inference` wraps this in a pandas UDF.

Requests run as coroutines in one event loop on a thread of the engine's own, while the caller's
thread reads input batches and hands back finished ones: C requests in flight cost C small
coroutines, not C threads fighting for the GIL.

One exception to "never an exception": a fatal transport error (an untrusted TLS certificate, a
header that cannot be sent; `udfs.transport.FATAL_KINDS`) is a configuration error that would fail
every row alike, so `map_batches` stops at the first one and raises it (the Spark task fails with its
message), and a header refused before anything is sent makes the constructor raise.

Example::

    engine = Engine(EngineSpec(url="http://127.0.0.1:7777/", task="custom", endpoint_type="driver_proxy"))
    for outcomes in engine.map_batches([["hello", "world"]]):
        print([o.response for o in outcomes])
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Iterable, Iterator, Sequence

from udfs import reasons
from udfs.budget import Budget
from udfs.outcome import Outcome
from udfs.prompts import is_blank
from udfs.router import Lane, Router
from udfs.spec import EngineSpec
from udfs.transport import TransportError


class Engine:
    """One task's engine over one endpoint, or several (`specs` with roles, `udfs.router`), each with
    its share of this task's limit (`max_limit`, one per spec; default: each spec's own)."""

    def __init__(self, spec: EngineSpec | Sequence[EngineSpec], *, max_limit: int | Sequence[int] | None = None) -> None:
        specs = [spec] if isinstance(spec, EngineSpec) else list(spec)
        limits = ([max_limit] if isinstance(max_limit, int) else list(max_limit)) if max_limit is not None else \
            [s.max_concurrency for s in specs]
        # One budget for the task, whichever endpoint spends it (each at its own prices).
        budget = Budget(specs[0].budget) if specs[0].budget else None
        self.lanes = [Lane(s, n, budget) for s, n in zip(specs, limits)]
        self.router = Router(self.lanes)
        first = next(lane for lane in self.lanes if lane.role == "primary")
        # The primary's parts, by their old names (a single endpoint's engine is all primary).
        self.spec, self.max_limit = first.spec, first.max_limit
        self.limiter, self.governor, self.caller = first.limiter, first.governor, first.caller
        self._transport = first.transport
        self._workers = 2 * sum(lane.capacity for lane in self.lanes)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bi-engine", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        lanes = ", ".join(f"{lane.name or lane.spec.url}:{lane.role}:{lane.max_limit}" for lane in self.lanes)
        return f"Engine(task={self.spec.task!r}, endpoints=[{lanes}])"

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.router.remember()
        for lane in self.lanes:
            self._run(lane.transport.aclose())
            lane.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def fatal(self) -> TransportError | None:
        return self.router.fatal

    def call(self, prompts: Sequence[str], lane: int | None = None) -> list[Outcome]:
        """Send `prompts` as one request (retrying, splitting on rejection, routing between endpoints);
        one outcome per prompt."""
        return self._run(self.router.acall(prompts, lane))

    # -- the pipeline ------------------------------------------------------------------------------

    def map_batches(self, batches: Iterable[Sequence[str | None] | Routed]) -> Iterator[list[Outcome]]:
        """One list of outcomes per input batch, in order, keeping C requests in flight across batches.

        A batch is its prompts, or `(prompts, lanes)`: each row's endpoint, chosen by a split (an index
        into the engine's specs; None: the router chooses).

        The caller's thread reads input batches and yields finished ones; the event loop's workers take
        requests from a queue. The caller reads ahead while fewer than `2 * max_limit` requests are
        outstanding, so the workers never wait for the next input batch to arrive.
        """
        cond = threading.Condition()
        done: deque[_Batch] = deque()
        outstanding = [0]
        low_water = self._workers
        queue: asyncio.Queue[tuple[_Batch, list[int], list[str], int | None] | None] = self._run(_make_queue())
        # Workers beyond the limit cost nothing while parked; they let a row sleeping before a retry
        # hold a worker without holding one of the limiter's slots.
        workers = [asyncio.run_coroutine_threadsafe(self._worker(queue, cond, outstanding, low_water), self._loop)
                   for _ in range(self._workers)]

        def ready() -> Iterator[list[Outcome]]:
            while True:
                with cond:
                    if self.fatal is not None:
                        raise self.fatal
                    if not done or done[0].remaining:
                        return
                    b = done.popleft()
                yield b.results  # type: ignore[misc]

        try:
            for batch in batches:
                if self.fatal is not None:
                    raise self.fatal
                prompts, lanes = batch if isinstance(batch, tuple) else (batch, None)
                b = _Batch(len(prompts))
                groups = [(b, positions, texts, lane) for positions, texts, lane in self._group(prompts, lanes, b)]
                with cond:
                    b.remaining = len(groups)
                    outstanding[0] += len(groups)
                    done.append(b)
                self._loop.call_soon_threadsafe(_put_all, queue, groups)
                while True:
                    yield from ready()
                    with cond:
                        if (outstanding[0] < low_water or (done and not done[0].remaining)
                                or self.fatal is not None):
                            break
                        cond.wait()
            while done:
                with cond:
                    while done[0].remaining and self.fatal is None:
                        cond.wait()
                yield from ready()
        finally:
            # On an early stop (the task was cancelled, the consumer failed) queued requests are
            # dropped, not sent; those already in flight finish.
            self._loop.call_soon_threadsafe(_drain_then_stop, queue, len(workers))
            for w in workers:
                w.result()

    async def _worker(self, queue: asyncio.Queue, cond: threading.Condition, outstanding: list[int],
                      low_water: int) -> None:
        while (item := await queue.get()) is not None:
            b, positions, prompts, lane = item
            fatal = self.fatal
            if fatal is not None:  # the task is failing: send nothing more
                outcomes = [Outcome.failed(fatal.kind) for _ in prompts]
            else:
                outcomes = await self.router.acall(prompts, lane)
            with cond:
                for pos, o in zip(positions, outcomes):
                    b.results[pos] = o
                b.remaining -= 1
                outstanding[0] -= 1
                # Wake the reader only when it has something to do: a batch to hand back, or room
                # to read the next one.
                if b.remaining == 0 or outstanding[0] == low_water - 1 or self.fatal is not None:
                    cond.notify()

    def _group(self, prompts: Sequence[str | None], lanes: Sequence[int | None] | None,
               b: _Batch) -> Iterator[tuple[list[int], list[str], int | None]]:
        """The batch's rows as requests of up to `rows_per_request`, rows of one lane together."""
        open_: dict[int | None, tuple[list[int], list[str]]] = {}
        size = self.router.batch
        for i, p in enumerate(prompts):
            if is_blank(p):
                b.results[i] = Outcome.failed(reasons.EMPTY_PROMPT)
                continue
            lane = lanes[i] if lanes is not None else None
            positions, texts = open_.setdefault(lane, ([], []))
            positions.append(i)
            texts.append(p)
            if len(texts) == size:
                yield positions, texts, lane
                del open_[lane]
        for lane, (positions, texts) in open_.items():
            yield positions, texts, lane


# A batch whose rows each name their endpoint (a split): (prompts, lanes).
Routed = tuple


async def _make_queue() -> asyncio.Queue:
    return asyncio.Queue()  # made inside the loop it serves


def _put_all(queue: asyncio.Queue, items: list) -> None:
    for item in items:
        queue.put_nowait(item)


def _drain_then_stop(queue: asyncio.Queue, workers: int) -> None:
    while not queue.empty():
        queue.get_nowait()
    _put_all(queue, [None] * workers)


class _Batch:
    __slots__ = ("results", "remaining")

    def __init__(self, n: int) -> None:
        self.results: list[Outcome | None] = [None] * n
        self.remaining = 0
