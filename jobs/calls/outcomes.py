"""Calling: every pending row gets its outcome columns from the endpoint.

Two places call, with the same engine (`udfs.engine`) and the same rules:

- executors (`with_outcomes`): the pandas UDF, one engine per task with its share of the limit;
- driver (`DriverChunk`): the job's own process, one engine holding the whole limit, for Spark
  Connect and serverless, whose UDFs cannot reach the internet. A chunk's rows arrive as Arrow;
  `DriverChunk.landed` gives them back with their outcomes, as Arrow, for the commit.

Identical requests are sent once (one `request_hash`, one call) and their answer goes to every row
that asked; rows a precheck stopped get their error without a call. Kept input columns ride along.
With structured output, each valid answer's canonical JSON becomes the typed `parsed` column
(`with_parsed`). For embeddings, a vector whose length is not the run's becomes an error row.

Example::

    landed = chunk.transform(with_outcomes(spec, plan)).transform(with_dimension_check(1024))
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, functions as F, types as T
from pyspark.sql.window import Window

from jobs.calls.plan import TaskPlan
from jobs.endpoint.health import EndpointHealth
from jobs.input.read import Transform, column
from jobs.output.structured import parsed_column, response_type
from udfs import reasons
from udfs.inference import PARSED_JSON, inference_udf, outcome_schema
from udfs.outcome import Outcome
from udfs.protocols import is_embeddings_task
from udfs.spec import EngineSpec


# The request columns `jobs.input.read` makes; any other input column is a kept one, carried to the output.
REQUEST_COLUMNS = ("id", "prompt", "request_hash", "precheck", "_exists")
# With a split: each row's endpoint, an index into the run's endpoints (`jobs.endpoint.routing.with_lane`).
LANE = "_lane"


def with_outcomes(spec: EngineSpec | Sequence[EngineSpec], plan: TaskPlan, parsed_type: T.DataType | None = None,
                  health: EndpointHealth | None = None) -> Transform:
    """Call the endpoint once per distinct request; every row gets its outcome columns.

    With a response schema, `parsed` is read with `parsed_type` (the output table's type of it, which
    may hold fields of earlier schemas), by default the schema's own. The UDF is built anew for each
    chunk (each call of the step), from `health.for_chunk(spec)`: the credentials as they are when the
    chunk starts, and half-open tasks if the endpoint was down in an earlier chunk.
    """
    specs = [spec] if isinstance(spec, EngineSpec) else list(spec)
    first = specs[0]
    embeddings = is_embeddings_task(first.task)
    structured = first.response_schema is not None
    if structured and parsed_type is None:
        parsed_type = response_type(first.response_schema or {})
    health = health or EndpointHealth()
    outcome_fields = outcome_schema(embeddings, structured).fields
    fields = [f.name for f in outcome_fields if f.name not in (PARSED_JSON, "endpoint")] + (
        ["parsed"] if structured else []) + ["endpoint"]

    def step(df: DataFrame) -> DataFrame:
        routed = LANE in df.columns  # a split chose each row's endpoint (`jobs.endpoint.routing`)
        for_chunk = [plan.per_task_spec(health.for_chunk(s) if len(specs) == 1 else health.credentials_for(s))
                     for s in specs]
        udf = (inference_udf(for_chunk[0], plan.per_task) if len(specs) == 1
               else inference_udf(for_chunk, plan.per_lane, routed=routed))
        key = ["request_hash", LANE] if routed else ["request_hash"]
        # Identical requests go to one task, one after another: the UDF sends each once and gives every
        # row its outcome (`udfs.inference.fold_repeats`). No join after the calls, so the append runs
        # in the calling tasks' own stage: a stage after the calls would be submitted (by adaptive
        # execution, as a job of its own) only once the last calling task ended, and would wait
        # behind the next chunks' calling tasks, landing this chunk only after their calls.
        called = (df.where(F.col("precheck").isNull())
                  .repartition(plan.partitions, "request_hash").sortWithinPartitions(*key)
                  .select("*", udf("prompt", *key[1:]).alias("o")).select("*", "o.*").drop("o"))
        skipped = df.where(F.col("precheck").isNotNull()).select(
            "*", *[_not_sent(f, specs, routed) for f in outcome_fields])
        out = called.unionByName(skipped.select(*called.columns)).drop("precheck")
        if structured and parsed_type is not None:
            out = out.transform(with_parsed(parsed_type))
        carried = [c for c in df.columns if c not in (*REQUEST_COLUMNS, LANE)]
        return out.select("id", *[column(c) for c in carried], "prompt", *fields, "request_hash",
                          *[c for c in ("_exists",) if c in df.columns])
    return step


def with_parsed(parsed_type: T.DataType) -> Transform:
    """`parsed` of type `parsed_type` from the engine's canonical JSON of each valid answer."""
    def step(df: DataFrame) -> DataFrame:
        return df.withColumn("parsed", parsed_column(F.col(PARSED_JSON), parsed_type))
    return step


