"""Calls from the executors: the pandas UDF in Spark's tasks, one Spark job per chunk that calls and
appends, two chunk jobs side by side on half the slots each and a third queued (classic clusters).

Example::

    ExecutorsRun(spark, cfg, spec, run_id, landing, staged, planner, progress, summary).call(scratch)
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any, Callable

from pyspark.sql import DataFrame, Observation, functions as F

from jobs.calls.chunk_run import ChunkRun
from jobs.calls.chunking import Chunk
from jobs.calls.outcomes import with_outcomes
from jobs.calls.plan import TaskPlan, plan_tasks, task_slots
from jobs.observe.stats import tokens_of_chars
from jobs.output.commit import commit_chunk
from udfs.budget import Spend
from udfs.outcome import UNSENT

log = logging.getLogger("batch_inference")

# Chunk jobs in flight at once (when they may overlap: `overlap_chunks`): two running side by side,
# each on half the task slots, and a third queued, whose tasks take the slots of whichever ends first.
CHUNKS_IN_FLIGHT = 3


class ExecutorsRun(ChunkRun):
    def call(self, outcomes_table: str) -> None:
        """Per chunk ONE Spark job: the UDF calls, and the same job appends the outcomes to Delta.

        No separate commit job, so none waits for slots held by calling tasks. When chunks may
        overlap (`overlap_chunks`), `CHUNKS_IN_FLIGHT` chunk jobs are in flight and two run side by
        side, each on half the slots (`TaskPlan.halved`), started at different times (the chunks grow
        until the latency is known): a chunk's tasks end waiting for their slowest answers, and
        meanwhile the other chunk's tasks, with rows still to send, borrow the share they leave
        idle (`udfs.hostpool`, same host); when they end, the queued chunk takes their slots, and the
        chunk that ended lands and the next is queued at once, however old the chunks still calling. With all
        the slots per chunk, every task of a chunk would drain at once, and the endpoint would sit
        nearly idle until the last answer freed a slot. The job-wide limit holds all the same: every
        task keeps `C // S` of its own and the cluster runs at most `S` tasks at once, whichever
        chunk they belong to; a borrowed permit is one a task on the same host does not use.
        Counts by status come from an `Observation` of each job. A chunk holding ids the table
        already has needs a MERGE, whose source must be stable: its outcomes are written once to a
        scratch table and merged from there, with no other chunk in flight (MERGE reads the table
        that concurrent appends would change).
        """
        plan = plan_tasks([r.limits.max_concurrency for r in self.cfg.routes()],
                          task_slots(self.spark, self.cfg.run.task_slots))
        # With run.budget, one chunk at a time: each chunk's tasks share what the committed ones left.
        depth = CHUNKS_IN_FLIGHT if overlap_chunks(plan) and self.spec.budget is None else 1
        if depth > 1:  # with an even share per task, tasks on one host may lend each other theirs
            plan = replace(plan.even(), pool=self.run_id if self.cfg.limits.host_pool else None)
        # Overlapping chunks run side by side, each on half the slots (`TaskPlan.halved`); a chunk
        # that runs alone (a MERGE, the first of vectors, a run's only chunk) takes them all.
        self.plan, self.side = plan, plan.halved() if depth > 1 else plan
        lanes = " + ".join("/".join(map(str, sorted(set(lane)))) for lane in plan.per_lane)
        if depth > 1:
            log.info("executors: chunks side by side, %d task(s) each of %d slots, %s in flight per task%s",
                     self.side.partitions, plan.partitions, lanes,
                     ", shares pooled per host" if plan.pool else "")
        else:
            log.info("executors: %d task(s) x %s in flight", plan.partitions, lanes)
        # Chunks in flight, and the lanes free for the next: a lane's chunks commit in order (`append_once`).
        running: dict[Future, tuple[Chunk, float, int]] = {}
        lanes = list(range(depth))
        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="bi-chunk") as pool:
            try:
                while self.summary.stopped is None and (chunk := self.next_chunk()) is not None:
                    alone = chunk.exists or (self.embeddings and self.dim.value is None and self.summary.chunks == 0)
                    while running and (alone or len(running) >= depth):
                        self._land_next(running, lanes)
                    t0 = time.monotonic()
                    only = not running and self.planner.left == 0  # nothing to run beside it
                    lane = lanes.pop(0)
                    call = pool.submit(self._call_chunk, chunk, outcomes_table, lane,
                                       self.plan if alone or only else self.side)
                    running[call] = (chunk, t0, lane)
                    if alone or self.spec.budget is not None:  # a MERGE, the first chunk of vectors (it
                        self._land_next(running, lanes)         # fixes their length), or a budget to settle
                while running:
                    self._land_next(running, lanes)
            finally:
                for f in running:  # a failed chunk: let the others finish, then raise
                    f.cancel()
                wait(list(running))

    def _call_chunk(self, chunk: Chunk, outcomes_table: str, lane: int,
                    plan: TaskPlan) -> tuple[dict[str, int], dict[str, Any]]:
        """One chunk's Spark job (two with a MERGE) on `plan`'s tasks, committed in `lane`: counts by
        status, and what `observed` saw."""
        specs = self.specs
        if self.spec.budget is not None:  # each task's share of what the committed chunks left
            specs = [replace(s, budget=s.budget.less(self.spent).share(plan.partitions)) if s.budget else s
                     for s in specs]
        outcomes = with_outcomes(specs, plan, self.parsed_type, self.health)
        seen = Observation(re.sub(r"\W", "_", f"chunk_{self.run_id}_{chunk.index}"))
        # Observed before `finish` names the columns as the output table does (`prompt` may become `text`).
        landed = observed(chunk.of(self.staged).select(*self.columns).transform(outcomes)
                          .transform(self._dim_check()), seen, self._prices()).transform(self.finish)
        out = self.cfg.output.table
        if chunk.exists:
            (landed.withColumn("_chunk", F.lit(chunk.index))
             .write.format("delta").mode("append").saveAsTable(outcomes_table))  # the calls
            stable = self.spark.table(outcomes_table).where(F.col("_chunk") == chunk.index).drop("_chunk")
            return commit_chunk(self.spark, out, stable, self.run_id, chunk.index), _observed(seen)
        # One txnAppId per lane: a lane takes its next chunk only once its last one landed, so a lane's
        # chunks commit in the order of their indexes (Delta's txnVersion), lanes in any order.
        return append_once(landed.drop("_exists"), out, f"{self.run_id}.{lane}", chunk.index, seen)

    def _land_next(self, running: dict[Future, tuple[Chunk, float, int]], lanes: list[int]) -> None:
        """Land the chunk in flight that ends first (of two at once, the older), and free its lane.

        Not the oldest: Spark starts the chunk jobs in the order their queries reach its scheduler, not
        the order the chunks were submitted, so the oldest chunk may be the last to start. Waiting for
        it, the next chunk would not start either, and the chunks that ended would leave their slots idle.
        """
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        call = min(done, key=lambda f: running[f][0].index)
        chunk, t0, lane = running.pop(call)
        lanes.append(lane)
        self._landed(chunk, t0, call)

    def _landed(self, chunk: Chunk, t0: float, future: Future) -> None:
        counts, got = future.result()
        self.learn_latency(got.get("latency_ms"), got.get("p99_ms"))
        self.spent.add(Spend(got.get("input_tokens") or 0, got.get("output_tokens") or 0, got.get("requests") or 0))
        self.spent.cost += got.get("cost") or 0.0
        if self.spec.budget is not None:
            self.summary.spent = self.spent.as_dict()
        self.pace.called_rows += chunk.rows
        self.pace.calling_s += time.monotonic() - t0
        log.debug("chunk %d: %d rows called and committed in %.1fs", chunk.index + 1, chunk.rows,
                  time.monotonic() - t0)
        self.health.after_chunk(self.spark, self.cfg.output.table, self.run_id, chunk.index, counts)
        self.committed(counts, got.get("unsent") or 0)

    def _prices(self) -> dict[str, tuple[float, float]]:
        """Each endpoint's prices per input and output token, for what a chunk spent (`run.budget`)."""
        return {s.name: (s.budget.price_in, s.budget.price_out) for s in self.specs if s.budget is not None}

    def _dim_check(self) -> Callable[[DataFrame], DataFrame]:
        """Vectors: the run's one length (`jobs.calls.outcomes.Dimension`), learned from the table once the first
        chunk with vectors committed."""
        if not self.embeddings:
            return _unchanged
        return self.dim.check(self.spark, self.cfg.output.table, self.run_id)


