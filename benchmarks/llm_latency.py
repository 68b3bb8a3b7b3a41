"""The real job against an endpoint with LLM latency: answers from 0.05 s to 20 s, fixed per prompt.

Starts benchmarks/server.py with `--latency heavy` (lognormal, median 0.5 s, mean 0.86 s, p99 about
6 s, capped at 20 s; or `--latency bimodal`: short classifications and long generations), writes N
prompts to a Delta table, and runs the real job (`jobs.pipeline.run_job` on local Spark, default
settings but `limits.max_concurrency`) for each C and calling mode. For each run it prints:

- efficiency: (the sum of the latencies the server served / C) / the job's wall time: 1.0 is an
  endpoint kept at C in flight from the job's first instant to its last;
- calls: the same over the calls phase only (first request to last answer, as the server saw it);
- mean in flight / C over the calls phase (time-weighted, the server's count), and the peak (<= C);
- before / after: seconds from the job's start to the server's first request, and from its last
  answer to the job's end (Spark's own time: the survey, staging, the first fetch; the last commit
  and the run's statistics);
- FIFO bound: the efficiency of a perfect scheduler with no overhead at all, C slots, sending the
  same requests in the order the server received them: the last requests' answers take what they
  take, so with few rounds of C the tail alone keeps this below 1 (N = 5,000 at C = 256 is under
  20 rounds). No scheduler that does not know each answer's length before it is sent does better
  on average, since any order of the prompts is as good as another;
- LPT bound: the same with the longest answers sent first, which needs that foreknowledge: what the
  workload allows at all;
- job / bound: efficiency over the FIFO bound: what the job loses that a scheduler could save.

Before the measured runs, a warm-up run of 500 prompts in each mode pays the JVM's first queries
(class loading and code generation of the survey, staging and Delta commits: about 7 s on this
machine) and starts the Python workers, so that the first configuration measured does not carry
them and the others do not; it is printed, not counted.

Then the overload case: `llm/v1/chat` with usage, a server whose time per output token doubles past
K = 16 requests in flight, at C = 64, `limits.adaptive` true against false: the limiter must back
off (`overload_cut_ok`: lower time per token with adaptive) without cutting on long answers.

Last line:
`summary: llm_job_efficiency_driver_c64=<x> llm_job_efficiency_executors_c64=<x> llm_job_efficiency_driver_c256=<x>
llm_job_efficiency_executors_c256=<x> overload_cut_ok=<true|false>`

    python benchmarks/llm_latency.py [--rows 5000] [--concurrency 64,256] [--modes driver,executors]
                                     [--latency heavy|bimodal] [--overload-rows 1500] [--no-overload]
                                     [--timeline]   # per run: in flight per second, the job's log lines
"""

from __future__ import annotations

import argparse
import heapq
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import Server  # noqa: E402


def fifo_bound(served: list[float], c: int) -> float:
    """Efficiency of list scheduling on `c` slots with no overhead: requests in arrival order (the
    server's `served` is in that order), each to the first free slot. The tail it leaves is the
    workload's own, not the job's."""
    slots = [0.0] * c
    for x in served:
        heapq.heappush(slots, heapq.heappop(slots) + x)
    return sum(served) / c / max(slots)


def lpt_bound(served: list[float], c: int) -> float:
    """`fifo_bound` with the longest answers first: only a scheduler told every answer's length does this."""
    return fifo_bound(sorted(served, reverse=True), c)


