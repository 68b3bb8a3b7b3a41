"""The fault matrix: every failure a batch job meets, injected on loopback, the output table asserted.

One job run answers most rows of the matrix: the endpoint's `FaultPlan` gives each prompt its own
fault, so the faults do not interact, and each `test_<fault>` below asserts the rows of its fault
exactly (as the run left the table). `test_every_input_id_has_exactly_one_row` asserts the whole
table. The kill -9 row runs the job as a separate process against the same warehouse, kills it after
two chunks have landed, and reruns it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml
from chispa import assert_df_equality
from pyspark.sql import functions as F, types as T

from jobs.local.stand_in import LocalEndpoint
from jobs.output.commit import commit_chunk, ensure_output_table, output_schema
from jobs.pipeline import run_job
from jobs.session import register_local_tables
from tests.conftest import ROOT, job_config
from tests.faults import (FaultPlan, html_page, json_answer, json_error, malformed_json, reset_mid_body,
                          server_error, stall, throttled)
from udfs.engine import Engine
from udfs.spec import EngineSpec, RetrySpec

COLS = "id long, prompt string, response string, status string, error string, http_status int, attempts int"
READ_TIMEOUT_S = 2.0  # generous: on a loaded machine a healthy answer must never time out
MAX_ATTEMPTS = 3


def ok(i: int, prompt: str, attempts: int = 1) -> tuple:
    return (i, prompt, f"Answer to: {prompt}", "ok", None, 200, attempts)


def failed(i: int, prompt: str | None, error: str, http_status: int | None, attempts: int) -> tuple:
    return (i, prompt, None, "error", error, http_status, attempts)


# Each fault: the prompts' scripts and the rows the table must then hold.
BURSTS = {f"burst {k}": script for k, script in enumerate(
    [[server_error(500)], [server_error(502)], [server_error(503)], [server_error(503), server_error(500)]]
    + [[]] * 6)}  # 15 requests, 5 of them failing: a third
TEXTS = ["nul\x00byte", "right-to-left \u202e override, 🦄 emoji", "crlf\r\nand\ttab",
         b"bad \xff\xfe bytes".decode("utf-8", errors="replace"), "\x1b[31mansi\x07bell\x7f"]
EXPECTED = {
    "bursts": [ok(10 + k, p, attempts=1 + len(s)) for k, (p, s) in enumerate(BURSTS.items())],
    "throttled": [ok(20, "throttled", attempts=2)],
    "timeouts": [
        ok(30, "stall once", attempts=2),
        failed(31, "stall always", f"timeout: no answer within read_timeout_s={READ_TIMEOUT_S:g} "
                                   f"(gave up after {MAX_ATTEMPTS} attempts)", None, MAX_ATTEMPTS),
        ok(32, "reset once", attempts=2),
    ],
    "bad answers": [
        failed(40, "malformed json", "bad_response: answer is not JSON: '{\"choices\": [{\"text\": '", 200, 1),
        failed(41, "wrong shape", "bad_response: the answer is dict, expected a string", 200, 1),
        failed(42, "html page", "bad_response: answer is not JSON: '<!DOCTYPE html> <html><head><title>502 Bad "
                                "Gateway</title></head><body><h1>Bad G'", 200, 1),
        failed(43, "html error page", "http_403: HTML error page", 403, 1),
    ],
    "bad prompt": [failed(50, "bad prompt", "http_400: BAD_REQUEST: prompt is not valid for this model", 400, 1)],
    "texts": [ok(60 + k, p) for k, p in enumerate(TEXTS)],
    "bad input": [
        failed(70, None, "empty_prompt", None, 0),
        failed(71, "", "empty_prompt", None, 0),
        failed(72, "   ", "empty_prompt", None, 0),
        failed(73, "x" * 61, "prompt_too_long: 61 chars > run.max_prompt_chars 60", None, 0),
    ],
}
NOT_SENT = {"bad input"}


def fault_plan() -> FaultPlan:
    return FaultPlan(
        scripts={**BURSTS, "throttled": [throttled("1")], "stall once": [stall(3 * READ_TIMEOUT_S)],
                 "reset once": [reset_mid_body()]},
        always={"stall always": stall(3 * READ_TIMEOUT_S), "malformed json": malformed_json(),
                "wrong shape": json_answer({"choices": [{"text": "hi"}]}), "html page": html_page(200),
                "html error page": html_page(403),
                "bad prompt": json_error(400, "prompt is not valid for this model", code="BAD_REQUEST")},
    )


def rows_of(*faults: str) -> list[tuple]:
    return [row for f in faults for row in EXPECTED[f]]


def outcomes(spark, table: str):
    """The table's outcome columns, the seconds in "gave up after N attempts, 1.2s" left out."""
    return spark.table(table).select("id", "prompt", "response", "status",
                         F.regexp_replace("error", r", [0-9.]+s\)$", ")").alias("error"), "http_status", "attempts")


