"""Credentials as the bundle's job gets them, against a stand-in workspace on 127.0.0.1; and what the
driver refuses before any row is sent (a header with a line break, an untrusted TLS certificate).

databricks-sdk itself makes the calls (no mock): a secret read through its dbutils (the path
`endpoint.token_secret` takes where no environment variable can be set, as on serverless), and a
service principal's OAuth client-credentials flow through `Config`.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from jobs.cli.run import execute
from jobs.config import ConfigError, EndpointConfig
from jobs.endpoint.resolve import auth_headers, engine_spec, fatal_in, preflight
from jobs.pipeline import run_job
from tests.conftest import job_config
from tests.http_servers import PROXY_HOST, AioServer, ForwardProxy, throwaway_ca
from tests.workspace import JsonHandler
from udfs.spec import EngineSpec

SECRETS = {("batch-inference", "endpoint-token"): "tok-from-scope-42"}


class Workspace(ThreadingHTTPServer):
    """The workspace routes databricks-sdk calls here; every request is recorded."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, dict[str, str], str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(JsonHandler):
    server: Workspace

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path, dict(self.headers.items()), ""))
        url = urlsplit(self.path)
        if self._discovery(url.path, self.server.url):
            return
        if url.path == "/api/2.0/secrets/get":
            if self.headers.get("Authorization") != "Bearer workspace-pat":
                return self._answer(401, {"error_code": "UNAUTHENTICATED", "message": "no"})
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            value = SECRETS.get((q.get("scope"), q.get("key")))
            if value is None:
                return self._answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                          "message": f"Secret does not exist with scope: {q.get('scope')}"})
            return self._answer(200, {"key": q["key"], "value": base64.b64encode(value.encode()).decode()})
        self._answer(404, {"error_code": "NOT_FOUND", "message": self.path})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        self.server.requests.append(("POST", self.path, dict(self.headers.items()), body))
        if urlsplit(self.path).path == "/oidc/v1/token":
            return self._answer(200, {"access_token": "sp-access-token", "token_type": "Bearer",
                                      "expires_in": 3600})
        self._answer(404, {"error_code": "NOT_FOUND", "message": self.path})


@pytest.fixture
def workspace(monkeypatch, tmp_path) -> Iterator[Workspace]:
    # Only what each test sets: no profile, no token or host from the machine running the tests.
    import os

    for name in [n for n in os.environ if n.startswith(("DATABRICKS_", "ARM_", "AZURE_", "GOOGLE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no.databrickscfg"))
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    server = Workspace()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_token_from_a_secret_scope_goes_on_the_wire_as_a_bearer(workspace, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", workspace.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", "workspace-pat")
    e = EndpointConfig(name="llm", token_secret={"scope": "batch-inference", "key": "endpoint-token"})

    headers = auth_headers(e, f"{workspace.url}/serving-endpoints/llm/invocations")

    assert {k: v.reveal() for k, v in headers.items()} == {"Authorization": "Bearer tok-from-scope-42"}
    assert "tok-from-scope-42" not in repr(headers)
    reads = [(m, p) for m, p, _, _ in workspace.requests if "/secrets/" in p]
    assert reads == [("GET", "/api/2.0/secrets/get?scope=batch-inference&key=endpoint-token")]


def test_a_missing_secret_names_scope_and_key(workspace, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", workspace.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", "workspace-pat")
    e = EndpointConfig(name="llm", token_secret={"scope": "batch-inference", "key": "typo"})

    message = r"^endpoint.token_secret: cannot read secret batch-inference/typo: \w+$"
    with pytest.raises(ConfigError, match=message):
        auth_headers(e, f"{workspace.url}/serving-endpoints/llm/invocations")


def test_service_principal_oauth_through_databricks_sdk_config(workspace, monkeypatch):
    """DATABRICKS_CLIENT_ID/SECRET (on a job cluster: spark_env_vars from the secret scope) give
    an OAuth access token, which is what the endpoint sees."""
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "sp-application-id")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", "sp-client-secret-value")
    e = EndpointConfig(name="llm", auth="databricks", host=workspace.url)

    headers = auth_headers(e, f"{workspace.url}/serving-endpoints/llm/invocations")

    assert {k: v.reveal() for k, v in headers.items()} == {"Authorization": "Bearer sp-access-token"}
    token_calls = [(h, b) for m, p, h, b in workspace.requests if m == "POST" and p == "/oidc/v1/token"]
    assert len(token_calls) == 1
    sent_headers, sent_body = token_calls[0]
    form = {k: v[0] for k, v in parse_qs(sent_body).items()}
    assert form["grant_type"] == "client_credentials"
    # The SDK sends the client credentials as HTTP Basic or in the form; either way, these ones.
    basic = sent_headers.get("Authorization", "")
    sent = (base64.b64decode(basic.split()[1]).decode() if basic.startswith("Basic ")
            else f"{form['client_id']}:{form['client_secret']}")
    assert sent == "sp-application-id:sp-client-secret-value"


