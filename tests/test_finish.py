"""The end of a run: progress lines, the runs table checked against the output table, MLflow's record."""

from __future__ import annotations

import logging
import re
import struct
import uuid
from pathlib import Path

from chispa import assert_df_equality

from jobs.pipeline import run_job
from tests.conftest import job_config

SECRET = "s3cr3t-token-value-0042"


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
        [(summary.run_id, "local-serving", src, table_name, 5, 5, 2, 5, 4, 1,
          {"empty_prompt": 1}, 3, 6, 12, 18, 0, 0.03, None, None)],
        "run_id string, endpoint string, input string, output_table string, input_rows long, "
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
    assert re.fullmatch(r"[0-9a-f]{16}", row.config_hash) and run.data.params["config_hash"] == row.config_hash
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
    # Throughput over time from the rows' sent_at: two panels, taller than the per-chunk fallback (418 px).
    png = Path(client.download_artifacts(run.info.run_id, "throughput.png", str(tmp_path))).read_bytes()
    assert struct.unpack(">II", png[16:24]) == (704, 572)
    assert not [r for r in caplog.records if "throughput over time" in r.getMessage()]
    # The token reached the endpoint, and nothing else: not MLflow, not the runs table.
    assert fresh_endpoint.received[0].headers["Authorization"] == f"Bearer {SECRET}"
    recorded = str(run.data) + Path(client.download_artifacts(run.info.run_id, "run_summary.json",
                                                              str(tmp_path))).read_text() + str(row)
    assert SECRET not in recorded and "BI_TEST_TOKEN" not in recorded
