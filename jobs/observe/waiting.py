"""What a run waits for, said when nothing has come back for a while.

Progress speaks after each committed chunk; between two chunks a run can be silent for minutes: an
endpoint that went away is retried until `retry.breaker_s` (480 s) gives up. `Waiting` looks every few
seconds; once nothing has come back for `after_s` (30 s) it opens one connection to the endpoint
(nothing is sent) and says what it found, again every `after_s`:

    waiting: no answer from http://127.0.0.1:7777 for 30 s, connection refused; giving up at 14:08 (retry.breaker_s)
    waiting: chunk 3 not back from https://adb-1.azuredatabricks.net for 60 s; the endpoint accepts connections

It runs on a daemon thread of its own and stops with the progress it watches (or by itself once the
breaker must have given up), so it never outlives a run by much.

Example::

    progress = Progress(total_rows=1000, total_chunks=4, watch=Waiting(spec.url, cfg.retry.breaker_s))
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Callable
from urllib.parse import urlsplit

from udfs.transport import TransportError, connect_probe

log = logging.getLogger("batch_inference")


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


class Waiting:
    """Says what a run waits for; `check` is the whole decision, the thread only calls it."""

    def __init__(self, url: str, breaker_s: float, *, after_s: float = 30.0, every_s: float = 5.0,
                 probe: Callable[[str, float], None] = connect_probe,
                 clock: Callable[[], float] = time.monotonic, now: Callable[[], datetime] = datetime.now) -> None:
        self.url, self.breaker_s, self.after_s, self.every_s = url, breaker_s, after_s, every_s
        self.probe, self.clock, self.now = probe, clock, now
        self.said_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, last_change: float, chunk: int) -> str | None:
        """The line to log when nothing has come back since `last_change` (a `clock` time) for at least
        `after_s`, at most once every `after_s`; None otherwise. `chunk` is the chunk being waited for."""
        t = self.clock()
        quiet = t - last_change
        if quiet < self.after_s or (self.said_at is not None and t - self.said_at < self.after_s
                                    and self.said_at > last_change):
            return None
        self.said_at = t
        where, waited = _where(self.url), f"{quiet:.0f} s"
        try:
            self.probe(self.url, 5.0)
        except TransportError as exc:
            if not exc.unreachable:
                return f"waiting: chunk {chunk} not back from {where} for {waited}; a connection to it: {exc}"
            why = "connection refused" if "Refused" in exc.detail else exc.detail
            # The breaker counts from the last answer, which came at the latest when progress last moved.
            until = self.now() + timedelta(seconds=max(0.0, self.breaker_s - quiet))
            return (f"waiting: no answer from {where} for {waited}, {why}; giving up at {until:%H:%M} "
                    f"(retry.breaker_s {self.breaker_s:g} s); rows left then fail as endpoint_unavailable")
        return (f"waiting: chunk {chunk} not back from {where} for {waited}; the endpoint accepts "
                "connections (requests in flight, or retried after 429/503)")

    def start(self, last_change: Callable[[], float], chunk: Callable[[], int]) -> None:
        """Watch on a daemon thread until `stop`, or until the breaker must have given up."""
        def watch() -> None:
            while not self._stop.wait(self.every_s):
                if self.clock() - last_change() > self.breaker_s + 2 * self.after_s:
                    return  # the breaker has given up, or the run has ended without closing its progress
                try:
                    line = self.check(last_change(), chunk())
                except Exception as exc:  # watching must never fail a run
                    log.debug("waiting: check failed: %s", exc)
                    continue
                if line:
                    log.info("%s", line)

        self._thread = threading.Thread(target=watch, name="bi-waiting", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


__all__ = ["Waiting"]
