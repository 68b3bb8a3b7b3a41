"""HTTP for one task: keep-alive connections to one endpoint, as many as the task's concurrency.

Every transport has one coroutine, `post(body, headers=None) -> (status, headers, data)` (answer
headers looked up case-insensitively; `headers` are added to the transport's own for this request: a
token that is refreshed), and raises `TransportError(kind, detail)`. `timeout` and `connection_error`
are worth retrying; those met before a connection was made are `unreachable` (refused, no route, no
name, a connect timeout), which the engine's governor treats as an endpoint that is down, not as one
row's bad luck. `tls_error` and `invalid_header` are fatal: configuration errors that fail every
request the same way, so the engine stops at the first one instead of retrying each row.

Which library does what:

- `AiohttpTransport` (`limits.http_client: aiohttp`, the default; `asyncio` is a deprecated alias):
  aiohttp's client in the engine's event loop. Its connector pools the keep-alive connections (sized
  to the task's share, idle ones closed after `KEEPALIVE_S`, ones the server closed dropped before
  reuse); its C parser, built on llhttp (the parser Node.js uses), reads status lines, headers,
  chunked bodies, trailers, 1xx and answers that have no body; it writes the body while it reads the
  answer, so a 413 sent before the body is read is seen; it tunnels through proxies.
- `ThreadedTransport` over `urllib3` or `requests` (`urllib3 | requests`): a blocking client on a
  thread pool of the task's share; `http.client` parses, urllib3 pools. `http.client` skips only
  100 Continue among interim answers: after a 102 or 103 the row fails, saying so.
- This module, for every client alike: one TLS context (`ssl_context`: `REQUESTS_CA_BUNDLE`, else
  `CURL_CA_BUNDLE`, else OpenSSL's `SSL_CERT_FILE`/`SSL_CERT_DIR`, else the system store plus
  certifi), the proxy from the environment resolved once (`proxy_for`), header values checked for line
  breaks before anything is sent, one bound per attempt, no redirects (a POST turned into a GET is
  never an answer), and each library's exceptions mapped to the kinds above.

No HTTP client of our own: one written here (hand-parsed, then rebuilt over httptools) was measured
against aiohttp and did not earn its keep (benchmarks/README.md).

Nothing here sends a request twice. A request that may have reached the server is the engine's to
retry, as a counted attempt with backoff, within the row's budget. A client only picks another
connection when the pooled one is known dead before use (closed by the server while idle, expired).

Timeouts, the same for every client: connecting (TCP, proxy tunnel, TLS) may take
`connect_timeout_s`; the answer may fall silent for at most `read_timeout_s`; and an attempt as a
whole ends after `connect_timeout_s + read_timeout_s`, so a server dripping bytes cannot hold a row.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import ssl
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from udfs import reasons
from udfs.loopback import is_loopback

# Kinds that no retry can fix: the run stops at the first one (see `udfs.engine`).
FATAL_KINDS = frozenset({reasons.TLS_ERROR, reasons.INVALID_HEADER})
# Idle connections are closed after this many seconds: below the shortest common server keep-alive
# (uvicorn and Node close at 5 s), so a pooled connection is ours to close, not found dead by a write.
KEEPALIVE_S = 3.0
CA_HINT = "set REQUESTS_CA_BUNDLE (or SSL_CERT_FILE) to a CA bundle that includes its issuer"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 token)
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")        # control characters but HTAB
# OpenSSL's reasons for a handshake that can never succeed as configured (plain HTTP on an https port,
# no protocol or cipher in common). Other TLS errors (a record garbled in transit, an alert from an
# overloaded middlebox) stay retryable: the row's attempts bound them.
_TLS_CONFIG_REASONS = frozenset({
    "WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE",
    "TLSV1_ALERT_PROTOCOL_VERSION", "SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV1_UNRECOGNIZED_NAME",
    "TLSV1_ALERT_UNKNOWN_CA", "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
})


class TransportError(Exception):
    def __init__(self, kind: str, detail: str, *, unreachable: bool = False) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        # No connection was made: nothing was sent, and the endpoint may be down as a whole.
        self.unreachable = unreachable

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL_KINDS


# -- shared by every client --------------------------------------------------------------------

def header_problem(name: str, value: str) -> str | None:
    """Why a header cannot be sent as is, never quoting its value (it is often a token)."""
    if not _TOKEN.fullmatch(name):
        return f"the header name {name!r} is not a valid HTTP field name"
    if "\r" in value or "\n" in value:
        return (f"the value of header {name!r} contains a line break (CR or LF), which would inject "
                "headers; a token read from a file or variable with a trailing newline?")
    if _CTL.search(value):
        return f"the value of header {name!r} contains a control character"
    return None


def check_headers(headers: Mapping[str, str]) -> None:
    """Refuse, before anything is sent, a header that would split the request (header injection)."""
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem:
            raise TransportError(reasons.INVALID_HEADER, problem)


def ssl_context() -> ssl.SSLContext:
    """The TLS context every client uses, from the CA bundle the environment names.

    requests' order: `REQUESTS_CA_BUNDLE`, then `CURL_CA_BUNDLE`, replacing the default store (a
    corporate bundle). Else OpenSSL's `SSL_CERT_FILE`/`SSL_CERT_DIR` as OpenSSL reads them, else the
    system store plus certifi (slim images ship no system store; certifi is what requests trusts).
    """
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        bundle = os.environ.get(var)
        if bundle:
            try:
                if os.path.isdir(bundle):
                    return ssl.create_default_context(capath=bundle)
                return ssl.create_default_context(cafile=bundle)
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(reasons.TLS_ERROR, f"{var}={bundle}: cannot load CA bundle "
                                                  f"({type(exc).__name__})") from None
    ctx = ssl.create_default_context()
    if not (os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")):
        try:
            import certifi

            ctx.load_verify_locations(certifi.where())
        except (ImportError, OSError):
            pass
    return ctx


def proxy_for(url: str) -> str | None:
    """The proxy from HTTP(S)_PROXY for this URL, honouring NO_PROXY; never for loopback."""
    if is_loopback(url) or urllib.request.proxy_bypass(urlsplit(url).hostname or ""):
        return None
    return urllib.request.getproxies().get(urlsplit(url).scheme)


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps, outermost first: each library nests the OS or TLS error differently
    (aiohttp's `os_error`/`certificate_error`, urllib3's `reason`, requests' first argument)."""
    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo and len(seen) < 12:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, a, None) for a in ("certificate_error", "os_error", "reason")]
        todo += [e.args[0] if e.args else None, e.__cause__, e.__context__]
    return seen


