"""The serving endpoint's definition from the workspace (`GET /api/2.0/serving-endpoints/{name}`, a
loopback stand-in): which AI Gateway limits apply and where the job starts under them, a route-optimized
endpoint called at its own URL with an OAuth token, and a workspace that cannot be read."""

from __future__ import annotations

import logging
import os

import pytest

from jobs.config import ConfigError
from jobs.endpoint.info import parse_endpoint
from jobs.endpoint.resolve import engine_spec
from tests.conftest import job_config
from tests.workspace import AUTH_DETAILS, CLIENT_ID, CLIENT_SECRET, RO_PREFIX, Workspace
from udfs.auth import DataPlaneToken, OAuthM2M

LIMITS = [
    {"calls": 600, "key": "endpoint", "renewal_period": "minute"},
    {"calls": 300, "tokens": 60000, "key": "service_principal", "renewal_period": "minute"},
    {"calls": 30, "key": "service_principal", "principal": "another-sp", "renewal_period": "minute"},
    {"calls": 10, "key": "user_group", "principal": "analysts", "renewal_period": "minute"},
]


def test_the_limits_that_apply_to_this_caller():
    info = parse_endpoint({"name": "llm", "ai_gateway": {"rate_limits": LIMITS}}, principal=CLIENT_ID)
    assert (info.calls_per_minute, info.tokens_per_minute) == (300, 60000)
    assert info.limits == ("600 calls/min per endpoint", "300 calls/min, 60000 tokens/min per service_principal")
    assert info.ignored == ("30 calls/min per service_principal another-sp (not this caller)",
                            "10 calls/min per user_group analysts (not this caller)")
    mine = parse_endpoint({"name": "llm", "ai_gateway": {"rate_limits": [
        {**LIMITS[2], "principal": CLIENT_ID}, LIMITS[0]]}}, principal=CLIENT_ID)
    assert mine.calls_per_minute == 30  # a limit naming this service principal applies to it


def _lim(key: str, calls: int | None = None, tokens: int | None = None, principal: str | None = None) -> dict:
    return {k: v for k, v in {"key": key, "calls": calls, "tokens": tokens, "principal": principal,
                              "renewal_period": "minute"}.items() if v is not None}


