"""What the driver refuses before any row is sent (a header with a line break, a TLS certificate it does
not trust), and how a task that meets a fatal transport error anyway stops the run with one message."""

from __future__ import annotations

import logging
import uuid

import pytest
import yaml

from jobs.config import ConfigError
from jobs.endpoint import engine_spec, fatal_in, preflight
from jobs.pipeline import run_job
from jobs.run import execute
from tests.conftest import job_config
from tests.http_servers import PROXY_HOST, AioServer, ForwardProxy, throwaway_ca
from tests.test_transport import ENV_PROXY, ENV_TLS
from udfs.engine import EngineSpec


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_TLS + ENV_PROXY:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory):
    authority, server_ctx = throwaway_ca()
    pem = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    return pem, server_ctx


# -- headers ---------------------------------------------------------------------------------------

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
def test_preflight_passes_a_certificate_from_a_trusted_ca(ca, var, monkeypatch):
    pem, server_ctx = ca
    monkeypatch.setenv(var, str(pem))
    with AioServer(tls=server_ctx) as srv:
        preflight(EngineSpec(url=f"{srv.url}/"))
        assert srv.requests == 0


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


def test_https_to_a_plain_http_port_is_refused():
    with AioServer() as srv:
        with pytest.raises(ConfigError, match=r"TLS handshake failed .*\(https on a plain HTTP port\)"):
            preflight(EngineSpec(url=f"https://127.0.0.1:{srv.port}/"))


def test_preflight_only_logs_an_endpoint_it_cannot_reach(caplog):
    with AioServer() as gone:
        port = gone.port
    preflight(EngineSpec(url=f"http://127.0.0.1:{port}/"))  # plain HTTP: nothing to check
    with caplog.at_level(logging.WARNING, logger="batch_inference"):
        preflight(EngineSpec(url=f"https://127.0.0.1:{port}/", connect_timeout_s=2))
    assert "TLS pre-flight could not connect (connection_error: ConnectionRefusedError" in caplog.text


# -- through the job -------------------------------------------------------------------------------

def tls_job(spark, srv: AioServer, table_name: str, rows: int = 40, host: str = "127.0.0.1"):
    name = f"prompts_{uuid.uuid4().hex[:8]}"
    df = spark.createDataFrame([(i, f"p{i}") for i in range(rows)], "id long, prompt string")
    df.createOrReplaceTempView(name)
    return {"input": {"table": name}, "output": {"table": table_name},
            "endpoint": {"name": "tls", "type": "driver_proxy", "url": f"https://{host}:{srv.port}/"},
            "retry": {"max_attempts": 6, "backoff_base_s": 0.5}, "run": {"chunk_rows": 1000, "task_slots": 2}}


def test_a_run_against_an_untrusted_certificate_stops_before_any_row(spark, ca, table_name):
    _, server_ctx = ca
    with AioServer(tls=server_ctx) as srv:
        with pytest.raises(ConfigError, match="not trusted"):
            run_job(spark, job_config(**tls_job(spark, srv, table_name)))
        assert srv.requests == 0
    assert not spark.catalog.tableExists(table_name)


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
