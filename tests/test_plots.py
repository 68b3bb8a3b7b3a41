"""The run's two plots, drawn from its numbers: real PNG files, one a histogram, one per chunk."""

from __future__ import annotations

from jobs.observe.plots import log_bins, save_plots
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
