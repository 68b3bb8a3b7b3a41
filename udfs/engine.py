"""The request engine for one task: prompts in, one `Outcome` per prompt out, never an exception.

It keeps up to the task's limit of requests in flight across input batches (a pipeline, not a pool
drained at each batch boundary), groups rows into requests of `rows_per_request`, retries what is worth
retrying, splits a batch the endpoint rejects, and turns every failure into an error outcome with a
reason. No Spark here: `udfs.inference` wraps this in a pandas UDF.

Requests run as coroutines in one event loop on a thread of the engine's own, while the caller's
thread reads input batches and hands back finished ones: C requests in flight cost C small
coroutines, not C threads fighting for the GIL.

Example::

    engine = Engine(EngineSpec(url="http://127.0.0.1:7777/", task="custom", endpoint_type="driver_proxy"))
    for outcomes in engine.map_batches([["hello", "world"]]):
        print([o.response for o in outcomes])
"""

from __future__ import annotations

import asyncio
import importlib
import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from udfs.auth import Secret, scrub
from udfs.limits import AdaptiveLimiter, RateLimiter
from udfs.prompts import is_blank
from udfs.protocols import BadResponse, Parsed, Protocol, make_protocol
from udfs.transport import TransportError, make_transport

MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class RetrySpec:
    statuses: tuple[int, ...] = (429, 500, 502, 503, 504)
    max_attempts: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    row_budget_s: float = 600.0


@dataclass(frozen=True)
class EngineSpec:
    """Everything a task needs to call the endpoint; picklable, and its repr shows no secret."""

    url: str
    task: str = "custom"
    endpoint_type: str = "serving"
    headers: dict[str, Secret | str] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    system_prompt: str | None = None
    transform_input: str | None = None
    transform_output: str | None = None
    rows_per_request: int = 1
    max_concurrency: int = 8
    requests_per_s: float | None = None
    tokens_per_s: float | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    adaptive: bool = True
    latency_cut_factor: float = 3.0
    http_client: str = "asyncio"
    retry: RetrySpec = field(default_factory=RetrySpec)

    def secrets(self) -> list[Secret]:
        return [v for v in self.headers.values() if isinstance(v, Secret)]


@dataclass
class Outcome:
    response: str | None = None
    embedding: list[float] | None = None
    status: str = "ok"
    error: str | None = None
    http_status: int | None = None
    attempts: int = 0
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @classmethod
    def failed(cls, reason: str, **kw: Any) -> Outcome:
        return cls(status="error", error=reason[:MAX_ERROR_CHARS], **kw)


def import_function(ref: str) -> Callable[..., Any]:
    """`"package.module:function"` -> the function, with an error that names the reference."""
    module_name, _, attr = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import {ref!r}: {exc}") from None
    if not callable(fn):
        raise ImportError(f"{ref!r} is not callable")
    return fn


class _Failure(Exception):
    """One attempt's failure: `kind` is the reason code, `retry_after` the server's wish if any."""

    def __init__(self, kind: str, detail: str = "", *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None, split: bool = False) -> None:
        super().__init__(kind)
        self.kind, self.detail, self.status = kind, detail, status
        self.retryable, self.retry_after, self.split = retryable, retry_after, split

    def reason(self, note: str = "") -> str:
        # With no detail, a note reads `timeout: (gave up ...)`, as with one: `code: detail (note)`.
        return f"{self.kind}: {self.detail}" if self.detail else (f"{self.kind}:" if note else self.kind)


