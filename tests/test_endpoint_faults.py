"""Rate limits that last until the window resets, a cold start, an endpoint that is down and tokens that
expire: the real job on local Spark against loopback servers that behave as Databricks serving does.

The issue's cases, scaled from minutes to seconds with their ratios kept: a fixed window of 60
requests per 10 s becomes 20 per 2 s; a 20 s cold start 3 s; the breaker's 480 s 3 s; a one-hour
token 2 s, in a run longer than three of them. Default retry settings unless a case scales one.
Wall time is asserted only where it is the point (a refused endpoint stops a run in seconds); elsewhere
the requests each server saw, and the rows, say what happened.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

import pytest
import yaml
from pyspark.sql import functions as F

from jobs.local.stand_in import LocalEndpoint
from jobs.pipeline import run_job
from tests.conftest import free_port, job_config
from tests.faults import ColdStart, FixedWindow
from tests.workspace import AUTH_DETAILS, CLIENT_ID, CLIENT_SECRET, RO_PREFIX, Workspace

DEFAULT_RETRY = {"backoff_base_s": 0.5, "backoff_max_s": 30.0}  # conftest's job_config shortens them


def prompts(spark, n: int) -> str:
    view = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(i, f"question {i}") for i in range(n)], "id long, prompt string") \
        .createOrReplaceTempView(view)
    return view


def statuses(spark, table: str) -> dict[str, int]:
    return {r["status"]: r["count"] for r in spark.table(table).groupBy("status").count().collect()}


def test_a_fixed_window_without_retry_after_leaves_every_row_ok(spark, table_name):
    """The issue measured 59 to 76 of 398 rows `http_429` and 473 to 570 refused requests for 400 prompts
    (over one per row) against 60 per 10 s at max_concurrency 8. Now every row is ok, the task pauses and
    probes instead of each row retrying on its own, and every request the server saw is an attempt a
    row counts.

    What this run cannot show is the learned rate: seven windows of 20, shared by two tasks that each
    learn alone, are over before learning pays (measured: 17-20% of the requests drew a 429 learning,
    25% with `limits.adaptive: false`), and the share moves with the machine's load. The rate's rules are
    pinned on a virtual clock instead (tests/test_limits.py, the fixed-window tests), and
    benchmarks/ratelimit.py measures the share over thirty windows (under 0.05)."""
    window = FixedWindow(limit=20, window_s=2.0)
    with LocalEndpoint(fault=window) as ep:
        summary = run_job(spark, job_config(
            input={"table": prompts(spark, 150)}, output={"table": table_name},
            endpoint={"name": "pay-per-token", "type": "driver_proxy", "url": f"{ep.url}/"},
            limits={"max_concurrency": 8}, retry=DEFAULT_RETRY))
    print(f"\nfixed window 20 per 2 s: {summary.by_status}; {window.served} requests, {window.refused} "
          f"drew a 429 ({window.refused / window.served:.1%}); windows used {sorted(window.per_window.items())}")
    assert statuses(spark, table_name) == {"ok": 150}
    assert spark.table(table_name).agg(F.sum("attempts")).first()[0] == window.served
    # Paused and probed: measured 31 to 50 refusals for 150 rows, with learning or without; rows
    # retrying on their own drew more than one each.
    assert window.refused < 0.5 * 150, f"{window.refused} of {window.served} requests drew a 429"


def test_a_cold_start_of_503s_ends_with_every_row_ok(spark, table_name):
    cold = ColdStart(seconds=3.0)
    with LocalEndpoint(fault=cold) as ep:
        run_job(spark, job_config(
            input={"table": prompts(spark, 40)}, output={"table": table_name},
            endpoint={"name": "scaled-to-zero", "type": "driver_proxy", "url": f"{ep.url}/"},
            limits={"max_concurrency": 8}, retry=DEFAULT_RETRY))
    print(f"\ncold start of 3 s: {cold.requests} requests, {cold.unavailable} answered 503")
    assert statuses(spark, table_name) == {"ok": 40}
    # The first requests in flight and one probe at a time per task, not every row retrying on its own.
    assert cold.unavailable <= 8 + 2 * 5


@pytest.mark.parametrize("calls_from", ["driver", "executors"])
def test_an_endpoint_that_refuses_connections_at_start_stops_the_run_in_seconds(spark, tmp_path, caplog,
                                                                                calls_from):
    """Nothing has ever answered (a wrong port, a server not started): the pre-flight connection says so
    before the first chunk, as one line and exit 2, like any bad config; the breaker is not waited for."""
    from jobs.cli.run import execute

    port, table = free_port(), f"test.refused_{uuid.uuid4().hex[:8]}"
    conf = tmp_path / "refused.yml"
    conf.write_text(yaml.safe_dump({
        "input": {"table": prompts(spark, 20)}, "output": {"table": table},
        "endpoint": {"name": "nowhere", "type": "driver_proxy", "url": f"http://127.0.0.1:{port}/"},
        "run": {"calls_from": calls_from, "task_slots": 2}}))  # default retry: breaker_s 480
    caplog.set_level(logging.INFO, logger="batch_inference")
    t0 = time.monotonic()
    assert execute(["--conf", str(conf)]) == 2
    assert time.monotonic() - t0 < 30
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"endpoint http://127.0.0.1:{port}: nothing answers there (ConnectionRefusedError "
                      f"connecting to 127.0.0.1:{port}); no row was sent. Is the endpoint running (the local "
                      f"stand-in: python -m jobs.local.stand_in --port {port}), and are its URL, host and port "
                      "right?"]
    assert not spark.catalog.tableExists(table)


def test_an_endpoint_down_fails_fast_exits_non_zero_and_a_rerun_completes(spark, tmp_path, caplog, monkeypatch):
    """Nothing listens: each task's breaker opens after breaker_s (3 s here, 480 s by default) and fails
    the rest of its rows as `endpoint_unavailable`; later chunks probe once and fail at once; the run
    exits 1 naming the reason. With the endpoint up, a rerun sends those rows and exits 0.

    The pre-flight connection is skipped, as if the endpoint had answered it and gone away after: an
    endpoint refusing connections at start stops the run before any chunk (the test above)."""
    from jobs.cli.run import execute

    monkeypatch.setattr("jobs.pipeline.preflight", lambda spec: None)

    port, table = free_port(), f"test.down_{uuid.uuid4().hex[:8]}"
    conf = tmp_path / "down.yml"
    conf.write_text(yaml.safe_dump({
        "input": {"table": prompts(spark, 60)}, "output": {"table": table},
        "endpoint": {"name": "down", "type": "driver_proxy", "url": f"http://127.0.0.1:{port}/"},
        "limits": {"max_concurrency": 4}, "retry": {"breaker_s": 3.0},
        "run": {"task_slots": 2, "chunk_rows": 20}}))
    caplog.set_level(logging.INFO, logger="batch_inference")

    assert execute(["--conf", str(conf)]) == 1
    rows = spark.table(table).select("status", "error", "attempts").collect()
    assert len(rows) == 60 and {r["status"] for r in rows} == {"error"}
    assert {r["error"].split(":")[0] for r in rows} == {"endpoint_unavailable"}
    assert any(re.match(r"endpoint_unavailable: nothing answered for \ds \(last: connection_error: "
                        r"ConnectionRefusedError connecting to 127\.0\.0\.1:\d+\)$", r["error"]) for r in rows)
    sent = sum(r["attempts"] for r in rows)
    print(f"\nendpoint down: 60 rows, {sent} connection attempts; e.g. {rows[0]['error']!r}")
    # Probes, not 6 attempts per row: two tasks, 4 in flight and a probe every few seconds, then one
    # probe per task in each later chunk.
    assert sent <= 4 + 2 * 6 + 2 * 2
    last = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][-1]
    assert "failed: 60 of the 60 rows it sent failed (100%, above run.max_error_share 0.5); main reason: " \
           "endpoint_unavailable (60 rows)" in last
    warned = [r.getMessage() for r in caplog.records if "failed fast as endpoint_unavailable" in r.getMessage()]
    assert warned and all("the endpoint unavailable: 'down': " in m and "later chunks probe once before sending" in m
                          for m in warned), warned

    with LocalEndpoint(port=port):
        assert execute(["--conf", str(conf)]) == 0
    assert statuses(spark, table) == {"ok": 60}


def test_tokens_that_expire_are_refreshed_for_a_run_longer_than_three_of_their_lives(spark, table_name,
                                                                                         monkeypatch, caplog):
    """A service principal's OAuth through databricks-sdk against a loopback workspace: tokens live 2 s
    (an hour, scaled) and are refused after; the run paces at the endpoint's AI Gateway limit for over
    6 s. Each task mints its own tokens before they lapse. The endpoint is route-optimized: it is called
    at its own URL, which the workspace's definition gives, with tokens scoped to it (exchanged from the
    workspace's; the replica refuses others with 403)."""
    for name in ("DATABRICKS_TOKEN", "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", "/nonexistent/.databrickscfg")
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)
    caplog.set_level(logging.INFO, logger="batch_inference")
    with Workspace(token_life_s=2.0) as ws:
        ws.definition = {
            "name": "llm", "route_optimized": True, "state": {"ready": "READY"},
            "endpoint_url": f"{ws.url}{RO_PREFIX}/serving-endpoints/llm/invocations",
            "data_plane_info": {"query_info": {"authorization_details": AUTH_DETAILS}},
            "ai_gateway": {"rate_limits": [{"calls": 480, "key": "endpoint", "renewal_period": "minute"}]}}
        summary = run_job(spark, job_config(
            input={"table": prompts(spark, 60)}, output={"table": table_name},
            endpoint={"name": "llm", "type": "serving", "task": "llm/v1/chat", "host": ws.url, "auth": "databricks"},
            limits={"max_concurrency": 4}, retry=DEFAULT_RETRY))
        calls = ws.invocations()
        scoped = {ws.tokens[t][0] for t in ws.scoped}
    tokens = {n for _, n in calls}
    print(f"\nexpiring tokens: {summary.by_status} in {summary.seconds:.1f}s; {len(calls)} calls with "
          f"{len(tokens)} tokens, {ws.refused} refused")
    assert statuses(spark, table_name) == {"ok": 60}
    assert {p for p, _ in calls} == {f"{RO_PREFIX}/serving-endpoints/llm/invocations"}
    assert len(tokens) >= 4 and None not in tokens and tokens <= scoped
    log = caplog.text
    assert "AI Gateway limits: 480 calls/min per endpoint" in log and "route-optimized: calling" in log
    assert CLIENT_SECRET not in log and "oauth-" not in log and "scoped-" not in log


