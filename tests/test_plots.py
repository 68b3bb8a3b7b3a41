"""The run's two plots, drawn from its numbers: real PNG files, a histogram and throughput over time
(per chunk when the run has no series)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from jobs.observe.plots import log_bins, save_plots
from jobs.observe.progress import ChunkTiming
from jobs.observe.stats import FlightSeries, RunStats

START = datetime(2025, 1, 1, tzinfo=timezone.utc)
# 4 s of a run at C = 2: in flight 2 but for a dip in the second second, errors in the third.
SERIES = FlightSeries(start=START, bucket_s=1.0, span_s=3.5, rows_per_s=[0.0, 3.0, 4.0, 8.0],
                      errors_per_s=[0.0, 0.0, 1.0, 0.0], in_flight=[2.0, 1.2, 2.0, 2.0])
# Chunks committed 1.5 s and 3.6 s after the first send, and one with no wall clock (not drawn).
TIMELINE = [ChunkTiming(1, 2.0, 5, 0, START.timestamp() + 1.5), ChunkTiming(2, 4.0, 5, 1, START.timestamp() + 3.6),
            ChunkTiming(3, 4.5, 2, 0)]


def test_both_plots_are_written_as_png(tmp_path):
    stats = RunStats(distinct_requests=3, latency_p50_ms=50.0, latency_p95_ms=80.0, latency_p99_ms=90.0,
                     latency_histogram=[(48.0, 1.0), (52.0, 1.0), (90.0, 1.0)])
    timeline = [ChunkTiming(1, 2.0, 100, 0), ChunkTiming(2, 3.0, 100, 1)]
    paths = save_plots(stats, timeline, tmp_path)
    assert [p.name for p in paths] == ["latency_histogram.png", "throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths)


def test_an_empty_run_still_draws(tmp_path):
    assert len(save_plots(RunStats(), [], tmp_path)) == 2


def test_latency_bins_are_even_on_a_log_axis():
    edges, counts = log_bins([(3.0, 40.0), (30.0, 9.0), (3000.0, 1.0)], bins=3)
    ratios = [b / a for a, b in zip(edges, edges[1:])]
    assert max(ratios) - min(ratios) < 1e-9  # the same factor per bin: even on a log axis
    assert counts == [40.0, 9.0, 1.0]  # a linear axis put 49 of the 50 in its first bar
    assert log_bins([]) == ([], [])


def test_a_no_op_rerun_is_an_mlflow_run_tagged_so_without_plots(tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.observe.tracking import log_to_mlflow
    from tests.conftest import job_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = job_config(input={"table": "t"}, output={"table": "o"},
                     mlflow={"enabled": True, "tracking_uri": uri, "experiment": "tests"})
    record = {"run_id": "r" * 32, "pending_rows": 0, "errors_by_reason": {}, "rows": 0}
    mid = log_to_mlflow(None, cfg, record, RunStats(), [])
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(mid)
    assert run.data.tags["batch_inference.noop"] == "true" and run.info.run_name.endswith("-noop")
    assert [a.path for a in client.list_artifacts(mid)] == ["run_summary.json"]


def test_errors_over_time_get_an_axis_of_their_own_only_when_there_are_errors():
    from matplotlib.figure import Figure

    from jobs.observe.plots import _draw_throughput

    for timeline, axes in (([ChunkTiming(1, 2.0, 10, 0)], 1), ([ChunkTiming(1, 2.0, 10, 0), ChunkTiming(2, 4.0, 10, 3)], 2)):
        fig = Figure()
        _draw_throughput(fig.add_subplot(), timeline, "run r, e, C=8")
        assert len(fig.axes) == axes
        assert fig.axes[0].get_title() == f"Throughput ({len(timeline)} chunks)\nrun r, e, C=8"


def test_throughput_over_time_is_written_from_the_series(tmp_path):
    paths = save_plots(RunStats(), TIMELINE, tmp_path, "run r, e, C=2", SERIES, concurrency=2)
    assert [p.name for p in paths] == ["latency_histogram.png", "throughput.png"]
    throughput = paths[1].read_bytes()
    assert throughput[:8] == b"\x89PNG\r\n\x1a\n" and len(throughput) > 5000
    (tmp_path / "per_chunk").mkdir()
    per_chunk = save_plots(RunStats(), TIMELINE, tmp_path / "per_chunk", "run r, e, C=2")[1].read_bytes()
    assert per_chunk != throughput  # without a series: the per-chunk plot, as before


def test_over_time_rows_per_s_above_in_flight_below_with_c_dashed_and_chunk_commits_marked():
    from matplotlib.figure import Figure

    from jobs.observe.plots import _draw_over_time

    fig = Figure()
    _draw_over_time(fig, SERIES, TIMELINE, 2, "run r, e, C=2")
    rate, flight = fig.axes
    assert rate.get_title() == "Throughput over time (3 chunks, 1 s buckets)\nrun r, e, C=2"
    [c_line] = [line for line in flight.get_lines() if line.get_linestyle() == "--"]
    assert tuple(c_line.get_ydata()) == (2, 2) and c_line.get_label() == "C = 2"
    for ax in (rate, flight):  # two of the three chunks have a wall clock: two faint lines per panel
        marks = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "-")
        assert marks == pytest.approx([1.5, 3.6])
    labels = [t.get_text() for t in rate.get_legend().get_texts()]
    assert labels == ["rows answered / s", "error rows / s", "chunk committed"]


def test_rows_per_s_is_a_rolling_mean_that_keeps_the_total():
    from jobs.observe.plots import rolling_mean

    assert rolling_mean([0, 0, 6, 0, 0, 3], 3) == [0, 0, 2, 2, 2, 1]
    assert rolling_mean([4, 2], 1) == [4, 2]
    assert rolling_mean([4, 2], 5) == [4, 3]  # fewer than k values at the start: their own mean
