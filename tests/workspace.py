"""A stand-in Databricks workspace on 127.0.0.1: OAuth for service principals, the serving-endpoints API
and the endpoint itself, for the tests of expiring tokens, AI Gateway limits and route optimization.

- `/.well-known/databricks-config` and `/oidc/.well-known/oauth-authorization-server`: where
  databricks-sdk discovers the token endpoint (as `tests/test_resolve.py`'s workspace does);
- `POST /oidc/v1/token`: the client-credentials grant, HTTP Basic `client_id:client_secret`; each
  token is new and lives `token_life_s` (`expires_in`), as a real one lives an hour;
- `GET /api/2.0/preview/scim/v2/Me`: who a token it issued is (the service principal, in `groups`);
- `GET /api/2.0/serving-endpoints/{name}`: the endpoint's definition (`definition`, a
  `ServingEndpointDetailed` as JSON), for a bearer token it issued;
- `POST /oidc/v1/token` with the JWT-bearer grant: a token it issued (`assertion`) exchanged for one
  scoped with `authorization_details` (databricks-sdk's data-plane path), which must be the
  definition's `data_plane_info.query_info.authorization_details`;
- `POST /serving-endpoints/{name}/invocations`, and the same under `/ro/1234/` (a route-optimized
  endpoint's own URL, `1234` the workspace id, which every API answer names in `x-databricks-org-id`):
  the toy model's answer for a token issued less than `token_life_s` ago, else 401 as Databricks
  writes it (or `refuse_with`, 403, as some gateways answer); at the route-optimized URL, a token not
  scoped to the endpoint is refused with 403;
  with `queries_per_window` (N, seconds), a Foundation Model API's queries-per-hour limit scaled down:
  past N answered queries in a fixed window, 429 `REQUEST_LIMIT_EXCEEDED` (no Retry-After) until the
  next window.

Every request is recorded (`requests`: method, path, the token's number or None).

Example::

    with Workspace(token_life_s=2.0) as ws:
        ws.definition = {"name": "llm", "route_optimized": True, "endpoint_url": ws.url + "/ro/1234/..."}
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jobs.local.stand_in import answer

CLIENT_ID, CLIENT_SECRET = "sp-application-id", "sp-client-secret-Zq7wkx9R"
WORKSPACE_ID = "1234"
RO_PREFIX = f"/ro/{WORKSPACE_ID}"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# What a route-optimized endpoint's definition says a token to query it must carry.
AUTH_DETAILS = json.dumps([{"type": "workspace_permission", "object_type": "serving-endpoints",
                            "object_path": "/serving-endpoints/llm-id", "actions": ["query_inference_endpoint"]}])


class Workspace(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token_life_s: float = 3600.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token_life_s = token_life_s
        self.definition: dict[str, Any] | None = None
        self.groups: list[str] = []  # the service principal's groups, as SCIM `Me` lists them
        self.tokens: dict[str, tuple[int, float]] = {}  # token -> (its number, issued at)
        self.scoped: dict[str, str] = {}  # a token exchanged for an endpoint's -> its authorization_details
        self.requests: list[tuple[str, str, int | None]] = []
        self.refused = 0  # invocations answered 401
        self.refuse_with = 401
        # Appended to every access token issued: a token endpoint that sends a line break (tests of
        # header injection).
        self.token_suffix = ""
        self.queries_per_window: tuple[int, float] | None = None
        self.limited = 0  # invocations answered 429
        self._started = time.monotonic()
        self._window: tuple[int, int] = (0, 0)  # (window number, queries answered in it)
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def issue(self, authorization_details: str | None = None) -> dict[str, Any]:
        with self._lock:
            n = next(self._numbers)
            kind = "oauth" if authorization_details is None else "scoped"
            token = f"{kind}-{n}-{base64.b32encode(n.to_bytes(4, 'big')).decode().rstrip('=')}-access{self.token_suffix}"
            self.tokens[token] = (n, time.monotonic())
            if authorization_details is not None:
                self.scoped[token] = authorization_details
        return {"access_token": token, "token_type": "Bearer", "expires_in": self.token_life_s,
                "scope": "all-apis" if authorization_details is None else "serving-endpoints"}

    def required_scope(self) -> str | None:
        info = ((self.definition or {}).get("data_plane_info") or {}).get("query_info") or {}
        return info.get("authorization_details")

    def token_of(self, header: str | None) -> tuple[int | None, bool]:
        """The number of the bearer token in `header`, and whether it is still valid."""
        token = (header or "").removeprefix("Bearer ")
        with self._lock:
            found = self.tokens.get(token)
        if found is None:
            return None, False
        n, issued = found
        return n, time.monotonic() - issued < self.token_life_s

    def over_limit(self) -> bool:
        """Count a query against `queries_per_window`; True if it is over (refused, not counted)."""
        if self.queries_per_window is None:
            return False
        n, window_s = self.queries_per_window
        with self._lock:
            number = int((time.monotonic() - self._started) // window_s)
            seen = self._window[1] if self._window[0] == number else 0
            if seen >= n:
                self.limited += 1
                return True
            self._window = (number, seen + 1)
        return False

    def invocations(self) -> list[tuple[str, int | None]]:
        return [(p, n) for m, p, n in self.requests if m == "POST" and p.endswith("/invocations")]

    def __enter__(self) -> Workspace:
        threading.Thread(target=self.serve_forever, name="workspace", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet handler that answers JSON, and the OIDC discovery a workspace serves databricks-sdk: the
    base of the stand-in workspaces (this one, and `tests/test_resolve.py`'s for secret scopes)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    # The workspace id every API answer names (`x-databricks-org-id`), if set.
    org_id: str | None = None

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        if self.org_id:
            self.send_header("x-databricks-org-id", self.org_id)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _discovery(self, path: str, base: str) -> bool:
        """Answer where databricks-sdk discovers OAuth from, if `path` asks; True if it did."""
        if path == "/.well-known/databricks-config":
            self._answer(200, {"oidc_endpoint": f"{base}/oidc", "workspace_id": "1234"})
        elif path == "/oidc/.well-known/oauth-authorization-server":
            self._answer(200, {"authorization_endpoint": f"{base}/oidc/v1/authorize",
                               "token_endpoint": f"{base}/oidc/v1/token"})
        else:
            return False
        return True


class _Handler(JsonHandler):
    server: Workspace
    org_id = WORKSPACE_ID

    def _record(self) -> tuple[int | None, bool]:
        n, valid = self.server.token_of(self.headers.get("Authorization"))
        with self.server._lock:
            self.server.requests.append((self.command, urlsplit(self.path).path, n))
        return n, valid

    def do_GET(self) -> None:
        n, valid = self._record()
        path, ws = urlsplit(self.path).path, self.server
        if self._discovery(path, ws.url):
            return
        if path == "/api/2.0/preview/scim/v2/Me":
            if not valid:
                return self._answer(401, {"error_code": "UNAUTHENTICATED", "message": "Invalid access token."})
            return self._answer(200, {"userName": CLIENT_ID, "applicationId": CLIENT_ID, "active": True,
                                      "groups": [{"display": g, "value": str(i)} for i, g in enumerate(ws.groups)]})
        m = re.fullmatch(r"/api/2.0/serving-endpoints/([^/]+)", path)
        if m and ws.definition is not None and m.group(1) == ws.definition.get("name"):
            if not valid:
                return self._answer(401, {"error_code": "UNAUTHENTICATED", "message": "Invalid access token."})
            return self._answer(200, ws.definition)
        self._answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"no route {path}"})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        n, valid = self._record()
        path, ws = urlsplit(self.path).path, self.server
        if path == "/oidc/v1/token":
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            if form.get("grant_type") == JWT_BEARER:
                _, ok = ws.token_of("Bearer " + form.get("assertion", ""))
                if not ok or form.get("assertion") in ws.scoped:
                    return self._answer(401, {"error": "invalid_grant", "error_description": "Invalid assertion"})
                if not form.get("authorization_details") or form["authorization_details"] != ws.required_scope():
                    return self._answer(400, {"error": "invalid_request",
                                              "error_description": "Invalid authorization_details"})
                return self._answer(200, ws.issue(form["authorization_details"]))
            basic = self.headers.get("Authorization", "")
            pair = base64.b64decode(basic.split()[1]).decode() if basic.startswith("Basic ") else ""
            if form.get("grant_type") != "client_credentials" or pair != f"{CLIENT_ID}:{CLIENT_SECRET}":
                return self._answer(401, {"error": "invalid_client", "error_description": "Client authentication failed"})
            return self._answer(200, ws.issue())
        invocation = path.removeprefix(RO_PREFIX)
        if re.fullmatch(r"/serving-endpoints/[^/]+/invocations", invocation):
            if not valid:
                with ws._lock:
                    ws.refused += 1
                return self._answer(ws.refuse_with, {"error_code": "UNAUTHENTICATED",
                                                     "message": "Token expired or invalid; send a fresh OAuth token."})
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            if path.startswith(RO_PREFIX) and ws.required_scope() and ws.scoped.get(token) != ws.required_scope():
                with ws._lock:
                    ws.refused += 1
                return self._answer(403, {"error_code": "PERMISSION_DENIED",
                                          "message": "Token is not scoped to this endpoint."})
            if ws.over_limit():
                return self._answer(429, {"error_code": "REQUEST_LIMIT_EXCEEDED",
                                          "message": "Exceeded the queries-per-hour limit of this endpoint."})
            status, value = answer(invocation, json.loads(raw))
            return self._answer(status, value)
        self._answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"no route {path}"})