# -- what the driver refuses before any row is sent (issue #11) -----------------------------------------
# A header value with a line break; a TLS certificate the job does not trust (the pre-flight); and a
# task that meets a fatal transport error anyway stops the run with one message.

# -- headers ---------------------------------------------------------------------------------------

@pytest.mark.usefixtures("clean_env")
def test_a_token_with_a_trailing_newline_is_refused_naming_its_variable(monkeypatch):
    monkeypatch.setenv("BI_TEST_TOKEN", "tok-SECRET-1234\n")
    cfg = job_config(endpoint={"name": "e", "type": "driver_proxy", "url": "http://127.0.0.1:9/",
                               "token_env": "BI_TEST_TOKEN"})
    with pytest.raises(ConfigError) as err:
        engine_spec(cfg)
    assert str(err.value).startswith(
        "endpoint.token_env (environment variable BI_TEST_TOKEN): the value of header 'Authorization' "
        "contains a line break")
    assert "SECRET" not in str(err.value)


# -- the TLS pre-flight ------------------------------------------------------------------------------

@pytest.mark.usefixtures("clean_env")
def test_preflight_refuses_an_untrusted_certificate_without_sending_a_request(ca):
    _, server_ctx = ca
    with AioServer(tls=server_ctx) as srv:
        with pytest.raises(ConfigError) as err:
            preflight(EngineSpec(url=f"{srv.url}/serving-endpoints/m/invocations"))
        assert srv.requests == 0
    assert str(err.value).startswith(f"endpoint https://127.0.0.1:{srv.port}: the server's TLS "
                                     "certificate is not trusted (")
    assert "REQUESTS_CA_BUNDLE" in str(err.value) and "SSL_CERT_FILE" in str(err.value)


@pytest.mark.parametrize("var", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
@pytest.mark.usefixtures("clean_env")
def test_preflight_passes_a_certificate_from_a_trusted_ca(ca, var, monkeypatch):
    pem, server_ctx = ca
    monkeypatch.setenv(var, str(pem))
    with AioServer(tls=server_ctx) as srv:
        preflight(EngineSpec(url=f"{srv.url}/"))
        assert srv.requests == 0


@pytest.mark.usefixtures("clean_env")
def test_preflight_goes_through_the_proxy(ca, monkeypatch):
    pem, server_ctx = ca
    with AioServer(tls=server_ctx) as srv, ForwardProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        url = f"https://{PROXY_HOST}:{srv.port}/"
        with pytest.raises(ConfigError, match="not trusted"):
            preflight(EngineSpec(url=url))
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pem))
        preflight(EngineSpec(url=url))
        assert proxy.targets == [f"CONNECT {PROXY_HOST}:{srv.port}"] * 2
        assert srv.requests == 0


@pytest.mark.usefixtures("clean_env")
def test_https_to_a_plain_http_port_is_refused():
    with AioServer() as srv:
        with pytest.raises(ConfigError, match=r"TLS handshake failed .*\(https on a plain HTTP port\)"):
            preflight(EngineSpec(url=f"https://127.0.0.1:{srv.port}/"))


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.usefixtures("clean_env")
def test_preflight_refuses_an_endpoint_nothing_answers_at_within_seconds(scheme):
    with AioServer() as gone:
        port = gone.port
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        preflight(EngineSpec(url=f"{scheme}://127.0.0.1:{port}/", connect_timeout_s=2), retry_s=1.0)
    assert time.monotonic() - t0 < 5
    assert str(err.value) == (
        f"endpoint {scheme}://127.0.0.1:{port}: nothing answers there (ConnectionRefusedError connecting to "
        f"127.0.0.1:{port}); no row was sent. Is the endpoint running (the local stand-in: python -m "
        f"jobs.local.stand_in --port {port}), and are its URL, host and port right?")


