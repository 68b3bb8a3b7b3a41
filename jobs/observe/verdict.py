"""Whether a finished run failed: the exit decision, made after every row is committed.

A run fails (`JobFailed`, exit 1) when any row failed under `run.fail_on_error`, or when the share
of the rows it sent that failed exceeds `run.max_error_share` (default 0.5): an endpoint that was
down for a whole run must not leave a scheduled job green. Rows stopped before sending (empty,
too long, a null template field) count for neither side. The message, the run's last line, names
the main reason with an example, and says that a rerun retries the failed rows.

Example::

    judge(spark, cfg, summary)   # raises JobFailed, or returns the errors by reason
"""

from __future__ import annotations

import logging

from pyspark.sql import SparkSession, functions as F

from jobs.config import JobConfig
from jobs.errors import JobFailed
from jobs.observe.stats import reason_code
from jobs.observe.summary import RunSummary
from udfs import reasons

log = logging.getLogger("batch_inference")

# Rows that failed before anything was sent: not the endpoint's failures.
NOT_SENT = frozenset({reasons.EMPTY_PROMPT, reasons.PROMPT_TOO_LONG, reasons.NULL_FIELD})


def errors_by_reason(spark: SparkSession, table: str, run_id: str) -> dict[str, tuple[int, str]]:
    """This run's failed rows per reason code: (rows, one example `error`), in one aggregation."""
    code = reason_code(F.col("error"))
    rows = (spark.read.table(table).where((F.col("run_id") == run_id) & (F.col("status") != "ok"))
            .groupBy(code.alias("reason")).agg(F.count(F.lit(1)).alias("n"), F.min("error").alias("example"))
            .collect())
    return {r["reason"] or "unknown": (r["n"], r["example"] or "") for r in rows}


def judge(spark: SparkSession, cfg: JobConfig, summary: RunSummary) -> dict[str, tuple[int, str]]:
    """Raise `JobFailed` if the run must exit non-zero; else return its errors by reason."""
    if not summary.errors:
        return {}
    by_reason = errors_by_reason(spark, cfg.output.table, summary.run_id)
    rows = sum(summary.by_status.values())
    not_sent = sum(n for code, (n, _) in by_reason.items() if code in NOT_SENT)
    sent, failed = rows - not_sent, summary.errors - not_sent
    share = failed / sent if sent else 0.0
    # The main reason: the commonest among the rows sent (the endpoint's failures), else among all.
    main, (n, example) = max(by_reason.items(), key=lambda kv: (kv[0] not in NOT_SENT, kv[1][0]))
    where = f"see {cfg.output.table} WHERE run_id = '{summary.run_id}' AND status != 'ok'"
    if cfg.run.fail_on_error:
        raise JobFailed(f"{summary.errors} row(s) failed in run {summary.run_id} (run.fail_on_error is set); "
                        f"main reason: {main} ({n} rows), e.g. {example!r}; {where}")
    if share > cfg.run.max_error_share:
        raise JobFailed(f"run {summary.run_id} failed: {failed} of the {sent} rows it sent failed "
                        f"({share:.0%}, above run.max_error_share {cfg.run.max_error_share:g}); main reason: "
                        f"{main} ({n} rows), e.g. {example!r}; every row is written, rerun to retry the "
                        f"failed ones; {where}")
    return by_reason