def observed(landed: DataFrame, seen: Observation, prices: dict[str, tuple[float, float]] | None = None) -> DataFrame:
    """`landed` with `seen` counting it as it passes (rows, ok, unsent, latency, what it spent: at
    `prices`, each endpoint's per input and output token), then without its unsent rows (run.budget:
    never written, so they stay pending)."""
    tokens_in = F.coalesce(F.col("prompt_tokens"), tokens_of_chars(F.length("prompt")))
    tokens_out = (F.coalesce(F.col("completion_tokens"), tokens_of_chars(F.coalesce(F.length("response"), F.lit(0))))
                  if "response" in landed.columns else F.lit(0))
    sent = F.col("attempts") > 0
    return (landed.observe(seen, F.count(F.lit(1)).alias("rows"), F.count_if(F.col("status") == "ok").alias("ok"),
                           F.count_if(F.col("status") == UNSENT).alias("unsent"),
                           F.avg("latency_ms").alias("latency_ms"),
                           F.percentile_approx("latency_ms", 0.99).alias("p99_ms"),
                           F.sum(F.when(sent, tokens_in)).alias("input_tokens"),
                           F.sum(F.when(sent, tokens_out)).alias("output_tokens"),
                           F.sum("attempts").alias("requests"),
                           F.sum(F.when(sent, _cost(tokens_in, tokens_out, prices or {}))).alias("cost"))
            .where(F.col("status") != UNSENT))


