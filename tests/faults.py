"""Faults on command for the local endpoint: a script of replies per prompt, every request timed.

`FaultPlan` is a `LocalEndpoint.fault` hook. Each prompt may have a script: the reply to its first,
second, ... request (`None` lets the toy model answer), and an `always` reply once the script is
used up. Replies are built by the helpers below; `stall` and `reset_mid_body` take over the raw
socket, which is the only way to produce a read timeout or a connection reset halfway through a body.

Example::

    plan = FaultPlan({"flaky": [server_error(503)]}, always={"broken": malformed_json()})
    with LocalEndpoint(fault=plan) as ep:
        ...                                   # "flaky" fails once then answers; "broken" never does
    plan.count("flaky")                      # 2
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Union

from jobs.local.stand_in import Request

Reply = Union[tuple[int, dict[str, str], bytes], Callable[[BaseHTTPRequestHandler], None], "FromRequest", None]

HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
             b"<body><h1>Bad Gateway</h1><p>The upstream server is unavailable.</p></body></html>")


def prompts_of(body: Any) -> list[str]:
    """The prompts a request carries, whatever the protocol (driver proxy, completions, custom model)."""
    if not isinstance(body, dict):
        return []
    if isinstance(body.get("prompt"), str):
        return [body["prompt"]]
    if isinstance(body.get("dataframe_records"), list):
        return [r.get("prompt") for r in body["dataframe_records"] if isinstance(r, dict)]
    if isinstance(body.get("input"), list):
        return [str(t) for t in body["input"]]
    return []


@dataclass(frozen=True)
class FromRequest:
    """A reply made from the request itself (an error that quotes the request's headers)."""

    make: Callable[[Request], Reply]


@dataclass
class FaultPlan:
    scripts: dict[str, list[Reply]] = field(default_factory=dict)
    always: dict[str, Reply] = field(default_factory=dict)
    # A whole-request rule, for batched requests: replies instead of the scripts when it returns one.
    rule: Callable[[list[str]], Reply] | None = None
    # (monotonic time, prompts of the request), one entry per request received.
    log: list[tuple[float, tuple[str, ...]]] = field(default_factory=list)
    _seen: Counter[tuple[str, ...]] = field(default_factory=Counter, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, req: Request) -> Reply:
        prompts = prompts_of(req.body)
        with self._lock:
            n = self._seen[tuple(prompts)]
            self._seen[tuple(prompts)] += 1
            self.log.append((time.monotonic(), tuple(prompts)))
        reply = self.rule(prompts) if self.rule is not None else None
        if reply is None and len(prompts) == 1:
            script = self.scripts.get(prompts[0], [])
            reply = script[n] if n < len(script) else self.always.get(prompts[0])
        return reply.make(req) if isinstance(reply, FromRequest) else reply

    def clear(self) -> None:
        """No more faults: every request gets the model's answer (the log is kept)."""
        self.scripts, self.always, self.rule = {}, {}, None

    def count(self, prompt: str) -> int:
        """Requests that carried `prompt`, alone or in a batch."""
        return sum(1 for _, p in self.log if prompt in p)

    def counts(self) -> Counter[str]:
        return Counter(p for _, ps in self.log for p in ps)

    def times(self, prompt: str) -> list[float]:
        return [t for t, p in self.log if prompt in p]


# -- replies -------------------------------------------------------------------------------------------

def json_error(status: int, message: str, code: str = "ERROR", headers: dict[str, str] | None = None) -> Reply:
    """An error the way Databricks serving writes one: `{"error_code", "message"}`."""
    return status, dict(headers or {}), json.dumps({"error_code": code, "message": message}).encode()


def server_error(status: int) -> Reply:
    return json_error(status, f"transient failure {status}", code="TEMPORARILY_UNAVAILABLE")


def throttled(retry_after: str) -> Reply:
    return json_error(429, "rate limit exceeded", code="REQUEST_LIMIT_EXCEEDED", headers={"Retry-After": retry_after})


def malformed_json() -> Reply:
    return 200, {}, b'{"choices": [{"text": '


def json_answer(value: Any) -> Reply:
    return 200, {}, json.dumps(value).encode()


def chat_answer(content: str, usage: dict[str, int] | None = None) -> Reply:
    """An `llm/v1/chat` answer whose message is `content`, with `usage` if given."""
    return json_answer({"choices": [{"message": {"role": "assistant", "content": content}}],
                        **({"usage": usage} if usage else {})})


def html_page(status: int) -> Reply:
    return status, {"Content-Type": "text/html; charset=utf-8"}, HTML_PAGE


def stall(seconds: float) -> Reply:
    """Say nothing for `seconds` (longer than the client's read timeout), then hang up."""
    def reply(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
    return reply


def reset_mid_body() -> Reply:
    """Send the status line, headers and part of the body, then reset the connection (TCP RST)."""
    def reply(handler: BaseHTTPRequestHandler) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
        try:
            handler.wfile.write(head + b'"Answer to: half of a bo')
            handler.wfile.flush()
            time.sleep(0.05)  # let the client read the headers and start on the body
            # SO_LINGER with a zero timeout turns close() into a reset instead of an orderly FIN.
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()
        except OSError:
            pass
    return reply


# -- the endpoint as a whole: rate-limit windows and cold starts (tests/test_endpoint_faults.py) ---------

class _SinceFirst:
    """A fault whose behaviour depends on the time since the first request it saw."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._lock = threading.Lock()

    def _elapsed(self) -> float:
        """Seconds since the first request (0 for that one); call with `_lock` held."""
        now = time.monotonic()
        self._start = self._start if self._start is not None else now
        return now - self._start


class FixedWindow(_SinceFirst):
    """A fault: at most `limit` requests per `window_s`, windows counted from the first request; past
    it 429 `REQUEST_LIMIT_EXCEEDED` with no `Retry-After`, until the window resets (as AI Gateway and
    pay-per-token endpoints answer). `served` and `refused` count requests."""

    def __init__(self, limit: int, window_s: float) -> None:
        super().__init__()
        self.limit, self.window_s = limit, window_s
        self.served = self.refused = 0
        self.per_window: Counter[int] = Counter()
        self.log: list[tuple[float, bool]] = []

    def __call__(self, req: Request) -> Reply:
        with self._lock:
            t = self._elapsed()
            window = int(t // self.window_s)
            self.per_window[window] += 1
            over = self.per_window[window] > self.limit
            self.refused += over
            self.served += 1
            self.log.append((round(t, 3), over))
        if over:
            return json_error(429, "Exceeded the endpoint's rate limit of requests per window",
                              code="REQUEST_LIMIT_EXCEEDED")
        return None


class ColdStart(_SinceFirst):
    """A fault: 503 for `seconds` after the first request (an endpoint scaling from zero), then answers."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.unavailable = self.requests = 0
        self.log: list[tuple[float, list[str], bool]] = []

    def __call__(self, req: Request) -> Reply:
        with self._lock:
            t = self._elapsed()
            cold = t < self.seconds
            self.requests += 1
            self.unavailable += cold
            self.log.append((round(t, 3), prompts_of(req.body)[:1], cold))
        if cold:
            return json_error(503, "The endpoint is scaling up from zero; retry later",
                              code="TEMPORARILY_UNAVAILABLE")
        return None
