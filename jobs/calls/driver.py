"""Calls from the driver: one engine in the job's own process, `C` in flight across chunks.

For Spark Connect (serverless, standard access, Databricks Connect), whose UDFs may not reach the
internet. A fetch thread reads the next chunk's rows (Arrow) while this one calls; a `Committer`
commits chunk k on a thread of its own while chunk k+1 calls, in order, each once. A crash loses at
most one chunk calling, one committing and one waiting.

Example::

    DriverRun(spark, cfg, spec, run_id, landing, staged, planner, progress, summary).call()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterator

import pyarrow.compute as pc

from jobs.calls.chunk_run import ChunkRun
from jobs.calls.chunking import Chunk, latency_stats
from jobs.calls.outcomes import DriverChunk, status_counts, with_parsed
from jobs.output.commit import commit_chunk
from udfs.engine import Engine
from udfs.outcome import UNSENT

log = logging.getLogger("batch_inference")


class DriverRun(ChunkRun):
    def call(self) -> None:
        """One engine in this process, `C` in flight across chunks; rows come and go as Arrow.

        Its governor spans the run: once its breaker opens (nothing answered for `retry.breaker_s`),
        every row left fails fast as `endpoint_unavailable`, and a rerun sends them again. Refreshable
        credentials refresh themselves in this process.
        """
        limits = [r.limits.max_concurrency for r in self.cfg.routes()]  # each endpoint's C, in config order
        specs = [replace(s, max_concurrency=c) for s, c in zip(self.specs, limits)]
        names = [s.name for s in self.specs]
        fetched: queue.Queue = queue.Queue(maxsize=1)  # the next chunk's rows, read while this one calls
        stop = threading.Event()
        fetcher = threading.Thread(target=self._fetch, args=(fetched, stop), name="bi-fetch", daemon=True)
        chunks: list[tuple[Chunk, DriverChunk]] = []
        first_call: list[float] = []

        def batches() -> Iterator[Any]:
            while True:
                item = fetched.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                chunk, rows = item
                log.debug("chunk %d: to the engine", chunk.index + 1)
                todo = DriverChunk(rows, self.embeddings, structured=self.parsed_type is not None, names=names)
                chunks.append((chunk, todo))
                first_call[:] = first_call or [time.monotonic()]
                yield todo.batch

        with Committer() as committer, Engine(specs, max_limit=limits) as engine:
            fetcher.start()
            try:
                for outcomes in engine.map_batches(batches()):
                    chunk, todo = chunks.pop(0)
                    log.debug("chunk %d: answered", chunk.index + 1)
                    spent = any(o.status == UNSENT for o in outcomes)
                    if engine.caller.budget is not None:
                        self.summary.spent = engine.caller.budget.spent.as_dict()
                    # Calls run back to back across chunks: the rate is rows over time since the first.
                    self.pace.called_rows += chunk.rows
                    self.pace.calling_s = time.monotonic() - first_call[0]
                    self.learn_latency(*latency_stats([o.latency_ms for o in outcomes if o.latency_ms is not None]))
                    committer.submit(self._driver_commit(chunk, todo, outcomes), lambda counts: self.committed(*counts))
                    if spent:  # run.budget: nothing more is sent; what was answered is committed
                        break
            finally:
                if engine.caller.budget is not None:
                    self.summary.spent = engine.caller.budget.spent.as_dict()
                stop.set()
                while fetcher.is_alive():  # unblock a fetcher waiting to hand over a chunk
                    try:
                        fetched.get_nowait()
                    except queue.Empty:
                        pass
                    fetcher.join(0.05)

    def _fetch(self, fetched: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                chunk = self.next_chunk()
                if chunk is None:
                    break
                rows = chunk.of(self.staged).select(*self.columns).toArrow()
                _put(fetched, (chunk, rows), stop)
        except BaseException as exc:  # handed to the caller's thread, which raises it
            _put(fetched, exc, stop)
            return
        _put(fetched, None, stop)

    def _driver_commit(self, chunk: Chunk, todo: DriverChunk,
                       outcomes: list) -> Callable[[], tuple[dict[str, int], int]]:
        def commit() -> tuple[dict[str, int], int]:
            table = todo.landed(outcomes, *(self.dim.learned(outcomes) if self.embeddings else (None, "")))
            sent = pc.not_equal(table.column("status"), UNSENT)
            unsent = len(table) - pc.sum(sent).as_py() if len(table) else 0
            table = table.filter(sent)  # not sent (run.budget): never written, so still pending
            landed = self.spark.createDataFrame(table)
            if self.parsed_type is not None:
                landed = landed.transform(with_parsed(self.parsed_type))
            landed = landed.transform(self.finish)
            return commit_chunk(self.spark, self.cfg.output.table, landed, self.run_id, chunk.index,
                                counts=status_counts(table)), unsent
        return commit


class Committer:
    """Commits chunks in order on one thread of its own while the caller goes on calling.

    `submit` waits while one commit runs and another waits (bounded memory, bounded loss on a crash)
    and raises the first commit's failure, so a broken commit stops the calls too.
    """

    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="bi-commit", daemon=True)
        self._thread.start()

    def submit(self, commit: Callable[[], Any], then: Callable[[Any], None]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((commit, then))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[1](item[0]())
                except BaseException as exc:
                    self._error = exc

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Committer:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            self.close()
        else:  # the caller failed: let committed chunks stand, raise the caller's error
            self._queue.put(None)
            self._thread.join()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
