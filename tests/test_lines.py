"""The lines a person reads: the start line."""

from __future__ import annotations

from jobs.observe.lines import start_line
from tests.conftest import job_config


def cfg(**sections):
    return job_config(input={"table": "demo.prompts"}, output={"table": "demo.completions", "runs_table": "demo.runs"},
                      endpoint={"name": "local-toy", "type": "driver_proxy", "port": 7777,
                                "price_per_1k_prompt_tokens": 0.0005}, **sections)


def test_the_start_line_names_input_output_endpoint_concurrency_and_calling_mode():
    assert start_line(cfg(), "executors", "run.calls_from: auto") == (
        "input demo.prompts -> output demo.completions; endpoint local-toy (driver_proxy, custom) at "
        "127.0.0.1:7777; C=4; calls from the executors (run.calls_from: auto); --verbose prints the full config")