def tls_problem(exc: BaseException) -> TransportError | None:
    """A TLS failure that no retry fixes, as a fatal `tls_error`; None for anything else.

    An untrusted or mismatched certificate, or a handshake that cannot agree (plain HTTP on an
    https URL), fails the same way every time. A handshake cut short (EOF, reset) can be load, and
    stays a retried `connection_error`, as does any TLS error not known to be configuration.
    """
    for e in _causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            why = getattr(e, "verify_message", None) or getattr(e, "reason", None) or "verify failed"
            return TransportError(reasons.TLS_ERROR,
                                  f"the server's TLS certificate is not trusted ({why}); {CA_HINT}")
        if isinstance(e, ssl.CertificateError):
            return TransportError(reasons.TLS_ERROR,
                                  f"the server's TLS certificate does not match the host; {CA_HINT}")
        if isinstance(e, ssl.SSLError) and e.reason in _TLS_CONFIG_REASONS:
            return TransportError(reasons.TLS_ERROR, f"TLS handshake failed ({e.reason}); is the URL's "
                                               "scheme right (https on a plain HTTP port), and the "
                                               "server's TLS set-up?")
    return None


def _os_name(exc: BaseException) -> str:
    """The innermost OS-level error's type (ConnectionRefusedError, ...): names, never messages."""
    names = [type(e).__name__ for e in _causes(exc) if isinstance(e, OSError)]
    return names[-1] if names else type(exc).__name__


# The same words for the same failure, whichever client met it.
def _slow_connect(where: str, seconds: float) -> TransportError:
    return TransportError(reasons.TIMEOUT, f"connect to {where} took over {seconds:g}s", unreachable=True)


def _no_connection(exc: BaseException, where: str) -> TransportError:
    return TransportError(reasons.CONNECTION_ERROR, f"{_os_name(exc)} connecting to {where}", unreachable=True)


def _silent(read: float) -> TransportError:
    return TransportError(reasons.TIMEOUT, f"no answer within read_timeout_s={read:g}")


def _too_long(whole: float) -> TransportError:
    return TransportError(reasons.TIMEOUT,
                          f"answer not complete within connect_timeout_s + read_timeout_s = {whole:g}s")


DROPPED = "the server closed the connection without answering"


