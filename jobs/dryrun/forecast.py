"""`--dry-run`'s forecast: a few real pending rows sent and kept, then the whole pending set extrapolated.

`run.forecast_rows` (20) of the pending rows, spread over the table (`run.limit` with `run.limit_order:
spread`: the first ids could be a biased sample), go through a real run: their outcomes are
committed like any other, so the next run does not pay for them twice. From those rows this measures
per row: input and output tokens (from `usage`, else characters / 4) and latency, and extrapolates to
the rows still pending: tokens at the per-row p50, mean and p95 times the rows (the mean is the
forecast; p50 and p95 its range), cost at `endpoint.price_per_1k_*_tokens`, and wall time at `C`
requests in flight, one mean latency apart, plus the p99 latency for the last answers.

With several endpoints (`endpoints:`) the sample's rows cost at the prices of the endpoint that
answered each, and the rest is shared as the run will share it: by the `split` weights, or all to
the primary (overflow and fallback take rows only when it is full or failing, which a sample of 20
cannot foresee, so `cost_if_all` gives the rest's cost were every row to go to each endpoint: the
range a budget must allow). The wall time counts the endpoints that call at once: each split lane
at its own limit, or the primary's limit plus its overflows'.

Example::

    f = forecast_from(spark, cfg, sample_run_id, rest=10_000)
    f.output_tokens["mean"], f.cost["p95"], f.wall_s
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from pyspark.sql import SparkSession, functions as F

from jobs.config import EndpointConfig, JobConfig
from jobs.observe.stats import estimate_cost, tokens_of_chars

log = logging.getLogger("batch_inference")


@dataclass
class Forecast:
    sampled: int  # rows sent for real and committed (measured)
    rest: int  # rows still pending after them (extrapolated)
    input_tokens: dict[str, float] = field(default_factory=dict)  # p50/mean/p95 x rest + measured
    output_tokens: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float | None] = field(default_factory=dict)
    # Several endpoints: the mean cost of the rest were every row to go to each (name -> cost).
    cost_if_all: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # per row, measured: p50/mean/p95/p99
    wall_s: float | None = None
    measured: dict[str, float] = field(default_factory=dict)  # the sample's own totals


def sample_config(cfg: JobConfig, pending: int) -> JobConfig:
    """The config of the sample run: the same job, `run.forecast_rows` pending rows, for real."""
    take = min(cfg.run.forecast_rows, pending, cfg.run.limit or pending)
    run = cfg.run.model_copy(update={"dry_run": False, "limit": take, "limit_order": "spread"})
    return cfg.model_copy(update={"run": run})


def _quantiles(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    at = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": at(0.5), "mean": sum(s) / len(s), "p95": at(0.95), "p99": at(0.99)}


def forecast_from(spark: SparkSession, cfg: JobConfig, run_id: str, rest: int) -> Forecast | None:
    """The forecast from the rows run `run_id` wrote (sent and answered), for `rest` more rows."""
    out = spark.table(cfg.output.table).where((F.col("run_id") == run_id) & (F.col("attempts") > 0))
    has_response = "response" in out.columns
    rows = out.select(
        F.coalesce(F.col("prompt_tokens"), tokens_of_chars(F.length("prompt"))).alias("i"),
        (F.coalesce(F.col("completion_tokens"), tokens_of_chars(F.coalesce(F.length("response"), F.lit(0))))
         if has_response else F.lit(0)).alias("o"),
        F.col("latency_ms").alias("ms"), F.col("endpoint")).collect()
    if not rows:
        return None
    f = Forecast(sampled=len(rows), rest=rest)
    tin, tout = _quantiles([float(r["i"] or 0) for r in rows]), _quantiles([float(r["o"] or 0) for r in rows])
    f.latency_ms = _quantiles([float(r["ms"] or 0) for r in rows])
    f.measured = {"input_tokens": sum(float(r["i"] or 0) for r in rows),
                  "output_tokens": sum(float(r["o"] or 0) for r in rows)}
    for k in ("p50", "mean", "p95"):
        f.input_tokens[k] = f.measured["input_tokens"] + tin[k] * rest
        f.output_tokens[k] = f.measured["output_tokens"] + tout[k] * rest
    if cfg.endpoints is None:
        for k in ("p50", "mean", "p95"):
            f.cost[k] = estimate_cost(cfg.endpoint, math.ceil(f.input_tokens[k]), math.ceil(f.output_tokens[k]))
    else:
        by_name = {e.name: e for e in cfg.endpoints}
        sample = _priced(by_name, [(r["endpoint"], float(r["i"] or 0), float(r["o"] or 0)) for r in rows])
        for k in ("p50", "mean", "p95"):
            f.cost[k] = _add(sample, _priced(by_name, [(name, tin[k] * rest * share, tout[k] * rest * share)
                                                        for name, share in shares(cfg).items()]))
        f.cost_if_all = {name: cost for name, e in by_name.items()
                         if (cost := estimate_cost(e, tin["mean"] * rest, tout["mean"] * rest)) is not None}
    f.wall_s = rest * f.latency_ms["mean"] / 1000 / calling_slots(cfg) + f.latency_ms["p99"] / 1000 if rest else 0.0
    return f


def shares(cfg: JobConfig) -> dict[str, float]:
    """The share of the rows each endpoint is expected to answer: the split's weights, else the primary all."""
    routes = cfg.routes()
    if any(r.weight is not None for r in routes):
        return {r.endpoint.name: r.weight for r in routes if r.weight}
    return {next(r.endpoint.name for r in routes if r.role == "primary"): 1.0}


