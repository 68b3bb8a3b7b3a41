"""The request engine for one task: prompts in, one `Outcome` per prompt out, never an exception.

The engine is the task's runner. It keeps up to the task's limit of requests in flight across input
batches (a pipeline, not a pool drained at each batch boundary), groups rows into requests of
`rows_per_request`, and hands each request to its `Caller` (`udfs.caller`: retries, splitting,
parsing). No Spark here: `udfs.inference` wraps this in a pandas UDF.

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
import time
from collections import deque
from dataclasses import replace
from typing import Any, Iterable, Iterator, Sequence

from udfs import reasons
from udfs.auth import Secret
from udfs.caller import Caller, governor_for
from udfs.limits import (LEARNED_TTL_S, AdaptiveLimiter, RateLimiter, recall, recall_limit, remember,
                         remember_limit)
from udfs.outcome import Outcome
from udfs.prompts import is_blank
from udfs.protocols import is_embeddings_task
from udfs.spec import EngineSpec
from udfs.transport import make_transport


class Engine:
    def __init__(self, spec: EngineSpec, *, max_limit: int | None = None) -> None:
        self.spec = spec
        self.max_limit = max_limit or spec.max_concurrency
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        headers.update({k: v.reveal() if isinstance(v, Secret) else v for k, v in spec.headers.items()})
        self._transport = make_transport(spec.http_client, spec.url, headers, pool_size=self.max_limit,
                                         connect_timeout=spec.connect_timeout_s,
                                         read_timeout=spec.read_timeout_s)
        # Latency says something about load only per unit of work: output tokens (LLM tasks, from
        # `usage`) or rows (embeddings). Such a limit starts slow, to measure the endpoint unloaded.
        self.limiter = AdaptiveLimiter(self.max_limit, adaptive=spec.adaptive,
                                       latency_factor=spec.latency_cut_factor,
                                       slow_start=measures_work(spec.task))
        # What an earlier task of this endpoint and share learned in this process (the last chunk):
        # the pace, the in-flight limit with its latency baseline, and whether its breaker opened.
        self._learned_key = (spec.url, self.max_limit, spec.requests_per_s)
        down = _DOWN.get(spec.url)
        if down is not None and not spec.endpoint_down and time.monotonic() - down[1] <= LEARNED_TTL_S:
            # Chunks overlap in executors mode: the next chunk's task may start before the driver has
            # read that the last one's breaker opened. It probes once first, as a half-open task does.
            spec = replace(spec, endpoint_down=down[0])
        # The task's sending as a whole: pauses and probes, the learned rate, the breaker.
        self.governor = governor_for(spec)
        earlier = recall(self._learned_key) if spec.adaptive and not spec.endpoint_down else None
        if earlier is not None:
            self.governor.start_from(earlier)
        limit = recall_limit(self._learned_key) if spec.adaptive else None
        if limit is not None:
            self.limiter.start_from(limit)
        rate = RateLimiter(spec.requests_per_s, spec.tokens_per_s, input_tokens_per_s=spec.input_tokens_per_s,
                           output_tokens_per_s=spec.output_tokens_per_s)
        self.caller = Caller(spec, self._transport, self.limiter, rate, self.governor)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bi-engine", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Engine(url={self.spec.url!r}, task={self.spec.task!r}, max_limit={self.max_limit})"

    def close(self) -> None:
        if self._loop.is_closed():
            return
        remember(self._learned_key, self.governor)
        remember_limit(self._learned_key, self.limiter)
        if self.governor.open_reason is not None:
            _DOWN[self.spec.url] = (DOWN_IN_THIS_PROCESS, time.monotonic())
        elif self.governor.answered_once:
            _DOWN.pop(self.spec.url, None)
        self._run(self._transport.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def call(self, prompts: Sequence[str]) -> list[Outcome]:
        """Send `prompts` as one request (retrying, splitting on rejection); one outcome per prompt."""
        return self._run(self.caller.acall(prompts))

    # -- the pipeline ------------------------------------------------------------------------------

    def map_batches(self, batches: Iterable[Sequence[str | None]]) -> Iterator[list[Outcome]]:
        """One list of outcomes per input batch, in order, keeping C requests in flight across batches.

        The caller's thread reads input batches and yields finished ones; the event loop's workers take
        requests from a queue. The caller reads ahead while fewer than `2 * max_limit` requests are
        outstanding, so the workers never wait for the next input batch to arrive.
        """
        cond = threading.Condition()
        done: deque[_Batch] = deque()
        outstanding = [0]
        low_water = 2 * self.max_limit
        queue: asyncio.Queue[tuple[_Batch, list[int], list[str]] | None] = self._run(_make_queue())
        # Workers beyond the limit cost nothing while parked; they let a row sleeping before a retry
        # hold a worker without holding one of the limiter's slots.
        workers = [asyncio.run_coroutine_threadsafe(self._worker(queue, cond, outstanding, low_water), self._loop)
                   for _ in range(2 * self.max_limit)]

        def ready() -> Iterator[list[Outcome]]:
            while True:
                with cond:
                    if self.caller.fatal is not None:
                        raise self.caller.fatal
                    if not done or done[0].remaining:
                        return
                    b = done.popleft()
                yield b.results  # type: ignore[misc]

        try:
            for prompts in batches:
                if self.caller.fatal is not None:
                    raise self.caller.fatal
                b = _Batch(len(prompts))
                groups = [(b, positions, texts) for positions, texts in self._group(prompts, b)]
                with cond:
                    b.remaining = len(groups)
                    outstanding[0] += len(groups)
                    done.append(b)
                self._loop.call_soon_threadsafe(_put_all, queue, groups)
                while True:
                    yield from ready()
                    with cond:
                        if (outstanding[0] < low_water or (done and not done[0].remaining)
                                or self.caller.fatal is not None):
                            break
                        cond.wait()
            while done:
                with cond:
                    while done[0].remaining and self.caller.fatal is None:
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
            b, positions, prompts = item
            if self.caller.fatal is not None:  # the task is failing: send nothing more
                outcomes = [Outcome.failed(self.caller.fatal.kind) for _ in prompts]
            else:
                outcomes = await self.caller.acall(prompts)
            with cond:
                for pos, o in zip(positions, outcomes):
                    b.results[pos] = o
                b.remaining -= 1
                outstanding[0] -= 1
                # Wake the reader only when it has something to do: a batch to hand back, or room
                # to read the next one.
                if b.remaining == 0 or outstanding[0] == low_water - 1 or self.caller.fatal is not None:
                    cond.notify()

    def _group(self, prompts: Sequence[str | None], b: _Batch) -> Iterator[tuple[list[int], list[str]]]:
        positions: list[int] = []
        texts: list[str] = []
        for i, p in enumerate(prompts):
            if is_blank(p):
                b.results[i] = Outcome.failed(reasons.EMPTY_PROMPT)
                continue
            positions.append(i)
            texts.append(p)
            if len(texts) == self.caller.batch:
                yield positions, texts
                positions, texts = [], []
        if texts:
            yield positions, texts


# Endpoints whose breaker opened in a task of this process (url -> why, when): the next task starts
# half-open (`Engine`), until one answers again.
_DOWN: dict[str, tuple[str, float]] = {}
DOWN_IN_THIS_PROCESS = "unavailable in an earlier task of this run"


def measures_work(task: str) -> bool:
    """Whether answers of `task` say how much work they were: output tokens in `usage`, or rows."""
    return task in ("llm/v1/chat", "llm/v1/completions") or is_embeddings_task(task)


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
