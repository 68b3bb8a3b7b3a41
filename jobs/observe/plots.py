"""The run's two plots: latency per request (a histogram on a log axis with p50/p95/p99) and throughput,
each titled with the run, the endpoint and the concurrency.

Throughput is drawn over time from the rows' `sent_at` (`jobs.observe.stats.flight_series`): rows
answered per second above, requests in flight below against the run's `C`, chunk commits as faint
lines. A run without that series (no row sent, or a table written before `sent_at`) gets its rate per
chunk instead, from the progress timeline.

matplotlib's object API (no pyplot: no global figure state, no GUI backend); without matplotlib the
plots are skipped with a warning.

Example::

    series = flight_series(spark, table, run_id)
    save_plots(stats, progress.timeline, Path("/tmp/plots"), about, series, concurrency=16)
    # [latency_histogram.png, throughput.png]
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from jobs.observe.progress import ChunkTiming, chunk_rates
from jobs.observe.stats import FlightSeries, RunStats

log = logging.getLogger("batch_inference")


def save_plots(stats: RunStats, timeline: list[ChunkTiming], folder: Path, about: str = "",
               series: FlightSeries | None = None, concurrency: int | None = None) -> list[Path]:
    """`latency_histogram.png` and `throughput.png` in `folder`, their titles ending with `about` (the
    run, endpoint and concurrency); throughput over time with `series`, per chunk without it; none if
    matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        log.warning("matplotlib is not installed: the run's plots are skipped")
        return []
    latency, throughput = folder / "latency_histogram.png", folder / "throughput.png"
    fig = Figure(figsize=(6, 3.8), dpi=110)
    _draw_latency(fig.add_subplot(), stats, about)
    fig.tight_layout()
    fig.savefig(latency)
    if series is not None and series.start is not None:
        fig = Figure(figsize=(6.4, 5.2), dpi=110)
        _draw_over_time(fig, series, timeline, concurrency, about)
    else:
        fig = Figure(figsize=(6, 3.8), dpi=110)
        _draw_throughput(fig.add_subplot(), timeline, about)
    fig.tight_layout()
    fig.savefig(throughput)
    return [latency, throughput]


def log_bins(histogram: list[tuple[float, float]], bins: int = 30) -> tuple[list[float], list[float]]:
    """(edges, counts): histogram_numeric's uneven centroids re-binned into bins even on a log axis.

    Latency spans orders of magnitude (a 3 ms answer, a 2 s retry): on a linear axis most requests
    fall into the first bar.
    """
    xs = [x for x, _ in histogram if x > 0]
    if not xs:
        return [], []
    lo, hi = min(xs) / 1.05, max(xs) * 1.05
    step = (math.log(hi) - math.log(lo)) / bins
    edges = [math.exp(math.log(lo) + i * step) for i in range(bins + 1)]
    counts = [0.0] * bins
    for x, n in histogram:
        if x > 0:
            counts[min(bins - 1, max(0, int((math.log(x) - math.log(lo)) / step)))] += n
    return edges, counts


def _draw_latency(ax: Any, stats: RunStats, about: str) -> None:
    edges, counts = log_bins(stats.latency_histogram)
    if edges:
        ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
               color="#4c78a8", edgecolor="white")
        ax.set_xscale("log")
    for q, value, style in (("p50", stats.latency_p50_ms, "-"), ("p95", stats.latency_p95_ms, "--"),
                            ("p99", stats.latency_p99_ms, ":")):
        if value is not None:
            ax.axvline(value, color="#e45756", linestyle=style, label=f"{q} {value:,.0f} ms")
    ax.set_title(f"Latency per request ({stats.distinct_requests:,} requests)" + (f"\n{about}" if about else ""),
                 fontsize=10)
    ax.set_xlabel("latency (ms, log scale), retries included")
    ax.set_ylabel("requests")
    if stats.latency_p50_ms is not None:
        ax.legend(loc="upper right")