def connect_probe(url: str, timeout: float) -> None:
    """Open one connection to the endpoint (and, for https, complete the TLS handshake); send nothing.

    For http through a proxy only the proxy is reached. Raises `TransportError` as `tls_probe` does:
    `unreachable` when no connection could be made (refused, no such host, a connect timeout).
    """
    parts = urlsplit(url)
    if parts.scheme == "https":
        tls_probe(url, timeout)
        return
    if parts.scheme != "http" or not parts.hostname:
        return
    proxy = proxy_for(url)
    if proxy:
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or "", p.port or 80
    else:
        host, port = parts.hostname, parts.port or 80
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
    except TimeoutError:
        raise _slow_connect(f"{host}:{port}", timeout) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _no_connection(exc, f"{host}:{port}") from None
    finally:
        conn.close()


def tls_probe(url: str, timeout: float) -> None:
    """Connect to an https endpoint and complete the TLS handshake, through the proxy if one applies.

    No HTTP request is sent. Raises a fatal `TransportError` for a TLS problem, a retryable one if the
    host cannot be reached; returns at once for http URLs and for proxies it cannot tunnel (https).
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return
    host, port = parts.hostname, parts.port or 443
    ctx = ssl_context()
    proxy = proxy_for(url)
    if proxy:
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.scheme != "http" or not p.hostname:
            return
        conn = http.client.HTTPSConnection(p.hostname, p.port or 80, timeout=timeout, context=ctx)
        auth = {}
        if p.username:
            import base64

            pair = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
            auth["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode()
        conn.set_tunnel(host, port, headers=auth)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    try:
        conn.connect()
    except TimeoutError:
        raise _slow_connect(f"{host}:{port}", timeout) from None
    except (OSError, http.client.HTTPException) as exc:
        raise tls_problem(exc) or _no_connection(exc, f"{host}:{port}") from None
    finally:
        conn.close()


# -- aiohttp -----------------------------------------------------------------------------------

class AiohttpTransport:
    """One `aiohttp.ClientSession` per engine, made in the engine's loop on first use.

    Tuned for thousands of small POSTs a second on two cores: one `ClientTimeout` for the session, the
    URL parsed once, no cookie jar, no User-Agent, and the proxy resolved once here rather than with
    `trust_env=True`, which looks up `~/.netrc` and the proxy variables on a worker thread for every
    request (measured: 500 instead of 160 us of CPU per request; see benchmarks/README.md).
    """

    def __init__(self, url: str, headers: Mapping[str, str], *, pool_size: int,
                 connect_timeout: float, read_timeout: float) -> None:
        from yarl import URL

        check_headers(headers)
        self._url = URL(url, encoded=True)
        if self._url.scheme not in ("http", "https") or not self._url.host:
            raise ValueError(f"not an http(s) URL: {self._url.with_query(None)!s}")
        self._headers = dict(headers)
        self._ssl = ssl_context() if self._url.scheme == "https" else None
        proxy = proxy_for(url)
        self._proxy = URL(proxy if "://" in proxy else f"http://{proxy}") if proxy else None
        self._proxy_auth = None
        if self._proxy is not None and self._proxy.user:
            import aiohttp

            self._proxy_auth = aiohttp.BasicAuth(self._proxy.user, self._proxy.password or "")
            self._proxy = self._proxy.with_user(None)
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._where = f"{self._url.host}:{self._url.port}"
        self._session: Any = None

    def __repr__(self) -> str:
        return f"AiohttpTransport({self._where})"

    def _open(self) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=0,
                                         keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=300,
                                         ssl=self._ssl if self._ssl is not None else True)
        timeout = aiohttp.ClientTimeout(total=self._connect_timeout + self._read_timeout,
                                        sock_connect=self._connect_timeout, sock_read=self._read_timeout)
        return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self._headers,
                                     cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",),
                                     trust_env=False)

    async def post(self, body: bytes, headers: Mapping[str, str] | None = None
                   ) -> tuple[int, Mapping[str, str], bytes]:
        import aiohttp

        if headers:
            check_headers(headers)
        if self._session is None:
            self._session = self._open()
        try:
            async with self._session.post(self._url, data=body, headers=headers, allow_redirects=False,
                                          proxy=self._proxy, proxy_auth=self._proxy_auth) as resp:
                return resp.status, resp.headers, await resp.read()
        except aiohttp.ConnectionTimeoutError:
            raise _slow_connect(self._where, self._connect_timeout) from None
        except aiohttp.SocketTimeoutError:
            raise _silent(self._read_timeout) from None
        except asyncio.TimeoutError:
            raise _too_long(self._connect_timeout + self._read_timeout) from None
        except aiohttp.ClientHttpProxyError as exc:
            raise TransportError(reasons.CONNECTION_ERROR,
                                 f"the proxy refused the tunnel (HTTP {exc.status})") from None
        except aiohttp.ClientConnectorError as exc:
            raise tls_problem(exc) or _no_connection(exc, self._where) from None
        except aiohttp.ServerDisconnectedError:
            raise TransportError(reasons.CONNECTION_ERROR, DROPPED) from None
        except aiohttp.ClientPayloadError:
            raise TransportError(reasons.CONNECTION_ERROR, "the answer was cut off") from None
        except aiohttp.ClientResponseError:
            raise TransportError(reasons.CONNECTION_ERROR, "the answer is not valid HTTP") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(reasons.CONNECTION_ERROR,
                                 f"{_os_name(exc)} while exchanging with {self._where}") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


# -- threaded clients --------------------------------------------------------------------------

def _read_within(resp: Any, deadline: float, whole: float) -> bytes:
    """A urllib3 response's body, a read at a time, ending as `timeout` past `deadline`.

    The libraries' read timeout is per read: a server dripping a byte at a time never trips it.
    """
    parts = []
    while chunk := resp.read1(1 << 16):
        parts.append(chunk)
        if time.monotonic() > deadline:
            raise _too_long(whole)
    return b"".join(parts)


def _finish(resp: Any, deadline: float, whole: float) -> bytes:
    """Read the body and give the connection back to the pool, kept alive or closed on failure."""
    try:
        if 100 <= resp.status < 200:
            # http.client skips 100 Continue only: after a 102 or 103 the real answer is still on the
            # wire, and the next request on this connection would read it as its own.
            raise TransportError(reasons.CONNECTION_ERROR,
                                 f"the server sent an interim answer ({resp.status}) that this client "
                                 "cannot skip; use limits.http_client: aiohttp")
        data = _read_within(resp, deadline, whole)
    except BaseException:
        resp.close()  # a half-read connection cannot carry another request
        resp.release_conn()  # the pool blocks at its size: a slot never given back is lost for good
        raise
    resp.release_conn()
    return data


class Urllib3Client:
    """A blocking urllib3 pool (requests' own transport), used by `ThreadedTransport`."""

    def __init__(self, url: str, headers: Mapping[str, str], *, pool_size: int,
                 connect_timeout: float, read_timeout: float) -> None:
        import urllib3

        check_headers(headers)
        parts = urlsplit(url)
        self._url = url
        self._headers = dict(headers)
        self._where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        self._timeouts = (connect_timeout, read_timeout)
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._whole = connect_timeout + read_timeout
        kw: dict[str, Any] = dict(num_pools=1, maxsize=pool_size, block=True)
        if parts.scheme == "https":
            kw["ssl_context"] = ssl_context()
        proxy = proxy_for(url)
        # The manager, not one of its pools: through a proxy an http request goes in absolute form,
        # which only the manager writes.
        self._manager = urllib3.ProxyManager(proxy, **kw) if proxy else urllib3.PoolManager(**kw)

    def post(self, body: bytes, headers: Mapping[str, str] | None = None) -> tuple[int, Mapping[str, str], bytes]:
        from urllib3.exceptions import HTTPError

        if headers:
            check_headers(headers)
        deadline = time.monotonic() + self._whole
        try:
            r = self._manager.urlopen("POST", self._url, body=body,
                                      headers={**self._headers, **headers} if headers else self._headers,
                                      retries=False,
                                      redirect=False, timeout=self._timeout, preload_content=False)
            return r.status, r.headers, _finish(r, deadline, self._whole)
        except TransportError:
            raise
        except (HTTPError, OSError) as exc:
            raise _threaded_error(exc, self._where, *self._timeouts) from None

    def close(self) -> None:
        self._manager.clear()


class RequestsClient:
    """One pooled `requests.Session`, used by `ThreadedTransport`.

    `trust_env` is off: this module reads the environment once for every client (CA bundle, proxy),
    where requests would read it, and `~/.netrc`, again for each request.
    """

    def __init__(self, url: str, headers: Mapping[str, str], *, pool_size: int,
                 connect_timeout: float, read_timeout: float) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        check_headers(headers)
        parts = urlsplit(url)
        self._url = url
        self._where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        self._timeouts = (connect_timeout, read_timeout)
        self._whole = connect_timeout + read_timeout
        self._proxies = {parts.scheme: proxy_for(url)}
        ctx = ssl_context() if parts.scheme == "https" else None

        class Adapter(HTTPAdapter):
            def init_poolmanager(self, *args: Any, **kw: Any) -> None:
                if ctx is not None:
                    kw["ssl_context"] = ctx
                super().init_poolmanager(*args, **kw)

            def proxy_manager_for(self, proxy: str, **kw: Any) -> Any:
                if ctx is not None:
                    kw["ssl_context"] = ctx
                return super().proxy_manager_for(proxy, **kw)

        self._session = requests.Session()
        self._session.trust_env = False
        self._session.headers.update(headers)
        adapter = Adapter(pool_connections=1, pool_maxsize=pool_size, pool_block=True, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def post(self, body: bytes, headers: Mapping[str, str] | None = None) -> tuple[int, Mapping[str, str], bytes]:
        import requests
        from urllib3.exceptions import HTTPError

        if headers:
            check_headers(headers)
        deadline = time.monotonic() + self._whole
        try:
            r = self._session.post(self._url, data=body, headers=headers, timeout=self._timeouts,
                                   proxies=self._proxies, allow_redirects=False, stream=True)
            return r.status_code, r.headers, _finish(r.raw, deadline, self._whole)
        except TransportError:
            raise
        except (requests.RequestException, HTTPError, OSError) as exc:  # urllib3's own while streaming
            raise _threaded_error(exc, self._where, *self._timeouts) from None

    def close(self) -> None:
        self._session.close()


def _threaded_error(exc: BaseException, where: str, connect: float, read: float) -> TransportError:
    """urllib3's and requests' exceptions as a `TransportError`, by what they wrap."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProxyError, ReadTimeoutError

    tls = tls_problem(exc)
    if tls is not None:
        return tls
    causes = _causes(exc)
    # urllib3 2 makes NewConnectionError (refused, no route, no name) a kind of ConnectTimeoutError.
    if any(isinstance(e, NewConnectionError) for e in causes) and not any(
            isinstance(e, TimeoutError) for e in causes):
        return _no_connection(exc, where)
    if any(isinstance(e, ConnectTimeoutError) for e in causes):
        return _slow_connect(where, connect)
    if any(isinstance(e, (ReadTimeoutError, TimeoutError)) for e in causes):
        return _silent(read)
    if any(isinstance(e, ProxyError) for e in causes):
        return TransportError(reasons.CONNECTION_ERROR, f"{_os_name(exc)} through the proxy to {where}")
    if any(isinstance(e, http.client.RemoteDisconnected) for e in causes):
        return TransportError(reasons.CONNECTION_ERROR, DROPPED)
    if any(type(e).__name__ in ("IncompleteRead", "InvalidChunkLength") for e in causes):
        return TransportError(reasons.CONNECTION_ERROR, "the answer was cut off")
    return TransportError(reasons.CONNECTION_ERROR, f"{_os_name(exc)} while exchanging with {where}")


class ThreadedTransport:
    """A blocking client run in a thread pool of the task's concurrency, awaited from the event loop."""

    def __init__(self, client: Urllib3Client | RequestsClient, pool_size: int) -> None:
        self._client = client
        self._threads = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="bi-http")

    async def post(self, body: bytes, headers: Mapping[str, str] | None = None
                   ) -> tuple[int, Mapping[str, str], bytes]:
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._client.post, body, headers)

    async def aclose(self) -> None:
        self._threads.shutdown(wait=False)
        self._client.close()


# -- choosing ------------------------------------------------------------------------------------

CLIENTS = ("aiohttp", "urllib3", "requests")


def make_transport(kind: str, url: str, headers: Mapping[str, str], *, pool_size: int,
                   connect_timeout: float, read_timeout: float) -> Any:
    """The transport for `limits.http_client`; raises a fatal `TransportError` for a bad header or
    CA bundle, before any connection is made."""
    kw = dict(pool_size=pool_size, connect_timeout=connect_timeout, read_timeout=read_timeout)
    if kind in ("aiohttp", "asyncio"):  # asyncio: the deleted client's name, kept for old configs
        return AiohttpTransport(url, headers, **kw)
    if kind not in ("urllib3", "requests"):
        raise ValueError(f"unknown http client {kind!r}; expected one of {', '.join(CLIENTS)}")
    client = RequestsClient(url, headers, **kw) if kind == "requests" else Urllib3Client(url, headers, **kw)
    return ThreadedTransport(client, pool_size)
