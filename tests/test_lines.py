"""The two lines a person reads: the start line, and the closing line with cost in its unit."""

from __future__ import annotations

import pytest

from jobs.observe.lines import closing_line, duration, money, start_line
from jobs.observe.stats import RunStats
from jobs.observe.summary import RunSummary
from tests.conftest import job_config


@pytest.mark.parametrize("amount, text", [
    (0.000318, "USD 0.00032"),     # the runs table showed 3.18E-4, the log 0.0003
    (0.0000318, "USD 0.000032"),  # a 20-row run printed 0.0000
    (0.0013, "USD 0.0013"),
    (0.03, "USD 0.03"),
    (1234.5, "USD 1,234.50"),
    (0.0, "USD 0"),
    (None, "no price set"),
])
def test_money_names_its_unit_and_keeps_small_amounts_readable(amount, text):
    assert money(amount, "USD") == text


def test_duration_reads_as_a_person_says_it():
    assert [duration(s) for s in (8.24, 161.7, 3725)] == ["8.2 s", "2 min 42 s", "1 h 02 min"]


def cfg(**sections):
    return job_config(input={"table": "demo.prompts"}, output={"table": "demo.completions", "runs_table": "demo.runs"},
                      endpoint={"name": "local-toy", "type": "driver_proxy", "port": 7777,
                                "price_per_1k_prompt_tokens": 0.0005, "price_unit": "EUR"}, **sections)


def test_the_start_line_names_input_output_endpoint_concurrency_and_calling_mode():
    assert start_line(cfg(), "executors", "run.calls_from: auto") == (
        "input demo.prompts -> output demo.completions; endpoint local-toy (driver_proxy, custom) at "
        "127.0.0.1:7777; C=4; calls from the executors (run.calls_from: auto); --verbose prints the full config")


def test_the_closing_line_says_rows_time_rate_tokens_cost_and_where_the_results_are():
    summary = RunSummary(run_id="r1", output_table="demo.completions", input_rows=50, pending_rows=50,
                         by_status={"error": 2, "ok": 48}, seconds=161.7)
    stats = RunStats(rows=50, prompt_tokens=1000, completion_tokens=184, estimated_token_requests=3)
    assert closing_line(cfg(), summary, stats, 0.000592, "m1") == (
        "run r1 finished in 2 min 42 s: 50 rows (48 ok, 2 error), 0.31 rows/s over the whole run, 1,184 tokens "
        "(3 requests' tokens estimated as characters / 4), cost EUR 0.00059; results in demo.completions "
        "(runs in demo.runs; MLflow run m1)")


def test_a_run_without_prices_or_stats_still_names_rows_time_and_results():
    summary = RunSummary(run_id="r2", output_table="demo.completions", pending_rows=3, by_status={"ok": 3},
                         seconds=2.0)
    plain = job_config(input={"table": "t"}, output={"table": "o"})
    assert closing_line(plain, summary, RunStats(rows=3, prompt_tokens=9)) == (
        "run r2 finished in 2.0 s: 3 rows (3 ok), 1.5 rows/s over the whole run, 9 tokens, no cost (set "
        "endpoint.price_per_1k_prompt_tokens); results in o")
    assert closing_line(plain, summary) == (
        "run r2 finished in 2.0 s: 3 rows (3 ok), 1.5 rows/s over the whole run; results in o")


def test_a_run_with_nothing_pending_says_so():
    summary = RunSummary(run_id="r3", output_table="o", input_rows=5, pending_rows=0, seconds=4.0)
    assert closing_line(job_config(input={"table": "t"}, output={"table": "o"}), summary) == (
        "run r3 finished in 4.0 s: nothing to do: every row of t is already final in o")
