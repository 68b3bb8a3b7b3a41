"""The pandas UDF: a column of prompts in, a struct of outcomes out, one row for each row.

The iterator form does its set-up once per task, on the executor: one engine (connection pool, thread
pool, limiters) sized to this task's share of the job-wide concurrency, picked by partition id.

Rows that ask the same (the same prompt for the same endpoint) are sent once when they come one after
another: the job sorts each task's rows by `request_hash` (`jobs.calls.outcomes.with_outcomes`), so all
of a task's identical requests are adjacent, and each gets the one outcome (`fold_repeats`).

Example::

    infer = inference_udf(spec, per_task_limits=[4, 4])
    df.select("id", infer("prompt").alias("r")).select("id", "r.*")
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator, Sequence, Tuple

import pandas as pd
from pyspark.sql import types as T
from pyspark.sql.functions import pandas_udf

from udfs.engine import Engine
from udfs.outcome import Outcome
from udfs.protocols import is_embeddings_task
from udfs.spec import EngineSpec

_COMMON = [
    T.StructField("status", T.StringType()),
    T.StructField("error", T.StringType()),
    T.StructField("http_status", T.IntegerType()),
    T.StructField("attempts", T.IntegerType()),
    T.StructField("sent_at", T.TimestampType()),  # when the first attempt left (UTC); null if never sent
    T.StructField("latency_ms", T.DoubleType()),
    T.StructField("prompt_tokens", T.LongType()),
    # Who answered: the output table's `endpoint` column (placed with the run's stamps there).
    T.StructField("endpoint", T.StringType()),
]
COMPLETION_SCHEMA = T.StructType(
    [T.StructField("response", T.StringType())] + _COMMON + [T.StructField("completion_tokens", T.LongType())]
)
EMBEDDING_SCHEMA = T.StructType(
    [T.StructField("embedding", T.ArrayType(T.FloatType())), T.StructField("dim", T.IntegerType())] + _COMMON
)
# Structured output: a valid answer's canonical JSON, which the job turns into the typed `parsed`
# column with `from_json` (`jobs.output.structured`) and then drops. The UDF keeps returning flat types.
PARSED_JSON = "_parsed_json"


def outcome_schema(embeddings: bool, structured: bool = False) -> T.StructType:
    if structured:
        return T.StructType(COMPLETION_SCHEMA.fields + [T.StructField(PARSED_JSON, T.StringType())])
    return EMBEDDING_SCHEMA if embeddings else COMPLETION_SCHEMA


def outcomes_frame(outcomes: Sequence[Outcome], embeddings: bool, structured: bool = False) -> pd.DataFrame:
    """Outcomes as a frame whose dtypes match the declared struct exactly (nullable ints included)."""
    cols = {
        "status": pd.Series([o.status for o in outcomes], dtype=object),
        "error": pd.Series([o.error for o in outcomes], dtype=object),
        "http_status": pd.array([o.http_status for o in outcomes], dtype="Int32"),
        "attempts": pd.array([o.attempts for o in outcomes], dtype="Int32"),
        "sent_at": pd.Series(pd.to_datetime([o.sent_at for o in outcomes], unit="s", utc=True).as_unit("us")),
        "latency_ms": pd.array([o.latency_ms for o in outcomes], dtype="Float64"),
        "prompt_tokens": pd.array([o.prompt_tokens for o in outcomes], dtype="Int64"),
        "endpoint": pd.Series([o.endpoint for o in outcomes], dtype=object),
    }
    if embeddings:
        head = {
            "embedding": pd.Series([o.embedding for o in outcomes], dtype=object),
            "dim": pd.array([len(o.embedding) if o.embedding is not None else None for o in outcomes],
                            dtype="Int32"),
        }
        return pd.DataFrame({**head, **cols})
    frame = pd.DataFrame({
        "response": pd.Series([o.response for o in outcomes], dtype=object),
        **cols,
        "completion_tokens": pd.array([o.completion_tokens for o in outcomes], dtype="Int64"),
    })
    if structured:
        frame[PARSED_JSON] = pd.Series([o.parsed_json for o in outcomes], dtype=object)
    return frame


def _prompts(s: pd.Series) -> list[str | None]:
    return [p if isinstance(p, str) else None for p in s.tolist()]


def _lanes(s: pd.Series) -> list[int | None]:
    return [None if pd.isna(v) else int(v) for v in s.tolist()]


_NO_KEY = object()


def fold_repeats(batches: Iterator, shapes: deque) -> Iterator:
    """Each batch without the rows that repeat the row before them (the same prompt and endpoint, across
    batch boundaries too); for each batch, `shapes` gets where each of its rows' outcome is: an index
    into the folded batch, or -1 for the previous batch's last outcome."""
    last: Any = _NO_KEY
    for batch in batches:
        prompts, lanes = batch if isinstance(batch, tuple) else (batch, None)
        kept: list[str | None] = []
        kept_lanes: list[int | None] = []
        index: list[int] = []
        for i, p in enumerate(prompts):
            key = (p, lanes[i] if lanes is not None else None)
            if key != last:
                kept.append(p)
                kept_lanes.append(key[1])
                last = key
            index.append(len(kept) - 1)
        shapes.append(index)
        yield (kept, kept_lanes) if lanes is not None else kept


def unfold(outcomes: Iterator[list[Outcome]], shapes: deque) -> Iterator[list[Outcome]]:
    """Each folded batch's outcomes, one per row of the batch as it came (`fold_repeats`)."""
    previous: Outcome | None = None
    for folded in outcomes:
        index = shapes.popleft()
        rows = [folded[j] if j >= 0 else previous for j in index]
        if folded:
            previous = folded[-1]
        yield rows  # type: ignore[misc]


def inference_udf(spec: EngineSpec | Sequence[EngineSpec], per_task_limits: Sequence[int] | Sequence[Sequence[int]],
                  *, routed: bool = False):
    """A pandas UDF calling the endpoint; task `i` keeps at most `per_task_limits[i]` requests in flight.

    With several endpoints, `spec` is their list and `per_task_limits` one such list per endpoint;
    `routed`: the UDF takes a second column, each row's endpoint (an index into `spec`, a split's choice).
    """
    specs = [spec] if isinstance(spec, EngineSpec) else list(spec)
    per_lane = [list(per_task_limits)] if isinstance(spec, EngineSpec) else [list(x) for x in per_task_limits]  # type: ignore[arg-type]
    embeddings = is_embeddings_task(specs[0].task)
    structured = specs[0].response_schema is not None

    def run(inputs: Iterator) -> Iterator[pd.DataFrame]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        pid = ctx.partitionId() if ctx is not None else 0
        engine = Engine(specs, max_limit=[lane[pid % len(lane)] for lane in per_lane])
        shapes: deque = deque()
        try:
            for outcomes in unfold(engine.map_batches(fold_repeats(inputs, shapes)), shapes):
                yield outcomes_frame(outcomes, embeddings, structured)
        finally:
            engine.close()

    # Spark reads the UDF's kind from its type hints: one column, or (prompt, endpoint index).
    def infer(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        return run(_prompts(p) for p in batches)

    def infer_routed(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        return run((_prompts(p), _lanes(lane)) for p, lane in batches)

    udf = pandas_udf(infer_routed if routed else infer, returnType=outcome_schema(embeddings, structured))  # type: ignore[call-overload]
    # Calling an endpoint is not a pure function: keep the optimizer from duplicating or reordering it.
    return udf.asNondeterministic()
