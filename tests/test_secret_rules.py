"""The one rule for secrets in files: job configs, endpoint specs and the bundle all answer alike."""

from __future__ import annotations

import pytest

from jobs.config import ConfigError, parse_config
from jobs.secret_rules import (LITERAL_CREDENTIAL, PLAINTEXT_FIELD, TOKEN_SHAPED, URL_CREDENTIAL, find_secrets,
                               redact_url)
from jobs.endpoint.serving_endpoints import SpecError, check_spec

PAT = "dapi0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("doc, path, kind", [
    ({"endpoint": {"token": "abc"}}, "endpoint.token", LITERAL_CREDENTIAL),
    ({"model_kwargs": {"api_key": "abc"}}, "model_kwargs.api_key", LITERAL_CREDENTIAL),
    ({"aws": {"aws_secret_access_key": "abc"}}, "aws.aws_secret_access_key", LITERAL_CREDENTIAL),
    ({"gcp": {"private_key": "abc"}}, "gcp.private_key", LITERAL_CREDENTIAL),
    ({"api_key_auth": {"key": "x-api-key", "value": "abc"}}, "api_key_auth.value", LITERAL_CREDENTIAL),
    ({"openai_api_key_plaintext": "abc"}, "openai_api_key_plaintext", PLAINTEXT_FIELD),
    ({"description": f"uses {PAT}"}, "description", TOKEN_SHAPED),
    ({"list": ["fine", "Bearer abcdefghijkl"]}, "list[1]", TOKEN_SHAPED),
    ({"url": "https://user:pw@example.com/x"}, "url", URL_CREDENTIAL),
    ({"url": "https://example.com/x?api_key=abc"}, "url", URL_CREDENTIAL),
])
def test_each_kind_of_secret_is_found_by_path(doc, path, kind):
    [finding] = find_secrets(doc)
    assert (finding.path, finding.kind) == (path, kind)
    assert "abc" not in finding.detail and PAT not in finding.detail  # a finding never carries the value


@pytest.mark.parametrize("doc", [
    {"endpoint": {"token_env": "MY_TOKEN", "token_secret": {"scope": "s", "key": "k"}}},
    {"openai_api_key": "{{secrets/llm/openai}}"},
    {"limits": {"max_tokens": 64}, "note": "tokens per minute"},
    {"url": "https://example.com/serving-endpoints/x/invocations?version=2"},
    {"token": None, "api_key": ""},
])
def test_references_and_ordinary_values_pass(doc):
    assert list(find_secrets(doc)) == []


def test_a_bundle_variable_counts_as_a_reference_only_where_asked():
    doc = {"spark_env_vars": {"BI_ENDPOINT_TOKEN": "${var.token}"}}
    assert [f.path for f in find_secrets(doc)] == ["spark_env_vars.BI_ENDPOINT_TOKEN"]
    assert list(find_secrets(doc, is_reference=lambda v: v.startswith("${"))) == []


def test_a_job_config_and_an_endpoint_spec_give_the_same_answer():
    """They were two walkers: a token in a spec's description passed while a config refused it."""
    with pytest.raises(ConfigError, match=r"^endpoint.system_prompt: this value looks like a token"):
        parse_config({"input": {"table": "t"}, "output": {"table": "o"},
                      "endpoint": {"name": "e", "system_prompt": f"say {PAT}"}})
    with pytest.raises(SpecError, match=r"^description: this value looks like a token"):
        check_spec({"name": "e", "description": f"owner's token {PAT}",
                    "config": {"served_entities": [{"entity_name": "m"}]}})


def test_urls_print_without_their_credentials():
    assert redact_url("https://u:pw@host.example/x?api_key=k&v=2") == "https://u:****@host.example/x?api_key=****&v=****"
    assert redact_url("http://127.0.0.1:7777/") == "http://127.0.0.1:7777/"
    assert redact_url("not a url") == "not a url"
