"""A run's numbers from the rows it wrote: counts by status and reason, latency, tokens, cost; and
its throughput over time with the requests in flight.

One aggregation over the output table's rows of one `run_id`, per request first (identical prompts
are sent, and paid for, once), then rolled up. `flight_series` cuts the run's time, from its first
send (`sent_at`) to its last answer (`sent_at` + `latency_ms`), into buckets: rows answered per second
and the mean number of requests in flight in each, for the throughput plot.

Example::

    stats = run_stats(spark, "demo.completions", run_id, embeddings=False)
    stats.latency_p95_ms, stats.total_tokens
    series = flight_series(spark, "demo.completions", run_id)
    series.in_flight   # [15.2, 16.0, 16.0, ..., 3.1]: C = 16 kept in flight, then the last answers
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, functions as F

from jobs.config import EndpointConfig
from udfs.prompts import CHARS_PER_TOKEN


@dataclass
class RunStats:
    """What a run did, from the rows it wrote. Tokens and latency count each distinct request once:
    identical prompts are sent once and share the answer, so they are paid for once."""

    rows: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    # Requests sent (identical prompts once; rows stopped by a precheck are not sent).
    distinct_requests: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Answered requests without reported usage, whose tokens are estimated as characters / CHARS_PER_TOKEN.
    estimated_token_requests: int = 0
    # (centroid in ms, requests): Spark's histogram_numeric, 64 uneven bins, for the latency plot.
    latency_histogram: list[tuple[float, float]] = field(default_factory=list)
    # The same numbers per endpoint that answered (several endpoints: overflow, fallback, a split).
    by_endpoint: dict[str, EndpointStats] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class EndpointStats:
    """One endpoint's share of a run: its rows (those it answered, or last tried), requests, tokens
    and latency (each distinct request once)."""
    rows: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    cost: float | None = None


def reason_code(error: Column) -> Column:
    """An error's reason code (`udfs.reasons`): `http_503: busy (gave up ...)` -> `http_503`."""
    return F.substring_index(error, ":", 1)


def tokens_of_chars(chars: Any) -> Any:
    """A text's tokens from its length (a column), where the endpoint reports no `usage`."""
    return F.ceil(chars / CHARS_PER_TOKEN).cast("long")


def run_stats(spark: SparkSession, table: str, run_id: str, embeddings: bool) -> RunStats:
    """One aggregation over this run's rows: per request first, then rolled up by status and reason."""
    rows = spark.read.table(table).where(F.col("run_id") == run_id)
    ok = F.col("status") == "ok"
    text = "text" if embeddings else "prompt"
    # An error row with reported usage (`invalid_output`: the answer came, and was paid for) counts too.
    completion = (F.lit(0).cast("long") if embeddings
                  else F.when(ok, F.coalesce("completion_tokens", tokens_of_chars(F.length("response"))))
                  .otherwise(F.col("completion_tokens")))
    estimated = ok & (F.col("prompt_tokens").isNull()
                      | (F.lit(False) if embeddings else F.col("completion_tokens").isNull()))
    # Every row of one request_hash carries that request's outcome, so max() just picks it. (A split
    # sends one request to each endpoint its rows went to: a request is a hash at an endpoint.)
    per_request = rows.groupBy("request_hash", "endpoint").agg(
        F.count("*").alias("n"),
        F.max("status").alias("status"),
        F.max(F.when(~ok, reason_code(F.col("error")))).alias("reason"),
        F.max("latency_ms").alias("latency_ms"),
        F.max("attempts").alias("attempts"),
        F.max(F.when(ok, F.coalesce("prompt_tokens", tokens_of_chars(F.length(text))))
              .otherwise(F.col("prompt_tokens"))).alias("pt"),
        F.max(completion).alias("ct"),
        F.max(estimated.cast("int")).alias("estimated"),
    )
    levels = per_request.rollup("status", "reason").agg(
        F.grouping_id().alias("level"),
        F.sum("n").alias("rows"),
        F.count(F.when(F.col("attempts") > 0, 1)).alias("requests"),  # sent: not stopped by a precheck
        F.percentile_approx("latency_ms", [0.5, 0.95, 0.99]).alias("p"),
        F.sum("pt").alias("pt"), F.sum("ct").alias("ct"), F.sum("estimated").alias("estimated"),
        F.histogram_numeric("latency_ms", F.lit(64)).alias("hist"),
    ).collect()
    stats = RunStats()
    for r in levels:
        if r["level"] == 3:  # the grand total
            p = r["p"] or [None, None, None]
            stats.rows, stats.distinct_requests = r["rows"] or 0, r["requests"] or 0
            stats.latency_p50_ms, stats.latency_p95_ms, stats.latency_p99_ms = p
            stats.prompt_tokens, stats.completion_tokens = r["pt"] or 0, r["ct"] or 0
            stats.estimated_token_requests = r["estimated"] or 0
            stats.latency_histogram = [(b["x"], b["y"]) for b in (r["hist"] or [])]
        elif r["level"] == 1:  # one status
            if r["status"] == "ok":
                stats.rows_ok = r["rows"]
            else:
                stats.rows_error += r["rows"]
        elif r["status"] != "ok":
            reason = r["reason"] or "unknown"
            stats.errors_by_reason[reason] = stats.errors_by_reason.get(reason, 0) + r["rows"]
    stats.by_endpoint = endpoint_stats(per_request)
    return stats


