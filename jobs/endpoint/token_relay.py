"""The driver's current token for the executors' tasks, for credentials only the driver can refresh.

In executors mode a chunk's tasks used to get a snapshot of the driver's `Authorization` header
(`udfs.auth.Snapshot`): the job's own `runtime` token, a notebook's, or another unified-auth source
that databricks-sdk refreshes on the driver could lapse in the middle of a chunk, and every row after
it failed with 401 until a rerun. The relay is a small HTTP server on the driver, at the address the
executors already reach it at (`spark.driver.host`), keyed by a random secret of this run that travels
to the tasks only inside a `Secret`; a task whose token is refused or due asks it for the current one
(`udfs.auth.DriverRelay`), and the driver refreshes its credentials to answer (at most once a second).
OAuth M2M needs none of this (tasks mint their own tokens).

Example::

    with relay_for(spec, spark):      # no-op unless the credentials are databricks-sdk's, refreshable
        run.from_executors(...)
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from jobs.session import conf_get
from udfs.auth import CredentialError, DataPlaneToken, SdkCredentials, Secret
from udfs.spec import EngineSpec

log = logging.getLogger("batch_inference")

# Tasks refused at once all ask the relay at once: the driver refreshes its credentials for the first,
# and answers the others within this many seconds with what it has.
REFRESH_AT_MOST_EVERY_S = 1.0


class _Relay(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, creds: SdkCredentials, key: Secret) -> None:
        super().__init__((host, 0), _Handler)
        self.creds, self.key = creds, key
        self.lock = threading.Lock()
        self.refreshed_at = 0.0

    def current(self) -> dict[str, Any]:
        with self.lock:
            if time.monotonic() - self.refreshed_at >= REFRESH_AT_MOST_EVERY_S:
                self.creds.refresh()
                self.refreshed_at = time.monotonic()
            header = self.creds.header()
            return {"authorization": header.reveal() if header is not None else None,
                    "expires_at": self.creds.expires_at}


class _Handler(BaseHTTPRequestHandler):
    server: _Relay

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        given = self.headers.get("X-Relay-Key", "")
        if self.path != "/token" or not hmac.compare_digest(given.encode(), self.server.key.reveal().encode()):
            return self._send(403, {"error": "forbidden"})
        try:
            self._send(200, self.server.current())
        except CredentialError as exc:
            self._send(503, {"error": str(exc)})

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _driver_refreshed(spec: EngineSpec) -> SdkCredentials | None:
    creds = spec.credentials
    if isinstance(creds, DataPlaneToken):
        creds = creds.upstream
    return creds if isinstance(creds, SdkCredentials) and creds.refreshable else None


@contextmanager
def relay_for(spec: EngineSpec, spark: Any | None) -> Iterator[None]:
    """Run a relay for the run's tasks while the block runs, if their credentials need one."""
    creds = _driver_refreshed(spec)
    if creds is None:
        yield
        return
    key = Secret(secrets.token_urlsafe(32))
    host = (conf_get(spark, "spark.driver.host") if spark is not None else None) or "127.0.0.1"
    try:
        server = _Relay(host, creds, key)
    except OSError:
        host = "127.0.0.1"
        server = _Relay(host, creds, key)
    url = f"http://{host}:{server.server_address[1]}/token"
    thread = threading.Thread(target=server.serve_forever, name="bi-token-relay", daemon=True)
    thread.start()
    creds.relay = (url, key)
    log.info("credentials (%s): the tasks get the driver's current token from %s when theirs lapses",
             creds.auth_type, url)
    try:
        yield
    finally:
        creds.relay = None
        server.shutdown()
        server.server_close()
