"""The transport conformance suite: every `limits.http_client` against real servers on 127.0.0.1.

Each case runs the engine (retries, splitting, attempt counting included) over one client against
aiohttp's server, uvicorn, a scripted socket server or a TLS server with a throwaway CA, and checks
what a batch job needs: the right outcome, in about the time it should take, with `attempts` equal to
the requests the server saw.
"""

from __future__ import annotations

import time

import pytest

from jobs.config import parse_config
from tests.http_servers import (
    PROXY_HOST,
    AioServer,
    ForwardProxy,
    RawServer,
    UvicornServer,
    chunked_answer,
    close_without_answer,
    closing_answer,
    drip,
    early_refusal,
    no_content,
    ok_answer,
    reset_mid_body,
)
from udfs.auth import Secret
from udfs.engine import Engine
from udfs.spec import EngineSpec, RetrySpec
from udfs.transport import AiohttpTransport, TransportError, make_transport

CLIENTS = ["aiohttp", "urllib3", "requests"]
FAST_RETRY = RetrySpec(backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=3)


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/conftest.py: no CA bundle or proxy from the machine


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    return request.param


def spec(url: str, client: str, **kw) -> EngineSpec:
    kw.setdefault("retry", FAST_RETRY)
    kw.setdefault("endpoint_type", "driver_proxy")
    return EngineSpec(url=url, task=kw.pop("task", "custom"), http_client=client, **kw)


def run(s: EngineSpec, prompts: list[str]):
    with Engine(s) as engine:
        return [o for b in engine.map_batches([prompts]) for o in b]


def call_each(s: EngineSpec, prompts: list[str], pause_s: float = 0.0):
    """One request at a time over one engine (one pool), optionally idle between them."""
    out = []
    with Engine(s) as engine:
        for i, p in enumerate(prompts):
            if i and pause_s:
                time.sleep(pause_s)
            out += engine.call([p])
    return out


def summary(outcomes) -> list[tuple]:
    return [(o.status, o.response, o.error, o.attempts) for o in outcomes]


# -- connections -------------------------------------------------------------------------------------

@pytest.mark.parametrize("server", [AioServer, UvicornServer], ids=["aiohttp-server", "uvicorn"])
def test_keep_alive_reuses_connections(client, server):
    with server() as srv:
        out = call_each(spec(srv.url + "/", client, max_concurrency=1), ["a", "b", "c", "d"])
        assert summary(out) == [("ok", f"Answer to: {p}", None, 1) for p in "abcd"]
        assert len(srv.connections) == 1
        out = run(spec(srv.url + "/", client, max_concurrency=4), [f"p{i}" for i in range(40)])
        assert {o.status for o in out} == {"ok"}
        assert len(srv.connections) <= 1 + 4


@pytest.mark.parametrize("server", [lambda: AioServer(keepalive_timeout=0.3),
                                    lambda: UvicornServer(timeout_keep_alive=0.3)],
                         ids=["aiohttp-server", "uvicorn"])
def test_idle_connections_closed_by_the_server_are_not_an_error(client, server):
    with server() as srv:
        out = call_each(spec(srv.url + "/", client, max_concurrency=2), ["a", "b", "c"], pause_s=0.8)
        assert summary(out) == [("ok", f"Answer to: {p}", None, 1) for p in "abc"]
        assert srv.requests == 3
        assert len(srv.connections) == 3


def test_connection_close_answers(client):
    with RawServer(closing_answer()) as srv:
        out = call_each(spec(srv.url + "/", client, max_concurrency=1), ["a", "b", "c"])
        assert summary(out) == [("ok", f"Answer to: {p}", None, 1) for p in "abc"]
        assert srv.requests == 3 and len(srv.connections) == 3


# -- what an answer may look like --------------------------------------------------------------------

@pytest.mark.parametrize("trailers", [None, [("X-Checksum", "abc"), ("X-Tokens", "7")]],
                         ids=["plain", "trailers"])
def test_chunked_answers(client, trailers):
    with RawServer(chunked_answer(trailers)) as srv:
        out = call_each(spec(srv.url + "/", client, max_concurrency=1), ["a long enough prompt", "b"])
        assert summary(out) == [("ok", "Answer to: a long enough prompt", None, 1),
                                ("ok", "Answer to: b", None, 1)]
        assert len(srv.connections) == 1, "the connection is reused after the last chunk and trailers"


def test_100_continue_before_the_answer(client):
    with RawServer(ok_answer(extra=b"HTTP/1.1 100 Continue\r\n\r\n")) as srv:
        out = call_each(spec(srv.url + "/", client, max_concurrency=1), ["a", "b"])
        assert summary(out) == [("ok", "Answer to: a", None, 1), ("ok", "Answer to: b", None, 1)]
        assert len(srv.connections) == 1


