"""Embeddings rows/s with one text per request versus 32, at the same concurrency, through the real job.

Runs jobs.pipeline.run_job (local Spark, Delta output) against the local stand-in endpoint speaking
`llm/v1/embeddings`, whose answer time models an embedding server: a fixed latency per request plus
a small cost per text (`--latency-ms`, `--per-text-ms`). For each batch size it prints:

- requests: what the server saw (ceil(rows / batch_size) per task);
- calls rows/s: rows / (first request arrival -> last answer), the calling phase alone;
- job rows/s: rows / the job's wall time (planning, checkpoint and the Delta commit included);
- p50 latency_ms as the table records it (a request's time, shared by its rows).

A small warm-up run goes first so neither measured run pays for the JVM's first queries. The last
line is machine-readable: the speed-up of job rows/s from batch_size 1 to 32.

    python benchmarks/embeddings.py [--rows 10000] [--concurrency 8] [--latency-ms 20] [--per-text-ms 0.2]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Clock:
    """Arrival of the first request and the end of the last answer's model time, as the server saw them."""

    def __init__(self, latency_s: float, per_text_s: float) -> None:
        self.latency_s, self.per_text_s = latency_s, per_text_s
        self.first: float | None = None
        self.last = 0.0
        self._lock = threading.Lock()

    def __call__(self, req):
        arrived = time.monotonic() - self.latency_s  # the stand-in slept the fixed latency before this hook
        texts = req.body.get("input", []) if isinstance(req.body, dict) else []
        time.sleep(self.per_text_s * len(texts))  # the model's cost per text, on top of the fixed latency
        with self._lock:
            self.first = min(self.first or arrived, arrived)
            self.last = max(self.last, time.monotonic())
        return None  # then the stand-in answers as the model

    def reset(self) -> None:
        self.first, self.last = None, 0.0


def run(spark, endpoint, clock: Clock, source: str, rows: int, batch_size: int, concurrency: int) -> dict:
    from jobs.config import parse_config
    from jobs.pipeline import run_job

    endpoint.received.clear()
    clock.reset()
    cfg = parse_config({
        "input": {"table": source},
        "output": {"table": f"bench.embeddings_{uuid.uuid4().hex[:8]}"},
        "endpoint": {"name": "bench-embeddings", "type": "serving", "task": "llm/v1/embeddings",
                     "host": endpoint.url, "batch_size": batch_size},
        "limits": {"max_concurrency": concurrency},
    })
    summary = run_job(spark, cfg)
    calls_s = max(1e-9, clock.last - (clock.first or clock.last))
    p50 = spark.sql(f"SELECT percentile(latency_ms, 0.5) FROM {cfg.output.table}").first()[0]
    return {"batch_size": batch_size, "rows": rows, "requests": len(endpoint.received),
            "calls_rps": rows / calls_s, "job_rps": rows / summary.seconds, "seconds": summary.seconds,
            "p50_ms": p50, "errors": summary.errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000)  # one chunk at the default run.chunk_rows
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--per-text-ms", type=float, default=0.2)
    p.add_argument("--master", default="local[2]")
    args = p.parse_args()

    from jobs.local.stand_in import LocalEndpoint
    from jobs.session import get_spark

    spark = get_spark("benchmark-embeddings", master=args.master,
                      warehouse=tempfile.mkdtemp(prefix="bench-wh-"))
    spark.sql("CREATE SCHEMA IF NOT EXISTS bench")
    words = ["delta", "spark", "vector", "table", "lake", "token", "batch", "query", "model", "index"]
    spark.range(1, args.rows + 1).selectExpr(
        "id", f"concat_ws(' ', 'text', id, element_at(array({','.join(repr(w) for w in words)}), "
              f"cast(id % {len(words)} + 1 AS int)))  AS prompt").createOrReplaceTempView("bench_texts")

    clock = Clock(args.latency_ms / 1000, args.per_text_ms / 1000)
    results = []
    with LocalEndpoint(latency_s=args.latency_ms / 1000, fault=clock) as endpoint:
        run(spark, endpoint, clock, "bench_texts", min(200, args.rows), 32, args.concurrency)  # warm-up
        for batch_size in (1, 32):
            results.append(run(spark, endpoint, clock, "bench_texts", args.rows, batch_size,
                               args.concurrency))

    print(f"\nmachine: {os.cpu_count()} cores, Spark {args.master}; endpoint: the local stand-in (threads) "
          f"answering llm/v1/embeddings in {args.latency_ms:g} ms + {args.per_text_ms:g} ms per text; "
          f"max_concurrency {args.concurrency}")
    print(f"{'batch_size':>10} {'rows':>6} {'requests':>9} {'calls rows/s':>13} {'job rows/s':>11} "
          f"{'job s':>7} {'p50 ms':>8} {'errors':>7}")
    for r in results:
        print(f"{r['batch_size']:>10} {r['rows']:>6} {r['requests']:>9} {r['calls_rps']:>13.0f} "
              f"{r['job_rps']:>11.0f} {r['seconds']:>7.1f} {r['p50_ms']:>8.1f} {r['errors']:>7}")
    one, many = results
    print(f"requests: {one['requests']} at batch_size 1, {many['requests']} at 32 "
          f"(ceil(rows / 32) = {math.ceil(args.rows / 32)}, plus at most one partial batch per task)")
    print(f"calls-phase speed-up: {many['calls_rps'] / one['calls_rps']:.1f}x; "
          f"end-to-end job speed-up: {many['job_rps'] / one['job_rps']:.1f}x")
    print(f"summary: embeddings_speedup={many['job_rps'] / one['job_rps']:.2f}")
    spark.stop()


if __name__ == "__main__":
    main()
