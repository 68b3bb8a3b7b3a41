"""What a run reports back: `RunSummary` for every run, `DryRunReport` for a dry run's checks.

Plain data that holds no Spark object: `jobs.pipeline` and `jobs.dryrun.checks` fill them, the entry point
prints them, and `jobs.observe` reads them for the runs table and MLflow. (Importing it imports pyspark
all the same: `RunStats` lives in `jobs.observe.stats`, beside the query that computes it.)

Example::

    summary = run_job(spark, cfg)
    summary.by_status          # {"ok": 998, "error": 2}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jobs.observe.stats import RunStats
from udfs.outcome import Outcome


@dataclass
class RunSummary:
    run_id: str
    output_table: str
    input_rows: int = 0
    pending_rows: int = 0
    chunks: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Latency, tokens, cost: set when output.runs_table or mlflow.enabled asks for them.
    stats: RunStats | None = None
    # A dry run's checks and estimates (run.dry_run); nothing else ran.
    dry_run: DryRunReport | None = None
    # `budget` when run.budget was spent: the rows not sent stay pending (exit code 3).
    stopped: str | None = None
    # run.budget's caps, and what the run spent against them (tokens, requests, cost).
    budget: dict[str, float] | None = None
    spent: dict[str, float] | None = None
    unsent_rows: int = 0

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.by_status.items() if s != "ok")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DryRunReport:
    checks: list[Check] = field(default_factory=list)
    input_rows: int | None = None
    pending_rows: int | None = None
    # Distinct requests a run would send: identical prompts go once; empty or over-long ones never.
    requests: int | None = None
    prompt_chars: int | None = None
    probe: Outcome | None = None
    probe_prompt_chars: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    token_basis: str = ""
    cost: float | None = None
    # run.forecast_rows sent for real, then the rest extrapolated (jobs.dryrun.forecast.Forecast).
    forecast: Any = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok
