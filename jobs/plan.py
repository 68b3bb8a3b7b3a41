"""How a job-wide limit becomes per-task limits.

The arithmetic: with `S` task slots (cores that run tasks at once) and a job-wide `max_concurrency`
`C`, each chunk runs in `P = min(S, C)` partitions, so all of them run at once and no more. Task `i`
may keep `C // P` requests in flight, plus one for the first `C % P` tasks: the sum over tasks is
exactly `C`, and since chunks run one after another, no moment has more than `C` in flight.
Requests and tokens per minute are split the same way, evenly.

When the slots cannot be read (Spark Connect without `run.task_slots`), we take `P = C` tasks of one
request each: never above the limit, if slower than it could be.

Driver mode (`run.calls_from: driver`) needs no plan: one engine in the driver holds all `C`.

Example::

    plan = plan_tasks(max_concurrency=64, slots=8)   # 8 partitions of 8 in flight each
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from jobs.session import conf_get, is_connect
from udfs.spec import EngineSpec

log = logging.getLogger("batch_inference")


@dataclass(frozen=True)
class TaskPlan:
    partitions: int
    per_task: tuple[int, ...]
    slots: int | None

    def even(self) -> TaskPlan:
        """Every task the same share, `C // P`: when tasks of two chunks may run together, any `P` of
        them must stay within `C`, not only the `P` of one chunk."""
        return replace(self, per_task=(min(self.per_task),) * self.partitions)

    def per_task_spec(self, spec: EngineSpec) -> EngineSpec:
        """Split the job-wide rate limits evenly over the tasks."""
        p = self.partitions
        return replace(
            spec,
            requests_per_s=spec.requests_per_s / p if spec.requests_per_s else None,
            tokens_per_s=spec.tokens_per_s / p if spec.tokens_per_s else None,
            input_tokens_per_s=spec.input_tokens_per_s / p if spec.input_tokens_per_s else None,
            output_tokens_per_s=spec.output_tokens_per_s / p if spec.output_tokens_per_s else None,
            start_requests_per_s=spec.start_requests_per_s / p if spec.start_requests_per_s else None,
        )


def split_limit(total: int, parts: int) -> tuple[int, ...]:
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def plan_tasks(max_concurrency: int, slots: int | None) -> TaskPlan:
    if slots is None:
        return TaskPlan(max_concurrency, (1,) * max_concurrency, None)
    p = max(1, min(slots, max_concurrency))
    return TaskPlan(p, split_limit(max_concurrency, p), slots)


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
