"""Config is validated once, before Spark: every error names the key."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml
from pyspark.sql import types as T

from jobs.config import RESERVED_COLUMNS, ConfigError, load_config, parse_config, parse_overrides
from jobs.output.commit import output_schema
from tests.conftest import job_config
from udfs.spec import EngineSpec, RetrySpec

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


def test_redacted_masks_what_a_url_may_carry_and_shows_references_as_they_are():
    cfg = parse_config(with_("endpoint", url="https://gw.example.com/v1?sig=s3cr3tvalue&region=eu",
                             token_env="BI_ENDPOINT_TOKEN"))
    shown = cfg.redacted()["endpoint"]
    assert (shown["url"], shown["token_env"]) == ("https://gw.example.com/v1?sig=****&region=****", "BI_ENDPOINT_TOKEN")
    assert "s3cr3tvalue" not in json.dumps(cfg.redacted())


def test_the_config_s_defaults_are_the_engine_s_own():
    """`udfs.spec` writes each default once: a config that sets nothing gives the engine its own."""
    cfg = parse_config(VALID)
    assert {**cfg.retry.model_dump(), "statuses": tuple(cfg.retry.statuses)} == dataclasses.asdict(RetrySpec())
    engine = {f.name: f.default for f in dataclasses.fields(EngineSpec)}
    assert {k: v for k, v in cfg.limits.model_dump().items() if k in engine} == {
        k: engine[k] for k in ("max_concurrency", "connect_timeout_s", "read_timeout_s", "adaptive",
                               "latency_cut_factor", "http_client")}
    assert set(cfg.limits.model_dump()) - set(engine) == {"requests_per_minute", "tokens_per_minute",
                                                          "input_tokens_per_minute", "output_tokens_per_minute",
                                                          "host_pool"}


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


@pytest.mark.parametrize("data, message", [
    (with_("limits", max_concurency=4), "limits.max_concurency: unknown key; did you mean limits.max_concurrency?"),
    ({**VALID, "limit": {"max_concurrency": 4}}, "limit: unknown key; did you mean limits?"),
    (with_("endpoint", tokenenv="X"), "endpoint.tokenenv: unknown key; did you mean endpoint.token_env?"),
    (with_("endpoint", response_format={"schema": {"type": "object", "properties": {"a": {"type": "string"}}},
                                        "sent_at": "x"}),
     "endpoint.response_format.sent_at: unknown key; did you mean endpoint.response_format.send_at?"),
    (with_("run", zzzz=1), "run.zzzz: unknown key"),  # nothing close: no guess
])
def test_an_unknown_key_suggests_the_nearest_known_one(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value) == f"config: {message}"


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


@pytest.mark.parametrize("section, values, message", [
    ("output", {"table": "a.b", "runs_table": "a.b"}, r"output: .*runs_table must be another table"),
    ("output", {"table": "a.b", "runs_table": "a b"}, r"output.runs_table: .*not a table name"),
    ("endpoint", {"price_per_1k_prompt_tokens": -1}, r"endpoint.price_per_1k_prompt_tokens: .*greater than"),
    ("mlflow", {"enable": True}, r"mlflow.enable: unknown key"),
])
def test_observability_settings_are_checked_and_named(section, values, message):
    with pytest.raises(ConfigError, match=message):
        job_config(**{section: values})


def test_config_hash_is_a_digest_of_the_effective_settings(tmp_path):
    """Runs with the same settings group together in the runs table, however the file was written."""
    a = tmp_path / "a.yml"
    a.write_text(yaml.safe_dump(VALID, sort_keys=True))
    b = tmp_path / "b.yml"
    b.write_text(yaml.safe_dump({k: VALID[k] for k in reversed(VALID)}, sort_keys=False))
    first, second = load_config(a).config_hash(), load_config(b).config_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", first) and first == second
    # Defaults written out are the same settings; a changed setting is another digest.
    assert load_config(a, ["limits.max_concurrency=8"]).config_hash() == first
    assert load_config(a, ["limits.max_concurrency=9"]).config_hash() != first
    assert load_config(a, ["run.chunk_rows=5"]).config_hash() != first


REVIEW = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]},
                                           "token": {"type": "string"}}}


def test_response_format_inline_in_full_or_as_a_file_next_to_the_config(tmp_path):
    inline = parse_config(with_("endpoint", response_format=REVIEW))
    assert (inline.endpoint.response_format.json_schema, inline.endpoint.response_format.name) == (REVIEW, "response")
    full = parse_config(with_("endpoint", response_format={"schema": REVIEW, "name": "review", "strict": False}))
    assert full.endpoint.response_format.wire() == {
        "type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW, "strict": False}}
    (tmp_path / "review.json").write_text(json.dumps(REVIEW))
    (tmp_path / "job.yml").write_text(yaml.safe_dump(with_("endpoint", response_format="review.json")))
    from_file = load_config(tmp_path / "job.yml")
    assert from_file.endpoint.response_format == inline.endpoint.response_format
    assert from_file.redacted()["endpoint"]["response_format"]["schema"] == REVIEW
    (tmp_path / "long.yml").write_text(yaml.safe_dump(with_("endpoint", response_format={"schema": "review.json",
                                                                                         "name": "r"})))
    assert load_config(tmp_path / "long.yml").endpoint.response_format.json_schema == REVIEW


@pytest.mark.parametrize("endpoint, message", [
    ({"response_format": "nope.json"}, r"^endpoint.response_format: no such file nope.json \(looked in "),
    ({"response_format": {"type": "object", "properties": {"x": {"oneOf": [{"type": "string"}]}}}},
     r"^config: endpoint.response_format.schema: at /properties/x: oneOf is not supported"),
    ({"response_format": {"type": "object", "properties": {"x": {}}}},
     r"endpoint.response_format.schema: at /properties/x: no type"),
    ({"response_format": {"schema": REVIEW, "name": "has space"}}, r"endpoint.response_format.name: String should"),
    ({"response_format": {"schema": REVIEW, "send_at": "params.response_format"}},
     r"endpoint.response_format.send_at: task llm/v1/chat takes response_format at the top"),
    ({"response_format": REVIEW, "model_kwargs": {"response_format": {"type": "json_object"}}},
     r"endpoint.model_kwargs.response_format and endpoint.response_format: give only"),
    ({"response_format": REVIEW, "task": "llm/v1/embeddings"}, r"endpoint.response_format: task llm/v1/embeddings"),
    ({"response_format": {"schema": REVIEW, "send_at": "dataframe_records.x"}, "task": "custom"},
     r"endpoint.response_format.send_at: dataframe_records.x: the request body's 'dataframe_records' is not"),
    ({"response_format": {"schema": REVIEW, "sent_at": "x"}}, r"endpoint.response_format.sent_at: unknown key"),
])
def test_response_format_errors_name_the_key(endpoint, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(with_("endpoint", **endpoint))


def test_a_schema_may_name_a_token_field_but_holds_no_token_value():
    parse_config(with_("endpoint", response_format=REVIEW))  # `token` is a field to extract, not a credential
    leaky = {**REVIEW, "description": "key dapi0123456789abcdef0123456789abcdef"}
    with pytest.raises(ConfigError, match=r"^endpoint.response_format.description: this value looks like a token"):
        parse_config(with_("endpoint", response_format=leaky))


def test_the_schema_shapes_the_request_hash_and_configs_without_one_keep_theirs():
    plain = parse_config(VALID)
    # The digest every config without the new keys had before structured output: existing tables
    # keep their hashes, so nothing becomes pending by upgrading.
    assert plain.request_fingerprint() == "31ff45736bfb7ded"
    a = parse_config(with_("endpoint", response_format=REVIEW))
    b = parse_config(with_("endpoint", response_format={**REVIEW, "required": ["sentiment"]}))
    c = parse_config({**with_("endpoint", response_format=REVIEW), "retry": {"invalid_output_attempts": 3},
                      "input": {"table": "main.raw.prompts", "keep_columns": ["country"]}})
    assert len({plain.request_fingerprint(), a.request_fingerprint(), b.request_fingerprint()}) == 3
    assert a.request_fingerprint() == c.request_fingerprint()


@pytest.mark.parametrize("input_, message", [
    ({"template": "Review of {product:>10}"}, r"input.template: \{product:>10\}: a field is a column name"),
    ({"template": "Review of {}"}, r"input.template: an empty \{\} names no column"),
    ({"template": "Review of {product"}, r"input.template: .*write a literal brace as \{\{ or \}\}"),
    ({"template": "No fields"}, r"input.template names no column"),
    ({"template": "{body}", "prompt_col": "body"}, r"input.template and input.prompt_col: give one"),
    ({"null_fields": "empty"}, r"input.null_fields applies to input.template only"),
    ({"template": "{body}", "null_fields": "skip"}, r"input.null_fields: Input should be 'error' or 'empty'"),
    ({"keep_columns": ["status"]}, r"input.keep_columns: 'status' is a column the job writes itself"),
    ({"keep_columns": ["_exists"]}, r"input.keep_columns: '_exists' is a column the job writes itself"),
    ({"keep_columns": ["a", "a"]}, r"input.keep_columns: \['a'\] given more than once"),
])
def test_template_and_kept_column_errors_name_the_key(input_, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(with_("input", **input_))


def test_template_fields_are_read_once_in_order():
    cfg = parse_config(with_("input", template="{b} and {a}, {b} again {{not a field}}"))
    assert cfg.input.template_fields == ["b", "a"]


def test_reserved_names_are_the_output_tables_columns_and_the_jobs_own():
    names = {n for e in (False, True) for n in output_schema(T.LongType(), e).fieldNames()}
    assert RESERVED_COLUMNS == names | {"parsed", "precheck"}
