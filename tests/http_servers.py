"""Real HTTP servers on 127.0.0.1 for the transport conformance suite (tests/test_transport.py).

- `AioServer`: aiohttp's web server (optionally TLS), answering with the local endpoint's toy model.
- `UvicornServer`: uvicorn (h11) serving a small ASGI app with the same model, and a body limit it
  enforces the way gateways do: a 413 from the Content-Length alone, the body never read.
- `RawServer`: a socket server scripted byte by byte, for what frameworks will not send on demand:
  1xx before the answer, trailers, a body dripped or cut off, an answer before the body is read, a
  connection closed after the request. Its request parsing is deliberately minimal (test code).
- `ForwardProxy`: an HTTP proxy (absolute-form requests and CONNECT tunnels) that sends everything
  to 127.0.0.1, whatever host it is asked for, and records the targets.
- `throwaway_ca()`: a throwaway CA (trustme) and a certificate for 127.0.0.1, localhost and endpoint.test.

Every server counts the requests it saw in full (`requests`), keeps their prompts (`prompts`) and
the client connections it accepted (`connections`), so a test can compare them with `attempts`.

Example::

    with RawServer(drip(b'"slow"', every_s=0.1)) as srv:
        Engine(EngineSpec(url=srv.url + "/", ...)).call(["x"])
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from jobs.local.stand_in import answer
from tests.faults import prompts_of

PROXY_HOST = "endpoint.test"  # resolvable only through ForwardProxy: proof that the proxy was used
# What the machine may set that these servers' tests must control: CA bundles and proxies.
ENV_TLS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
ENV_PROXY = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
             "no_proxy")


class _Counts:
    def __init__(self) -> None:
        self.requests = 0
        self.prompts: list[list[str]] = []
        self.connections: set[Any] = set()
        self.lock = threading.Lock()

    def saw(self, conn: Any, body: Any) -> None:
        with self.lock:
            self.requests += 1
            self.prompts.append(prompts_of(body))
            self.connections.add(conn)

    def count(self, prompt: str) -> int:
        return sum(prompt in p for p in self.prompts)


def _model(path: str, raw: bytes) -> tuple[int, bytes]:
    try:
        body = json.loads(raw)
    except ValueError:
        return 400, b'{"message": "not JSON"}'
    status, value = answer(path, body)
    return status, json.dumps(value).encode()


# -- aiohttp -------------------------------------------------------------------------------------

class AioServer(_Counts):
    def __init__(self, *, tls: ssl.SSLContext | None = None, keepalive_timeout: float = 75.0) -> None:
        super().__init__()
        self.tls = tls
        self.keepalive_timeout = keepalive_timeout
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        raw = await request.read()
        self.saw(request.transport.get_extra_info("peername"), _json_or_none(raw))
        status, data = _model(request.path, raw)
        return web.Response(status=status, body=data, content_type="application/json")

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.keepalive_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def __enter__(self) -> AioServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="aio-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


# -- uvicorn -------------------------------------------------------------------------------------

class UvicornServer(_Counts):
    """uvicorn with h11; bodies over `max_body` bytes get a 413 before a byte of them is read."""

    def __init__(self, *, timeout_keep_alive: float = 5.0, max_body: int | None = None) -> None:
        super().__init__()
        self.timeout_keep_alive = timeout_keep_alive
        self.max_body = max_body
        self.refused = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def app(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        length = int(dict(scope["headers"]).get(b"content-length", b"0"))
        if self.max_body is not None and length > self.max_body:
            with self.lock:
                self.refused += 1
            refusal = {"error_code": "BAD_REQUEST",
                       "message": f"request of {length} bytes over {self.max_body}"}
            await _asgi_send(send, 413, json.dumps(refusal).encode())
            return
        raw, more = b"", True
        while more:
            msg = await receive()
            raw += msg.get("body", b"")
            more = msg.get("more_body", False)
        self.saw(tuple(scope["client"]), _json_or_none(raw))
        await _asgi_send(send, *_model(scope["path"], raw))

    def __enter__(self) -> UvicornServer:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, http="h11", interface="asgi3", lifespan="off", log_level="warning",
                                access_log=False, timeout_keep_alive=self.timeout_keep_alive)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self._server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(10)


async def _asgi_send(send: Callable, status: int, data: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# -- a scripted socket server --------------------------------------------------------------------

@dataclass
class RawRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes | None  # None when the script answers before reading it
    n: int  # this request's number for its prompt(s): 0 for the first


# A script writes the answer to the socket itself; it returns False to close the connection after.
Script = Callable[[socket.socket, RawRequest], bool]


class RawServer(_Counts):
    def __init__(self, script: Script, *, read_body: Callable[[RawRequest], bool] = lambda r: True) -> None:
        super().__init__()
        self.script = script
        self.read_body = read_body
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._open: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RawServer:
        threading.Thread(target=self._accept, name="raw-server", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sock.close()
        for s in self._open:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                line, *fields = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
                req = RawRequest(method, target, headers, None, 0)
                if self.read_body(req):
                    length = int(headers.get("content-length", "0"))
                    while len(buf) < length:
                        data = conn.recv(1 << 20)
                        if not data:
                            return
                        buf += data
                    req.body, buf = buf[:length], buf[length:]
                    body = _json_or_none(req.body)
                    with self.lock:
                        req.n = sum(p == prompts_of(body) for p in self.prompts)
                    self.saw(peer, body)
                if not self.script(conn, req):
                    conn.close()
                    return
        except OSError:
            return


def ok_answer(extra: bytes = b"") -> Script:
    """The toy model's answer with Content-Length, keep-alive; `extra` goes before it (a 1xx)."""
    def script(conn: socket.socket, req: RawRequest) -> bool:
        status, data = _model(req.target, req.body or b"")
        conn.sendall(extra + _head(status, [("Content-Length", str(len(data)))]) + data)
        return True
    return script