@pytest.fixture(scope="module")
def matrix(spark):
    """One run of the job over every fault's prompts; yields what the tests need to assert on it."""
    plan = fault_plan()
    rows = [(r[0], r[1]) for rows in EXPECTED.values() for r in rows]
    src = f"fault_prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame(rows, "id long, prompt string").createOrReplaceTempView(src)
    table = f"test.faults_{uuid.uuid4().hex[:8]}"
    with LocalEndpoint(fault=plan) as ep:
        sections = dict(
            input={"table": src}, output={"table": table},
            endpoint={"name": "faulty", "type": "driver_proxy", "url": f"{ep.url}/"},
            limits={"max_concurrency": 4, "read_timeout_s": READ_TIMEOUT_S},
            retry={"max_attempts": MAX_ATTEMPTS, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
            run={"max_prompt_chars": 60, "task_slots": 2},
        )
        summary = run_job(spark, job_config(**sections))
        # The table and the requests as this run left them, frozen: the rerun test adds to both, and
        # the tests must pass in any order.
        landed = outcomes(spark, table).localCheckpoint(eager=True)
        yield {"table": table, "landed": landed, "plan": FaultPlan(log=list(plan.log)), "live_plan": plan,
               "summary": summary, "sections": sections}


def assert_rows(spark, matrix, *faults: str) -> None:
    actual = matrix["landed"].where(
        F.col("id").isin([r[0] for r in rows_of(*faults)]))
    assert_df_equality(actual, spark.createDataFrame(rows_of(*faults), COLS), ignore_row_order=True,
                       ignore_nullable=True)


def test_every_input_id_has_exactly_one_row(spark, matrix):
    assert_df_equality(matrix["landed"], spark.createDataFrame(rows_of(*EXPECTED), COLS), ignore_row_order=True,
                       ignore_nullable=True)
    assert matrix["landed"].groupBy("id").count().where("count > 1").count() == 0
    assert matrix["summary"].by_status == Counter(r[3] for r in rows_of(*EXPECTED))


def test_5xx_bursts_are_retried_until_every_row_is_ok(spark, matrix):
    assert_rows(spark, matrix, "bursts")
    counts = matrix["plan"].counts()
    sent = sum(counts[p] for p in BURSTS)
    assert (sent, sent - len(BURSTS)) == (15, 5)  # a third of the requests failed, every row ended ok


def test_429_with_retry_after_is_waited_for(spark, matrix):
    assert_rows(spark, matrix, "throttled")
    first, second = matrix["plan"].times("throttled")
    assert second - first >= 1.0  # Retry-After: 1 is a floor, not a hint


def test_read_timeout_and_reset_mid_body_are_retried_then_fail_as_timeout(spark, matrix):
    assert_rows(spark, matrix, "timeouts")
    counts = matrix["plan"].counts()
    assert (counts["stall once"], counts["stall always"], counts["reset once"]) == (2, MAX_ATTEMPTS, 2)


def test_malformed_json_wrong_shape_and_html_are_error_rows_without_retries(spark, matrix):
    assert_rows(spark, matrix, "bad answers")
    counts = matrix["plan"].counts()
    assert [counts[r[1]] for r in EXPECTED["bad answers"]] == [1, 1, 1, 1]  # no retry storm


def test_400_for_one_bad_prompt_fails_that_row_and_no_other(spark, matrix):
    assert_rows(spark, matrix, "bad prompt")
    assert matrix["plan"].counts()["bad prompt"] == 1
    others = matrix["landed"].where(
        F.col("id").isin([r[0] for r in rows_of("bursts", "throttled", "texts")]))
    assert others.where("status != 'ok'").count() == 0


def test_control_characters_and_replaced_bytes_survive_the_round_trip(spark, matrix):
    assert_rows(spark, matrix, "texts")
    assert all(matrix["plan"].counts()[t] == 1 for t in TEXTS)  # sent as read, byte for byte


def test_empty_and_overlong_prompts_are_error_rows_never_sent(spark, matrix):
    assert_rows(spark, matrix, "bad input")
    sent = set(matrix["plan"].counts())
    assert sent.isdisjoint(r[1] for r in EXPECTED["bad input"])


def test_rerun_sends_only_error_rows_and_only_when_retry_errors(spark, matrix):
    plan, sections, table = matrix["live_plan"], matrix["sections"], matrix["table"]
    plan.clear()
    before = len(plan.log)
    kept = run_job(spark, job_config(**{**sections, "run": {**sections["run"], "retry_errors": False}}))
    assert (kept.pending_rows, len(plan.log)) == (0, before)

    again = run_job(spark, job_config(**sections))
    sent = Counter(p for _, ps in plan.log[before:] for p in ps)
    failed_sent = [r for f in EXPECTED if f not in NOT_SENT for r in EXPECTED[f] if r[3] == "error"]
    assert sent == Counter({r[1]: 1 for r in failed_sent})
    assert again.pending_rows == len(failed_sent) + len(EXPECTED["bad input"])

    first_run = matrix["summary"].run_id
    expected = ([(r[0], "ok", 1, False) for r in failed_sent]
                + [(r[0], "error", 0, False) for r in EXPECTED["bad input"]]
                + [(r[0], "ok", r[6], True) for f in EXPECTED for r in EXPECTED[f] if r[3] == "ok"])
    actual = spark.table(table).select("id", "status", "attempts", (F.col("run_id") == first_run).alias("kept"))
    assert_df_equality(actual, spark.createDataFrame(expected, "id long, status string, attempts int, kept boolean"),
                       ignore_row_order=True, ignore_nullable=True)


def test_400_in_a_batched_request_is_split_until_only_the_bad_row_fails():
    plan = FaultPlan(rule=lambda prompts: json_error(400, "input 'bad' is not valid", code="BAD_REQUEST")
                     if "bad" in prompts else None)
    with LocalEndpoint(fault=plan) as ep:
        engine = Engine(EngineSpec(url=f"{ep.url}/serving-endpoints/m/invocations", task="custom",
                                   rows_per_request=4, max_concurrency=1, retry=RetrySpec(max_attempts=3)))
        try:
            results = engine.call(["a", "b", "bad", "c"])
        finally:
            engine.close()
    assert [(o.status, o.response, o.error, o.http_status) for o in results] == [
        ("ok", "Answer to: a", None, 200), ("ok", "Answer to: b", None, 200),
        ("error", None, "http_400: BAD_REQUEST: input 'bad' is not valid", 400), ("ok", "Answer to: c", None, 200)]
    # Halves until the bad row stands alone; a 400 is never retried as such.
    assert [p for _, p in plan.log] == [("a", "b", "bad", "c"), ("a", "b"), ("bad", "c"), ("bad",), ("c",)]


def test_a_retried_chunk_commit_adds_no_second_row(spark, table_name):
    """The same chunk of the same run committed twice (a retried write) lands its rows once.

    New ids are appended with Delta's `txnAppId` (the run) and `txnVersion` (the chunk), so Delta
    skips a second write of them; ids the table holds are merged on id, idempotent as such (the rerun
    test above goes through that path).
    """
    schema = output_schema(T.LongType(), embeddings=False)
    ensure_output_table(spark, table_name, schema)
    with_flag = T.StructType([*schema.fields, T.StructField("_exists", T.BooleanType())])
    rows = [{"id": 1, "prompt": "a", "response": "A", "status": "ok", "run_id": "r1", "_exists": False},
            {"id": 2, "prompt": "b", "error": "http_503", "status": "error", "run_id": "r1", "_exists": False}]
    chunk = spark.createDataFrame([tuple(r.get(f.name) for f in with_flag.fields) for r in rows], with_flag)
    assert [commit_chunk(spark, table_name, chunk, "r1", 0) for _ in range(2)] == [{"ok": 1, "error": 1}] * 2
    expected = spark.createDataFrame([(1, "A", "ok"), (2, None, "error")], "id long, response string, status string")
    assert_df_equality(spark.table(table_name).select("id", "response", "status"), expected, ignore_row_order=True,
                       ignore_nullable=True)


# -- secrets in config --------------------------------------------------------------------------------

PAT = "dapi0123456789abcdef0123456789abcdef"


def exit_code(argv: list[str]) -> int:
    """The console script's exit status, whether it returns it or raises `SystemExit` with it."""
    from jobs.cli.run import main

    try:
        return main(argv)
    except SystemExit as exc:  # the console script raises SystemExit(code) on failure
        return int(exc.code or 0)


@pytest.mark.parametrize("endpoint, overrides, message", [
    ({"token": PAT}, [], r"endpoint\.token: a literal credential is not allowed in config; use endpoint\.token_env"),
    ({"model_kwargs": {"api_key": "sk-live-abcdefghijklmnop"}}, [], r"endpoint\.model_kwargs\.api_key: a literal"),
    ({"model_kwargs": {"note": PAT}}, [], r"endpoint\.model_kwargs\.note: this value looks like a token"),
    ({"url": f"https://token:{PAT}@adb-1.azuredatabricks.net/x"}, [], r"endpoint\.url: this value looks like a token"),
    ({"url": "https://svc:hunter2-pw@gateway.example.com/v1"}, [], r"endpoint\.url: .*password"),
    ({"url": "https://gateway.example.com/v1?api_key=hunter2-pw"}, [], r"endpoint\.url: .*api_key"),
    ({}, [f"endpoint.token={PAT}"], r"endpoint\.token: a literal credential"),
], ids=["token-key", "api-key-in-kwargs", "pat-value", "pat-in-url", "url-password", "url-query", "--set"])
def test_token_in_config_file_is_refused_with_a_clear_error(spark, tmp_path, caplog, capsys, endpoint, overrides,
                                                           message):
    # Were the config let through, the run would stop at once on the missing input table (the test's
    # session is up, auth is off), not with "bad config".
    conf = tmp_path / "job.yml"
    conf.write_text(yaml.safe_dump({"input": {"table": "test.no_such_prompts"}, "output": {"table": "test.out"},
                                    "endpoint": {"name": "llm", "task": "llm/v1/chat", "auth": "none",
                                                 "url": "http://127.0.0.1:9/", **endpoint}}))
    caplog.set_level(logging.INFO)
    assert exit_code(["--conf", str(conf), *[a for o in overrides for a in ("--set", o)]]) == 2
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage().startswith("bad config: ")
    assert re.search(message, record.getMessage())
    shown = caplog.text + "".join(capsys.readouterr())
    assert not any(s in shown for s in (PAT, "abcdefghijklmnop", "hunter2"))


# -- kill -9 mid-run, then rerun ----------------------------------------------------------------------

RESUME_ROWS, RESUME_CHUNK_ROWS = 20, 4  # five chunks
TOKEN = "dapi-RESUME-Zq7w-SECRET-kx9R-0042"  # not hex: no id or hash in a log can hold a piece of it


def start_job(argv: list[str], warehouse: Path, log: Path) -> subprocess.Popen:
    """`batch-inference` as its own OS process (and process group) on the test session's warehouse."""
    env = {**os.environ, "BI_WAREHOUSE_DIR": str(warehouse), "BI_SPARK_MASTER": "local[2]",
           "BI_DRIVER_MEMORY": "1g", "BI_RESUME_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), "-m", "jobs.cli.run", *argv], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_commit(proc: subprocess.Popen, delta_log: Path, version: int, log: Path, timeout_s: float = 600,
                    line: str | None = None) -> None:
    """Until the table has `version` (and the job's log has `line`, if given)."""
    deadline = time.monotonic() + timeout_s
    while not ((delta_log / f"{version:020d}.json").exists()
               and (line is None or line in log.read_text(errors="replace"))):
        if proc.poll() is not None:
            pytest.fail(f"the job exited ({proc.returncode}) before commit {version}:\n"
                        + log.read_text(errors="replace")[-3000:])
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no commit {version} within {timeout_s}s")
        time.sleep(0.02)


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """`batch-inference` in this process (its session is the test session); exit code and all it logged."""
    out, handler, root = io.StringIO(), logging.StreamHandler(), logging.getLogger()
    handler.setStream(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level, root.level = root.level, logging.DEBUG
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return exit_code(argv), out.getvalue()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="module")
def killed_then_rerun(spark, warehouse, tmp_path_factory):
    """Run the job in a process, kill -9 it once two chunks have landed, then rerun the same config.

    The rerun runs in the test's own process: the same entry point and config, without paying for a
    second JVM start. Its log and the killed process's whole output are kept for the token check.
    """
    tmp = tmp_path_factory.mktemp("resume")
    name = uuid.uuid4().hex[:8]
    source, table = f"test.resume_in_{name}", f"test.resume_out_{name}"
    prompts = {i: f"resume prompt {i}" for i in range(RESUME_ROWS)}
    spark.sql("CREATE SCHEMA IF NOT EXISTS test")
    spark.createDataFrame(list(prompts.items()), "id long, prompt string").write.format("delta").saveAsTable(source)
    plan = FaultPlan()  # no faults: it only records what the endpoint was sent
    with LocalEndpoint(latency_s=0.25, fault=plan) as ep:
        conf = tmp / "job.yml"
        conf.write_text(yaml.safe_dump({
            "input": {"table": source}, "output": {"table": table},
            "endpoint": {"name": "slow", "type": "driver_proxy", "url": f"{ep.url}/", "token_env": "BI_RESUME_TOKEN"},
            "limits": {"max_concurrency": 2}, "run": {"task_slots": 2, "chunk_rows": 1000},
        }))
        # --verbose: the full effective config is printed too, and must not carry the token either.
        argv = ["--conf", str(conf), "--set", f"run.chunk_rows={RESUME_CHUNK_ROWS}", "--verbose"]
        delta_log = warehouse / "test.db" / table.split(".")[1] / "_delta_log"
        first = start_job(argv, warehouse, tmp / "killed.log")
        # Version 0 creates the table; each chunk's append is one more version. Three chunks are in
        # flight at once and may land in any order; the fourth is sent only once the first has landed
        # and its progress line is out: killed then, chunks have landed and at least one has not.
        wait_for_commit(first, delta_log, 3, tmp / "killed.log", line="chunk 1/5")
        os.killpg(first.pid, signal.SIGKILL)  # the driver, its JVM and Python workers, with no goodbye
        first.wait()
        register_local_tables(spark)  # the table the killed process created, unknown to this session
        at_kill = {r["id"]: r["run_id"] for r in spark.table(table).select("id", "run_id").collect()}
        sent_before = len(plan.log)

        os.environ["BI_RESUME_TOKEN"] = TOKEN
        try:
            rerun_code, rerun_log = run_in_process(argv)
        finally:
            del os.environ["BI_RESUME_TOKEN"]
        yield {"table": table, "prompts": prompts, "plan": plan, "at_kill": at_kill, "sent_before": sent_before,
               "killed_rc": first.returncode, "killed_log": (tmp / "killed.log").read_text(errors="replace"),
               "rerun_rc": rerun_code, "rerun_log": rerun_log,
               "headers": [r.headers.get("Authorization") for r in ep.received]}


def test_kill_9_mid_run_then_rerun_completes_without_duplicates_or_second_calls(spark, killed_then_rerun):
    run = killed_then_rerun
    prompts, at_kill, plan = run["prompts"], run["at_kill"], run["plan"]
    assert (run["killed_rc"], run["rerun_rc"]) == (-signal.SIGKILL, 0), run["rerun_log"][-3000:]
    assert 0 < len(at_kill) < RESUME_ROWS  # killed mid-run: some chunks landed, not all

    final = spark.table(run["table"]).select("id", "prompt", "response", "status", "error", "attempts")
    expected = [(i, p, f"Answer to: {p}", "ok", None, 1) for i, p in prompts.items()]
    assert_df_equality(final, spark.createDataFrame(expected, "id long, prompt string, response string, "
                                                              "status string, error string, attempts int"),
                       ignore_row_order=True, ignore_nullable=True)  # every id, exactly once

    sent = plan.counts()
    assert {i: sent[prompts[i]] for i in at_kill} == {i: 1 for i in at_kill}  # never paid for twice
    rerun_sent = Counter(p for _, ps in plan.log[run["sent_before"]:] for p in ps)
    assert rerun_sent == Counter({p: 1 for i, p in prompts.items() if i not in at_kill})
    # Rows landed before the kill were left alone by the rerun.
    kept = spark.table(run["table"]).where(F.col("id").isin(list(at_kill))).select("id", "run_id")
    assert {r["id"]: r["run_id"] for r in kept.collect()} == at_kill


def test_the_log_of_a_whole_run_with_a_token_set_never_contains_it(killed_then_rerun):
    """The rerun's log (a whole run, every logger at DEBUG) and all the killed process wrote, JVM included."""
    run = killed_then_rerun
    assert set(run["headers"]) == {f"Bearer {TOKEN}"}  # the token was in use on every request
    assert "effective config" in run["rerun_log"] and "finished in" in run["rerun_log"]
    assert "effective config" in run["killed_log"] and "chunk 1/5" in run["killed_log"]
    for text in (run["killed_log"], run["rerun_log"]):
        assert not [TOKEN[i:i + 10] for i in range(len(TOKEN) - 9) if TOKEN[i:i + 10] in text]
