"""MLflow tracking of a run: its parameters, its summary as metrics, and two plots as PNG artifacts
(throughput over time from the run's rows: `jobs.observe.stats.flight_series`).

Locally the tracking store is SQLite under the working directory (`mlruns/mlflow.db`, artifacts in
`mlruns/artifacts`); on Databricks, the workspace. MLflow is imported lazily: the wheel does not
depend on it (Databricks runtimes bring their own), and without it logging is skipped with a warning.

Example::

    mlflow_run_id = log_to_mlflow(spark, cfg, record, stats, progress.timeline)
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from jobs.config import JobConfig
from jobs.errors import brief
from jobs.observe.plots import save_plots
from jobs.observe.progress import ChunkTiming, chunk_rates
from jobs.observe.runs_table import JOB_KEYS
from jobs.observe.stats import FlightSeries, RunStats, flight_series
from jobs.session import on_databricks

log = logging.getLogger("batch_inference")


def tracking_uri(cfg: JobConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if on_databricks():
        return "databricks"
    return f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """A local SQLite store keeps its artifacts beside it, not in MLflow's default `./mlruns`."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        folder.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        return (folder / "artifacts").resolve().as_uri()
    return None


def _experiment(spark: SparkSession, cfg: JobConfig) -> str:
    if cfg.mlflow.experiment:
        return cfg.mlflow.experiment
    if on_databricks():  # workspace experiments are paths; a job has no notebook experiment to default to
        return f"/Users/{spark.sql('SELECT current_user()').first()[0]}/batch-inference"
    return "batch-inference"


def mlflow_params(cfg: JobConfig) -> dict[str, str]:
    """What shaped the run. Never credentials: not even the names of the variables or scopes holding them,
    nor the URL, whose query could carry one."""
    e, lim, r = cfg.endpoint, cfg.limits, cfg.retry
    params: dict[str, Any] = {
        "endpoint": e.name, "endpoint_type": e.type, "task": e.task, "rows_per_request": e.rows_per_request,
        "max_concurrency": lim.max_concurrency, "requests_per_minute": lim.requests_per_minute,
        "tokens_per_minute": lim.tokens_per_minute, "adaptive": lim.adaptive, "http_client": lim.http_client,
        "read_timeout_s": lim.read_timeout_s, "max_attempts": r.max_attempts,
        "chunk_rows": cfg.run.chunk_rows, "limit": cfg.run.limit, "retry_errors": cfg.run.retry_errors,
        "input": cfg.input.table or cfg.input.path or "(query)", "output_table": cfg.output.table,
        "config_hash": cfg.config_hash(), "cost_unit": e.price_unit,
        **{f"model_kwargs.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in e.model_kwargs.items()},
    }
    return {k: str(v)[:500] for k, v in params.items() if v is not None}


def log_to_mlflow(spark: SparkSession, cfg: JobConfig, record: dict[str, Any], stats: RunStats,
                  timeline: list[ChunkTiming]) -> str | None:
    """Params, the summary as metrics, and the two plots; returns MLflow's run id (None if skipped)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        log.warning("mlflow.enabled is set but mlflow is not installed here: skipping MLflow logging "
                    "(pip install mlflow, or use a Databricks ML runtime)")
        return None
    uri = tracking_uri(cfg)
    artifacts = _artifact_root(uri)
    client = MlflowClient(tracking_uri=uri)  # a client of its own: the process's MLflow state is left alone
    name = _experiment(spark, cfg)
    found = client.get_experiment_by_name(name)
    exp_id = found.experiment_id if found else client.create_experiment(name, artifact_location=artifacts)
    noop = not record["pending_rows"]
    run = client.create_run(exp_id, run_name=f"{cfg.endpoint.name}-{record['run_id'][:8]}" + ("-noop" if noop else ""),
                            tags={"batch_inference.run_id": record["run_id"],
                                  "batch_inference.noop": str(noop).lower()})
    mid = run.info.run_id
    try:
        _log_run(spark, client, mid, cfg, record, stats, timeline)
    except BaseException:
        client.set_terminated(mid, "FAILED")  # not left RUNNING forever in the UI
        raise
    client.set_terminated(mid, "FINISHED")
    log.debug("MLflow: run %s in experiment %s (%s)", mid, name, uri)  # the closing line names the run
    return mid


def _log_run(spark: SparkSession, client: Any, mid: str, cfg: JobConfig, record: dict[str, Any],
             stats: RunStats, timeline: list[ChunkTiming]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in _metric_values(record).items()]
    metrics += [Metric("chunk_rows_per_s", rate, now, c.chunk)
                for c, rate in zip(timeline, chunk_rates(timeline))]
    tags = [RunTag(f"databricks.{k}", v) for k, v in record.items() if k in JOB_KEYS and v]
    if record.get("stopped"):
        tags.append(RunTag("batch_inference.stopped", record["stopped"]))
    params = [Param(k, v) for k, v in mlflow_params(cfg).items()]
    client.log_batch(mid, metrics=metrics[:1000], params=params[:100], tags=tags)
    for i in range(1000, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(mid, metrics=metrics[i:i + 1000])
    with tempfile.TemporaryDirectory() as tmp:
        if record["pending_rows"]:  # a no-op rerun has nothing to plot: its run is tagged instead
            about = f"run {record['run_id'][:8]}, {cfg.endpoint.name}, C={cfg.limits.max_concurrency}"
            series = _series(spark, cfg, record["run_id"])
            for path in save_plots(stats, timeline, Path(tmp), about, series, cfg.limits.max_concurrency):
                client.log_artifact(mid, str(path))
        summary = Path(tmp) / "run_summary.json"
        summary.write_text(json.dumps(record, default=str, indent=2))
        client.log_artifact(mid, str(summary))


def _series(spark: SparkSession, cfg: JobConfig, run_id: str) -> FlightSeries | None:
    """The run's throughput over time; None if the query fails (the plot is then drawn per chunk)."""
    try:
        return flight_series(spark, cfg.output.table, run_id)
    except Exception as exc:
        log.warning("could not compute run %s's throughput over time: %s", run_id, brief(exc))
        return None


def _metric_values(record: dict[str, Any]) -> dict[str, float]:
    out = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    # Reasons are codes (`http_429`, `timeout`); anything else MLflow refuses in a name becomes `_`.
    for reason, n in record["errors_by_reason"].items():
        out["errors." + re.sub(r"[^\w.\- /]", "_", reason)] = n
    for kind in ("budget", "spent"):  # run.budget's caps and spend: `budget.max_cost`, `spent.cost`
        out.update({f"{kind}.{k}": v for k, v in (record.get(kind) or {}).items()})
    for e in record.get("endpoints") or []:  # per endpoint: `endpoint.<name>.rows`, ...`.estimated_cost`
        name = re.sub(r"[^\w.\- /]", "_", e["endpoint"])
        out.update({f"endpoint.{name}.{k}": v for k, v in e.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out
