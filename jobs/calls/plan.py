"""How a job-wide limit becomes per-task limits.

The arithmetic: with `S` task slots (cores that run tasks at once) and a job-wide `max_concurrency`
`C`, each chunk runs in `P = min(S, C)` partitions, so all of them run at once and no more. Task `i`
may keep `C // P` requests in flight, plus one for the first `C % P` tasks: the sum over tasks is
exactly `C`, and since chunks run one after another, no moment has more than `C` in flight.
Requests and tokens per minute are split the same way, evenly.

When the slots cannot be read (Spark Connect without `run.task_slots`), we take `P = C` tasks of one
request each: never above the limit, if slower than it could be.

Several endpoints (`endpoints:`): each has its own limit `C_e`, and `P = min(S, min C_e)`, so that
every task holds at least one slot of each endpoint and the sum over tasks is exactly `C_e`.

Chunks that overlap (one task per slot, every share even: `jobs.calls.executors`) run side by side
on half the slots each (`TaskPlan.halved`): each task still keeps `C // S`, and at most `S` tasks
run at once, so the sum stays within `C`; rate limits split over the `S` tasks, not a chunk's.

Driver mode (`run.calls_from: driver`) needs no plan: one engine in the driver holds all `C`.

Example::

    plan = plan_tasks(max_concurrency=64, slots=8)   # 8 partitions of 8 in flight each
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Sequence

from jobs.session import conf_get, is_connect
from udfs.spec import EngineSpec

log = logging.getLogger("batch_inference")


@dataclass(frozen=True)
class TaskPlan:
    partitions: int
    per_task: tuple[int, ...]
    slots: int | None
    # With several endpoints: each endpoint's `per_task`, in the order of their limits (the first is
    # `per_task`). Every task has a share of each endpoint (`P` is at most the smallest limit).
    lanes: tuple[tuple[int, ...], ...] = ()
    # The run's key for pooling the in-flight shares of the tasks on each host (`udfs.hostpool`):
    # only for an even plan of one task per slot (`jobs.calls.executors.overlap_chunks`); None: none.
    pool: str | None = None
    # Tasks that may run at once, of this chunk and others (`halved`); None: `partitions`.
    at_once: int | None = None

    @property
    def tasks_at_once(self) -> int:
        return self.at_once or self.partitions

    def halved(self) -> TaskPlan:
        """This even plan over half its tasks, each keeping its `C // S`: two chunks run side by side
        (`jobs.calls.executors`), and rate limits still split over every task that may run at once."""
        p = max(1, self.partitions // 2)
        return replace(self, partitions=p, per_task=self.per_task[:p], lanes=tuple(lane[:p] for lane in self.lanes),
                       at_once=self.tasks_at_once)

    def even(self) -> TaskPlan:
        """Every task the same share, `C // P`: when tasks of two chunks may run together, any `P` of
        them must stay within `C`, not only the `P` of one chunk."""
        lanes = tuple((min(lane),) * self.partitions for lane in self.lanes)
        return replace(self, per_task=(min(self.per_task),) * self.partitions, lanes=lanes)

    @property
    def per_lane(self) -> tuple[tuple[int, ...], ...]:
        return self.lanes or (self.per_task,)

    def per_task_spec(self, spec: EngineSpec) -> EngineSpec:
        """Split the job-wide rate limits evenly over the tasks."""
        p = self.tasks_at_once
        return replace(
            spec,
            requests_per_s=spec.requests_per_s / p if spec.requests_per_s else None,
            tokens_per_s=spec.tokens_per_s / p if spec.tokens_per_s else None,
            input_tokens_per_s=spec.input_tokens_per_s / p if spec.input_tokens_per_s else None,
            output_tokens_per_s=spec.output_tokens_per_s / p if spec.output_tokens_per_s else None,
            start_requests_per_s=spec.start_requests_per_s / p if spec.start_requests_per_s else None,
            pool_key=self.pool,
        )


def split_limit(total: int, parts: int) -> tuple[int, ...]:
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def plan_tasks(max_concurrency: int | Sequence[int], slots: int | None) -> TaskPlan:
    """The plan for one job-wide limit, or for several endpoints' (`max_concurrency` a list): then
    `P = min(S, smallest limit)` tasks, each with a share of every endpoint, so that no endpoint's
    limit is passed and every task can send to each (a split's rows, a fallback's)."""
    limits = [max_concurrency] if isinstance(max_concurrency, int) else list(max_concurrency)
    p = min(limits) if slots is None else max(1, min(slots, *limits))
    lanes = tuple(split_limit(c, p) for c in limits)
    return TaskPlan(p, lanes[0], slots, lanes if len(limits) > 1 else ())


def task_slots(spark: Any, configured: int | None = None) -> int | None:
    """Cores running tasks at once: from `run.task_slots`, the conf (guarded: serverless refuses keys),
    or on classic Spark only, the SparkContext (Spark Connect has none)."""
    if configured:
        return configured
    master = conf_get(spark, "spark.master") or ""
    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master)
    if m:
        n = m.group(1)
        return os.cpu_count() or 1 if n == "*" else int(n or 1)
    value = conf_get(spark, "spark.default.parallelism")
    if value and value.isdigit():
        return int(value)
    if not is_connect(spark):
        try:
            return int(spark.sparkContext.defaultParallelism)
        except Exception:
            pass
    log.warning("cannot read the cluster's task slots; set run.task_slots to use the full "
                "max_concurrency with fewer tasks")
    return None
