"""The run's two plots, drawn from its numbers: real PNG files, one a histogram, one per chunk."""

from __future__ import annotations

from jobs.observe.plots import save_plots
from jobs.observe.progress import ChunkTiming
from jobs.observe.stats import RunStats


def test_both_plots_are_written_as_png(tmp_path):
    stats = RunStats(distinct_requests=3, latency_p50_ms=50.0, latency_p95_ms=80.0, latency_p99_ms=90.0,
                     latency_histogram=[(48.0, 1.0), (52.0, 1.0), (90.0, 1.0)])
    timeline = [ChunkTiming(1, 2.0, 100, 0), ChunkTiming(2, 3.0, 100, 1)]
    paths = save_plots(stats, timeline, tmp_path)
    assert [p.name for p in paths] == ["latency_histogram.png", "throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths)


def test_an_empty_run_still_draws(tmp_path):
    assert len(save_plots(RunStats(), [], tmp_path)) == 2