DEFAULT = _lim("user", calls=100)
CASES = {
    # case: (limits, the caller's groups, (calls, tokens)/min that apply, what the log says of the calls)
    "default only": ([DEFAULT], [], (100, None), "100 calls/min: the default per-user limit"),
    "custom higher": ([DEFAULT, _lim("service_principal", calls=300, principal=CLIENT_ID)], [], (300, None),
                      "300 calls/min: a custom limit for this caller (it overrides the default"),
    "custom lower": ([DEFAULT, _lim("service_principal", calls=20, principal=CLIENT_ID)], [], (20, None),
                     "20 calls/min: a custom limit for this caller"),
    "custom beats group": ([DEFAULT, _lim("user_group", calls=50, principal="analysts"),
                            _lim("service_principal", calls=300, principal=CLIENT_ID)], ["analysts"], (300, None),
                           "300 calls/min: a custom limit for this caller (it overrides the default and any group's)"),
    "group": ([DEFAULT, _lim("user_group", calls=250, principal="analysts"),
               _lim("user_group", calls=5, principal="others")], ["analysts"], (250, None),
              "250 calls/min: its group's limit, shared with the group's other members"),
    "endpoint ceiling below": ([_lim("endpoint", calls=40), DEFAULT,
                                _lim("service_principal", calls=300, principal=CLIENT_ID)], [], (40, None),
                               "40 calls/min: the endpoint's ceiling (40 calls/min per endpoint) is below a custom"),
    "tokens stricter than calls": ([_lim("user", calls=600, tokens=6000)], [], (600, 6000),
                                   "both apply, the stricter binds: the tokens limit for requests of more than 10 tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ai_gateway_precedence_against_the_workspace(case, oauth_env, caplog):
    """Each case of AI Gateway's documented precedence, read from the replica with the job's own OAuth
    identity (SCIM `Me` says who it is and its groups), and logged with the reason."""
    limits, groups, (calls, tokens), why = CASES[case]
    caplog.set_level(logging.INFO, logger="batch_inference")
    with Workspace() as ws:
        ws.groups = groups
        ws.definition = {"name": "llm", "ai_gateway": {"rate_limits": limits}}
        spec = engine_spec(job_config(endpoint=serving(ws, auth="databricks")))
    assert spec.requests_per_s == pytest.approx(calls / 60)
    assert spec.tokens_per_s == (None if tokens is None else pytest.approx(0.9 * tokens / 60))
    assert "applies: " in caplog.text and why in caplog.text


@pytest.fixture
def oauth_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith(("DATABRICKS_", "ARM_", "AZURE_", "GOOGLE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", "/nonexistent/.databrickscfg")
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)


def serving(ws: Workspace, **kw) -> dict:
    return {"name": "llm", "type": "serving", "task": "llm/v1/chat", "host": ws.url, **kw}


@pytest.mark.usefixtures("oauth_env")
def test_the_job_starts_under_the_gateway_s_limits_and_calls_a_route_optimized_endpoint_at_its_url(caplog):
    caplog.set_level(logging.INFO, logger="batch_inference")
    with Workspace() as ws:
        ws.definition = {"name": "llm", "route_optimized": True, "state": {"ready": "READY"},
                         "endpoint_url": f"{ws.url}{RO_PREFIX}/serving-endpoints/llm/invocations",
                         "config": {"served_entities": [{"name": "e", "scale_to_zero_enabled": True}]},
                         "ai_gateway": {"rate_limits": LIMITS}}
        spec = engine_spec(job_config(endpoint=serving(ws, auth="databricks")))
        gets = [(m, p, n) for m, p, n in ws.requests if p.startswith("/api/")]
    assert spec.url == f"{ws.url}{RO_PREFIX}/serving-endpoints/llm/invocations"
    assert isinstance(spec.credentials, OAuthM2M) and spec.credentials.header().reveal().startswith("Bearer oauth-")
    # (no data_plane_info in this definition: the workspace token is sent, and the log says so)
    # read with the OAuth token; who it is, as limits name principals
    assert gets == [("GET", "/api/2.0/serving-endpoints/llm", 1), ("GET", "/api/2.0/preview/scim/v2/Me", 1)]
    assert spec.requests_per_s == pytest.approx(300 / 60) and spec.start_requests_per_s == pytest.approx(0.9 * 5)
    assert spec.tokens_per_s == pytest.approx(0.9 * 60000 / 60)
    assert "route-optimized at" in caplog.text and "scales to zero" in caplog.text
    assert "starting at 270 requests/min (0.9 of its AI Gateway limit), never above 300" in caplog.text


@pytest.mark.usefixtures("oauth_env")
def test_the_config_s_limits_override_the_gateway_s(caplog):
    caplog.set_level(logging.INFO, logger="batch_inference")
    with Workspace() as ws:
        ws.definition = {"name": "llm", "ai_gateway": {"rate_limits": LIMITS}}
        spec = engine_spec(job_config(endpoint=serving(ws, auth="databricks"),
                                      limits={"requests_per_minute": 120, "tokens_per_minute": 1000,
                                              "input_tokens_per_minute": 6000, "output_tokens_per_minute": 600}))
    assert (spec.requests_per_s, spec.start_requests_per_s, spec.tokens_per_s) == (2.0, None, pytest.approx(1000 / 60))
    assert (spec.input_tokens_per_s, spec.output_tokens_per_s) == (100.0, 10.0)
    assert "separate budgets: 6000 input, 600 output tokens/min" in caplog.text
    assert spec.url == f"{ws.url}/serving-endpoints/llm/invocations"


def test_a_personal_access_token_is_refused_for_a_route_optimized_endpoint(monkeypatch):
    monkeypatch.setenv("BI_TEST_PAT", "dapi0123456789abcdef0123456789abcdef")
    with Workspace() as ws:
        ws.tokens["dapi0123456789abcdef0123456789abcdef"] = (0, float("inf"))  # the workspace takes it
        ws.definition = {"name": "llm", "route_optimized": True,
                         "endpoint_url": f"{ws.url}{RO_PREFIX}/serving-endpoints/llm/invocations"}
        with pytest.raises(ConfigError, match=r"^endpoint llm is route-optimized: Databricks accepts only OAuth "
                                              r"tokens at its URL, and endpoint.token_env \(environment variable "
                                              r"BI_TEST_PAT\) gives a personal access token"):
            engine_spec(job_config(endpoint=serving(ws, token_env="BI_TEST_PAT")))


def test_a_workspace_that_cannot_be_read_is_logged_unless_the_definition_is_required(monkeypatch, caplog):
    monkeypatch.setenv("BI_TEST_TOKEN", "tok-not-issued-by-this-workspace")
    with Workspace() as ws:
        ws.definition = {"name": "llm"}
        spec = engine_spec(job_config(endpoint=serving(ws, token_env="BI_TEST_TOKEN")))
        assert spec.url == f"{ws.url}/serving-endpoints/llm/invocations" and spec.requests_per_s is None
        assert "could not read its definition (GET " in caplog.text and "HTTP 401: " in caplog.text
        with pytest.raises(ConfigError, match=r"^endpoint.read_definition: GET .* HTTP 401"):
            engine_spec(job_config(endpoint=serving(ws, token_env="BI_TEST_TOKEN", read_definition=True)))
    assert "tok-not-issued" not in caplog.text


def test_endpoints_with_a_url_of_their_own_are_not_looked_up():
    with Workspace() as ws:
        engine_spec(job_config(endpoint={"name": "local", "type": "driver_proxy", "url": f"{ws.url}/"}))
        assert ws.requests == []


def test_the_local_stand_in_answers_its_definition_so_the_demo_reads_it_without_a_warning(monkeypatch, caplog):
    """`make demo`'s serving endpoints are the stand-in: its definition reads as ready, with no limits."""
    from jobs.local.stand_in import LocalEndpoint

    monkeypatch.setenv("DEMO_TOKEN", "not-a-real-token-but-long")
    caplog.set_level(logging.INFO, logger="batch_inference")
    with LocalEndpoint() as ep:
        spec = engine_spec(job_config(endpoint={"name": "local-embeddings", "type": "serving", "host": ep.url,
                                                "task": "llm/v1/embeddings", "token_env": "DEMO_TOKEN"}))
    assert spec.url == f"{ep.url}/serving-endpoints/local-embeddings/invocations"
    assert "endpoint local-embeddings: state READY; AI Gateway limits: none" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- route-optimized endpoints: their own URL, a token scoped to them, no runtime token ---------------------

def route_optimized(ws: Workspace, endpoint_url: str) -> dict:
    return {"name": "llm", "route_optimized": True, "state": {"ready": "READY"}, "endpoint_url": endpoint_url,
            "data_plane_info": {"query_info": {"authorization_details": AUTH_DETAILS}}}


@pytest.mark.usefixtures("oauth_env")
def test_a_route_optimized_url_given_as_a_bare_host_is_completed_with_the_workspace_id():
    """Databricks' route-optimized URL is `<host>/<workspace-id>/serving-endpoints/<name>/invocations`; the
    workspace id comes from the workspace's answer (`x-databricks-org-id`). Without it the replica says 404."""
    from udfs.engine import Engine

    with Workspace() as ws:
        ws.definition = route_optimized(ws, f"{ws.url}/ro")
        spec = engine_spec(job_config(endpoint=serving(ws, auth="databricks")))
        with Engine(spec) as engine:
            [o] = engine.call(["x"])
    assert spec.url == f"{ws.url}{RO_PREFIX}/serving-endpoints/llm/invocations"
    assert o.status == "ok", o.error


@pytest.mark.usefixtures("oauth_env")
def test_a_route_optimized_endpoint_is_called_with_a_token_scoped_to_it_refreshed_before_it_expires(caplog):
    """The workspace token is exchanged at /oidc/v1/token for one carrying the endpoint's
    authorization_details (the replica refuses anything else with 403), on the driver and again in a
    task (pickled, as to an executor) when it nears its end: tokens live 2 s, the calls go on for 5."""
    import dataclasses
    import pickle
    import time

    from udfs.engine import Engine

    caplog.set_level(logging.INFO, logger="batch_inference")
    with Workspace(token_life_s=2.0) as ws:
        ws.definition = route_optimized(ws, f"{ws.url}{RO_PREFIX}/serving-endpoints/llm/invocations")
        spec = engine_spec(job_config(endpoint=serving(ws, auth="databricks")))
        task_creds = pickle.loads(pickle.dumps(spec.credentials.for_tasks()))
        outcomes = []
        for creds in (spec.credentials, task_creds):
            with Engine(dataclasses.replace(spec, credentials=creds)) as engine:
                for _ in range(3):
                    outcomes += engine.call(["x"]) + engine.call(["y"])
                    time.sleep(0.9)
        calls, refused = ws.invocations(), ws.refused
        exchanges = [n for m, p, n in ws.requests if m == "POST" and p == "/oidc/v1/token"]
        scoped_numbers = {ws.tokens[t][0] for t in ws.scoped}
    assert [(o.status, o.error) for o in outcomes] == [("ok", None)] * 12 and refused == 0
    assert isinstance(spec.credentials, DataPlaneToken) and "Authorization" not in spec.headers
    assert {n for _, n in calls} <= scoped_numbers and len({n for _, n in calls}) >= 3  # refreshed, scoped
    assert len(exchanges) >= 5  # client credentials and exchanges, again as the tokens neared their end
    assert "with a token scoped to it (exchanged at" in caplog.text
    assert CLIENT_SECRET not in caplog.text and "scoped-" not in caplog.text and "oauth-" not in caplog.text


class _RuntimeLike:
    """databricks-sdk's `runtime` strategy as it resolves inside a Databricks job: the job's own token,
    not OAuth (databricks-sdk's Config with a credentials strategy, no Spark involved)."""

    def auth_type(self) -> str:
        return "runtime"

    def __call__(self, cfg):
        return lambda: {"Authorization": "Bearer job-runtime-token-Zq7wkx9R"}


def test_the_job_s_own_runtime_token_is_refused_for_a_route_optimized_endpoint_before_any_row(monkeypatch):
    from databricks.sdk.config import Config

    import jobs.endpoint.resolve

    with Workspace() as ws:
        ws.tokens["job-runtime-token-Zq7wkx9R"] = (0, float("inf"))  # the workspace takes it
        ws.definition = route_optimized(ws, f"{ws.url}{RO_PREFIX}/serving-endpoints/llm/invocations")
        monkeypatch.setattr(jobs.endpoint.resolve, "_sdk_config",
                            lambda host=None: Config(host=ws.url, credentials_strategy=_RuntimeLike()))
        with pytest.raises(ConfigError) as err:
            engine_spec(job_config(endpoint=serving(ws, auth="databricks")))
        assert ws.invocations() == []
    assert str(err.value).startswith("endpoint llm is route-optimized: Databricks accepts only OAuth tokens "
                                     "scoped to the endpoint at its URL, and endpoint.auth (the credentials "
                                     "databricks-sdk resolved) gives the job's own runtime token")
    assert "use a service principal's OAuth M2M (DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET" in str(err.value)
    assert "Zq7wkx9R" not in str(err.value)