def calling_slots(cfg: JobConfig) -> float:
    """Rows in flight at once: a split's lanes each at its own limit (the slowest lane to drain its
    share sets the pace), or the primary's limit plus its overflows'."""
    routes = cfg.routes()
    slots = {r.endpoint.name: r.limits.max_concurrency * r.endpoint.rows_per_request for r in routes}
    weights = {r.endpoint.name: r.weight for r in routes if r.weight}
    if weights:
        return min(slots[name] / w for name, w in weights.items())
    return sum(slots[r.endpoint.name] for r in routes if r.role in ("primary", "overflow"))


def _priced(by_name: dict[str, EndpointConfig], tokens: list[tuple[str, float, float]]) -> float | None:
    """(endpoint, input tokens, output tokens) at each endpoint's prices; None when none has a price."""
    costs = [estimate_cost(by_name[name], i, o) for name, i, o in tokens if name in by_name]
    priced = [c for c in costs if c is not None]
    return round(sum(priced), 6) if priced else None


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else round((a or 0.0) + (b or 0.0), 6)


def forecast_lines(f: Forecast, cfg: JobConfig) -> list[str]:
    """What is measured and what is extrapolated, a line each."""
    lat = f.latency_ms
    lines = [f"measured on {f.sampled} pending row(s), sent and committed (the next run skips them): "
             f"{f.measured['input_tokens']:,.0f} input and {f.measured['output_tokens']:,.0f} output tokens; "
             f"latency per row p50 {lat['p50']:,.0f} ms, mean {lat['mean']:,.0f} ms, p95 {lat['p95']:,.0f} ms"]
    if not f.rest:
        return lines + ["nothing else pending"]
    tok = lambda d: f"{d['mean']:,.0f} (p50 {d['p50']:,.0f}, p95 {d['p95']:,.0f})"  # noqa: E731
    lines.append(f"extrapolated to all {f.sampled + f.rest:,} pending rows (per-row figures times the "
                 f"{f.rest:,} left): input tokens {tok(f.input_tokens)}, output tokens {tok(f.output_tokens)}")
    several = cfg.endpoints is not None
    if f.cost.get("mean") is not None:
        at = ("each endpoint's price_per_1k_prompt_tokens / price_per_1k_completion_tokens, the rest "
              + ("shared by split" if any(r.weight for r in cfg.routes()) else "all to the primary")
              if several else "endpoint.price_per_1k_prompt_tokens / price_per_1k_completion_tokens")
        lines.append(f"cost {f.cost['mean']:,.4f} (p50 {f.cost['p50']:,.4f}, p95 {f.cost['p95']:,.4f}) at {at}")
        if len(f.cost_if_all) > 1:
            lines.append("cost of the rest were every row to go to one endpoint (overflow and fallback "
                         "take rows only when needed): " + ", ".join(f"{name} {cost:,.4f}"
                                                                      for name, cost in f.cost_if_all.items()))
    else:
        lines.append("cost: set price_per_1k_prompt_tokens and price_per_1k_completion_tokens"
                     + (" on each endpoint" if several else " on the endpoint"))
    in_flight = (f"{calling_slots(cfg):,.0f} rows in flight" if several
                 else f"{cfg.limits.max_concurrency} in flight")
    lines.append(f"wall time of the calls ~{f.wall_s:,.0f} s at {in_flight} "
                 "(mean latency), plus Spark's own time per chunk")
    return lines