def _draw_throughput(ax: Any, timeline: list[ChunkTiming], about: str = "") -> None:
    if timeline:
        t = [0.0] + [c.seconds for c in timeline]
        rates = chunk_rates(timeline)
        ax.stairs(rates, t, baseline=None, color="#4c78a8", label="rows/s per chunk", linewidth=2)
        done = 0
        average = []
        for c in timeline:
            done += c.rows
            average.append(done / c.seconds if c.seconds > 0 else 0.0)
        ax.plot(t[1:], average, "o--", color="#f58518", label="rows/s since start")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right")
        if any(c.errors for c in timeline):  # errors over time: when the endpoint failed, not only how often
            errors = ax.twinx()
            errors.stairs([c.errors for c in timeline], t, color="#e45756", fill=True, alpha=0.3,
                          label="error rows per chunk")
            errors.set_ylabel("error rows", color="#e45756")
            errors.set_ylim(bottom=0)
            errors.legend(loc="upper right")
    ax.set_title(f"Throughput ({len(timeline)} chunks)" + (f"\n{about}" if about else ""), fontsize=10)
    ax.set_xlabel("seconds since the first chunk started")
    ax.set_ylabel("rows / s")


# The rows/s panel averages over about 1/SMOOTH_BUCKETS of the run.
SMOOTH_BUCKETS = 15


def rolling_mean(values: list[float], k: int) -> list[float]:
    """Each value replaced by the mean of the `k` values ending at it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def _draw_over_time(fig: Any, series: FlightSeries, timeline: list[ChunkTiming], concurrency: int | None,
                    about: str = "") -> None:
    """Two panels over the run's time: rows answered per second (error rows shaded), and the mean
    requests in flight per bucket with `C` dashed; chunk commits as faint vertical lines on both."""
    rate, flight = fig.subplots(2, 1, sharex=True)
    n = len(series.in_flight)
    edges = [i * series.bucket_s for i in range(n)] + [max(series.span_s, (n - 1) * series.bucket_s + 1e-3)]
    k = max(1, n // SMOOTH_BUCKETS)  # rows arrive one by one: a mean over k buckets reads as a rate
    rolling = f" (mean over {k * series.bucket_s:.2g} s)" if k > 1 else ""
    rate.stairs(rolling_mean(series.rows_per_s, k), edges, baseline=None, color="#4c78a8", linewidth=1.5,
                label="rows answered / s" + rolling)
    if any(series.errors_per_s):
        rate.stairs(rolling_mean(series.errors_per_s, k), edges, color="#e45756", fill=True, alpha=0.35,
                    label="error rows / s")
    flight.stairs(series.in_flight, edges, baseline=None, color="#f58518", linewidth=1.5,
                  label="requests in flight")
    if concurrency:
        flight.axhline(concurrency, color="#54a24b", linestyle="--", linewidth=1.2, label=f"C = {concurrency}")
    start = series.start.timestamp() if series.start is not None else 0.0
    marks = [c.at - start for c in timeline if c.at is not None and 0 <= c.at - start <= edges[-1] * 1.05]
    for i, x in enumerate(marks):  # when each chunk was committed: the plot's chunk boundaries
        for ax in (rate, flight):
            ax.axvline(x, color="#888888", alpha=0.35, linewidth=0.8,
                       label="chunk committed" if i == 0 and ax is rate else None)
    rate.set_ylim(bottom=0)
    top = max([*series.in_flight, concurrency or 0, 1])
    flight.set_ylim(0, top * 1.15)
    chunks = f"{len(timeline)} chunk{'s' if len(timeline) != 1 else ''}"
    rate.set_title(f"Throughput over time ({chunks}, {series.bucket_s:g} s buckets)"
                   + (f"\n{about}" if about else ""), fontsize=10)
    rate.set_ylabel("rows / s")
    flight.set_ylabel("in flight (mean)")
    flight.set_xlabel("seconds since the first request was sent")
    rate.legend(loc="best", fontsize=8)
    flight.legend(loc="best", fontsize=8)
