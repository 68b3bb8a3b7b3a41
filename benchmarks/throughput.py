"""Throughput of the real job against an endpoint with a fixed latency, versus the bound C / L.

Starts benchmarks/server.py (aiohttp, asyncio, its own process) with latency L, writes N prompts to a
Delta table, and runs the real job (jobs.pipeline.run_job on local Spark) once per max_concurrency C.
For each run it prints:

- calls rows/s: N / (first request arrival -> last answer, as the server saw it): the calling phase,
  which is what C / L bounds;
- job rows/s: N / the job's whole wall time (input checks, planning, checkpoint, Delta commit);
- the ratio of calls rows/s to C / L, the same ratio in the steady state (the median half-second,
  without ramp-up and tail), p50/p99 latency as the client saw it (the table's latency_ms), and the
  peak of requests in flight as the server counted them (must never exceed C).

With several `--http-client` values it runs each C once per client, alternating (and reversing the
order every other `--round`), so clients are compared in the same run, under the same load.

In the same process it runs the naive baseline most users write (a pandas UDF calling
`requests.post` row after row) and prints our speed-up over it. The last line is machine-readable:
the worst round's ratio per client at C = 64 and 128 (the first client's without a suffix).

`--calls-from driver|executors` sets `run.calls_from` (default: the config's `auto`); `--connect`
runs the job through a Spark Connect client of the benchmark's own local session (served on
127.0.0.1), as serverless would.

`--whole-job` measures the whole job instead: N = 100,000 rows by default, default chunking (no
`run.chunk_rows`), C = 64 and 128, completions and embeddings (batch 32, an `llm/v1/embeddings` route
of the same server), calls and whole-job ratios side by side, and the seconds of a no-op rerun (the
same config again, nothing pending). Last line: `summary: job_efficiency_c64=<x> job_efficiency_c128=<x>
embeddings_job_efficiency=<x> noop_rerun_s=<s>` (embeddings: whole-job rows/s over calls-phase rows/s,
the lower of the two Cs).

    python benchmarks/throughput.py [--rows 20000] [--latency-ms 50] [--concurrency 8,32,64,128]
                                    [--http-client aiohttp,urllib3,requests] [--rounds 2]
                                    [--calls-from driver] [--connect]
    python benchmarks/throughput.py --whole-job [--calls-from driver] [--connect]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd  # module-level: pandas_udf resolves the type hints in this module's globals

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_CLIENT = "aiohttp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, latency_ms: float, per_text_ms: float = 0.2, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "server.py"), "--port",
                                      str(self.port), "--latency-ms", str(latency_ms),
                                      "--per-text-ms", str(per_text_ms), *extra])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("benchmark server did not start")

    def _call(self, method: str, path: str) -> dict:
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        return self._call("GET", "/stats")

    def reset(self) -> None:
        self._call("POST", "/reset")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_ours(spark, server: Server, table: str, rows: int, c: int, http_client: str,
             calls_from: str | None = None) -> dict:
    from jobs.config import parse_config
    from jobs.pipeline import run_job

    out = f"bench.out_c{c}_{http_client}"
    spark.sql(f"DROP TABLE IF EXISTS {out}")
    cfg = parse_config({
        "input": {"table": table},
        "output": {"table": out},
        "endpoint": {"name": "bench", "type": "driver_proxy", "url": server.url + "/"},
        "limits": {"max_concurrency": c, "http_client": http_client},
        "run": {"chunk_rows": rows, **({"calls_from": calls_from} if calls_from else {})},
    })
    server.reset()
    t0 = time.monotonic()
    summary = run_job(spark, cfg)
    wall = time.monotonic() - t0
    s = server.stats()
    lat = spark.sql(f"SELECT percentile(latency_ms, array(0.5, 0.99)) AS p, count_if(status = 'ok') AS ok "
                    f"FROM {out}").first()
    span = s["last"] - s["first"]
    # Steady state: the median half-second of answers, leaving out the ramp-up and the tail.
    series = sorted(s["series"][1:-1]) or [0]
    return {"c": c, "calls_rps": rows / span, "steady_rps": series[len(series) // 2] * 2, "job_rps": rows / wall, "p50": lat["p"][0], "p99": lat["p"][1],
            "peak": s["peak_inflight"], "ok": lat["ok"], "requests": s["requests"], "errors": summary.errors}


def run_whole(spark, server: Server, table: str, rows: int, c: int, task: str, calls_from: str | None) -> dict:
    """The whole job with default chunking, then the same config again with nothing pending."""
    from jobs.config import parse_config
    from jobs.pipeline import run_job

    out = f"bench.whole_{task}_c{c}"
    spark.sql(f"DROP TABLE IF EXISTS {out}")
    endpoint = ({"name": "bench", "type": "driver_proxy", "url": server.url + "/"} if task == "completions" else
                {"name": "bench-emb", "type": "serving", "task": "llm/v1/embeddings", "host": server.url,
                 "batch_size": 32})
    cfg = parse_config({"input": {"table": table}, "output": {"table": out}, "endpoint": endpoint,
                        "limits": {"max_concurrency": c},
                        **({"run": {"calls_from": calls_from}} if calls_from else {})})
    server.reset()
    t0 = time.monotonic()
    summary = run_job(spark, cfg)
    wall = time.monotonic() - t0
    s = server.stats()
    t0 = time.monotonic()
    again = run_job(spark, cfg)
    noop = time.monotonic() - t0
    assert again.pending_rows == 0, again
    return {"task": task, "c": c, "calls_rps": s["rows"] / (s["last"] - s["first"]), "job_rps": rows / wall,
            "wall": wall, "chunks": summary.chunks, "peak": s["peak_inflight"], "ok": summary.by_status.get("ok", 0),
            "noop_s": noop}


def whole_job(spark, server: Server, table: str, args: argparse.Namespace, latency: float) -> None:
    cs = [int(c) for c in (args.concurrency if args.concurrency != DEFAULT_CS else "64,128").split(",")]
    results = [run_whole(spark, server, table, args.rows, c, task, args.calls_from)
               for task in ("completions", "embeddings") for c in cs]
    print(f"\nwhole job: {os.cpu_count()} cores, Spark {args.master}{' via Spark Connect' if args.connect else ''}; "
          f"calls from: {args.calls_from or 'auto'}; L = {args.latency_ms:.0f} ms (+{args.per_text_ms} ms per "
          f"embedded text); N = {args.rows} rows; default chunking")
    print(f"{'task':<12} {'C':>4} {'bound C/L':>10} {'calls rows/s':>13} {'calls ratio':>12} {'job rows/s':>11} "
          f"{'job ratio':>10} {'job/calls':>10} {'chunks':>7} {'peak':>5} {'ok':>7} {'no-op rerun s':>14}")
    for r in results:
        bound = r["c"] / latency
        r["calls_ratio"], r["job_ratio"] = r["calls_rps"] / bound, r["job_rps"] / bound
        emb = r["task"] == "embeddings"  # batches of 32 rows: C / L bounds requests, not rows
        cells = ("-", "-", "-") if emb else (f"{bound:.0f}", f"{r['calls_ratio']:.2f}", f"{r['job_ratio']:.2f}")
        print(f"{r['task']:<12} {r['c']:>4} {cells[0]:>10} {r['calls_rps']:>13.0f} {cells[1]:>12} "
              f"{r['job_rps']:>11.0f} {cells[2]:>10} {r['job_rps'] / r['calls_rps']:>10.2f} "
              f"{r['chunks']:>7} {r['peak']:>5} {r['ok']:>7} {r['noop_s']:>14.1f}")
    comp = {r["c"]: r for r in results if r["task"] == "completions"}
    emb = [r["job_rps"] / r["calls_rps"] for r in results if r["task"] == "embeddings"]
    fields = [f"job_efficiency_c64={comp[64]['job_ratio']:.3f}" if 64 in comp else None,
              f"job_efficiency_c128={comp[128]['job_ratio']:.3f}" if 128 in comp else None,
              f"embeddings_job_efficiency={min(emb):.3f}",
              f"noop_rerun_s={comp[min(comp)]['noop_s']:.1f}",
              f"peak_inflight_ok={str(all(r['peak'] <= r['c'] for r in results)).lower()}"]
    print("summary: " + " ".join(f for f in fields if f))


@contextlib.contextmanager
def connect_columns(on: bool):
    """pyspark builds Connect columns by a process-wide switch; on only while the job runs over Connect."""
    if on:
        os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"
    try:
        yield
    finally:
        if on:
            os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)


def run_naive(spark, server: Server, table: str, rows: int) -> dict:
    import requests
    from pyspark.sql.functions import pandas_udf

    url = server.url + "/"

    @pandas_udf("string")
    def naive(prompts: pd.Series) -> pd.Series:
        return prompts.map(lambda p: requests.post(url, json={"prompt": p, "stop": []}, timeout=60).json())

    df = spark.table(table).orderBy("id").limit(rows).repartition(2)
    server.reset()
    t0 = time.monotonic()
    n = df.select(naive("prompt").alias("r")).where("r IS NOT NULL").count()
    wall = time.monotonic() - t0
    s = server.stats()
    return {"calls_rps": n / (s["last"] - s["first"]), "job_rps": n / wall, "rows": n}


DEFAULT_CS = "8,32,64,128"


def run_order(clients: list[str], concurrency: list[int], rounds: int) -> list[tuple[int, int, str]]:
    """(round, C, client) in run order: clients alternate at each C, their order reversed every other
    round, so a slow spell on a shared machine does not always fall on the same client."""
    order = []
    for r in range(rounds):
        for c in concurrency:
            for client in (clients if r % 2 == 0 else clients[::-1]):
                order.append((r + 1, c, client))
    return order


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="20,000; 100,000 with --whole-job")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--per-text-ms", type=float, default=0.2, help="embeddings: added latency per text")
    p.add_argument("--concurrency", default=DEFAULT_CS, help="8,32,64,128; 64,128 with --whole-job")
    p.add_argument("--calls-from", choices=["executors", "driver"], default=None)
    p.add_argument("--connect", action="store_true", help="run the job through a Spark Connect client")
    p.add_argument("--whole-job", action="store_true")
    p.add_argument("--naive-rows", type=int, default=600)
    p.add_argument("--http-client", default=DEFAULT_CLIENT,
                   help="comma-separated limits.http_client values, run alternately "
                        f"(default {DEFAULT_CLIENT})")
    p.add_argument("--rounds", type=int, default=1, help="repeat every (C, client) run this many times")
    p.add_argument("--master", default="local[2]")
    args = p.parse_args()
    args.rows = args.rows or (100_000 if args.whole_job else 20_000)
    os.environ.setdefault("BI_JARS_DIR", str(ROOT / ".cache" / "jars"))
    clients = [c.strip() for c in args.http_client.split(",") if c.strip()]
    concurrency = [int(c) for c in args.concurrency.split(",")]

    from jobs.session import get_spark

    server = Server(args.latency_ms, args.per_text_ms)
    port = free_port() if args.connect else None
    spark = get_spark("benchmark", master=args.master, warehouse=tempfile.mkdtemp(prefix="bench-wh-"),
                      **({"connect_port": port} if port else {}))
    spark.sql("CREATE SCHEMA IF NOT EXISTS bench")
    table = "bench.prompts"
    (spark.range(args.rows).selectExpr("id", "concat('prompt number ', id) AS prompt")
     .write.format("delta").mode("overwrite").saveAsTable(table))
    latency = args.latency_ms / 1000
    job_spark = spark
    if port:
        from jobs.session import connect_session

        job_spark = connect_session(f"sc://127.0.0.1:{port}")
    results = []
    try:
        if args.whole_job:
            with connect_columns(bool(port)):
                whole_job(job_spark, server, table, args, latency)
            return
        naive = run_naive(spark, server, table, args.naive_rows)
        with connect_columns(bool(port)):
            for rnd, c, client in run_order(clients, concurrency, args.rounds):
                r = run_ours(job_spark, server, table, args.rows, c, client, args.calls_from)
                r.update(round=rnd, client=client, ratio=r["calls_rps"] / (c / latency))
                print(f"round {rnd} C={c} {client}: ratio {r['ratio']:.2f}", flush=True)
                results.append(r)
    finally:
        server.stop()

    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          "at the end; "
          f"Spark {args.master}; server: aiohttp (asyncio) in its own process; L = {args.latency_ms:.0f} ms; "
          f"N = {args.rows} rows; clients: {', '.join(clients)}; rounds: {args.rounds}; "
          f"calls from: {args.calls_from or 'auto'}{' via Spark Connect' if args.connect else ''}")
    print(f"{'round':>5} {'client':>8} {'C':>5} {'bound C/L':>10} {'calls rows/s':>13} {'ratio':>6} "
          f"{'steady':>7} "
          f"{'job rows/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'peak':>5} {'ok':>7}")
    for r in sorted(results, key=lambda r: (r["round"], r["c"], clients.index(r["client"]))):
        bound = r["c"] / latency
        print(f"{r['round']:>5} {r['client']:>8} {r['c']:>5} {bound:>10.0f} {r['calls_rps']:>13.0f} "
              f"{r['ratio']:>6.2f} "
              f"{r['steady_rps'] / bound:>7.2f} {r['job_rps']:>11.0f} "
              f"{r['p50']:>7.1f} {r['p99']:>7.1f} {r['peak']:>5} {r['ok']:>7}")
    print(f"naive per-row requests.post UDF over {naive['rows']} rows: {naive['calls_rps']:.1f} rows/s "
          f"(job {naive['job_rps']:.1f} rows/s)")
    first = [r for r in results if r["client"] == clients[0]]
    best = max(first, key=lambda r: r["calls_rps"])
    speedup = best["calls_rps"] / naive["calls_rps"]
    print(f"speed-up of {clients[0]} over naive (best C = {best['c']}): {speedup:.0f}x")
    peak_ok = all(r["peak"] <= r["c"] for r in results)
    # Per client, the worst round: the number a claim can rest on.
    fields = []
    for client in clients:
        suffix = "" if client == clients[0] else f"_{client}"
        for c in (64, 128):
            ratios = [r["ratio"] for r in results if r["client"] == client and r["c"] == c]
            if ratios:
                fields.append(f"efficiency_c{c}{suffix}={min(ratios):.3f}")
    fields += [f"speedup_vs_naive={speedup:.1f}", f"peak_inflight_ok={str(peak_ok).lower()}"]
    print("summary: " + " ".join(fields))


if __name__ == "__main__":
    main()