def endpoint_stats(per_request: DataFrame) -> dict[str, EndpointStats]:
    """`run_stats`' per-request rows summed per endpoint (a second small aggregation)."""
    ok = F.col("status") == "ok"
    got = per_request.groupBy("endpoint").agg(
        F.sum("n").alias("rows"), F.sum(F.when(ok, F.col("n"))).alias("ok"),
        F.count(F.when(F.col("attempts") > 0, 1)).alias("requests"),
        F.sum("pt").alias("pt"), F.sum("ct").alias("ct"),
        F.percentile_approx("latency_ms", [0.5, 0.95]).alias("p"),
    ).collect()
    out = {}
    for r in got:
        p = r["p"] or [None, None]
        out[r["endpoint"] or "(none)"] = EndpointStats(
            rows=r["rows"] or 0, rows_ok=r["ok"] or 0, rows_error=(r["rows"] or 0) - (r["ok"] or 0),
            requests=r["requests"] or 0, prompt_tokens=r["pt"] or 0, completion_tokens=r["ct"] or 0,
            latency_p50_ms=p[0], latency_p95_ms=p[1])
    return out


def with_costs(stats: RunStats, endpoints: dict[str, EndpointConfig]) -> float | None:
    """Each endpoint's cost at its own prices, into `stats.by_endpoint`; the run's total (None when no
    endpoint that answered has a price)."""
    costs = []
    for name, e in stats.by_endpoint.items():
        e.cost = estimate_cost(endpoints[name], e.prompt_tokens, e.completion_tokens) if name in endpoints else None
        costs.append(e.cost)
    known = [c for c in costs if c is not None]
    return round(sum(known), 6) if known else None


def run_cost(stats: RunStats, primary: EndpointConfig, endpoints: list[EndpointConfig]) -> float | None:
    """The run's estimated cost: each endpoint's tokens at its own prices (`with_costs`), or, for a run
    with no rows, the primary's prices of nothing."""
    if stats.by_endpoint:
        return with_costs(stats, {e.name: e for e in endpoints})
    return estimate_cost(primary, stats.prompt_tokens, stats.completion_tokens)


@dataclass
class FlightSeries:
    """A run over time, bucket by bucket from its first send: bucket `i` covers `start` + [i, i + 1)
    x `bucket_s` (the last one only up to the last answer). Rows never sent (a precheck) are not on it."""

    start: datetime | None = None  # the run's first send (UTC); None: no row of the run was sent
    bucket_s: float = 0.0
    span_s: float = 0.0  # from the first send to the last answer
    rows_per_s: list[float] = field(default_factory=list)  # rows answered (ok or not) per second
    errors_per_s: list[float] = field(default_factory=list)  # of which error rows
    in_flight: list[float] = field(default_factory=list)  # mean requests in flight over the bucket

    @property
    def seconds(self) -> list[float]:
        """Each bucket's start, in seconds since the first send."""
        return [i * self.bucket_s for i in range(len(self.in_flight))]