def chunked_answer(trailers: list[tuple[str, str]] | None = None) -> Script:
    """The answer in chunks of 7 bytes (one with a chunk extension), then trailers if given."""
    def script(conn: socket.socket, req: RawRequest) -> bool:
        status, data = _model(req.target, req.body or b"")
        parts = [data[i:i + 7] for i in range(0, len(data), 7)]
        out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";ext=1" if i == 1 else b"", p)
                       for i, p in enumerate(parts))
        fields = [("Transfer-Encoding", "chunked")]
        if trailers:
            fields.append(("Trailer", ", ".join(k for k, _ in trailers)))
        tail = b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers or [])
        conn.sendall(_head(status, fields) + out + b"0\r\n" + tail + b"\r\n")
        return True
    return script


def closing_answer() -> Script:
    """The answer with `Connection: close`, then the server closes."""
    def script(conn: socket.socket, req: RawRequest) -> bool:
        status, data = _model(req.target, req.body or b"")
        conn.sendall(_head(status, [("Content-Length", str(len(data))), ("Connection", "close")]) + data)
        return False
    return script


def no_content(status: int = 204) -> Script:
    """An answer that has no body by definition (204, 304): no Content-Length, no chunks, no close."""
    def script(conn: socket.socket, req: RawRequest) -> bool:
        conn.sendall(_head(status, []))
        return True
    return script


def drip(every_s: float) -> Script:
    """The answer's head at once, then its body a byte every `every_s` seconds."""
    def script(conn: socket.socket, req: RawRequest) -> bool:
        status, data = _model(req.target, req.body or b"")
        conn.sendall(_head(status, [("Content-Length", str(len(data)))]))
        for i in range(len(data)):
            time.sleep(every_s)
            conn.sendall(data[i:i + 1])
        return True
    return script


def reset_mid_body(times: int = 1) -> Script:
    """For a prompt's first `times` requests: the head and half the body, then a TCP reset."""
    def script(conn: socket.socket, req: RawRequest) -> bool:
        status, data = _model(req.target, req.body or b"")
        if req.n >= times:
            return ok_answer()(conn, req)
        conn.sendall(_head(status, [("Content-Length", str(len(data)))]) + data[:len(data) // 2])
        time.sleep(0.05)
        _reset(conn)
        return False
    return script


def close_without_answer(unless: Callable[[RawRequest], bool] = lambda r: False) -> Script:
    """Read the whole request, then close without a byte of answer (a crashed worker behind a proxy)."""
    def script(conn: socket.socket, req: RawRequest) -> bool:
        if unless(req):
            return ok_answer()(conn, req)
        return False
    return script


def early_refusal(max_body: int) -> tuple[Callable[[RawRequest], bool], Script]:
    """(read_body, script): a body over `max_body` is refused with 413 from its Content-Length alone,
    and the connection closed at once with the body unread (the kernel resets it)."""
    def read_body(req: RawRequest) -> bool:
        return int(req.headers.get("content-length", "0")) <= max_body

    def script(conn: socket.socket, req: RawRequest) -> bool:
        if req.body is not None:
            return ok_answer()(conn, req)
        data = b'{"error_code": "BAD_REQUEST", "message": "request too large"}'
        conn.sendall(_head(413, [("Content-Length", str(len(data))), ("Connection", "close")]) + data)
        return False
    return read_body, script


def _head(status: int, fields: list[tuple[str, str]]) -> bytes:
    reason = {200: "OK", 204: "No Content", 304: "Not Modified", 413: "Payload Too Large"}.get(status, "X")
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _reset(conn: socket.socket) -> None:
    # SO_LINGER with a zero timeout turns close() into a reset instead of an orderly FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


# -- a forward proxy -----------------------------------------------------------------------------

class ForwardProxy:
    def __init__(self) -> None:
        self.targets: list[str] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ForwardProxy:
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(1 << 16)
            if not data:
                conn.close()
                return
            buf += data
        method, target, _ = buf.split(b"\r\n", 1)[0].decode().split(" ", 2)
        authority = target if method == "CONNECT" else target.split("://", 1)[1].split("/", 1)[0]
        self.targets.append(f"{method} {authority}")
        upstream = socket.create_connection(("127.0.0.1", int(authority.rsplit(":", 1)[1])))
        if method == "CONNECT":
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            buf = buf.partition(b"\r\n\r\n")[2]
        upstream.sendall(buf)  # absolute-form as received: servers must accept it (RFC 9112 3.2.2)
        threading.Thread(target=_pipe, args=(upstream, conn), daemon=True).start()
        _pipe(conn, upstream)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# -- TLS -------------------------------------------------------------------------------------------

def throwaway_ca() -> tuple[Any, ssl.SSLContext]:
    """A trustme CA and a server context with its certificate for the loopback names."""
    import trustme

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", PROXY_HOST).configure_cert(server)
    return ca, server
