"""The job on Spark Connect, as serverless and Databricks Connect run it: a local Connect server with Delta.

The server runs in the suite's own JVM (`tests/conftest.py`), bound to 127.0.0.1, with Delta's
extension and catalog; the job talks to it through the Connect client only: no SparkContext, no
RDD, Delta's work in SQL. `run.calls_from: auto` then calls from the driver, as it must on
serverless, where UDFs cannot reach the internet.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections import Counter

import pytest
import yaml
from chispa import assert_df_equality

from jobs.calls.plan import task_slots
from jobs.local.stand_in import LocalEndpoint
from jobs.pipeline import run_job
from jobs.session import is_connect
from tests.conftest import ROOT, job_config
from tests.faults import FaultPlan
from tests.test_faults import run_in_process, start_job, wait_for_commit

SCHEMA = "id long, prompt string, response string, status string, error string, attempts int"


def view(session, rows: list[tuple], schema: str = "id long, prompt string") -> str:
    name = f"prompts_{uuid.uuid4().hex[:8]}"
    session.createDataFrame(rows, schema).createOrReplaceTempView(name)
    return name


def proxy(ep: LocalEndpoint, **extra):
    return {"name": "local-proxy", "type": "driver_proxy", "url": f"{ep.url}/", **extra}


def landed(session, table: str):
    return session.table(table).select("id", "prompt", "response", "status", "error", "attempts")


def test_the_session_is_connect_and_has_no_sparkcontext(connect):
    assert is_connect(connect)
    with pytest.raises(Exception):
        connect.sparkContext  # noqa: B018 - the point: Connect has none
    assert task_slots(connect) == 2  # from the conf (local[2]), never from a SparkContext


def test_completions_land_from_the_driver_in_chunks_with_dedupe_and_the_limit_kept(
        connect, fresh_endpoint, table_name, caplog):
    fresh_endpoint.latency_s = 0.02
    rows = [(i, f"prompt {i % 9}") for i in range(30)] + [(30, " "), (31, None)]
    src = view(connect, rows)
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=proxy(fresh_endpoint),
                     limits={"max_concurrency": 3}, run={"chunk_rows": 8, "task_slots": None})
    with caplog.at_level(logging.INFO, logger="batch_inference"):
        summary = run_job(connect, cfg)

    assert "calls from the driver (auto, on Spark Connect" in caplog.text
    expected = [(i, p, f"Answer to: {p}", "ok", None, 1) for i, p in rows[:30]]
    expected += [(30, " ", None, "error", "empty_prompt", 0), (31, None, None, "error", "empty_prompt", 0)]
    assert_df_equality(landed(connect, table_name), connect.createDataFrame(expected, SCHEMA),
                       ignore_row_order=True, ignore_nullable=True)
    assert summary.by_status == {"ok": 30, "error": 2} and summary.chunks >= 3  # staged, several chunks
    sent = Counter(r.body["prompt"] for r in fresh_endpoint.received)
    assert sent == Counter({f"prompt {k}": 1 for k in range(9)})  # identical prompts go once
    assert 2 <= fresh_endpoint.peak_inflight <= 3  # one engine holds the job-wide limit exactly
    # Scratch tables of the run are gone.
    schema = table_name.split(".")[0]
    assert [r.tableName for r in connect.sql(f"SHOW TABLES IN {schema} LIKE '*__bi_*'").collect()] == []


def test_rerun_skips_finished_rows_and_merges_changed_ones_in_sql(connect, fresh_endpoint, table_name):
    src = view(connect, [(1, "a"), (2, "b"), (3, "")])
    sections = dict(input={"table": src}, output={"table": table_name})
    first = run_job(connect, job_config(**sections, endpoint=proxy(fresh_endpoint)))
    fresh_endpoint.reset()
    again = run_job(connect, job_config(**sections, endpoint=proxy(fresh_endpoint)))
    assert (again.pending_rows, again.by_status, fresh_endpoint.received) == (1, {"error": 1}, [])  # the blank

    changed = run_job(connect, job_config(**sections, endpoint=proxy(fresh_endpoint, model_kwargs={"max_tokens": 2})))
    assert changed.pending_rows == 3 and len(fresh_endpoint.received) == 2
    expected = [(1, "a", "Answer to:", "ok", None, 1), (2, "b", "Answer to:", "ok", None, 1),
                (3, "", None, "error", "empty_prompt", 0)]
    assert_df_equality(landed(connect, table_name), connect.createDataFrame(expected, SCHEMA),
                       ignore_row_order=True, ignore_nullable=True)
    history = connect.sql(f"DESCRIBE HISTORY {table_name}").select("operation").collect()
    assert {r.operation for r in history} >= {"CREATE TABLE", "WRITE", "MERGE"}
    assert first.run_id != changed.run_id


def test_embeddings_land_as_vectors_from_the_driver(connect, fresh_endpoint, table_name):
    src = view(connect, [(1, "one two"), (2, "three"), (3, "four five six")])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint={"name": "emb", "type": "serving", "task": "llm/v1/embeddings",
                               "host": fresh_endpoint.url, "batch_size": 2})
    summary = run_job(connect, cfg)
    assert summary.by_status == {"ok": 3}
    assert len(fresh_endpoint.received) == 2  # 3 texts in requests of 2
    got = {r.id: (r.text, r.dim, len(r.embedding)) for r in connect.table(table_name).collect()}
    assert {i: (t, d == n) for i, (t, d, n) in got.items()} == {
        1: ("one two", True), 2: ("three", True), 3: ("four five six", True)}
    assert len({d for _, d, _ in got.values()}) == 1  # one length per run


def test_executors_mode_runs_over_connect_too(connect, fresh_endpoint, table_name):
    """Standard-access clusters run Connect and their UDFs may reach the endpoint: the UDF path, staged."""
    src = view(connect, [(i, f"p{i}") for i in range(12)])
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=proxy(fresh_endpoint),
                     limits={"max_concurrency": 2}, run={"calls_from": "executors", "chunk_rows": 5})
    summary = run_job(connect, cfg)
    assert summary.by_status == {"ok": 12} and len(fresh_endpoint.received) == 12
    assert fresh_endpoint.peak_inflight <= 2


def test_dry_run_and_the_runs_table_over_connect(connect, fresh_endpoint, table_name, tmp_path):
    src = view(connect, [(1, "one two"), (2, "three")])
    runs_table = f"{table_name}_runs"
    base = dict(input={"table": src}, output={"table": table_name, "runs_table": runs_table},
                endpoint={"name": "local-serving", "type": "serving", "task": "llm/v1/completions",
                          "host": fresh_endpoint.url})
    dry = run_job(connect, job_config(**base, run={"dry_run": True, "forecast_rows": 0}))
    assert [(c.name, c.ok) for c in dry.dry_run.checks] == [
        ("config", True), ("endpoint", True), ("input", True), ("output", True), ("pending", True),
        ("probe", True), ("estimate", True)]
    assert len(fresh_endpoint.received) == 1 and not connect.catalog.tableExists(table_name)

    summary = run_job(connect, job_config(**base, mlflow={"enabled": True,
                                                          "tracking_uri": f"sqlite:///{tmp_path}/m.db"}))
    [row] = connect.table(runs_table).collect()
    assert (row.run_id, row.rows, row.rows_ok, row.pending_rows, row.prompt_tokens) == (
        summary.run_id, 2, 2, 2, 3)
    assert row.mlflow_run_id


# -- kill -9 of a job talking to Connect, then rerun ----------------------------------------------------

def quiet(delta_log, seconds: float = 2.0, timeout_s: float = 60) -> None:
    """Wait until no commit lands for `seconds`: the killed client's last request may still finish."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        now = sorted(p.name for p in delta_log.glob("*.json"))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(0.1)