def bucket_us(span_us: int, most: int = 150) -> int:
    """The bucket width for a run of `span_us` microseconds: the smallest 1, 2 or 5 x 10^k us that cuts
    it into at most `most` buckets, hence more than `most` / 2.5 (60 of 150); 1 ms at least."""
    want = max(1000, -(-span_us // most))
    power = 10 ** (len(str(want)) - 1)
    return next(m * power for m in (1, 2, 5, 10) if m * power >= want)


def flight_series(spark: SparkSession, table: str, run_id: str, most: int = 150) -> FlightSeries:
    """`flight_series_of` this run's rows of the output table."""
    return flight_series_of(spark.read.table(table).where(F.col("run_id") == run_id), most)


def flight_series_of(rows: DataFrame, most: int = 150) -> FlightSeries:
    """Rows answered per second and requests in flight over the time of `rows` (`bucket_us` wide buckets,
    at most `most`); `rows` has the output table's `sent_at`, `latency_ms` and `status`.

    A request is in flight over [`sent_at`, `sent_at` + `latency_ms`), retries and waits included; the
    rows it answered finish at its end. Rows that share one call carry its `sent_at` and `latency_ms`
    (identical requests, whose answer goes to every row that asked; the rows of a batched request),
    so grouping by the two counts each call once, and its rows each. Each call is exploded over the
    buckets it overlaps (one row per call, plus about C per bucket: the calls in flight across its
    edges) and summed per bucket: two scans of the rows (their span, then the series), and only the
    series, a few hundred numbers, reaches the driver. Integer microseconds: the sums are exact.
    """
    rows = rows.where(F.col("sent_at").isNotNull())
    s = F.unix_micros("sent_at")
    e = s + F.round(F.coalesce(F.col("latency_ms"), F.lit(0.0)) * 1000).cast("long")
    t0, t1 = rows.agg(F.min(s), F.max(e)).first() or (None, None)
    if t0 is None:
        return FlightSeries()
    width = bucket_us(t1 - t0, most)
    n = max(1, -(-(t1 - t0) // width))

    def bucket(t: Any) -> Any:  # the bucket holding instant t, the run's last instant in the last one
        return F.least(F.floor((t - F.lit(t0)) / width).cast("long"), F.lit(n - 1))

    calls = rows.groupBy(s.alias("s"), e.alias("e")).agg(
        F.count("*").alias("rows"), F.count(F.when(F.col("status") != "ok", 1)).alias("errors"))
    spans = calls.select("*", F.explode(F.sequence(bucket(F.col("s")), bucket(F.col("e")))).alias("b"))
    b_start = F.lit(t0) + F.col("b") * width
    overlap = F.greatest(F.least("e", b_start + width) - F.greatest("s", b_start), F.lit(0))
    ends_here = F.col("b") == bucket(F.col("e"))
    got = spans.groupBy("b").agg(
        F.sum(overlap).alias("busy_us"),
        F.sum(F.when(ends_here, F.col("rows")).otherwise(0)).alias("rows"),
        F.sum(F.when(ends_here, F.col("errors")).otherwise(0)).alias("errors"),
    ).collect()
    busy, done, failed = [0] * n, [0] * n, [0] * n
    for r in got:
        busy[r["b"]], done[r["b"]], failed[r["b"]] = r["busy_us"], r["rows"], r["errors"]
    # Each bucket's length within the run: `width`, the last one up to the last answer (1 us at least).
    lengths = [max(1, min(width, t1 - (t0 + i * width))) for i in range(n)]
    return FlightSeries(
        start=datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=t0), bucket_s=width / 1e6,
        span_s=(t1 - t0) / 1e6,
        # Rates over the whole bucket width: a last bucket of a few microseconds would otherwise turn
        # its one answer into thousands of rows per second.
        rows_per_s=[d * 1e6 / width for d in done],
        errors_per_s=[f * 1e6 / width for f in failed],
        in_flight=[b / us for b, us in zip(busy, lengths)])


def estimate_cost(e: EndpointConfig, prompt_tokens: float, completion_tokens: float) -> float | None:
    """Tokens times the configured per-1k prices; None when the endpoint has no price set."""
    prices = (e.price_per_1k_prompt_tokens, e.price_per_1k_completion_tokens)
    if prices == (None, None):
        return None
    return round(prompt_tokens / 1000 * (prices[0] or 0) + completion_tokens / 1000 * (prices[1] or 0), 6)