def test_other_interim_answers_before_the_answer(client):
    interim = (b"HTTP/1.1 102 Processing\r\n\r\n"
               b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
    with RawServer(ok_answer(extra=interim)) as srv:
        out = call_each(spec(srv.url + "/", client, max_concurrency=1), ["a", "b"])
    if client in ("urllib3", "requests"):
        # http.client skips 100 only. What it cannot read it must not misread: the row fails saying
        # why, and the connection holding the real answer is not reused for "b".
        assert [(o.status, o.response) for o in out] == [("error", None)] * 2
        assert out[0].error.startswith("connection_error: the server sent an interim answer (102)")
        assert len(srv.connections) == srv.requests
    else:
        assert summary(out) == [("ok", "Answer to: a", None, 1), ("ok", "Answer to: b", None, 1)]
        assert len(srv.connections) == 1


def test_an_answer_without_body_is_read_at_once(client):
    with RawServer(no_content(204)) as srv:
        t0 = time.monotonic()
        [o] = call_each(spec(srv.url + "/", client, max_concurrency=1, read_timeout_s=5), ["a"])
        assert time.monotonic() - t0 < 2, "a 204 has no body to wait for"
        assert (o.status, o.http_status, o.attempts) == ("error", 200, 1)
        assert o.error.startswith("bad_response: answer is not JSON")
        assert srv.requests == 1


# -- refusals, stalls and broken connections ---------------------------------------------------------

TEXTS = [f"text {i} " + "x" * 200_000 for i in range(32)]  # 32 texts of 200,000 chars: 6.4 MB


def embeddings_spec(url: str, client: str) -> EngineSpec:
    return spec(url + "/serving-endpoints/e/invocations", client, task="llm/v1/embeddings",
                endpoint_type="serving", rows_per_request=32, max_concurrency=2, read_timeout_s=30)


@pytest.mark.parametrize("where", ["uvicorn", "raw-close"])
def test_a_413_sent_before_the_body_is_read_splits_the_batch(client, where):
    max_body = 1_000_000  # 4 texts fit
    if where == "uvicorn":
        srv = UvicornServer(max_body=max_body)
    else:
        read_body, script = early_refusal(max_body)
        srv = RawServer(script, read_body=read_body)
    with srv:
        out = run(embeddings_spec(srv.url, client), TEXTS)
        assert [o.status for o in out] == ["ok"] * 32, {o.error for o in out}
        assert all(len(o.embedding) == 16 for o in out)
        assert srv.requests == 8  # 32 -> 16 -> 8 -> 4 rows per request: 8 requests of 4 answered
        if where == "uvicorn":
            assert srv.refused == 1 + 2 + 4


def test_a_body_dripped_past_the_read_timeout_is_a_timeout(client):
    with RawServer(drip(every_s=0.1)) as srv:  # an answer of ~20 bytes: 2 s of dripping per attempt
        t0 = time.monotonic()
        [o] = call_each(spec(srv.url + "/", client, max_concurrency=1, connect_timeout_s=0.3,
                             read_timeout_s=0.5, retry=RetrySpec(backoff_base_s=0.01, max_attempts=2)),
                        ["drip"])
        took = time.monotonic() - t0
    assert (o.status, o.attempts) == ("error", 2)
    assert o.error.startswith("timeout: answer not complete within connect_timeout_s + read_timeout_s = 0.8s")
    assert took < 3.0, f"two attempts of 0.8 s took {took:.1f}s"
    assert srv.requests == 2


def test_a_reset_mid_body_is_retried_and_counted(client):
    with RawServer(reset_mid_body(times=1)) as srv:
        [o] = call_each(spec(srv.url + "/", client, max_concurrency=1), ["cut"])
        assert (o.status, o.response, o.attempts) == ("ok", "Answer to: cut", 2)
        assert srv.count("cut") == 2


def test_a_request_the_server_read_then_dropped_counts_as_an_attempt(client):
    # "warm" leaves a kept-alive connection; "x" is read by the server, which then closes without a
    # word, every time. Whether the client meets that on a reused or a fresh connection, each time the
    # server saw the request is an attempt the row pays for: no silent resend.
    with RawServer(close_without_answer(unless=lambda r: r.body is not None and b"warm" in r.body)) as srv:
        out = call_each(spec(srv.url + "/", client, max_concurrency=1), ["warm", "x"])
        assert out[0].status == "ok"
        o = out[1]
        assert (o.status, o.attempts) == ("error", 3)
        assert o.error.startswith("connection_error: ")
        assert srv.count("x") == o.attempts


def test_a_slow_answer_is_a_timeout(client):
    with RawServer(drip(every_s=1.0)) as srv:  # the head, then a second of silence before each byte
        [o] = call_each(spec(srv.url + "/", client, max_concurrency=1, read_timeout_s=0.3,
                             retry=RetrySpec(backoff_base_s=0.01, max_attempts=1)), ["slow"])
    assert (o.status, o.attempts) == ("error", 1)
    assert o.error.startswith("timeout: ")


# -- TLS -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("var", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_tls_with_a_ca_bundle_from_the_environment(client, ca, var, monkeypatch):
    pem, server_ctx = ca
    monkeypatch.setenv(var, str(pem))
    with AioServer(tls=server_ctx) as srv:
        out = call_each(spec(srv.url + "/", client, max_concurrency=1), ["a", "b"])
        assert summary(out) == [("ok", "Answer to: a", None, 1), ("ok", "Answer to: b", None, 1)]
        assert len(srv.connections) == 1


def test_requests_ca_bundle_is_read_before_curl_ca_bundle(ca, tmp_path, monkeypatch):
    """requests' order, for every client alike (one TLS context): REQUESTS_CA_BUNDLE, then CURL_CA_BUNDLE."""
    pem, server_ctx = ca
    missing = tmp_path / "missing.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pem))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(missing))  # never read: REQUESTS_CA_BUNDLE comes first
    with AioServer(tls=server_ctx) as srv:
        [o] = call_each(spec(srv.url + "/", "aiohttp", max_concurrency=1), ["a"])
        assert (o.status, o.response) == ("ok", "Answer to: a")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(missing))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(pem))
    with pytest.raises(TransportError, match="^tls_error: REQUESTS_CA_BUNDLE="):
        Engine(spec("https://127.0.0.1:9/", "aiohttp"))


