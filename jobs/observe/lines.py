"""The two lines a person reads: what a run is about to do, and what it did.

The effective config runs to a hundred lines of JSON (every default, a whole response schema): it
goes to MLflow and the runs table, and to the output only with `--verbose`. At the start one line
names what matters (input, output, endpoint, concurrency, where calls come from); at the end one line
says what came of it (rows by status, wall time, rate, tokens, cost with its unit, where the results
are), whatever else the run logged.

Example::

    start_line(cfg, "executors", "run.calls_from: auto")
    # input demo.prompts -> output demo.completions; endpoint local-toy (driver_proxy, custom) at
    # 127.0.0.1:7777; C=8; calls from the executors (run.calls_from: auto); --verbose prints the full config
    money(0.000318, "USD")   # 'USD 0.00032'
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from jobs.secret_rules import redact_url

if TYPE_CHECKING:
    from jobs.config import EndpointConfig, JobConfig
    from jobs.observe.stats import RunStats
    from jobs.observe.summary import RunSummary


def where(e: EndpointConfig) -> str:
    """Where the endpoint is, from the config alone (no credentials resolved, no host looked up)."""
    if e.url:
        return redact_url(e.url)
    if e.type == "serving":
        return f"{e.host or '$DATABRICKS_HOST'}/serving-endpoints/{e.name}"
    if e.cluster_id or e.host:
        return f"the driver proxy of cluster {e.cluster_id or '(this one)'}, port {e.port}"
    return f"127.0.0.1:{e.port}"


def input_name(cfg: JobConfig) -> str:
    i = cfg.input
    return i.table or i.path or "(input.query)"


def start_line(cfg: JobConfig, mode: str, why: str) -> str:
    """input -> output; endpoint; concurrency; calling mode: one line instead of the whole config."""
    e = cfg.endpoint
    dry = "dry run (one probe request, nothing written): " if cfg.run.dry_run else ""
    others = [r for r in cfg.routes() if r.endpoint is not e]
    if others:  # several endpoints: the primary's line, then the others with their roles and limits
        also = "; ".join(f"{r.role if r.weight is None else f'split {r.weight:.0%}'} {r.endpoint.name} at "
                         f"{where(r.endpoint)}, C={r.limits.max_concurrency}" for r in others)
        return start_line(cfg.model_copy(update={"endpoints": None, "split": None}), mode, why).replace(
            "; calls from", f"; also {also}; calls from", 1)
    limit = f" (at most {cfg.run.limit} row{'s' if cfg.run.limit != 1 else ''})" if cfg.run.limit else ""
    return (f"{dry}input {input_name(cfg)}{limit} -> output {cfg.output.table}; endpoint {e.name} ({e.type}, "
            f"{e.task}) at {where(e)}; C={cfg.limits.max_concurrency}; calls from the {mode} ({why}); "
            "--verbose prints the full config")


def money(amount: float | None, unit: str) -> str:
    """An amount with its unit, readable when small: `USD 0.00032`, not `3.18E-4` or `0.0000`.

    Two significant digits below one cent, two decimals above; an estimate needs no more.
    """
    if amount is None:
        return "no price set"
    if amount == 0:
        return f"{unit} 0"
    if abs(amount) >= 0.01:
        return f"{unit} {amount:,.2f}"
    digits = 1 - math.floor(math.log10(abs(amount)))
    return f"{unit} {amount:.{digits}f}"


def duration(seconds: float) -> str:
    """`8.2 s`, `2 min 42 s`, `1 h 05 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _rate(per_s: float) -> str:
    return f"{per_s:.2f}" if per_s < 1 else f"{per_s:.1f}" if per_s < 100 else f"{per_s:,.0f}"


def closing_line(cfg: JobConfig, summary: RunSummary, stats: RunStats | None = None,
                 cost: float | None = None, mlflow_run_id: str | None = None) -> str:
    """What the run did and where it is, in one line; the last line of a run that succeeds.

    The rate is rows over the run's whole wall time (reading, calling, committing), which is why it
    is lower than the progress lines' rate of calls.
    """
    rows = sum(summary.by_status.values())
    head = f"run {summary.run_id} finished in {duration(summary.seconds)}: "
    if not summary.pending_rows:
        return (head + f"nothing to do: every row of {input_name(cfg)} is already final in "
                f"{cfg.output.table}")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.by_status.items(), key=lambda kv: kv[0] != "ok"))
    rate = f"{_rate(rows / summary.seconds)} rows/s over the whole run" if summary.seconds > 0 else "-"
    parts = [f"{rows} rows ({counts or 'none'})", rate]
    if stats is not None:
        tokens = f"{stats.total_tokens:,} tokens"
        if stats.estimated_token_requests:
            tokens += f" ({stats.estimated_token_requests} requests' tokens estimated as characters / 4)"
        parts.append(tokens)
        parts.append(f"cost {money(cost, cfg.endpoint.price_unit)}" if cost is not None
                     else "no cost (set endpoint.price_per_1k_prompt_tokens)")
    if stats is not None and len(stats.by_endpoint) > 1:  # who answered how much (several endpoints)
        parts.append("by endpoint " + ", ".join(
            f"{name} {e.rows:,} ({e.rows_ok:,} ok)" for name, e in sorted(stats.by_endpoint.items())))
    if summary.stopped == "budget":  # run.budget spent: the rest stays pending, exit code 3
        left = summary.pending_rows - rows
        parts.append(f"stopped: budget ({spend_text(summary.spent or {}, summary.budget or {})}), {left:,} rows "
                     "left pending for the next run")
    more = [f"runs in {cfg.output.runs_table}"] if cfg.output.runs_table else []
    more += [f"MLflow run {mlflow_run_id}"] if mlflow_run_id else []
    return head + ", ".join(parts) + f"; results in {cfg.output.table}" + (f" ({'; '.join(more)})" if more else "")


def spend_text(spent: dict[str, float], caps: dict[str, float]) -> str:
    """`spent 1,180 of 5,000 output tokens, 12 of 100 requests`: each quantity `run.budget` caps."""
    names = {"max_cost": ("cost", "cost"), "max_input_tokens": ("input_tokens", "input tokens"),
             "max_output_tokens": ("output_tokens", "output tokens"), "max_requests": ("requests", "requests")}
    parts = []
    for cap, limit in caps.items():
        key, label = names[cap]
        used = spent.get(key, 0.0)
        parts.append(f"{used:,.4f} of {limit:,.4f} {label}" if key == "cost" else f"{used:,.0f} of {limit:,.0f} {label}")
    return "spent " + ", ".join(parts)


__all__ = ["closing_line", "duration", "money", "spend_text", "start_line", "where"]
