"""The console script takes what Databricks passes: the bundle's arguments, both forms, job parameters."""

from __future__ import annotations

import logging
import re

import pytest
from chispa import assert_df_equality

from jobs.cli.run import ArgumentsError, effective_config_text, execute, main, parse_args
from jobs.config import load_config
from tests.bundle import ROOT, SERVERLESS, jobs, load_bundle, resolved, task_argv

DEMO = str(ROOT / "conf" / "demo.yml")


def dev_task(name: str, include: list[str] | None = None) -> tuple[dict, dict]:
    job = jobs(resolved(load_bundle(include=include), "dev"))["batch_inference"]
    task, = (t for t in job["tasks"] if t["task_key"] == name)
    return job, task


def config_of(argv: list[str]):
    inv = parse_args(argv)
    return load_config(inv.conf, inv.overrides), inv


def test_the_bundle_passes_named_parameters_then_its_job_parameters():
    job, task = dev_task("completions")
    assert task_argv(job, task) == [
        f"--conf={ROOT}/conf/databricks_completions.yml",
        "--input.table=main.dev_user.prompts",
        "--output.table=main.dev_user.completions",
        "--output.runs_table=main.dev_user.batch_inference_runs",
        "--endpoint.name=databricks-meta-llama-3-3-70b-instruct",
        "--limits.max_concurrency=8",
        "--limit=100",
        "--dry_run=false",
        "--max_cost=",
        "--max_output_tokens=",
    ]


def test_the_budget_job_parameters_reach_run_budget_and_empty_keeps_the_config_s():
    job, task = dev_task("completions")
    cfg, inv = config_of(task_argv(job, task, {"max_output_tokens": "50000"}))
    assert (cfg.run.budget.max_output_tokens, cfg.run.budget.max_cost, inv.ignored) == (50000, None, [])
    cfg, _ = config_of(task_argv(job, task, {"max_cost": "12.5"}) + [
        "--endpoint.price_per_1k_prompt_tokens=0.5", "--endpoint.price_per_1k_completion_tokens=1.5"])
    assert cfg.run.budget.max_cost == 12.5
    with pytest.raises(ArgumentsError, match=r"--max_cost=-1: expected a positive number \(run.budget.max_cost\)"):
        config_of(task_argv(job, task, {"max_cost": "-1"}))


@pytest.mark.parametrize("variant", [None, SERVERLESS], ids=["job_cluster", "serverless"])
@pytest.mark.parametrize("name, output, endpoint", [
    ("completions", "main.dev_user.completions", "databricks-meta-llama-3-3-70b-instruct"),
    ("embeddings", "main.dev_user.embeddings", "databricks-gte-large-en"),
])
def test_each_task_of_the_dev_target_parses_into_its_config(variant, name, output, endpoint):
    job, task = dev_task(name, variant)
    cfg, inv = config_of(task_argv(job, task))

    assert (cfg.input.table, cfg.output.table, cfg.endpoint.name, cfg.limits.max_concurrency,
            cfg.run.limit, cfg.run.dry_run, inv.ignored) == (
        "main.dev_user.prompts", output, endpoint, 8, 100, False, [])
    assert (cfg.output.runs_table, cfg.mlflow.enabled) == ("main.dev_user.batch_inference_runs", True)
    # No token: the tasks call as the job's own identity (databricks-sdk's unified auth in the job).
    assert (cfg.endpoint.token_env, cfg.endpoint.token_secret, cfg.endpoint.auth) == (None, None, "auto")


def test_job_parameters_set_at_run_time_reach_the_config():
    job, task = dev_task("embeddings")
    cfg, inv = config_of(task_argv(job, task, {"limit": "", "dry_run": "true", "run_date": "2026-01-31"}))
    # An empty limit leaves the conf file's value (none); another job's parameter is set aside.
    assert (cfg.run.limit, cfg.run.dry_run, inv.ignored) == (None, True, ["run_date"])


def test_list_and_named_forms_give_the_same_config():
    listed, _ = config_of(["--conf", DEMO, "--set", "limits.max_concurrency=4", "--endpoint.name", "toy",
                           "--limit", "5", "--dry-run"])
    named, _ = config_of([f"--conf={DEMO}", "--limits.max_concurrency=4", "--endpoint.name=toy",
                          "--limit=5", "--dry_run=true"])
    assert listed == named
    assert (named.limits.max_concurrency, named.endpoint.name, named.run.limit, named.run.dry_run) == (
        4, "toy", 5, True)


def test_all_prices_every_row_in_a_dry_run_and_only_there():
    cfg, _ = config_of(["--conf", DEMO, "--dry-run", "--all"])
    assert (cfg.run.dry_run, cfg.run.dry_run_all) == (True, True)
    with pytest.raises(Exception, match=r"run.dry_run_all \(--all\) applies to a dry run: add --dry-run"):
        config_of(["--conf", DEMO, "--all"])


