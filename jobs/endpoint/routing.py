"""A split between endpoints: each row's endpoint, chosen from its id, the same on every run.

`split: {a: 0.5, b: 0.5}` sends each row to one endpoint so that two models can be compared on the
same table. The choice is a pure function of the id (Spark's `xxhash64` of it as a string, which
does not change between runs, clusters or versions), so a rerun with a fresh table sends each id to
the same endpoint again, and ids added later split in the same proportions.

Example::

    pending.withColumn("_lane", lane_column([0.5, 0.5, None]))   # a, b, and a fallback (never chosen)
"""

from __future__ import annotations

from typing import Sequence

from pyspark.sql import Column, functions as F

from jobs.config import JobConfig

# The hash's resolution: a weight is honoured to within 1 / BUCKETS.
BUCKETS = 1_000_000


def lane_column(weights: Sequence[float | None], id_col: str = "id") -> Column:
    """The index of each row's endpoint: endpoint `i` takes the share `weights[i]` (weights sum to 1;
    None: not in the split, a fallback), by where the id's hash falls in [0, 1)."""
    u = F.pmod(F.xxhash64(F.col(id_col).cast("string")), F.lit(BUCKETS)) / F.lit(BUCKETS)
    chosen = [(i, w) for i, w in enumerate(weights) if w]
    lane, edge = None, 0.0
    for i, w in chosen[:-1]:
        edge += w
        lane = F.when(u < F.lit(edge), F.lit(i)) if lane is None else lane.when(u < F.lit(edge), F.lit(i))
    last = F.lit(chosen[-1][0])
    return (last if lane is None else lane.otherwise(last)).cast("int")


def split_lanes(cfg: JobConfig) -> Column | None:
    """`lane_column` for the run's split, in the order of its endpoints; None without a split."""
    if not cfg.split:
        return None
    return lane_column([r.weight for r in cfg.routes()])