class Events(logging.Handler):
    """The job's log lines (its debug ones too) with their times, for `--timeline`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[float, str]] = []
        self.log = logging.getLogger("batch_inference")
        self.level_was = self.log.level
        self.log.setLevel(logging.DEBUG)
        self.log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.created, record.getMessage()[:110]))

    def close(self) -> None:
        self.log.removeHandler(self)
        self.log.setLevel(self.level_was)
        super().close()


def print_timeline(title: str, start: float, end: float, by_s: list, lines: list, c: int) -> None:
    """Per second of the run: the server's mean in flight (a bar of C), and the job's log lines."""
    area = {int(k): v for k, v in by_s}
    print(f"timeline of {title}: second, mean in flight, bar of C = {c}, the job's log lines")
    for sec in range(int(start), int(end) + 1):
        got = [m for t, m in lines if int(t) == sec]
        n = area.get(sec, 0.0)
        bar = "#" * round(20 * n / c)
        print(f"{sec - int(start):>5} {n:>6.1f} {bar:<20} {' | '.join(got)[:160]}")


def run_one(spark, server: Server, table: str, c: int, mode: str, *, task: str = "proxy",
            adaptive: bool = True, tag: str = "", timeline: bool = False) -> dict:
    from jobs.config import parse_config
    from jobs.pipeline import run_job

    out = f"bench.llm_{mode}_c{c}{tag}"
    spark.sql(f"DROP TABLE IF EXISTS {out}")
    endpoint = ({"name": "bench", "type": "driver_proxy", "url": server.url + "/"} if task == "proxy" else
                {"name": "bench-chat", "type": "serving", "task": "llm/v1/chat", "host": server.url})
    cfg = parse_config({"input": {"table": table}, "output": {"table": out}, "endpoint": endpoint,
                        "limits": {"max_concurrency": c, "adaptive": adaptive},
                        "run": {"calls_from": mode}})
    server.reset()
    events = Events() if timeline else None
    t0, start = time.monotonic(), time.time()
    try:
        summary = run_job(spark, cfg)
    finally:
        if events:
            events.close()
    wall, end = time.monotonic() - t0, time.time()
    s = server.stats()
    if events:
        print_timeline(f"{mode} C={c}", start, end, s["inflight_by_s"], events.lines, c)
    served = s["served"]
    span = s["last"] - s["first"]
    work = sum(served) / c
    return {"mode": mode, "c": c, "rows": len(served), "wall": wall, "span": span, "chunks": summary.chunks,
            "ok": summary.by_status.get("ok", 0), "efficiency": work / wall, "calls": work / span,
            "mean_inflight": s["inflight_area"] / span / c, "peak": s["peak_inflight"],
            "before": s["first"] - start, "after": end - s["last"],
            "bound": fifo_bound(served, c), "lpt": lpt_bound(served, c), "ideal": work,
            "per_token_ms": 1000 * s["token_s"] / s["tokens"] if s["tokens"] else None,
            "tokens_per_s": s["tokens"] / span if s["tokens"] else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--concurrency", default="64,256")
    p.add_argument("--modes", default="driver,executors")
    p.add_argument("--latency", choices=["heavy", "bimodal"], default="heavy")
    p.add_argument("--overload-rows", type=int, default=1500)
    p.add_argument("--no-overload", action="store_true")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--timeline", action="store_true", help="print each run's in flight per second and log lines")
    args = p.parse_args()
    os.environ.setdefault("BI_JARS_DIR", str(ROOT / ".cache" / "jars"))
    from jobs.session import get_spark

    spark = get_spark("benchmark", master=args.master, warehouse=tempfile.mkdtemp(prefix="bench-wh-"))
    spark.sql("CREATE SCHEMA IF NOT EXISTS bench")
    table = "bench.llm_prompts"
    (spark.range(args.rows).selectExpr("id", "concat('prompt number ', id) AS prompt")
     .write.format("delta").mode("overwrite").saveAsTable(table))
    results, overload = [], []
    server = Server(50, 0.2, "--latency", args.latency)
    try:
        warm = "bench.llm_warmup"
        spark.table(table).where("id < 500").write.format("delta").mode("overwrite").saveAsTable(warm)
        for mode in args.modes.split(","):
            r = run_one(spark, server, warm, 64, mode, tag="_warmup")
            print(f"warm-up (not counted): 500 prompts, {mode} C=64, {r['wall']:.1f}s, "
                  f"{r['before']:.1f}s before the first call", flush=True)
        for c in [int(x) for x in args.concurrency.split(",")]:
            for mode in args.modes.split(","):
                r = run_one(spark, server, table, c, mode, timeline=args.timeline)
                print(f"{mode} C={c}: efficiency {r['efficiency']:.2f} in {r['wall']:.0f}s", flush=True)
                results.append(r)
    finally:
        server.stop()
    if not args.no_overload:
        small = "bench.llm_prompts_small"
        spark.table(table).where(f"id < {args.overload_rows}").write.format("delta").mode("overwrite").saveAsTable(small)
        server = Server(50, 0.2, "--latency", args.latency, "--overload-k", "16")
        try:
            for adaptive in (True, False):
                r = run_one(spark, server, small, 64, "driver", task="chat", adaptive=adaptive,
                            tag="_adaptive" if adaptive else "_fixed")
                r["adaptive"] = adaptive
                overload.append(r)
        finally:
            server.stop()

    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; "
          f"Spark {args.master}; server: aiohttp, latency {args.latency} per prompt; N = {args.rows}; "
          "default settings (driver-proxy endpoint)")
    print(f"{'calls from':<10} {'C':>4} {'chunks':>6} {'ideal s':>8} {'wall s':>7} {'before':>6} {'after':>5} "
          f"{'efficiency':>10} {'calls':>6} {'in flight/C':>11} {'FIFO bound':>10} {'job/bound':>9} "
          f"{'LPT bound':>9} {'peak':>5} {'ok':>6}")
    for r in results:
        print(f"{r['mode']:<10} {r['c']:>4} {r['chunks']:>6} {r['ideal']:>8.1f} {r['wall']:>7.1f} "
              f"{r['before']:>6.1f} {r['after']:>5.1f} {r['efficiency']:>10.2f} {r['calls']:>6.2f} "
              f"{r['mean_inflight']:>11.2f} {r['bound']:>10.2f} {r['efficiency'] / r['bound']:>9.2f} "
              f"{r['lpt']:>9.2f} {r['peak']:>5} {r['ok']:>6}")
    fields = [f"llm_job_efficiency_{r['mode']}_c{r['c']}={r['efficiency']:.3f}" for r in results]
    if overload:
        print(f"\noverload: llm/v1/chat, time per output token x2 past 16 in flight, C = 64, "
              f"N = {args.overload_rows}, calls from the driver")
        print(f"{'adaptive':<9} {'ms/token':>9} {'tokens/s':>9} {'mean in flight':>14} {'peak':>5} {'wall s':>7} {'ok':>6}")
        for r in overload:
            print(f"{str(r['adaptive']).lower():<9} {r['per_token_ms']:>9.1f} {r['tokens_per_s']:>9.0f} "
                  f"{r['mean_inflight'] * 64:>14.1f} {r['peak']:>5} {r['wall']:>7.1f} {r['ok']:>6}")
        adaptive, fixed = overload
        fields.append(f"overload_cut_ok={str(adaptive['per_token_ms'] < 0.9 * fixed['per_token_ms']).lower()}")
    fields.append(f"peak_inflight_ok={str(all(r['peak'] <= r['c'] for r in results + overload)).lower()}")
    print("summary: " + " ".join(fields))


if __name__ == "__main__":
    main()
