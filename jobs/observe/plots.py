"""The run's two plots: latency per request (a histogram with p50/p95/p99) and throughput per chunk.

matplotlib's object API (no pyplot: no global figure state, no GUI backend); without matplotlib the
plots are skipped with a warning.

Example::

    save_plots(stats, progress.timeline, Path("/tmp/plots"))   # [latency_histogram.png, throughput.png]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jobs.observe.progress import ChunkTiming, chunk_rates
from jobs.observe.stats import RunStats

log = logging.getLogger("batch_inference")


def save_plots(stats: RunStats, timeline: list[ChunkTiming], folder: Path) -> list[Path]:
    """`latency_histogram.png` and `throughput.png` in `folder`; none if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        log.warning("matplotlib is not installed: the run's plots are skipped")
        return []
    latency, throughput = folder / "latency_histogram.png", folder / "throughput.png"
    fig = Figure(figsize=(6, 3.6), dpi=110)
    _draw_latency(fig.add_subplot(), stats)
    fig.tight_layout()
    fig.savefig(latency)
    fig = Figure(figsize=(6, 3.6), dpi=110)
    _draw_throughput(fig.add_subplot(), timeline)
    fig.tight_layout()
    fig.savefig(throughput)
    return [latency, throughput]


def _draw_latency(ax: Any, stats: RunStats, bins: int = 30) -> None:
    # histogram_numeric gives uneven bins (centroids with counts); their counts are re-binned into
    # even ones, or a wide sparse bin would look as tall as a narrow busy one.
    top = max((x for x, _ in stats.latency_histogram), default=0.0)
    if top > 0:
        width = top / (bins - 0.5)
        counts = [0.0] * bins
        for x, n in stats.latency_histogram:
            counts[min(bins - 1, int(x / width))] += n
        ax.bar([i * width for i in range(bins)], counts, width=width, align="edge", color="#4c78a8",
               edgecolor="white")
    for q, value, style in (("p50", stats.latency_p50_ms, "-"), ("p95", stats.latency_p95_ms, "--"),
                            ("p99", stats.latency_p99_ms, ":")):
        if value is not None:
            ax.axvline(value, color="#e45756", linestyle=style, label=f"{q} {value:,.0f} ms")
    ax.set_title(f"Latency per request ({stats.distinct_requests:,} requests)")
    ax.set_xlabel("latency (ms), retries included")
    ax.set_ylabel("requests")
    if stats.latency_p50_ms is not None:
        ax.legend(loc="upper right")


def _draw_throughput(ax: Any, timeline: list[ChunkTiming]) -> None:
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
    ax.set_title(f"Throughput ({len(timeline)} chunks)")
    ax.set_xlabel("seconds since the first chunk started")
    ax.set_ylabel("rows / s")