def test_set_takes_several_keys_as_the_readme_quickstart_gives_them():
    cfg, _ = config_of(["--conf", DEMO, "--set", "endpoint.type=serving", "endpoint.name=databricks-meta-llama",
                        "endpoint.task=llm/v1/chat", "--limit", "3"])
    assert (cfg.endpoint.type, cfg.endpoint.name, cfg.endpoint.task, cfg.run.limit) == (
        "serving", "databricks-meta-llama", "llm/v1/chat", 3)
    with pytest.raises(Exception, match=r"--set 'stray': expected key=value"):
        config_of(["--conf", DEMO, "--set", "run.limit=3", "stray"])


def test_layers_apply_in_order_and_later_wins():
    cfg, inv = config_of(["--conf", DEMO, "--set", "limits.max_concurrency=4", "--set", "run.limit=3",
                          "--limits.max_concurrency=6", "--limit=7"])
    assert (cfg.limits.max_concurrency, cfg.run.limit) == (6, 7)
    assert inv.overrides == ["limits.max_concurrency=4", "run.limit=3", "limits.max_concurrency=6",
                             "run.limit=7"]
    kept, _ = config_of(["--conf", DEMO, "--set", "run.limit=3", "--limit="])
    assert (kept.run.limit, kept.limits.max_concurrency) == (3, 16)  # 16: conf/demo.yml's own value


@pytest.mark.parametrize("argv, message", [
    (["--limt=5"], r"--limt: unknown; did you mean --limit\?"),
    (["--limt", "5"], r"unknown arguments: --limt: unknown; did you mean --limit\? \(options"),
    (["--dryrun"], r"--dryrun: unknown; did you mean --dry-run\?"),
    (["--dryrun=true"], r"--dryrun: unknown; did you mean --dry-run\?"),
    (["--limit.max_concurrency=5"], r"--limit.max_concurrency: unknown; did you mean --limits.KEY=VALUE\?"),
    (["--endpoint=x"], r"--endpoint: unknown; did you mean --endpoint.KEY=VALUE\?"),
    (["stray"], r"stray: not an option of batch-inference"),
    (["--verbos"], r"--verbos: unknown; did you mean --verbose\?"),
    (["--quiet"], r"--quiet: not an option of batch-inference"),
    (["--limits.max_concurrency"], r"--limits.max_concurrency: expects a value"),
    (["--limit=ten"], r"--limit=ten: expected a positive whole number of rows \(run.limit\), or empty"),
    (["--limit=0"], r"--limit=0: expected a positive whole number"),
    (["--dry_run=maybe"], r"--dry_run=maybe: expected true or false \(run.dry_run\)"),
])
def test_unknown_or_bad_arguments_are_named(argv, message):
    with pytest.raises(ArgumentsError, match=message):
        parse_args(["--conf", DEMO, *argv])


def test_a_bad_config_key_from_a_parameter_names_the_key():
    with pytest.raises(Exception, match=r"limits.max_concurency: unknown key; did you mean limits.max_concurrency\?"):
        config_of(["--conf", DEMO, "--limits.max_concurency=4"])


def test_bad_input_fails_the_task_before_spark(caplog):
    caplog.set_level(logging.ERROR, logger="batch_inference")
    assert execute(["--conf", DEMO, "--limt=5"]) == 2
    assert "--limt: unknown; did you mean --limit?" in caplog.text
    # Databricks' wheel runner ignores a return value: the console script must raise to fail the task.
    with pytest.raises(SystemExit) as exit_:
        main(["--conf", str(ROOT / "conf" / "nope.yml")])
    assert exit_.value.code == 2
    assert "--conf" in caplog.text and "no such file" in caplog.text


def test_the_effective_config_is_printed_with_credentials_redacted(tmp_path):
    conf = tmp_path / "c.yml"
    conf.write_text("input: {table: main.raw.prompts}\noutput: {table: main.gold.out}\n"
                    "endpoint: {name: gw, type: serving, task: llm/v1/chat, token_env: BI_ENDPOINT_TOKEN,\n"
                    "  url: 'https://gw.example.com/v1/chat?sig=s3cr3tvalue&region=eu'}\n")
    cfg, inv = config_of([f"--conf={conf}", "--limits.max_concurrency=3", "--limit=9",
                          "--run_date=2026-01-31"])
    text = effective_config_text(cfg, inv)

    head, body = text.split("\n", 1)
    assert head == (f"effective config: --conf {conf}, overridden: limits.max_concurrency, run.limit; "
                    "ignored job parameters: run_date")
    # A password or an api_key in a URL is refused by the config itself (tests/test_faults.py); query
    # values with innocent names (a signed URL's `sig`) are still masked in what is printed.
    assert '"url": "https://gw.example.com/v1/chat?sig=****&region=****"' in body
    assert '"token_env": "BI_ENDPOINT_TOKEN"' in body and '"max_concurrency": 3' in body
    assert "s3cr3tvalue" not in text


