"""Watching a run: progress per chunk, the runs table against the output table, MLflow's record of it."""

from __future__ import annotations

import io
import logging
import sys
import threading
import uuid
from pathlib import Path

import pytest
from chispa import assert_df_equality

from jobs.config import ConfigError
from jobs.observe.progress import ChunkTiming, Progress
from jobs.observe.runs_table import RUNS_SCHEMA, append_run, databricks_ids
from jobs.observe.stats import RunStats
from jobs.pipeline import run_job
from jobs.observe.tracking import log_to_mlflow
from tests.conftest import job_config

SECRET = "s3cr3t-token-value-0042"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def ticking(*times: float):
    """A clock that returns the given times, one per call."""
    it = iter(times)
    return lambda: next(it)


def test_progress_on_a_terminal_redraws_one_bar_in_place(caplog):
    out = Terminal()
    progress = Progress(300, 3, stream=out, clock=ticking(0.0, 10.0, 20.0))
    with caplog.at_level(logging.INFO, logger="batch_inference"):
        progress.chunk_done({"ok": 100})
        progress.chunk_done({"ok": 95, "error": 5})
        progress.close()
    assert out.getvalue() == (
        "\r 33.3%|########----------------| 100/300 rows [0:00:10<0:00:20, 10.0 rows/s, errors 0, chunk 1/3]"
        "\r 66.7%|################--------| 200/300 rows [0:00:20<0:00:10, 10.0 rows/s, errors 5, chunk 2/3]\n")
    assert caplog.records == []  # a log line would break the bar


def test_progress_in_job_logs_is_one_plain_line_per_chunk(caplog):
    out = io.StringIO()
    progress = Progress(250, 2, stream=out, clock=ticking(0.0, 4.0, 10.0))
    with caplog.at_level(logging.INFO, logger="batch_inference"):
        progress.chunk_done({"ok": 98, "error": 2})
        progress.chunk_done({"ok": 150})
        progress.close()
    assert [r.getMessage() for r in caplog.records] == [
        "chunk 1/2: 100/250 rows (40.0%), 25.0 rows/s, ETA 0:00:06, errors 2",
        "chunk 2/2: 250/250 rows (100.0%), 25.0 rows/s, ETA 0:00:00, errors 2",
    ]
    assert out.getvalue() == ""
    assert progress.timeline == [ChunkTiming(1, 4.0, 100, 2), ChunkTiming(2, 10.0, 150, 0)]