class Engine:
    def __init__(self, spec: EngineSpec, *, max_limit: int | None = None) -> None:
        self.spec = spec
        self.max_limit = max_limit or spec.max_concurrency
        self.protocol: Protocol = make_protocol(spec.task, spec.endpoint_type, model_kwargs=spec.model_kwargs,
                                                stop=spec.stop, system_prompt=spec.system_prompt)
        self.batch = max(1, min(spec.rows_per_request, self.protocol.max_batch))
        self._transform_in = import_function(spec.transform_input) if spec.transform_input else None
        self._transform_out = import_function(spec.transform_output) if spec.transform_output else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        headers.update({k: v.reveal() if isinstance(v, Secret) else v for k, v in spec.headers.items()})
        self._transport = make_transport(spec.http_client, spec.url, headers, pool_size=self.max_limit,
                                         connect_timeout=spec.connect_timeout_s,
                                         read_timeout=spec.read_timeout_s)
        self.limiter = AdaptiveLimiter(self.max_limit, adaptive=spec.adaptive,
                                       latency_factor=spec.latency_cut_factor)
        self.rate = RateLimiter(spec.requests_per_s, spec.tokens_per_s)
        self._retry_after = Retry(total=None, respect_retry_after_header=True, retry_after_max=3600)
        self._secrets = spec.secrets()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bi-engine", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Engine(url={self.spec.url!r}, task={self.spec.task!r}, max_limit={self.max_limit})"

    def close(self) -> None:
        if self._loop.is_closed():
            return
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

    # -- one request -------------------------------------------------------------------------------

    def call(self, prompts: Sequence[str]) -> list[Outcome]:
        """Send `prompts` as one request (retrying, splitting on rejection); one outcome per prompt."""
        return self._run(self.acall(prompts))

    async def acall(self, prompts: Sequence[str]) -> list[Outcome]:
        try:
            return await self._call(prompts)
        except Exception as exc:  # a bug or a transform that raised: the rows fail, the batch does not
            reason = self._clean(f"internal_error: {type(exc).__name__}: {exc}")
            return [Outcome.failed(reason) for _ in prompts]

    # The retry loop is ours; urllib3's `Retry` only parses Retry-After here (seconds or HTTP date).
    # Its own loop cannot do what a batch job needs: it sleeps while holding the connection and the
    # in-flight slot, its jitter is added, not "full", it has no per-row time budget, it cannot split a
    # batch the endpoint refuses, and it would hide the 429s that AIMD must see.
    async def _call(self, prompts: Sequence[str]) -> list[Outcome]:
        try:
            body = self.protocol.build(prompts)
            if self._transform_in is not None:
                body = self._transform_in(body)
            payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        except Exception as exc:
            reason = self._clean(f"transform_input_failed: {type(exc).__name__}: {exc}")
            return [Outcome.failed(reason) for _ in prompts]
        sent: list[float] = []  # when the first attempt left: queueing before it is not latency
        attempts = 0
        spec = self.spec.retry
        while True:
            attempts += 1
            try:
                parsed = await self._attempt(payload, prompts, sent)
            except _Failure as f:
                elapsed = time.monotonic() - sent[0] if sent else 0.0
                if f.split and len(prompts) > 1:
                    half = len(prompts) // 2
                    return await self._call(prompts[:half]) + await self._call(prompts[half:])
                wait = self._backoff(attempts, f.retry_after)
                if f.retryable and attempts < spec.max_attempts and elapsed + wait <= spec.row_budget_s:
                    await asyncio.sleep(wait)  # holds no slot: other rows go meanwhile
                    continue
                gave_up = f"(gave up after {attempts} attempts, {elapsed:.1f}s)" if f.retryable and attempts > 1 else ""
                latency = round(elapsed * 1000, 3)
                reason = self._clean(f.reason(), gave_up)
                return [Outcome.failed(reason, http_status=f.status, attempts=attempts, latency_ms=latency)
                        for _ in prompts]
            latency = round((time.monotonic() - sent[0]) * 1000, 3)
            return [Outcome(response=p.text, embedding=p.embedding, http_status=200, attempts=attempts,
                            latency_ms=latency, prompt_tokens=p.prompt_tokens,
                            completion_tokens=p.completion_tokens) for p in parsed]

    async def _attempt(self, payload: bytes, prompts: Sequence[str], sent: list[float]) -> list[Parsed]:
        await self.limiter.acquire()
        overloaded, latency = False, None
        try:
            await self.rate.acquire()
            t0 = time.monotonic()
            if not sent:
                sent.append(t0)
            try:
                status, headers, data = await self._transport.post(payload)
            except TransportError as exc:
                raise _Failure(exc.kind, exc.detail, retryable=True) from None
            latency = time.monotonic() - t0
            if 200 <= status < 300:
                return self._parse(data, prompts)
            overloaded = status in (429, 503)
            raise self._http_failure(status, headers, data, len(prompts))
        finally:
            self.limiter.release(overloaded=overloaded, latency=None if overloaded else latency)

    def _parse(self, data: bytes, prompts: Sequence[str]) -> list[Parsed]:
        try:
            answer = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            snippet = self._text(data)[:80].replace("\n", " ")
            raise _Failure("bad_response", f"answer is not JSON: {snippet!r}", status=200) from None
        if self._transform_out is not None:
            try:
                answer = self._transform_out(answer)
            except Exception as exc:
                raise _Failure("transform_output_failed", f"{type(exc).__name__}: {exc}", status=200) from None
            if isinstance(answer, str) and len(prompts) == 1:
                return [Parsed(text=answer)]
            if isinstance(answer, list) and len(answer) == len(prompts) and all(isinstance(a, str) for a in answer):
                return [Parsed(text=a) for a in answer]
        try:
            parsed = self.protocol.parse(answer, prompts)
        except BadResponse as exc:
            raise _Failure("bad_response", str(exc), status=200) from None
        usage = sum((p.prompt_tokens or 0) + (p.completion_tokens or 0) for p in parsed)
        self.rate.charge_tokens(usage)
        return parsed

    def _http_failure(self, status: int, headers: Any, data: bytes, n: int) -> _Failure:
        retry_after = None
        if headers.get("retry-after"):
            try:
                retry_after = self._retry_after.parse_retry_after(headers["retry-after"])
            except InvalidHeader:
                retry_after = None
        detail = _error_message(self._text(data))
        retryable = status in self.spec.retry.statuses
        # A batch refused as a whole (too large, one bad input): split it so only bad rows fail.
        split = n > 1 and status in (400, 413, 422)
        return _Failure(f"http_{status}", detail, status=status, retryable=retryable,
                        retry_after=retry_after, split=split)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        spec = self.spec.retry
        ceiling = min(spec.backoff_max_s, spec.backoff_base_s * (2 ** (attempt - 1)))
        if retry_after is not None:
            # Never earlier than asked; the jitter on top keeps threads from firing in lockstep.
            return retry_after + random.uniform(0, max(0.05, min(spec.backoff_base_s, ceiling)))
        return random.uniform(0, ceiling)  # "full jitter"

    def _clean(self, text: str, suffix: str = "") -> str:
        """Secrets out, then the cut, then `suffix`: the endpoint's message is cut, never our own note."""
        if not suffix:
            return scrub(text, self._secrets)[:MAX_ERROR_CHARS]
        room = MAX_ERROR_CHARS - len(suffix) - 1
        return f"{scrub(text, self._secrets)[:room]} {suffix}"

    def _text(self, data: bytes) -> str:
        """A failed answer's start as text, secrets removed. Only the first 16 KiB: messages are read from
        the first 4,000 characters, and a run of a secret cut at the edge is still scrubbed if it is
        8 characters or more (shorter is not a secret's worth)."""
        return scrub(data[:16384].decode("utf-8", "replace"), self._secrets)

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
                    if not done or done[0].remaining:
                        return
                    b = done.popleft()
                yield b.results  # type: ignore[misc]

        try:
            for prompts in batches:
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
                        if outstanding[0] < low_water or (done and not done[0].remaining):
                            break
                        cond.wait()
            while done:
                with cond:
                    while done[0].remaining:
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
            outcomes = await self.acall(prompts)
            with cond:
                for pos, o in zip(positions, outcomes):
                    b.results[pos] = o
                b.remaining -= 1
                outstanding[0] -= 1
                # Wake the reader only when it has something to do: a batch to hand back, or room
                # to read the next one.
                if b.remaining == 0 or outstanding[0] == low_water - 1:
                    cond.notify()

    def _group(self, prompts: Sequence[str | None], b: _Batch) -> Iterator[tuple[list[int], list[str]]]:
        positions: list[int] = []
        texts: list[str] = []
        for i, p in enumerate(prompts):
            if is_blank(p):
                b.results[i] = Outcome.failed("empty_prompt")
                continue
            positions.append(i)
            texts.append(p)
            if len(texts) == self.batch:
                yield positions, texts
                positions, texts = [], []
        if texts:
            yield positions, texts


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


def _error_message(body_text: str) -> str:
    """The endpoint's own error message when it sends one (`{"message": ...}`), else the body's start."""
    text = body_text[:4000]
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message", value)
            if value:
                code = body.get("error_code")
                return (f"{code}: {value}" if isinstance(code, str) else str(value))[:MAX_ERROR_CHARS]
    if "<html" in text[:200].lower():
        return "HTML error page"
    return " ".join(text.split())[:MAX_ERROR_CHARS]
