"""How an error is shown in one line, and what a run's summary counts as errors."""

from __future__ import annotations

from jobs.errors import brief, first_line
from jobs.observe.summary import RunSummary


def test_first_line_and_brief_keep_one_cut_line():
    exc = RuntimeError("  the reason\n  at some.Stack(Trace.java:1)\n" + "x" * 1000)
    assert first_line(exc) == "the reason"
    assert first_line(RuntimeError("y" * 1000), limit=10) == "y" * 10
    assert brief(exc) == "RuntimeError: the reason"
    assert brief(KeyError()) == "KeyError"


def test_errors_are_every_status_but_ok():
    assert RunSummary("r", "t", by_status={"ok": 5, "error": 2, "skipped": 1}).errors == 3
    assert RunSummary("r", "t").errors == 0
