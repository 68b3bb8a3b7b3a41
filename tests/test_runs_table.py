"""The runs table: the Databricks job run's ids, and two writers creating the table at once."""

from __future__ import annotations

import threading
import uuid

from chispa import assert_df_equality

from jobs.observe.runs_table import RUNS_SCHEMA, append_run, databricks_ids


def test_databricks_job_ids_come_from_the_spark_conf(spark):
    keys = {"spark.databricks.clusterUsageTags.clusterName": "job-123-run-456",
            "spark.databricks.job.taskKey": "completions"}
    assert databricks_ids(spark) == {"job_id": None, "job_run_id": None, "task_run_id": None, "task_key": None}
    try:
        for k, v in keys.items():
            spark.conf.set(k, v)
        assert databricks_ids(spark) == {"job_id": "123", "job_run_id": None, "task_run_id": "456",
                                         "task_key": "completions"}
    finally:
        for k in keys:
            spark.conf.unset(k)


def test_two_tasks_recording_their_first_runs_at_once_both_land(spark):
    """The bundle's two tasks may create the runs table at the same moment: Delta then refuses one of
    the two creating writers (`ProtocolChangedException`); that run must still be recorded."""
    table = f"test.runs_{uuid.uuid4().hex[:8]}"
    records = [{**{f.name: None for f in RUNS_SCHEMA.fields}, "run_id": f"run-{i}", "endpoint": f"e{i}",
                "errors_by_reason": {}} for i in range(2)]
    start, failures = threading.Barrier(2), []

    def record(r):
        start.wait()
        try:
            append_run(spark, table, r, pause_s=0.05)
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            failures.append(exc)

    writers = [threading.Thread(target=record, args=(r,)) for r in records]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert failures == []
    expected = spark.createDataFrame([("run-0", "e0"), ("run-1", "e1")], "run_id string, endpoint string")
    assert_df_equality(spark.table(table).select("run_id", "endpoint"), expected, ignore_row_order=True,
                       ignore_nullable=True)
