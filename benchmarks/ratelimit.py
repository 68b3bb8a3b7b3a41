"""Throughput of the real job under a fixed-window rate limit without `Retry-After`, versus the limit.

Starts benchmarks/server.py rate-limited as AI Gateway and pay-per-token endpoints are: W requests
per fixed window of S seconds, past it an immediate 429 with no `Retry-After` until the window
resets. Runs the real job (jobs.pipeline.run_job, local Spark, default retry settings) over N
prompts, and prints per run:

- calls rows/s: ok rows / (first request -> last answer, as the server saw it);
- efficiency: that over the limit's rate W / S (the bound: no schedule gets more rows through);
- 429 share: requests that drew a 429 over all requests the server saw;
- rows ok, and the rows that ended `http_429` (must be none).

Two runs in the same process, alternating per `--rounds`:

- `learned`: nothing told; the governor learns the window from its 429s (the default for an
  endpoint whose limits the job cannot read);
- `told`: `limits.requests_per_minute` set to the true limit, as when the workspace's AI Gateway
  definition is read (`jobs.endpoint.info`): the baseline a learned rate is measured against.

Last line: `summary: ratelimit_efficiency=<learned, worst round> ratelimit_429_share=<learned, worst
round> told_efficiency=<x>`. Target: efficiency >= 0.85 with a 429 share <= 0.05.

    python benchmarks/ratelimit.py [--window-limit 40] [--window-s 2] [--rows 1200]
                                   [--concurrency 8] [--latency-ms 50] [--rounds 1]
                                   [--chunk-rows N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import Server  # noqa: E402


def run(spark, server: Server, table: str, rows: int, c: int, told_rpm: float | None,
        chunk_rows: int | None = None) -> dict:
    from jobs.config import parse_config
    from jobs.pipeline import run_job

    out = f"bench.ratelimit_{'told' if told_rpm else 'learned'}"
    spark.sql(f"DROP TABLE IF EXISTS {out}")
    limits: dict = {"max_concurrency": c}
    if told_rpm:
        limits["requests_per_minute"] = told_rpm
    cfg = parse_config({
        "input": {"table": table}, "output": {"table": out},
        "endpoint": {"name": "rate-limited", "type": "driver_proxy", "url": server.url + "/"},
        "limits": limits, "run": {"chunk_rows": chunk_rows or rows},
    })
    server.reset()
    t0 = time.monotonic()
    run_job(spark, cfg)
    wall = time.monotonic() - t0
    s = server.stats()
    got = spark.sql(f"SELECT count_if(status = 'ok') AS ok, count_if(error LIKE 'http_429%') AS e429 "
                    f"FROM {out}").first()
    return {"ok": got["ok"], "e429": got["e429"], "requests": s["requests"], "refused": s["refused"],
            "calls_rps": got["ok"] / (s["last"] - s["first"]), "job_rps": got["ok"] / wall,
            "windows": [n for _, n in s["windows"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window-limit", type=int, default=40, help="W: requests per window")
    p.add_argument("--window-s", type=float, default=2.0, help="S: the window's length (s)")
    p.add_argument("--rows", type=int, default=1200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per chunk (default: all in one chunk; fewer: chunks side by side)")
    p.add_argument("--master", default="local[2]")
    args = p.parse_args()
    os.environ.setdefault("BI_JARS_DIR", str(ROOT / ".cache" / "jars"))
    limit_rps = args.window_limit / args.window_s

    from jobs.session import get_spark

    server = Server(args.latency_ms, 0.0, "--window-limit", str(args.window_limit),
                    "--window-s", str(args.window_s))
    spark = get_spark("benchmark", master=args.master, warehouse=tempfile.mkdtemp(prefix="bench-wh-"))
    spark.sql("CREATE SCHEMA IF NOT EXISTS bench")
    table = "bench.prompts"
    (spark.range(args.rows).selectExpr("id", "concat('prompt number ', id) AS prompt")
     .write.format("delta").mode("overwrite").saveAsTable(table))
    results = []
    try:
        for rnd in range(1, args.rounds + 1):
            order = ["learned", "told"] if rnd % 2 else ["told", "learned"]
            for kind in order:
                r = run(spark, server, table, args.rows, args.concurrency,
                        limit_rps * 60 if kind == "told" else None, args.chunk_rows)
                r.update(round=rnd, kind=kind, efficiency=r["calls_rps"] / limit_rps,
                         share=r["refused"] / max(1, r["requests"]))
                print(f"round {rnd} {kind}: efficiency {r['efficiency']:.2f}, 429 share {r['share']:.3f}; "
                      f"requests per window: {' '.join(map(str, r['windows']))}", flush=True)
                results.append(r)
    finally:
        server.stop()

    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; "
          f"Spark {args.master}; limit W = {args.window_limit} per {args.window_s:g} s window "
          f"({limit_rps:g} requests/s), no Retry-After; L = {args.latency_ms:.0f} ms; "
          f"C = {args.concurrency}; N = {args.rows} rows in chunks of {args.chunk_rows or args.rows}; "
          f"default retry settings")
    print(f"{'round':>5} {'run':>8} {'limit/s':>8} {'calls rows/s':>13} {'efficiency':>11} {'requests':>9} "
          f"{'429s':>6} {'429 share':>10} {'ok':>6} {'http_429':>9} {'job rows/s':>11}")
    for r in results:
        print(f"{r['round']:>5} {r['kind']:>8} {limit_rps:>8.1f} {r['calls_rps']:>13.1f} {r['efficiency']:>11.2f} "
              f"{r['requests']:>9} {r['refused']:>6} {r['share']:>10.3f} {r['ok']:>6} {r['e429']:>9} "
              f"{r['job_rps']:>11.1f}")
    learned = [r for r in results if r["kind"] == "learned"]
    told = [r for r in results if r["kind"] == "told"]
    print(f"summary: ratelimit_efficiency={min(r['efficiency'] for r in learned):.3f} "
          f"ratelimit_429_share={max(r['share'] for r in learned):.3f} "
          f"told_efficiency={min(r['efficiency'] for r in told):.3f}")


if __name__ == "__main__":
    main()
