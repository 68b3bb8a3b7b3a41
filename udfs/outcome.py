"""One row's outcome: its response or vector, or an error with a reason; with status, attempts,
latency and tokens. The engine never raises for a row: every failure is an `Outcome`.

Example::

    Outcome(response="A table format.", http_status=200, attempts=1, latency_ms=52.3, sent_at=1735689600.25)
    Outcome.failed("http_503: busy (gave up after 6 attempts, 13.0s)", http_status=503, attempts=6)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The `error` column holds at most this many characters (README: "cut to 500 characters").
MAX_ERROR_CHARS = 500
# A row the run did not send because `run.budget` was spent: it is never written, so it stays pending.
UNSENT = "unsent"
# A row an endpoint passed on unanswered (a 429 or 503 while an overflow endpoint can take it): the
# router sends it on, so it is never written either.
HANDED_OFF = "handed_off"


@dataclass
class Outcome:
    response: str | None = None
    embedding: list[float] | None = None
    status: str = "ok"
    error: str | None = None
    http_status: int | None = None
    attempts: int = 0
    latency_ms: float | None = None
    # When the first attempt left (wall clock, epoch seconds; latency_ms runs from it). None: never sent.
    sent_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Structured output: the valid answer as canonical JSON, for the job's `parsed` column.
    parsed_json: str | None = None
    # The endpoint that answered (with several endpoints, the last one tried; `udfs.router`).
    endpoint: str | None = None

    @classmethod
    def unsent(cls, attempts: int = 0) -> Outcome:
        return cls(status=UNSENT, attempts=attempts)

    @classmethod
    def handed_off(cls, reason: str, **kw: Any) -> Outcome:
        return cls(status=HANDED_OFF, error=reason[:MAX_ERROR_CHARS], **kw)

    @classmethod
    def failed(cls, reason: str, **kw: Any) -> Outcome:
        return cls(status="error", error=reason[:MAX_ERROR_CHARS], **kw)
