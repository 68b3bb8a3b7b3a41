"""Config is validated once, before Spark: every error names the key."""

from __future__ import annotations

import pytest

from jobs.config import ConfigError, load_config, parse_config, parse_overrides

VALID = {
    "input": {"table": "main.raw.prompts"},
    "output": {"table": "main.gold.completions"},
    "endpoint": {"name": "llama", "task": "llm/v1/chat"},
}


def with_(section: str, **values):
    return {**VALID, section: {**VALID.get(section, {}), **values}}


def test_defaults_work_out_of_the_box():
    cfg = parse_config(VALID)
    assert (cfg.limits.max_concurrency, cfg.run.chunk_rows, cfg.retry.statuses, cfg.endpoint.rows_per_request) == (
        8, None, [429, 500, 502, 503, 504], 1)  # chunk_rows unset: chunks follow the measured rate
    assert (cfg.run.calls_from, cfg.run.chunk_seconds, cfg.run.max_chunk_rows) == ("auto", 30.0, 100_000)


@pytest.mark.parametrize("data, message", [
    (with_("limits", max_concurency=4), r"limits.max_concurency: unknown key"),
    ({"input": {"table": "t"}, "endpoint": {"name": "x"}}, r"output: missing required field"),
    (with_("endpoint", name=None), r"endpoint.name: Input should be a valid string"),
    (with_("input", path="/x"), r"input: .*exactly one of table, path or query"),
    (with_("endpoint", task="llm/v2/chat"), r"endpoint.task: Input should be"),
    (with_("endpoint", type="driver_proxy"), r"endpoint: .*needs `port`"),
    (with_("endpoint", type="driver_proxy", port=80), r"endpoint.port: Input should be greater than or equal to 3000"),
    (with_("endpoint", transform_input="not a ref"), r"endpoint.transform_input: .*module:function"),
    (with_("endpoint", task="llm/v1/completions", batch_size=8), r"batch_size must be 1"),
    (with_("limits", max_concurrency=0), r"limits.max_concurrency: Input should be greater than or equal to 1"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


@pytest.mark.parametrize("data, key", [
    (with_("endpoint", token="dapi0123456789abcdef0123456789abcdef"), "endpoint.token"),
    (with_("endpoint", model_kwargs={"api_key": "abc123"}), "endpoint.model_kwargs.api_key"),
    (with_("endpoint", model_kwargs={"header": "Bearer abcdefghijkl"}), "endpoint.model_kwargs.header"),
    (with_("endpoint", system_prompt="dapi0123456789abcdef0123456789abcdef"), "endpoint.system_prompt"),
])
def test_a_literal_token_is_refused_and_never_echoed(data, key):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value).startswith(key)
    assert "0123456789abcdef" not in str(err.value) and "abc123" not in str(err.value)


def test_secret_references_are_allowed():
    cfg = parse_config(with_("endpoint", token_env="MY_TOKEN", model_kwargs={"api_key": "{{secrets/llm/openai}}"}))
    assert cfg.endpoint.token_env == "MY_TOKEN"
    cfg = parse_config(with_("endpoint", token_secret={"scope": "s", "key": "k"}))
    assert (cfg.endpoint.token_secret.scope, cfg.endpoint.token_secret.key) == ("s", "k")


@pytest.mark.parametrize("endpoint, message", [
    ({"auth": "none", "token_env": "MY_TOKEN"},
     r"^config: endpoint.auth: none contradicts endpoint.token_env: the token would be sent anyway"),
    ({"auth": "none", "token_secret": {"scope": "s", "key": "k"}},
     r"^config: endpoint.auth: none contradicts endpoint.token_secret"),
    ({"auth": "databricks", "token_env": "MY_TOKEN"},
     r"^config: endpoint.auth: databricks contradicts endpoint.token_env"),
    ({"token_env": "MY_TOKEN", "token_secret": {"scope": "s", "key": "k"}},
     r"^config: endpoint.token_env and endpoint.token_secret: give at most one"),
])
def test_contradictory_credentials_are_refused_naming_both_keys(endpoint, message):
    """`auth: none` with a token used to send the token anyway, silently: now it never gets that far."""
    with pytest.raises(ConfigError, match=message):
        parse_config(with_("endpoint", **endpoint))


def test_overrides_are_typed_and_dotted(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("input: {table: a}\noutput: {table: b}\nendpoint: {name: e}\n")
    cfg = load_config(path, ["limits.max_concurrency=32", "run.fail_on_error=true",
                             "endpoint.model_kwargs={temperature: 0.2}"])
    assert (cfg.limits.max_concurrency, cfg.run.fail_on_error, cfg.endpoint.model_kwargs) == (
        32, True, {"temperature": 0.2})
    with pytest.raises(ConfigError, match=r"--set 'limits': expected key=value"):
        parse_overrides(["limits"])
    with pytest.raises(ConfigError, match=r"limits.max_concurrency: Input should be a valid integer"):
        load_config(path, ["limits.max_concurrency=many"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_request_fingerprint_changes_with_parameters_only():
    a = parse_config(with_("endpoint", model_kwargs={"temperature": 0}))
    b = parse_config(with_("endpoint", model_kwargs={"temperature": 0.5}))
    c = parse_config({**with_("endpoint", model_kwargs={"temperature": 0}), "limits": {"max_concurrency": 99}})
    assert a.request_fingerprint() != b.request_fingerprint()
    assert a.request_fingerprint() == c.request_fingerprint()


def test_shipped_job_configs_parse():
    from pathlib import Path

    # conf/endpoint_*.yml are serving-endpoint specs for batch-inference-endpoint, not job configs.
    paths = [p for p in sorted(Path(__file__).parent.parent.glob("conf/*.yml")) if not p.name.startswith("endpoint_")]
    assert len(paths) >= 2
    for path in paths:
        load_config(path)