def _not_sent(f: T.StructField, specs: Sequence[EngineSpec] = (), routed: bool = False):
    if f.name == "endpoint":  # the endpoint the row would have gone to
        if routed:
            return F.element_at(F.array(*[F.lit(s.name) for s in specs]), F.col(LANE) + 1).alias("endpoint")
        return F.lit(next((s.name for s in specs if s.role == "primary"), None)).cast("string").alias("endpoint")
    if f.name == "status":
        return F.lit("error").alias("status")
    if f.name == "error":
        return F.col("precheck").alias("error")
    if f.name == "attempts":
        return F.lit(0).cast("int").alias("attempts")
    return F.lit(None).cast(f.dataType).alias(f.name)


def with_dimension_check(expected: int | None, source: str = "endpoint.embedding_dim") -> Transform:
    """An `ok` vector whose length is not the run's dimension becomes an error row, vector dropped.

    `expected` comes from `source` (the config, or rows this run already wrote); without one, the
    most common length among the chunk's `ok` rows is the reference (ties: the shorter). That takes
    windows, not an aggregate joined back: a second read of the outcomes would call the endpoint again.
    """
    def step(df: DataFrame) -> DataFrame:
        ok = F.col("status") == "ok"
        if expected is not None:
            ref, why = F.lit(expected), source
        else:
            df = df.withColumn("_n", F.count(F.when(ok, 1)).over(Window.partitionBy("dim")))
            top = F.max(F.when(ok, F.struct("_n", (-F.col("dim")).alias("_neg")))).over(Window.partitionBy())
            ref, why = -top["_neg"], "the most common length in this chunk"
        bad = ok & (F.col("dim") != ref)
        reason = F.concat(F.lit(f"{reasons.DIMENSION_MISMATCH}: "), F.col("dim").cast("string"),
                          F.lit(" values, expected "), ref.cast("string"), F.lit(f" ({why})"))
        return df.withColumns({
            "status": F.when(bad, F.lit("error")).otherwise(F.col("status")),
            "error": F.when(bad, reason).otherwise(F.col("error")),
            "embedding": F.when(bad, F.lit(None)).otherwise(F.col("embedding")),
            "dim": F.when(bad, F.lit(None)).otherwise(F.col("dim")),
        }).drop("_n")
    return step


class Dimension:
    """The run's vector length, one object for both calling modes: pinned (`endpoint.embedding_dim`),
    else learned from the run's first chunk with vectors (its most common length), and from then on
    every chunk of the run lands vectors of that length (`with_dimension_check`; the driver's
    `DriverChunk.landed` applies the same rule to Arrow rows).

    Example::

        dim = Dimension(cfg.endpoint.embedding_dim)
        chunk_df.transform(dim.check(spark, table, run_id))   # executors: learns from the table
        table = todo.landed(outcomes, *dim.learned(outcomes))   # driver: learns from the outcomes
    """

    def __init__(self, pinned: int | None = None) -> None:
        self.value: int | None = pinned
        self.why = "endpoint.embedding_dim"

    def learned(self, outcomes: Sequence[Outcome]) -> tuple[int | None, str]:
        """(length, why) for a chunk on the driver: the first chunk with vectors sets it."""
        if self.value is None:
            self.value = common_dim(outcomes)
            self.why = "the most common length in the run's first chunk with vectors"
        return self.value, self.why

    def check(self, spark: SparkSession, table: str, run_id: str) -> Transform:
        """`with_dimension_check` against the run's length; until known, the one this run's earlier
        chunks wrote (read when the chunk's plan is built, after they committed), else the chunk's own
        majority."""
        if self.value is None:
            first = (spark.read.table(table).where((F.col("run_id") == run_id) & (F.col("status") == "ok"))
                     .select("dim").limit(1).collect())
            if first:
                self.value, self.why = first[0]["dim"], "the length this run already wrote"
        return with_dimension_check(self.value, self.why) if self.value is not None else with_dimension_check(None)