def test_an_untrusted_certificate_stops_at_once(client, ca):
    _, server_ctx = ca
    with AioServer(tls=server_ctx) as srv:
        s = spec(srv.url + "/", client, max_concurrency=2,
                 retry=RetrySpec(backoff_base_s=0.5, max_attempts=6))
        t0 = time.monotonic()
        with Engine(s) as engine:
            [o] = engine.call(["one"])
            with pytest.raises(TransportError) as err:
                list(engine.map_batches([[f"p{i}" for i in range(50)]]))
        took = time.monotonic() - t0
        assert srv.requests == 0
    assert (o.status, o.attempts) == ("error", 1), "not retried"
    assert o.error.startswith("tls_error: the server's TLS certificate is not trusted")
    assert err.value.kind == "tls_error" and err.value.fatal
    assert "REQUESTS_CA_BUNDLE" in str(err.value) and "SSL_CERT_FILE" in str(err.value)
    assert took < 3, f"an untrusted certificate took {took:.1f}s to stop the run"


# -- proxies and headers -------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_from_the_environment(client, ca, scheme, monkeypatch):
    pem, server_ctx = ca
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pem))
    with AioServer(tls=server_ctx if scheme == "https" else None) as srv, ForwardProxy() as proxy:
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", proxy.url)
        # endpoint.test resolves nowhere: only through the proxy can this work.
        url = f"{scheme}://{PROXY_HOST}:{srv.port}/"
        out = call_each(spec(url, client, max_concurrency=1), ["a", "b"])
        assert summary(out) == [("ok", "Answer to: a", None, 1), ("ok", "Answer to: b", None, 1)]
        method = "CONNECT" if scheme == "https" else "POST"
        assert proxy.targets and set(proxy.targets) == {f"{method} {PROXY_HOST}:{srv.port}"}


def test_a_header_with_a_line_break_is_refused_before_sending(client):
    token = "Bearer tok-SECRET-1234\n"  # read from a file with its trailing newline
    with AioServer() as srv:
        with pytest.raises(TransportError) as err:
            Engine(spec(srv.url + "/", client, headers={"Authorization": Secret(token)}))
        assert srv.requests == 0
    assert err.value.kind == "invalid_header" and err.value.fatal
    assert "'Authorization' contains a line break" in str(err.value)
    assert "SECRET" not in str(err.value)


def test_a_ca_bundle_that_cannot_be_read_is_refused_before_connecting(client, tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(TransportError) as err:
        Engine(spec("https://127.0.0.1:9/", client))
    assert err.value.kind == "tls_error" and err.value.fatal
    missing = tmp_path / "missing.pem"
    assert str(err.value) == (f"tls_error: REQUESTS_CA_BUNDLE={missing}: cannot load CA bundle "
                              "(FileNotFoundError)")


def test_asyncio_is_a_deprecated_name_for_aiohttp(caplog):
    """`asyncio` named a client of our own that aiohttp replaced: old configs still run, on aiohttp."""
    data = {"input": {"table": "t"}, "output": {"table": "o"}, "endpoint": {"name": "e"},
            "limits": {"http_client": "asyncio"}}
    with caplog.at_level("WARNING", logger="batch_inference"):
        cfg = parse_config(data)
    assert cfg.limits.http_client == "aiohttp"
    assert "limits.http_client: asyncio is deprecated and now means aiohttp" in caplog.text
    transport = make_transport("asyncio", "http://127.0.0.1:9/", {}, pool_size=1, connect_timeout=1,
                               read_timeout=1)
    assert isinstance(transport, AiohttpTransport)