def test_the_bundle_task_runs_end_to_end_on_local_spark(spark, fresh_endpoint, table_name, monkeypatch,
                                                        capsys, caplog, tmp_path):
    """The dev completions task's own arguments, pointed at local stand-ins by later --key=value
    parameters, with the job parameter `limit` set at run time and a token in an environment variable
    (the PAT option, as a job cluster would fill it from a secret scope)."""
    src = f"prompts_{table_name.split('_')[-1]}"
    spark.createDataFrame([(1, "alpha"), (2, "beta"), (3, "gamma")], "id long, prompt string") \
        .createOrReplaceTempView(src)
    monkeypatch.setenv("BI_ENDPOINT_TOKEN", "tok-from-secret-scope-123")
    job, task = dev_task("completions")
    named = task_argv(job, task, {"limit": "2", "run_date": "2026-01-31"})
    local = [f"--input.table={src}", f"--output.table={table_name}", f"--output.runs_table={table_name}_runs",
             f"--mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"--endpoint.host={fresh_endpoint.url}",
             "--run.task_slots=2", "--retry.backoff_base_s=0.01", "--endpoint.token_env=BI_ENDPOINT_TOKEN"]
    # The stand-ins come after the bundle's own named parameters, so they win.
    argv = named[:6] + local + named[6:]

    caplog.set_level(logging.INFO, logger="batch_inference")
    assert execute(argv) == 0

    expected = spark.createDataFrame(
        [(1, "alpha", "Answer to: alpha", "ok"), (2, "beta", "Answer to: beta", "ok")],
        "id long, prompt string, response string, status string")
    assert_df_equality(spark.table(table_name).select("id", "prompt", "response", "status"), expected,
                       ignore_row_order=True, ignore_nullable=True)
    assert {r.path for r in fresh_endpoint.received} == {
        "/serving-endpoints/databricks-meta-llama-3-3-70b-instruct/invocations"}
    runs = spark.table(f"{table_name}_runs").select("output_table", "rows_ok", "rows_error")
    assert [tuple(r) for r in runs.collect()] == [(table_name, 2, 0)]
    assert (tmp_path / "mlflow.db").exists()
    sent = {r.headers.get("Authorization") for r in fresh_endpoint.received}
    assert sent == {"Bearer tok-from-secret-scope-123"}
    out = capsys.readouterr()
    # One line at the start instead of the whole config (that takes --verbose), one at the end.
    assert out.out == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "batch_inference" and r.levelno == logging.INFO]
    assert lines[0] == (f"input {src} (at most 2 rows) -> output {table_name}; endpoint "
                        f"databricks-meta-llama-3-3-70b-instruct (serving, llm/v1/chat) at {fresh_endpoint.url}"
                        "/serving-endpoints/databricks-meta-llama-3-3-70b-instruct; C=8; calls from the executors "
                        "(run.calls_from: auto); --verbose prints the full config")
    assert re.fullmatch(rf"run \w+ finished in [\w. ]+: 2 rows \(2 ok\), [\d.]+ rows/s over the whole run, "
                        rf"\d+ tokens, no cost \(set endpoint.price_per_1k_prompt_tokens\); results in {table_name} "
                        rf"\(runs in {table_name}_runs; MLflow run \w+\)", lines[-1]), lines[-1]
    assert "tok-from-secret-scope-123" not in out.out + out.err + caplog.text


def test_the_full_effective_config_is_printed_only_with_verbose(monkeypatch, capsys, caplog):
    monkeypatch.setattr("jobs.session.get_spark", lambda: None)
    monkeypatch.setattr("jobs.pipeline.calls_from", lambda spark, setting: ("driver", "stand-in"))
    monkeypatch.setattr("jobs.pipeline.run_job", lambda spark, cfg: None)
    caplog.set_level(logging.INFO, logger="batch_inference")
    assert execute(["--conf", DEMO]) == 0
    assert capsys.readouterr().out == ""
    assert caplog.records[-1].getMessage().startswith("input demo.prompts -> output demo.completions; ")
    assert execute(["--conf", DEMO, "--verbose"]) == 0
    head, body = capsys.readouterr().out.split("\n", 1)
    assert head == f"effective config: --conf {DEMO}"
    assert '"max_concurrency": 16' in body and '"price_unit": "USD"' in body


def test_the_readme_driver_proxy_parameters_reach_the_driver_proxy_url():
    """README's way to point a task at a driver-proxy app on an interactive cluster."""
    from jobs.endpoint.resolve import endpoint_url

    job, task = dev_task("completions")
    readme = ["--endpoint.type=driver_proxy", "--endpoint.task=custom", "--endpoint.port=7777",
              "--endpoint.cluster_id=0123-456789-abcdefgh"]
    named = task_argv(job, task)
    # On the job cluster databricks-sdk supplies the host; here it is given.
    cfg, _ = config_of(named[:5] + readme + ["--endpoint.host=adb-1.azuredatabricks.net/"] + named[5:])

    assert endpoint_url(cfg.endpoint) == (
        "https://adb-1.azuredatabricks.net/driver-proxy-api/o/0/0123-456789-abcdefgh/7777/")
    assert cfg.endpoint.token_env is None