@pytest.mark.usefixtures("clean_env")
def test_preflight_passes_a_plain_http_endpoint_that_accepts_connections():
    with AioServer() as srv:
        preflight(EngineSpec(url=f"http://127.0.0.1:{srv.port}/"))
        assert srv.requests == 0


# -- through the job -------------------------------------------------------------------------------

def tls_job(spark, srv: AioServer, table_name: str, rows: int = 40, host: str = "127.0.0.1"):
    name = f"prompts_{uuid.uuid4().hex[:8]}"
    df = spark.createDataFrame([(i, f"p{i}") for i in range(rows)], "id long, prompt string")
    df.createOrReplaceTempView(name)
    return {"input": {"table": name}, "output": {"table": table_name},
            "endpoint": {"name": "tls", "type": "driver_proxy", "url": f"https://{host}:{srv.port}/"},
            "retry": {"max_attempts": 6, "backoff_base_s": 0.5}, "run": {"chunk_rows": 1000, "task_slots": 2}}


@pytest.mark.usefixtures("clean_env")
def test_a_run_against_an_untrusted_certificate_stops_before_any_row(spark, ca, table_name):
    _, server_ctx = ca
    with AioServer(tls=server_ctx) as srv:
        with pytest.raises(ConfigError, match="not trusted"):
            run_job(spark, job_config(**tls_job(spark, srv, table_name)))
        assert srv.requests == 0
    assert not spark.catalog.tableExists(table_name)


@pytest.mark.usefixtures("clean_env")
def test_a_task_that_meets_an_untrusted_certificate_fails_fast_with_its_message(spark, table_name, tmp_path,
                                                                               monkeypatch, caplog):
    # The driver trusts the endpoint, the executors do not (another CA bundle on the workers): as if
    # the pre-flight had passed.
    monkeypatch.setattr("jobs.pipeline.preflight", lambda spec: None)
    _, server_ctx = throwaway_ca()
    hellos: list[str] = []  # TLS handshakes the server saw (by name: "localhost" sends SNI, an IP does not)
    server_ctx.sni_callback = lambda sock, name, ctx: hellos.append(name)
    with AioServer(tls=server_ctx) as srv:
        sections = tls_job(spark, srv, table_name, host="localhost")
        with pytest.raises(Exception) as err:
            run_job(spark, job_config(**sections))
        reason = fatal_in(err.value)
        assert reason is not None
        assert reason.startswith("tls_error: the server's TLS certificate is not trusted")
        # Retried, 40 rows x 6 attempts; stopped at the first, at most the 8 first attempts in flight.
        assert 1 <= len(hellos) <= 8, f"{len(hellos)} handshakes"

        conf = tmp_path / "tls.yml"
        conf.write_text(yaml.safe_dump(sections))
        with caplog.at_level(logging.ERROR, logger="batch_inference"):
            assert execute(["--conf", str(conf)]) == 2
        assert srv.requests == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert lines == [f"endpoint: {reason} (chunks committed before it are kept; rerun to resume)"]


def test_every_field_the_config_and_the_engine_spec_name_alike_reaches_the_spec():
    from dataclasses import fields

    cfg = job_config(endpoint={"name": "alike", "type": "serving", "task": "llm/v1/chat", "url": "http://127.0.0.1:3999/x",
                               "system_prompt": "be brief", "transform_input": "tests.transforms:add_marker",
                               "transform_output": "tests.transforms:shout", "auth": "none"},
                     limits={"max_concurrency": 7, "connect_timeout_s": 3.5, "read_timeout_s": 44.0, "adaptive": False,
                             "latency_cut_factor": 2.5, "http_client": "urllib3"})
    spec = engine_spec(cfg)
    alike = {f.name for f in fields(EngineSpec)} & (set(type(cfg.endpoint).model_fields) | set(type(cfg.limits).model_fields))
    carried = {k: getattr(cfg.endpoint, k, None) if k in type(cfg.endpoint).model_fields else getattr(cfg.limits, k)
               for k in alike - {"url", "role", "model_kwargs", "stop", "response_format", "batch_size"}}
    assert carried and {k: getattr(spec, k) for k in carried} == carried
    assert carried["max_concurrency"] == 7 and carried["http_client"] == "urllib3" and carried["task"] == "llm/v1/chat"