class _JobsOwnToken:
    """databricks-sdk's `runtime` strategy as a job's own token behaves: not OAuth, no expiry the SDK
    knows, a fresh one from the runtime whenever asked after half its life (here minted by the replica,
    so that the replica refuses it once it lapses)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws, self.token, self.at = ws, None, 0.0

    def auth_type(self) -> str:
        return "runtime"

    def __call__(self, cfg):
        def header() -> dict[str, str]:
            if self.token is None or time.monotonic() - self.at > self.ws.token_life_s / 2:
                self.token, self.at = self.ws.issue()["access_token"], time.monotonic()
            return {"Authorization": f"Bearer {self.token}"}
        return header


def test_the_job_s_own_token_is_refreshed_in_the_executors_for_a_chunk_longer_than_its_life(
        spark, table_name, monkeypatch, caplog):
    """Executors mode with credentials only the driver can refresh (the job's own runtime token): tokens
    live 4 s, one chunk calls for 12 s. The tasks get the driver's current token from its relay when
    theirs is refused, instead of failing the rest of the chunk with 401. (The relay's token may be
    up to half a life plus `REFRESH_AT_MOST_EVERY_S` old: with 2 s tokens it could lapse on the way
    back on a loaded machine, which real tokens of an hour never do.)"""
    from databricks.sdk.config import Config

    import jobs.endpoint.resolve

    caplog.set_level(logging.INFO, logger="batch_inference")
    with Workspace(token_life_s=4.0) as ws:
        ws.definition = {"name": "llm", "state": {"ready": "READY"}}
        strategy = _JobsOwnToken(ws)
        monkeypatch.setattr(jobs.endpoint.resolve, "_sdk_config",
                            lambda host=None: Config(host=ws.url, credentials_strategy=strategy))
        run_job(spark, job_config(
            input={"table": prompts(spark, 120)}, output={"table": table_name},
            endpoint={"name": "llm", "type": "serving", "task": "llm/v1/chat", "host": ws.url, "auth": "databricks"},
            limits={"max_concurrency": 2, "requests_per_minute": 600},
            run={"calls_from": "executors", "chunk_rows": 120}, retry=DEFAULT_RETRY))
        calls, refused = ws.invocations(), ws.refused
    tokens = {n for _, n in calls}
    print(f"\njob's own token, 4 s: {len(calls)} calls with {len(tokens)} tokens, {refused} refused")
    assert statuses(spark, table_name) == {"ok": 120}
    assert len(tokens) >= 3 and refused >= 1  # tokens lapsed mid-chunk, and the tasks got new ones
    assert "the tasks get the driver's current token from" in caplog.text
    assert "oauth-" not in caplog.text