def test_a_run_reports_each_chunk_and_records_itself_in_the_runs_table_and_mlflow(
        spark, fresh_endpoint, table_name, tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("BI_TEST_TOKEN", SECRET)
    src = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(1, "one two"), (2, "three"), (3, "three"), (4, ""), (5, "four five six")],
                          "id long, prompt string").createOrReplaceTempView(src)
    runs_table = f"{table_name}_runs"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = job_config(
        input={"table": src}, output={"table": table_name, "runs_table": runs_table},
        endpoint={"name": "local-serving", "type": "serving", "task": "llm/v1/completions",
                  "host": fresh_endpoint.url, "token_env": "BI_TEST_TOKEN", "model_kwargs": {"max_tokens": 16},
                  "price_per_1k_prompt_tokens": 1.0, "price_per_1k_completion_tokens": 2.0},
        run={"chunk_rows": 3}, mlflow={"enabled": True, "tracking_uri": uri, "experiment": "tests"})
    with caplog.at_level(logging.INFO, logger="batch_inference"):
        summary = run_job(spark, cfg)

    # One progress line per chunk (5 pending rows, 3 a chunk: 2 chunks), counts adding up to the run's.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("chunk ")]
    assert [line.split(":")[0] for line in lines] == ["chunk 1/2", "chunk 2/2"]
    assert lines[-1].startswith("chunk 2/2: 5/5 rows (100.0%), ") and lines[-1].endswith(", errors 1")

    # "three" is sent once for ids 2 and 3, so its tokens count once: 2+1+3 prompt, 4+3+5 completion.
    runs = spark.table(runs_table)
    expected = spark.createDataFrame(
        [(summary.run_id, cfg.config_hash(), "local-serving", src, table_name, 5, 5, 2, 5, 4, 1,
          {"empty_prompt": 1}, 3, 6, 12, 18, 0, 0.03, None, None)],
        "run_id string, config_hash string, endpoint string, input string, output_table string, input_rows long, "
        "pending_rows long, chunks int, rows long, rows_ok long, rows_error long, errors_by_reason map<string,long>, "
        "distinct_requests long, prompt_tokens long, completion_tokens long, total_tokens long, "
        "estimated_token_requests long, estimated_cost double, job_id string, task_run_id string")
    assert_df_equality(runs.select(*expected.columns), expected, ignore_nullable=True)
    # ... and the same numbers straight from the output table.
    from_output = spark.sql(f"""
        SELECT count(*) AS rows, count_if(status = 'ok') AS ok, count_if(status = 'error') AS error,
               (SELECT sum(p) FROM (SELECT DISTINCT request_hash, prompt_tokens AS p FROM {table_name})) AS pt,
               (SELECT sum(c) FROM (SELECT DISTINCT request_hash, completion_tokens AS c FROM {table_name})) AS ct
        FROM {table_name} WHERE run_id = '{summary.run_id}'""").first()
    row = runs.first()
    assert (row.rows, row.rows_ok, row.rows_error, row.prompt_tokens, row.completion_tokens) == tuple(from_output)
    assert 0 < row.latency_p50_ms <= row.latency_p95_ms <= row.latency_p99_ms
    assert row.started_at < row.finished_at and row.rows_per_s > 0

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_id == row.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.tags["batch_inference.run_id"] == summary.run_id
    assert {k: run.data.params[k] for k in ("endpoint", "task", "max_concurrency", "chunk_rows",
                                            "model_kwargs.max_tokens")} == {
        "endpoint": "local-serving", "task": "llm/v1/completions", "max_concurrency": "4", "chunk_rows": "3",
        "model_kwargs.max_tokens": "16"}
    assert {k: run.data.metrics[k] for k in ("rows_ok", "rows_error", "errors.empty_prompt", "prompt_tokens",
                                             "completion_tokens", "estimated_cost")} == {
        "rows_ok": 4.0, "rows_error": 1.0, "errors.empty_prompt": 1.0, "prompt_tokens": 6.0,
        "completion_tokens": 12.0, "estimated_cost": 0.03}
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "latency_histogram.png", "run_summary.json", "throughput.png"]
    for name in ("latency_histogram.png", "throughput.png"):
        assert Path(client.download_artifacts(run.info.run_id, name, str(tmp_path))).read_bytes()[:8] == (
            b"\x89PNG\r\n\x1a\n")
    # The token reached the endpoint, and nothing else: not MLflow, not the runs table.
    assert fresh_endpoint.received[0].headers["Authorization"] == f"Bearer {SECRET}"
    recorded = str(run.data) + Path(client.download_artifacts(run.info.run_id, "run_summary.json",
                                                              str(tmp_path))).read_text() + str(row)
    assert SECRET not in recorded and "BI_TEST_TOKEN" not in recorded


def test_without_mlflow_installed_logging_is_skipped_with_a_reason(spark, monkeypatch, caplog):
    for module in ("mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # what `import mlflow` meets where it is not installed
    cfg = job_config(mlflow={"enabled": True})
    with caplog.at_level(logging.WARNING, logger="batch_inference"):
        assert log_to_mlflow(spark, cfg, {"run_id": "r"}, RunStats(), []) is None
    assert "mlflow is not installed" in caplog.text


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


@pytest.mark.parametrize("section, values, message", [
    ("output", {"table": "a.b", "runs_table": "a.b"}, r"output: .*runs_table must be another table"),
    ("output", {"table": "a.b", "runs_table": "a b"}, r"output.runs_table: .*not a table name"),
    ("endpoint", {"price_per_1k_prompt_tokens": -1}, r"endpoint.price_per_1k_prompt_tokens: .*greater than"),
    ("mlflow", {"enable": True}, r"mlflow.enable: unknown key"),
])
def test_observability_settings_are_checked_and_named(section, values, message):
    with pytest.raises(ConfigError, match=message):
        job_config(**{section: values})


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
