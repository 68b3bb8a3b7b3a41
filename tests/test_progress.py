"""Progress: one line per chunk in a job's log, a bar redrawn in place on a terminal; on a fake clock."""

from __future__ import annotations

import io
import logging

from jobs.observe.progress import ChunkTiming, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def ticking(*times: float):
    """A clock that returns the given times, one per call."""
    it = iter(times)
    return lambda: next(it)


def test_progress_on_a_terminal_redraws_one_bar_in_place(caplog):
    out = Terminal()
    progress = Progress(300, 3, stream=out, clock=ticking(0.0, 10.0, 20.0))
    with caplog.at_level(logging.INFO, logger="batch_inference"):
        progress.chunk_done({"ok": 100})
        progress.chunk_done({"ok": 95, "error": 5})
        progress.close()
    assert out.getvalue() == (
        "\r 33.3%|########----------------| 100/300 rows [0:00:10<0:00:20, 10.0 rows/s, errors 0, chunk 1/3]"
        "\r 66.7%|################--------| 200/300 rows [0:00:20<0:00:10, 10.0 rows/s, errors 5, chunk 2/3]\n")
    assert caplog.records == []  # a log line would break the bar


def test_progress_in_job_logs_is_one_plain_line_per_chunk(caplog):
    out = io.StringIO()
    progress = Progress(250, 2, stream=out, clock=ticking(0.0, 4.0, 10.0))
    with caplog.at_level(logging.INFO, logger="batch_inference"):
        progress.chunk_done({"ok": 98, "error": 2})
        progress.chunk_done({"ok": 150})
        progress.close()
    assert [r.getMessage() for r in caplog.records] == [
        "chunk 1/2: 100/250 rows (40.0%), 25.0 rows/s, ETA 0:00:06, errors 2",
        "chunk 2/2: 250/250 rows (100.0%), 25.0 rows/s, ETA 0:00:00, errors 2",
    ]
    assert out.getvalue() == ""
    assert progress.timeline == [ChunkTiming(1, 4.0, 100, 2), ChunkTiming(2, 10.0, 150, 0)]
