"""The retry policy: what a failed attempt is, whether it is tried again, and how long to wait first.

The retry loop itself is the caller's (`udfs.caller`); urllib3's `Retry` only parses `Retry-After`
here (seconds or an HTTP date). Its own loop cannot do what a batch job needs: it sleeps while holding
the connection and the in-flight slot, its jitter is added, not "full", it has no per-row time
budget, it cannot split a batch the endpoint refuses, and it would hide the 429s that AIMD must see.

Example::

    failure = http_failure(503, {"retry-after": "2"}, "busy", rows=1, spec=RetrySpec())
    wait = backoff(attempt=1, retry_after=failure.retry_after, spec=RetrySpec())   # 2 s and a little jitter
"""

from __future__ import annotations

import json
import random
from typing import Callable, Mapping

from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from udfs import reasons
from udfs.outcome import MAX_ERROR_CHARS
from udfs.spec import RetrySpec

# Statuses that refuse a batched request as a whole (too large, one bad input): the batch is split in
# halves until only the bad rows fail.
SPLIT_STATUSES = (400, 413, 422)
# Statuses that speak for the endpoint as a whole, not for the request: the task pauses (`udfs.limits`).
# Of these only a 429 speaks of a rate (the governor learns one); a 503 is an endpoint not up yet.
RATE_LIMITED = 429
GOVERNED_STATUSES = (RATE_LIMITED, 503)

_RETRY_AFTER = Retry(total=None, respect_retry_after_header=True, retry_after_max=3600)


class Failure(Exception):
    """One attempt's failure: `kind` is the reason code, `retry_after` the server's wish if any."""

    def __init__(self, kind: str, detail: str = "", *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None, split: bool = False, governed: bool = False) -> None:
        super().__init__(kind)
        self.kind, self.detail, self.status = kind, detail, status
        self.retryable, self.retry_after, self.split = retryable, retry_after, split
        # A 429, a 503 or no connection: the task's governor holds the retry back until the endpoint
        # answers again, and the row's time budget (not `max_attempts`) bounds it.
        self.governed = governed
        # Which token the refused request carried (`udfs.auth.Credentials.generation`), for a 401/403.
        self.auth_generation: int | None = None

    def reason(self, note: str = "") -> str:
        # With no detail, a note reads `timeout: (gave up ...)`, as with one: `code: detail (note)`.
        return f"{self.kind}: {self.detail}" if self.detail else (f"{self.kind}:" if note else self.kind)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` value (seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return _RETRY_AFTER.parse_retry_after(value)
    except InvalidHeader:
        return None


def http_failure(status: int, headers: Mapping[str, str], body_text: str, *, rows: int,
                 spec: RetrySpec) -> Failure:
    """A non-2xx answer as a `Failure`: retryable if its status is in `retry.statuses`, split if a
    batch of `rows` was refused as a whole."""
    return Failure(reasons.http(status), error_message(body_text), status=status,
                   retryable=status in spec.statuses, retry_after=parse_retry_after(headers.get("retry-after")),
                   split=rows > 1 and status in SPLIT_STATUSES, governed=status in GOVERNED_STATUSES)


def backoff(attempt: int, retry_after: float | None, spec: RetrySpec,
            uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait before attempt `attempt + 1`: full jitter over an exponential ceiling, or the
    server's `Retry-After` in full plus a little jitter so that tasks do not retry in lockstep."""
    ceiling = min(spec.backoff_max_s, spec.backoff_base_s * (2 ** (attempt - 1)))
    if retry_after is not None:
        return retry_after + uniform(0, max(0.05, min(spec.backoff_base_s, ceiling)))
    return uniform(0, ceiling)


def error_message(body_text: str) -> str:
    """The endpoint's own error message when it sends one (`{"message": ...}`), else the body's start."""
    text = body_text[:4000]
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message", value)
            if value:
                code = body.get("error_code")
                return (f"{code}: {value}" if isinstance(code, str) else str(value))[:MAX_ERROR_CHARS]
    if "<html" in text[:200].lower():
        return "HTML error page"
    return " ".join(text.split())[:MAX_ERROR_CHARS]