def _cost(tokens_in, tokens_out, prices: dict[str, tuple[float, float]]):
    """A row's cost at the prices of the endpoint that answered it (0 without prices)."""
    cost = F.lit(0.0)
    for name, (p_in, p_out) in prices.items():
        cost = F.when(F.col("endpoint") == name, tokens_in * p_in + tokens_out * p_out).otherwise(cost)
    return cost


def append_once(landed: DataFrame, name: str, app_id: str, chunk: int,
                seen: Observation) -> tuple[dict[str, int], dict[str, Any]]:
    """Append `landed` (ids new to the table; `observed` by `seen`) in one job, idempotent per
    (`app_id`, chunk); counts by status, and what `seen` saw.

    Delta skips a write whose `txnVersion` is not above the last one committed for its `txnAppId`, so
    chunks that may commit out of order must use different app ids (`ExecutorsRun`: one per lane).
    `writeTo(...).append()`: its plan keeps the `Observation` (on classic Spark `saveAsTable` runs
    Delta's write in a nested query, and the observed counts never arrive).
    """
    landed.writeTo(name).option("txnAppId", app_id).option("txnVersion", str(chunk)).append()
    got = _observed(seen)
    rows, ok, unsent = got.get("rows") or 0, got.get("ok") or 0, got.get("unsent") or 0
    return {k: n for k, n in (("ok", ok), ("error", rows - ok - unsent)) if n}, got


def _observed(seen: Observation) -> dict[str, Any]:
    """What an `Observation` saw; nothing when no job ran (Delta skipped a chunk it had committed)."""
    try:
        return seen.get
    except Exception:
        return {}


def overlap_chunks(plan: TaskPlan) -> bool:
    """Whether chunk jobs may be in flight together without passing the job-wide limit: only when
    there is one task per slot (the cluster then runs at most `partitions` tasks at once, of any
    chunk). With unknown slots, or fewer partitions than slots (C < S), a second chunk's tasks
    would run beside the first's."""
    return plan.slots is not None and plan.partitions == plan.slots


def _unchanged(df: DataFrame) -> DataFrame:
    return df
