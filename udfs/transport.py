"""HTTP for one task: a keep-alive connection pool to one endpoint, sized to the task's concurrency.

Two implementations with one method, `post(body) -> (status, headers, data)`:
- `Urllib3Transport` (default): urllib3's pool, the transport requests itself runs on, called
  directly. requests adds per-call work we do not need on a hot path (hooks, cookie jar, a proxy
  lookup in the environment on every call); at thousands of calls per second on two cores, that is
  where the time goes (see benchmarks/README.md).
- `RequestsTransport`: one pooled `requests.Session`, for setups that rely on requests' behaviour
  (REQUESTS_CA_BUNDLE, .netrc). Select with `limits.http_client: requests`.

Errors are raised as `TransportError(kind, detail)` with kind `timeout` or `connection_error`.
"""

from __future__ import annotations

import urllib.request
from typing import Mapping
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import ConnectTimeoutError, ProtocolError, ReadTimeoutError, TimeoutError


class TransportError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class Urllib3Transport:
    def __init__(self, url: str, headers: Mapping[str, str], *, pool_size: int,
                 connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(url)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = dict(headers)
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        proxy = _proxy_for(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if proxy:
            manager = urllib3.ProxyManager(proxy, num_pools=1, maxsize=pool_size, block=True)
            self._pool = manager.connection_from_url(origin)
        else:
            self._pool = urllib3.connection_from_url(origin, maxsize=pool_size, block=True)

    def post(self, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        try:
            r = self._pool.urlopen("POST", self._path, body=body, headers=self._headers, retries=False,
                                   timeout=self._timeout, preload_content=True, assert_same_host=False)
        except (ReadTimeoutError, ConnectTimeoutError, TimeoutError) as exc:
            raise TransportError("timeout", type(exc).__name__) from None
        except (ProtocolError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransportError("connection_error", _reason(exc)) from None
        return r.status, r.headers, r.data

    def close(self) -> None:
        self._pool.close()


class RequestsTransport:
    def __init__(self, url: str, headers: Mapping[str, str], *, pool_size: int,
                 connect_timeout: float, read_timeout: float) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        self._url = url
        self._timeout = (connect_timeout, read_timeout)
        self._session = requests.Session()
        self._session.headers.update(headers)
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, pool_block=True, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def post(self, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        import requests

        try:
            r = self._session.post(self._url, data=body, timeout=self._timeout)
        except requests.Timeout as exc:
            raise TransportError("timeout", type(exc).__name__) from None
        except (requests.ConnectionError, requests.RequestException) as exc:
            raise TransportError("connection_error", type(exc).__name__) from None
        return r.status_code, r.headers, r.content

    def close(self) -> None:
        self._session.close()


def make_transport(kind: str, url: str, headers: Mapping[str, str], **kw: float | int):
    cls = {"urllib3": Urllib3Transport, "requests": RequestsTransport}[kind]
    return cls(url, headers, **kw)


def _proxy_for(url: str) -> str | None:
    """The proxy from HTTP(S)_PROXY for this URL, honouring NO_PROXY, as requests would."""
    host = urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1") or urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(urlsplit(url).scheme)


def _reason(exc: BaseException) -> str:
    # Keep the class names of the chain (ConnectionResetError, NewConnectionError), not addresses.
    names = [type(exc).__name__]
    inner = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else exc.__context__
    if isinstance(inner, BaseException):
        names.append(type(inner).__name__)
    return " / ".join(dict.fromkeys(names))
