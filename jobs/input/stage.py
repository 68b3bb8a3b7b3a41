"""Before the first call: one counting pass, the pending rows written once, and chunks that follow the work.

- `survey`: ONE aggregation over the input joined to the output table gives the input rows, null
  and repeated ids, the pending rows, and the pending rows per hash bucket. A run with nothing
  pending stops after it.
- `stage_pending`: when the run takes more than one chunk, the pending rows (cut to `run.limit`)
  are written once to a scratch Delta table of the run, `<output>__bi_pending_<run>`, laid out by
  bucket (a run of one chunk reads them once, in the chunk's own job). Every chunk reads its buckets from
  there, so the set decided at the start is the set called, on classic Spark and Spark Connect
  alike, and it survives a lost executor (a `localCheckpoint` does neither: serverless restricts it,
  and on a classic cluster it dies with its executor). Scratch tables are dropped at the end of the
  run, and a crashed run's are dropped by the next run on the same output table.
- chunks (`jobs.calls.chunking`) are runs of consecutive buckets: identical requests share a bucket (the
  bucket is a hash of `request_hash`), so each is sent once per run.

Example::

    found = survey(requests, prior, retry_errors=True, limit=None)
    pending = stage_pending(spark, pending_rows(requests, prior, True, None), "main.gold.`t__bi_pending_0123`", found.pending)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession, functions as F
from pyspark.sql.window import Window

from jobs.input.read import with_limit, with_pending

log = logging.getLogger("batch_inference")

# Hash buckets of request_hash: the grain of chunks. 4096 keeps the histogram small for the driver
# and a chunk's rows within a fraction of a percent of its target for any input of 10^6 rows or more.
BUCKETS = 4096
SCRATCH = "__bi_"


def bucket_of(col: str = "request_hash"):
    return F.pmod(F.xxhash64(col), F.lit(BUCKETS)).cast("int")


@dataclass
class Survey:
    input_rows: int = 0
    null_ids: int = 0
    repeated_ids: int = 0  # rows whose id another row has too
    pending_all: int = 0  # pending before run.limit
    pending: int = 0  # what this run takes
    histogram: dict[int, int] = field(default_factory=dict)  # bucket -> pending rows (before run.limit)
    exists: dict[int, int] = field(default_factory=dict)  # bucket -> pending rows whose id the table holds


def survey(requests: DataFrame, prior: DataFrame | None, retry_errors: bool, limit: int | None) -> Survey:
    """The start-of-run checks and counts in one aggregation (one Spark job) over input x output.

    The repeated-id count rides on the join's own partitioning by id (a window over id after the
    join adds no shuffle when the join is a sort-merge join).
    """
    flagged = (requests.transform(with_pending(prior, retry_errors))
               .withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy("id"))))
    rows = (flagged.groupBy(F.when(F.col("_pending"), bucket_of()).alias("_b"))
            .agg(F.count(F.lit(1)).alias("rows"), F.count_if(F.col("id").isNull()).alias("nulls"),
                 F.count_if(F.col("id").isNotNull() & (F.col("_n") > 1)).alias("repeated"),
                 F.count_if(F.col("_exists")).alias("exists"))
            .collect())
    s = Survey()
    for r in rows:
        s.input_rows += r["rows"]
        s.null_ids += r["nulls"]
        s.repeated_ids += r["repeated"]
        if r["_b"] is not None:
            s.histogram[r["_b"]] = r["rows"]
            if r["exists"]:
                s.exists[r["_b"]] = r["exists"]
    s.pending_all = sum(s.histogram.values())
    s.pending = min(s.pending_all, limit) if limit else s.pending_all
    return s


def scratch_table(output: str, run_id: str, kind: str) -> str:
    """`main.gold.completions` -> `main.gold.`completions__bi_pending_0123abcd4567``: beside the output."""
    parts = output.split(".")
    parts[-1] = f"`{parts[-1].strip('`')}{SCRATCH}{kind}_{run_id[:12]}`"
    return ".".join(parts)


def drop_stale_scratch(spark: SparkSession, output: str) -> list[str]:
    """Drop scratch tables a crashed run left beside `output` (one run at a time per output table)."""
    parts = output.split(".")
    base = parts[-1].strip("`").lower()
    where = f" IN {'.'.join(parts[:-1])}" if len(parts) > 1 else ""
    try:
        found = spark.sql(f"SHOW TABLES{where} LIKE '{base}{SCRATCH}*'").collect()
    except Exception as exc:  # a catalog that cannot list: leftovers stay, the run goes on
        log.info("could not list scratch tables beside %s: %s", output, type(exc).__name__)
        return []
    dropped = []
    for r in found:
        if r["isTemporary"]:
            continue
        name = ".".join([*parts[:-1], f"`{r['tableName']}`"])
        spark.sql(f"DROP TABLE IF EXISTS {name}")
        dropped.append(name)
    if dropped:
        log.info("dropped %d scratch table(s) of an earlier, interrupted run: %s", len(dropped), ", ".join(dropped))
    return dropped


def pending_rows(requests: DataFrame, prior: DataFrame | None, retry_errors: bool,
                 limit: int | None, limit_order: str = "id") -> DataFrame:
    """The rows this run calls (cut to `run.limit`), with their `_bucket`: the query `stage_pending` writes.
    Every column of `requests` stays, the kept input columns among them."""
    return (requests.transform(with_pending(prior, retry_errors)).where(F.col("_pending"))
            .transform(with_limit(limit, limit_order))
            .drop("_pending").withColumn("_bucket", bucket_of()))


def stage_pending(spark: SparkSession, pending: DataFrame, name: str, rows: int) -> DataFrame:
    """Write the pending rows once to the scratch table `name`, laid out by bucket; return it, read back.

    Rows are grouped into files by ranges of buckets and sorted within them, so Delta's file
    statistics let a chunk read only the files of its buckets.
    """
    groups = max(1, min(64, rows // 50_000))
    (pending.repartition(groups, F.floor(F.col("_bucket") * groups / BUCKETS))
     .sortWithinPartitions("_bucket")
     .write.format("delta").mode("overwrite").saveAsTable(name))
    return spark.table(name)


def histogram(staged: DataFrame) -> tuple[dict[int, int], dict[int, int]]:
    """Rows per bucket of a staged table (after `run.limit` cut the pending rows), and rows to MERGE."""
    rows = staged.groupBy("_bucket").agg(F.count(F.lit(1)).alias("n"), F.count_if("_exists").alias("e")).collect()
    return {r["_bucket"]: r["n"] for r in rows}, {r["_bucket"]: r["e"] for r in rows if r["e"]}