def test_kill_9_of_a_connect_job_then_rerun_completes_once_each(spark, connect_session, connect_url, warehouse,
                                                                tmp_path, monkeypatch):
    name = uuid.uuid4().hex[:8]
    source, table = f"test.cresume_in_{name}", f"test.cresume_out_{name}"
    prompts = {i: f"connect resume {i}" for i in range(20)}
    spark.sql("CREATE SCHEMA IF NOT EXISTS test")
    spark.createDataFrame(list(prompts.items()), "id long, prompt string").write.format("delta").saveAsTable(source)
    plan = FaultPlan()
    with LocalEndpoint(latency_s=0.25, fault=plan) as ep:
        conf = tmp_path / "job.yml"
        conf.write_text(yaml.safe_dump({
            "input": {"table": source}, "output": {"table": table},
            "endpoint": {"name": "slow", "type": "driver_proxy", "url": f"{ep.url}/"},
            "limits": {"max_concurrency": 2}, "run": {"chunk_rows": 4}}))
        argv = ["--conf", str(conf)]
        monkeypatch.setenv("SPARK_REMOTE", connect_url)  # the job process is a Connect client, nothing more
        first = start_job(argv, warehouse, tmp_path / "killed.log")
        delta_log = warehouse / "test.db" / table.split(".")[1] / "_delta_log"
        wait_for_commit(first, delta_log, 2, tmp_path / "killed.log")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        quiet(delta_log)
        at_kill = {r["id"]: r["run_id"] for r in spark.table(table).select("id", "run_id").collect()}
        sent_before = len(plan.log)

        monkeypatch.setenv("SPARK_CONNECT_MODE_ENABLED", "1")
        code, log_text = run_in_process(argv)  # get_spark() finds the Connect session already active
        monkeypatch.delenv("SPARK_CONNECT_MODE_ENABLED")

    killed_log = (tmp_path / "killed.log").read_text(errors="replace")
    assert "calls from the driver" in killed_log and (first.returncode, code) == (-signal.SIGKILL, 0), log_text[-3000:]
    assert 0 < len(at_kill) < len(prompts)
    final = spark.table(table).select("id", "prompt", "response", "status", "error", "attempts")
    expected = [(i, p, f"Answer to: {p}", "ok", None, 1) for i, p in prompts.items()]
    assert_df_equality(final, spark.createDataFrame(expected, SCHEMA), ignore_row_order=True, ignore_nullable=True)
    sent = plan.counts()
    assert {i: sent[prompts[i]] for i in at_kill} == {i: 1 for i in at_kill}  # landed rows never paid twice
    rerun_sent = Counter(p for _, ps in plan.log[sent_before:] for p in ps)
    assert rerun_sent == Counter({p: 1 for i, p in prompts.items() if i not in at_kill})
    kept = {r["id"]: r["run_id"] for r in spark.table(table).where(f"id IN ({','.join(map(str, at_kill))})")
            .select("id", "run_id").collect()}
    assert kept == at_kill
    assert ROOT.exists()
