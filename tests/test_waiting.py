"""What a run waits for: said once nothing has come back for 30 s, with what one connection finds."""

from __future__ import annotations

import logging
import time
from datetime import datetime

from jobs.observe.progress import Progress
from jobs.observe.waiting import Waiting
from tests.conftest import free_port
from udfs.transport import TransportError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def refused(url: str, timeout: float) -> None:
    raise TransportError("connection_error", "ConnectionRefusedError connecting to 127.0.0.1:7777",
                         unreachable=True)


def test_silence_is_explained_after_30_s_then_every_30_s():
    clock = Clock()
    w = Waiting("http://127.0.0.1:7777/invocations", 480.0, probe=refused, clock=clock,
                now=lambda: datetime(2026, 12, 2, 14, 0, 0))
    last = clock.t
    clock.t += 29
    assert w.check(last, 1) is None  # not yet
    clock.t += 1
    assert w.check(last, 1) == (
        "waiting: no answer from http://127.0.0.1:7777 for 30 s, connection refused; giving up at 14:07 "
        "(retry.breaker_s 480 s); rows left then fail as endpoint_unavailable")
    clock.t += 10
    assert w.check(last, 1) is None  # said 10 s ago
    clock.t += 20
    assert w.check(last, 1).startswith("waiting: no answer from http://127.0.0.1:7777 for 60 s, ")


def test_an_endpoint_that_accepts_connections_is_said_to_be_there():
    clock = Clock()
    w = Waiting("https://adb-1.azuredatabricks.net/serving-endpoints/m/invocations?x=1", 480.0,
                probe=lambda url, timeout: None, clock=clock)
    last = clock.t
    clock.t += 31
    assert w.check(last, 3) == (
        "waiting: chunk 3 not back from https://adb-1.azuredatabricks.net for 31 s; the endpoint accepts "
        "connections (requests in flight, or retried after 429/503)")
    last = clock.t  # a chunk came back: quiet again
    clock.t += 5
    assert w.check(last, 4) is None


def test_progress_watches_until_closed(caplog):
    port = free_port()  # nothing listens: a real connection, refused
    w = Waiting(f"http://127.0.0.1:{port}/", 480.0, after_s=0.2, every_s=0.05)
    caplog.set_level(logging.INFO, logger="batch_inference")
    progress = Progress(10, 1, watch=w)
    time.sleep(0.6)
    progress.close()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting: ")]
    assert said and said[0].startswith(f"waiting: no answer from http://127.0.0.1:{port} for 0 s, connection "
                                       "refused; giving up at ")
    time.sleep(0.3)
    assert len([r for r in caplog.records if r.getMessage().startswith("waiting: ")]) == len(said)  # stopped
