"""`--dry-run`: real input, real output table, one probe request to a real loopback endpoint, no write."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from jobs.cli.run import execute
from jobs.dryrun.checks import DryRunFailed
from jobs.observe.lines import money
from jobs.pipeline import run_job
from tests.conftest import job_config


def view(spark, rows: list[tuple]) -> str:
    name = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame(rows, "id long, prompt string").createOrReplaceTempView(name)
    return name


def serving(ep, **extra):
    return {"name": "local-serving", "type": "serving", "task": "llm/v1/completions", "host": ep.url, **extra}


def last_version(spark, table: str) -> int:
    return spark.sql(f"DESCRIBE HISTORY {table}").agg({"version": "max"}).first()[0]


def test_dry_run_counts_pending_rows_probes_once_and_writes_nothing(spark, fresh_endpoint, table_name, tmp_path):
    first = view(spark, [(1, "one two"), (2, "three")])
    run_job(spark, job_config(input={"table": first}, output={"table": table_name},
                              endpoint=serving(fresh_endpoint)))
    version = last_version(spark, table_name)
    fresh_endpoint.reset()

    grown = view(spark, [(1, "one two"), (2, "three"), (3, "four five six"), (4, "")])
    runs_table, db = f"{table_name}_runs", tmp_path / "mlflow.db"
    cfg = job_config(input={"table": grown}, output={"table": table_name, "runs_table": runs_table},
                     endpoint=serving(fresh_endpoint, price_per_1k_prompt_tokens=1.0,
                                      price_per_1k_completion_tokens=2.0),
                     run={"dry_run": True, "forecast_rows": 0},
                     mlflow={"enabled": True, "tracking_uri": f"sqlite:///{db}"})
    summary = run_job(spark, cfg)

    [probe] = fresh_endpoint.received
    assert probe.body["prompt"] == "four five six"  # the one pending prompt that would be sent
    report = summary.dry_run
    assert [(c.name, c.ok) for c in report.checks] == [
        ("config", True), ("endpoint", True), ("input", True), ("output", True), ("pending", True),
        ("probe", True), ("estimate", True)]
    # Rows 3 and 4 are pending; only row 3 is sent (row 4 is empty). The probe reported 3 tokens for
    # 13 characters, and an answer of 5 tokens: 3 prompt + 5 completion tokens at 1.0 and 2.0 per 1k.
    assert (summary.input_rows, summary.pending_rows, report.requests, report.prompt_chars) == (4, 2, 1, 13)
    assert (report.prompt_tokens, report.completion_tokens, report.cost) == (3, 5, 0.013)
    assert report.probe.latency_ms > 0 and summary.by_status == {}
    assert last_version(spark, table_name) == version
    assert not spark.catalog.tableExists(runs_table) and not db.exists()


def test_a_failing_dry_run_exits_1_after_one_attempt_and_names_every_failed_check(
        spark, fresh_endpoint, table_name, tmp_path, caplog):
    fresh_endpoint.fault = lambda req: (503, {}, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}')
    conf = tmp_path / "dry.yml"
    conf.write_text(yaml.safe_dump({
        "input": {"table": "test.no_such_prompts"}, "output": {"table": table_name},
        "endpoint": serving(fresh_endpoint), "retry": {"max_attempts": 5, "backoff_base_s": 0.01}}))

    assert execute(["--conf", str(Path(conf)), "--dry-run"]) == 1

    [probe] = fresh_endpoint.received  # 503 is retryable, but a dry run sends one request
    assert probe.body["prompt"] == "ping"  # no input to take a prompt from
    failed = [r.getMessage() for r in caplog.records if "dry run: FAIL" in r.getMessage()]
    assert [m.split(":")[1].strip() for m in failed] == ["FAIL input", "FAIL probe"]
    assert "cannot read input test.no_such_prompts" in failed[0] and "http_503" in failed[1]
    assert not spark.catalog.tableExists(table_name)


def test_dry_run_with_a_limit_counts_the_pending_rows_a_run_would_take(spark, fresh_endpoint, table_name, caplog):
    src = view(spark, [(i, f"p{i}") for i in range(1, 8)])
    run_job(spark, job_config(input={"table": src}, output={"table": table_name},
                              endpoint=serving(fresh_endpoint), run={"limit": 3}))  # ids 1-3 done
    fresh_endpoint.reset()
    with caplog.at_level("INFO", logger="batch_inference"):
        summary = run_job(spark, job_config(input={"table": src}, output={"table": table_name},
                                            endpoint=serving(fresh_endpoint),
                                            run={"limit": 3, "dry_run": True, "forecast_rows": 0}))
    assert (summary.input_rows, summary.pending_rows, summary.dry_run.requests) == (7, 3, 3)
    [probe] = fresh_endpoint.received
    assert probe.body["prompt"] == "p4"  # the lowest pending id, not the first id of the table
    assert "4 of 7 rows pending (3 already final in the output table), this run takes the first 3" in caplog.text



def test_dry_run_all_prices_every_input_row_after_a_finished_run(spark, fresh_endpoint, table_name, caplog):
    src = view(spark, [(1, "one two"), (2, "three"), (3, "")])
    sections = dict(input={"table": src}, output={"table": table_name},
                    endpoint=serving(fresh_endpoint, price_per_1k_prompt_tokens=0.5, price_unit="EUR"))
    run_job(spark, job_config(**sections))
    fresh_endpoint.reset()
    pending = run_job(spark, job_config(**sections, run={"dry_run": True})).dry_run
    # Only the empty prompt's error row is pending again, and it is never sent: nothing to price.
    assert (pending.pending_rows, pending.requests, pending.cost) == (1, 0, 0.0)
    with caplog.at_level("INFO", logger="batch_inference"):
        every = run_job(spark, job_config(**sections, run={"dry_run": True, "dry_run_all": True})).dry_run
    assert (every.pending_rows, every.requests) == (3, 2)  # the empty prompt is never sent
    assert [r.body["prompt"] for r in fresh_endpoint.received] == ["ping", "one two"]  # nothing pending: ping
    assert every.cost == round(every.prompt_tokens * 0.5 / 1000, 6) and every.cost > 0
    assert "all 3 input rows priced (--all), final ones too" in caplog.text
    assert f"estimated cost {money(every.cost, 'EUR')}" in caplog.text and "estimated cost EUR 0.00" in caplog.text


def test_a_dry_run_names_the_columns_a_run_would_add_and_probes_the_schema_once(spark, fresh_endpoint,
                                                                               table_name):
    src = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(1, "one", "FR")], "id long, prompt string, country string").createOrReplaceTempView(src)
    run_job(spark, job_config(input={"table": src}, output={"table": table_name}, endpoint=serving(fresh_endpoint)))
    version = last_version(spark, table_name)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    cfg = job_config(input={"table": src, "keep_columns": ["country"]}, output={"table": table_name},
                     endpoint=serving(fresh_endpoint, response_format=schema),
                     run={"dry_run": True, "forecast_rows": 0})

    checks = {c.name: c.detail for c in run_job(spark, cfg).dry_run.checks}
    assert "; a run adds columns `country`, `parsed`" in checks["output"]
    assert "HTTP 200" in checks["probe"] and "that fits endpoint.response_format" in checks["probe"]

    fresh_endpoint.reset()
    fresh_endpoint.fault = lambda req: (200, {}, json.dumps({"choices": [{"text": '{"n": "one"}'}]}).encode())
    with pytest.raises(DryRunFailed, match=r"1 check\(s\) failed \(probe\)"):
        run_job(spark, cfg)
    assert len(fresh_endpoint.received) == 1  # one probe, no re-ask
    assert fresh_endpoint.received[0].body["response_format"]["json_schema"]["schema"] == schema
    assert last_version(spark, table_name) == version and "parsed" not in spark.table(table_name).columns


def test_the_forecast_sends_a_sample_for_real_keeps_it_and_extrapolates_within_10_percent(
        spark, fresh_endpoint, table_name):
    """An endpoint whose answers are known: row i answers 80 + i % 41 output tokens (mean 100). The
    forecast from 20 rows, sent and committed, is within 10 % of the true total over 1,000 rows, and
    the run after it sends the other 980 only."""
    def answer(req):
        n = 80 + int(req.body["prompt"].split()[-1]) % 41
        body = {"choices": [{"text": "x " * n}], "usage": {"prompt_tokens": 3, "completion_tokens": n}}
        return 200, {}, json.dumps(body).encode()

    fresh_endpoint.fault = answer
    src = view(spark, [(i, f"tell me {i}") for i in range(1000)])
    cfg = job_config(input={"table": src}, output={"table": table_name},
                     endpoint=serving(fresh_endpoint, price_per_1k_prompt_tokens=1.0,
                                      price_per_1k_completion_tokens=2.0),
                     limits={"max_concurrency": 8}, run={"dry_run": True})
    f = run_job(spark, cfg).dry_run.forecast

    assert (f.sampled, f.rest, spark.table(table_name).count()) == (20, 980, 20)  # kept: committed
    truth = sum(80 + i % 41 for i in range(1000))
    assert abs(f.output_tokens["mean"] - truth) <= 0.1 * truth
    assert abs(f.output_tokens["p50"] - truth) <= 0.1 * truth  # lengths spread evenly: p50 near the mean
    assert f.output_tokens["p50"] <= f.output_tokens["p95"] <= 1.25 * truth and f.input_tokens["mean"] == 3000
    assert f.cost["mean"] == pytest.approx(3.0 + 2 * f.output_tokens["mean"] / 1000, rel=1e-3)
    fresh_endpoint.reset()
    fresh_endpoint.fault = answer
    run_job(spark, cfg.model_copy(update={"run": cfg.run.model_copy(update={"dry_run": False})}))
    assert len(fresh_endpoint.received) == 980  # the sample is not paid for twice
