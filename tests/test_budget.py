"""run.budget: reservations against caps (udfs/budget.py), and a real job that stops on its budget,
commits what was answered, leaves the rest pending, exits 3, and a second run finishes the rest."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from chispa import assert_df_equality

from jobs.cli.run import EXIT_BUDGET, execute
from jobs.pipeline import run_job
from tests.conftest import job_config
from udfs.budget import Budget, BudgetSpec, BudgetSpent


def run(coro):
    return asyncio.run(coro)


def test_a_request_reserves_its_worst_case_and_settles_from_usage():
    budget = Budget(BudgetSpec(max_output_tokens=100, price_in=1e-6, price_out=2e-6))

    async def go():
        held = await budget.reserve(input_tokens=10, output_tokens=64)
        assert (budget.held.output_tokens, budget.held.requests) == (64, 1)
        budget.settle(held, prompt_tokens=12, completion_tokens=5)
        assert (budget.held.output_tokens, budget.spent.output_tokens, budget.spent.input_tokens) == (0, 5, 12)
        assert budget.spent.cost == pytest.approx(12e-6 + 10e-6)
    run(go())


def test_without_max_tokens_the_documented_default_is_reserved():
    budget = Budget(BudgetSpec(max_output_tokens=5000))

    async def go():
        held = await budget.reserve(input_tokens=1, output_tokens=None)
        assert held.output_tokens == 1024  # run.budget.reserve_output_tokens' default
    run(go())


def test_a_request_that_does_not_fit_waits_for_those_in_flight_then_the_budget_is_spent():
    budget = Budget(BudgetSpec(max_output_tokens=100))

    async def go() -> list[str]:
        events = []
        first = await budget.reserve(0, 60)

        async def second():
            try:
                held = await budget.reserve(0, 60)  # 60 + 60 > 100: waits for the first to settle
                events.append("second sent")
                budget.settle(held, 0, 50)
            except BudgetSpent:
                events.append("second spent")

        task = asyncio.ensure_future(second())
        await asyncio.sleep(0)
        events.append("first settles at 30")
        budget.settle(first, 0, 30)  # 30 + 60 <= 100: the second fits now
        await task
        try:
            await budget.reserve(0, 60)  # 80 spent, nothing in flight: never fits
        except BudgetSpent:
            events.append("third spent")
        try:
            await budget.reserve(0, 1)  # spent is spent: nothing more goes, even what would fit
        except BudgetSpent:
            events.append("fourth spent")
        return events
    assert run(go()) == ["first settles at 30", "second sent", "third spent", "fourth spent"]
    assert budget.spent.output_tokens == 80


def test_shares_of_what_is_left_never_sum_above_it():
    spec = BudgetSpec(max_cost=1.0, max_output_tokens=1000, max_requests=7)
    from udfs.budget import Spend

    left = spec.less(Spend(output_tokens=400, requests=3, cost=0.25))
    share = left.share(3)
    assert (share.max_output_tokens * 3, share.max_requests * 3, share.max_cost * 3) == pytest.approx((600, 4, 0.75))
    assert share.max_input_tokens is None


@pytest.mark.parametrize("calls_from", ["driver", "executors"])
def test_a_run_stops_on_its_token_budget_leaves_the_rest_pending_and_the_next_run_finishes(
        spark, fresh_endpoint, table_name, calls_from):
    """The stand-in answers 4 output tokens a row (`Answer to: question N`) and max_tokens is 8: a
    budget of 100 output tokens stops after about 25 rows, never past 100 (a request reserves 8)."""
    src = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(i, f"question {i}") for i in range(60)], "id long, prompt string") \
        .createOrReplaceTempView(src)
    endpoint = {"name": "local-chat", "type": "serving", "task": "llm/v1/chat", "host": fresh_endpoint.url,
                "model_kwargs": {"max_tokens": 8}}
    cfg = job_config(input={"table": src}, output={"table": table_name}, endpoint=endpoint,
                     run={"calls_from": calls_from, "budget": {"max_output_tokens": 100}})
    first = run_job(spark, cfg)

    done = first.by_status.get("ok", 0)
    assert first.stopped == "budget" and first.by_status == {"ok": done}  # no error rows
    assert 20 <= done <= 25 and first.spent["output_tokens"] == 4 * done <= 100
    assert len(fresh_endpoint.received) == done  # nothing sent that is not in the table
    assert spark.table(table_name).count() == done  # the rest stay pending: not written at all

    second = run_job(spark, cfg)  # a fresh budget: enough for the 60 - done left? 35 rows need 140
    third = run_job(spark, cfg)
    assert second.stopped == "budget" and third.stopped is None
    expected = spark.createDataFrame([(i, f"Answer to: question {i}", "ok") for i in range(60)],
                                     "id long, response string, status string")
    assert_df_equality(spark.table(table_name).select("id", "response", "status"), expected,
                       ignore_row_order=True, ignore_nullable=True)
    prompts = [r.body["messages"][-1]["content"] for r in fresh_endpoint.received]
    assert sorted(prompts) == sorted(f"question {i}" for i in range(60))  # each sent exactly once


def test_a_run_stopped_by_its_budget_exits_3_and_records_the_spend(spark, fresh_endpoint, table_name, tmp_path):
    src = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(i, f"question {i}") for i in range(30)], "id long, prompt string") \
        .createOrReplaceTempView(src)
    conf = tmp_path / "job.yml"
    conf.write_text(f"""
input: {{table: {src}}}
output: {{table: {table_name}, runs_table: {table_name}_runs}}
endpoint:
  name: local-chat
  type: serving
  task: llm/v1/chat
  host: {fresh_endpoint.url}
  model_kwargs: {{max_tokens: 8}}
  price_per_1k_prompt_tokens: 1.0
  price_per_1k_completion_tokens: 2.0
limits: {{max_concurrency: 2}}
run: {{calls_from: driver, budget: {{max_requests: 10}}}}
""")
    assert execute(["--conf", str(conf)]) == EXIT_BUDGET == 3
    row = spark.table(f"{table_name}_runs").select("stopped", "budget", "spent", "rows_ok").first()
    assert (row["stopped"], row["budget"], row["rows_ok"]) == ("budget", {"max_requests": 10.0}, 10)
    assert row["spent"]["requests"] == 10 and row["spent"]["cost"] > 0
