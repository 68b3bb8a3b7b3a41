"""HTTP for one task: keep-alive connections to one endpoint, as many as the task's concurrency.

All transports have one coroutine, `post(body) -> (status, headers, data)`, with lower-case header
names, and raise `TransportError(kind, detail)` with kind `timeout` or `connection_error`.

- `AsyncHttpTransport` (default, `limits.http_client: asyncio`): HTTP/1.1 over asyncio streams, in
  the engine's event loop. Written by hand because at thousands of requests per second on two cores
  the per-request cost of the thread-per-request clients is what bounds throughput: urllib3 parses
  headers with `email.parser` and each of C threads must win the GIL back after every socket wait
  (see benchmarks/README.md). It speaks what a JSON POST needs and no more: Content-Length bodies,
  chunked answers, keep-alive, TLS through `ssl`'s default context.
- `ThreadedTransport` over `urllib3` or `requests` (`limits.http_client: urllib3 | requests`), run in
  a thread pool: for an HTTP(S) proxy from the environment (chosen automatically then), or setups that
  rely on requests' behaviour (REQUESTS_CA_BUNDLE, .netrc).
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping
from urllib.parse import urlsplit


class TransportError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class _Closed(Exception):
    """The server closed a kept-alive connection before answering: safe to resend on a new one."""


if sys.version_info >= (3, 11):
    def _within(seconds: float):
        return asyncio.timeout(seconds)
else:  # pragma: no cover - Databricks runtimes before 15 run Python 3.10
    class _within:  # a minimal asyncio.timeout for 3.10
        def __init__(self, seconds: float) -> None:
            self._seconds = seconds

        async def __aenter__(self) -> None:
            task = asyncio.current_task()
            self._handle = asyncio.get_running_loop().call_later(self._seconds, task.cancel)

        async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
            self._handle.cancel()
            if exc_type is asyncio.CancelledError:
                raise TimeoutError from None
            return False


class AsyncHttpTransport:
    def __init__(self, url: str, headers: Mapping[str, str], *, pool_size: int,
                 connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        lines = [f"POST {path} HTTP/1.1", f"Host: {host_header}", "Connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        # Read timeouts by one watchdog, not a timer per request: at thousands of requests per second
        # the timer heap costs more than the HTTP parsing. A deadline may fire up to `_tick` late.
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._tick = min(0.1, read_timeout / 10)
        self._watchdog: asyncio.TimerHandle | None = None

    async def post(self, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        if self._idle:
            try:
                return await self._exchange(self._idle.pop(), body)
            except _Closed:
                pass  # a stale keep-alive connection: resend once on a fresh one, as urllib3 does
        try:
            return await self._exchange(await self._connect(), body)
        except _Closed:
            raise TransportError("connection_error", "the server closed the connection without answering") from None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with _within(self._connect_timeout):
                return await asyncio.open_connection(self._host, self._port, ssl=self._ssl, limit=1 << 20)
        except TimeoutError:
            raise TransportError("timeout", f"connect to {self._host}:{self._port} took over "
                                            f"{self._connect_timeout:g}s") from None
        except OSError as exc:
            raise TransportError("connection_error", f"{type(exc).__name__} connecting to "
                                                     f"{self._host}:{self._port}") from None

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        reader, writer = conn
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = loop.time() + self._read_timeout
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._tick, self._expire)
        try:
            writer.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            status, headers, data, keep = await _read_response(reader)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            if hasattr(task, "uncancel"):
                task.uncancel()
            writer.close()
            raise TransportError("timeout", f"no answer within read_timeout_s={self._read_timeout:g}") from None
        except _Closed:
            writer.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            writer.close()
            raise TransportError("connection_error", f"{type(exc).__name__} while reading the answer") from None
        finally:
            self._deadlines.pop(task, None)
        if keep and len(self._idle) < self._pool_size:
            self._idle.append(conn)
        else:
            writer.close()
        return status, headers, data

    def _expire(self) -> None:
        now = asyncio.get_running_loop().time()
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._watchdog = (asyncio.get_running_loop().call_later(self._tick, self._expire)
                          if self._deadlines else None)

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        while self._idle:
            self._idle.pop()[1].close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, bool]:
    while True:
        # The whole head in one read: a readline per header costs more than the rest of the request.
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _Closed() from None
            raise
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        status = int(rest[:3])
        headers: dict[str, str] = {}
        for line in lines:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if status >= 200 or status == 101:
            break  # skip interim 1xx answers
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        data = await _read_chunked(reader)
    elif "content-length" in headers:
        data = await reader.readexactly(int(headers["content-length"]))
    else:
        data, keep = await reader.read(), False
    return status, headers, data, keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


class Urllib3Client:
    """A blocking urllib3 pool (requests' own transport), used by `ThreadedTransport`."""

    def __init__(self, url: str, headers: Mapping[str, str], *, pool_size: int,
                 connect_timeout: float, read_timeout: float) -> None:
        import urllib3

        parts = urlsplit(url)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = dict(headers)
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        proxy = proxy_for(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if proxy:
            self._pool = urllib3.ProxyManager(proxy, num_pools=1, maxsize=pool_size, block=True
                                              ).connection_from_url(origin)
        else:
            self._pool = urllib3.connection_from_url(origin, maxsize=pool_size, block=True)

    def post(self, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        from urllib3.exceptions import ConnectTimeoutError, HTTPError, ReadTimeoutError, TimeoutError

        try:
            r = self._pool.urlopen("POST", self._path, body=body, headers=self._headers, retries=False,
                                   timeout=self._timeout, preload_content=True, assert_same_host=False)
        except (ReadTimeoutError, ConnectTimeoutError, TimeoutError) as exc:
            raise TransportError("timeout", type(exc).__name__) from None
        except (HTTPError, OSError) as exc:
            raise TransportError("connection_error", type(exc).__name__) from None
        return r.status, r.headers, r.data

    def close(self) -> None:
        self._pool.close()


class RequestsClient:
    """One pooled `requests.Session`, used by `ThreadedTransport`."""

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
        except requests.RequestException as exc:
            raise TransportError("connection_error", type(exc).__name__) from None
        return r.status_code, r.headers, r.content

    def close(self) -> None:
        self._session.close()


class ThreadedTransport:
    """A blocking client run in a thread pool of the task's concurrency, awaited from the event loop."""

    def __init__(self, client: Urllib3Client | RequestsClient, pool_size: int) -> None:
        self._client = client
        self._threads = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="bi-http")

    async def post(self, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._client.post, body)

    async def aclose(self) -> None:
        self._threads.shutdown(wait=False)
        self._client.close()


def make_transport(kind: str, url: str, headers: Mapping[str, str], *, pool_size: int,
                   connect_timeout: float, read_timeout: float) -> AsyncHttpTransport | ThreadedTransport:
    kw = dict(pool_size=pool_size, connect_timeout=connect_timeout, read_timeout=read_timeout)
    if kind == "asyncio" and not proxy_for(url):
        return AsyncHttpTransport(url, headers, **kw)
    client = RequestsClient(url, headers, **kw) if kind == "requests" else Urllib3Client(url, headers, **kw)
    return ThreadedTransport(client, pool_size)


def proxy_for(url: str) -> str | None:
    """The proxy from HTTP(S)_PROXY for this URL, honouring NO_PROXY, as requests would."""
    host = urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1") or urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(urlsplit(url).scheme)
