"""Credentials as the bundle's job gets them, against a stand-in workspace on 127.0.0.1.

databricks-sdk itself makes the calls (no mock): a secret read through its dbutils (the path
`endpoint.token_secret` takes where no environment variable can be set, as on serverless), and a
service principal's OAuth client-credentials flow through `Config`.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from jobs.config import ConfigError, EndpointConfig
from jobs.resolve import auth_headers

SECRETS = {("batch-inference", "endpoint-token"): "tok-from-scope-42"}


class Workspace(ThreadingHTTPServer):
    """The workspace routes databricks-sdk calls here; every request is recorded."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, dict[str, str], str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Workspace

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path, dict(self.headers.items()), ""))
        url = urlsplit(self.path)
        if url.path == "/.well-known/databricks-config":  # where databricks-sdk discovers OAuth from
            return self._answer(200, {"oidc_endpoint": f"{self.server.url}/oidc", "workspace_id": "1234"})
        if url.path == "/oidc/.well-known/oauth-authorization-server":
            return self._answer(200, {"authorization_endpoint": f"{self.server.url}/oidc/v1/authorize",
                                      "token_endpoint": f"{self.server.url}/oidc/v1/token"})
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