class DriverChunk:
    """One chunk's rows on the driver: the distinct requests to send, then the rows with their outcomes.

    Example::

        chunk = DriverChunk(rows_arrow, embeddings=False)
        [outcomes] = engine.map_batches([chunk.prompts])    # one per distinct request
        table = chunk.landed(outcomes)                      # one per row, as Arrow
    """

    def __init__(self, rows: pa.Table, embeddings: bool, structured: bool = False,
                 names: Sequence[str] = ()) -> None:
        self.rows, self.embeddings, self.structured = rows, embeddings, structured
        hashes = rows.column("request_hash").to_pylist()
        prompts = rows.column("prompt").to_pylist()
        prechecks = rows.column("precheck").to_pylist()
        # A split chose each row's endpoint: one request per (request, endpoint), sent there.
        lanes = rows.column(LANE).to_pylist() if LANE in rows.column_names else [None] * len(hashes)
        self._slot: list[int | None] = []  # row -> index of its distinct request (None: not sent)
        first: dict[tuple[str, int | None], int] = {}
        self.prompts: list[str] = []
        self.lanes: list[int | None] = []
        self._would_go: list[str | None] = []  # a row not sent: the endpoint it would have gone to
        for h, p, pre, lane in zip(hashes, prompts, prechecks, lanes):
            if pre is not None:
                self._slot.append(None)
                self._would_go.append(names[lane] if lane is not None and names else None)
                continue
            if (h, lane) not in first:
                first[h, lane] = len(self.prompts)
                self.prompts.append(p)
                self.lanes.append(lane)
            self._slot.append(first[h, lane])
            self._would_go.append(None)
        self.prechecks = prechecks
        self.routed = LANE in rows.column_names

    @property
    def batch(self) -> list[str] | tuple[list[str], list[int | None]]:
        """What `Engine.map_batches` takes: the prompts, with each one's endpoint under a split."""
        return (self.prompts, self.lanes) if self.routed else self.prompts

    def landed(self, outcomes: Sequence[Outcome], dim: int | None = None, why: str = "") -> pa.Table:
        """`id, <kept>, prompt, <outcome columns>, request_hash, _exists`: every row with its outcome, as
        Arrow (with structured output, the canonical JSON `with_parsed` reads, as on the executors).

        With `dim`, an `ok` vector of another length becomes a `dimension_mismatch` error row
        (`with_dimension_check`'s rule, applied here because the rows are already on the driver).
        """
        per_row = [Outcome.failed(pre, attempts=0, endpoint=to) if slot is None else outcomes[slot]
                   for slot, pre, to in zip(self._slot, self.prechecks, self._would_go)]
        if dim is not None:
            per_row = [_checked(o, dim, why) for o in per_row]
        columns = {f.name: pa.array([_value(o, f.name) for o in per_row], type=_arrow_type(f.dataType))
                   for f in outcome_schema(self.embeddings, self.structured).fields}
        r = self.rows
        kept = {c: r.column(c) for c in r.column_names if c not in (*REQUEST_COLUMNS, LANE)}
        return pa.table({"id": r.column("id"), **kept, "prompt": r.column("prompt"), **columns,
                         "request_hash": r.column("request_hash"), "_exists": r.column("_exists")})


def common_dim(outcomes: Sequence[Outcome]) -> int | None:
    """The most common vector length among `ok` outcomes (ties: the shorter), as `with_dimension_check`."""
    lengths = Counter(len(o.embedding) for o in outcomes if o.status == "ok" and o.embedding is not None)
    return max(lengths, key=lambda n: (lengths[n], -n)) if lengths else None


def status_counts(table: pa.Table) -> list[tuple[str, bool, int]]:
    """(status, _exists, rows) of a landed chunk, counted on the driver: no Spark job."""
    c = Counter(zip(table.column("status").to_pylist(), table.column("_exists").to_pylist()))
    return [(s, bool(e), n) for (s, e), n in c.items()]


def _checked(o: Outcome, dim: int, why: str) -> Outcome:
    if o.status != "ok" or o.embedding is None or len(o.embedding) == dim:
        return o
    reason = f"{reasons.DIMENSION_MISMATCH}: {len(o.embedding)} values, expected {dim} ({why})"
    return Outcome(status="error", error=reason, http_status=o.http_status, attempts=o.attempts,
                   latency_ms=o.latency_ms, sent_at=o.sent_at, prompt_tokens=o.prompt_tokens,
                   endpoint=o.endpoint)


def _value(o: Outcome, name: str) -> Any:
    if name == "dim":
        return len(o.embedding) if o.embedding is not None else None
    if name == PARSED_JSON:
        return o.parsed_json
    if name == "sent_at":  # epoch seconds -> the timestamp's microseconds
        return None if o.sent_at is None else round(o.sent_at * 1_000_000)
    return getattr(o, name)


def _arrow_type(t: T.DataType) -> Any:
    return {T.StringType: pa.string(), T.IntegerType: pa.int32(), T.LongType: pa.int64(),
            T.DoubleType: pa.float64(),
            T.TimestampType: pa.timestamp("us", tz="UTC")}.get(type(t)) or pa.list_(pa.float32())
