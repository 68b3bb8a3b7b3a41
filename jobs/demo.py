"""`make demo`: the whole path on this machine, with the local stand-in endpoint.

Seeds `demo.prompts` from `data/prompts.jsonl`, starts the local endpoint (a driver-proxy-style app on
127.0.0.1; not a real model), runs the batch job with `conf/demo.yml`, and prints where the results
are and how to query them.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from jobs.config import load_config
from jobs.local_endpoint import LocalEndpoint
from jobs.run import setup_logging

ROOT = Path(__file__).resolve().parent.parent


def _free_port(preferred: int) -> int:
    for port in [preferred, *range(3000, 8001)]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 3000-8000 for the local endpoint")


def seed_prompts(spark, table: str, source: Path) -> None:
    spark.sql(f"CREATE SCHEMA IF NOT EXISTS {table.rsplit('.', 1)[0]}")
    df = spark.read.schema("id LONG, prompt STRING").json(str(source))
    df.write.format("delta").mode("overwrite").saveAsTable(table)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    from jobs.pipeline import run_job
    from jobs.session import get_spark

    conf = ROOT / "conf" / "demo.yml"
    base = load_config(conf)
    port = _free_port(base.endpoint.port or 7777)
    cfg = load_config(conf, [f"endpoint.port={port}", *(argv or [])])
    spark = get_spark("batch-inference-demo")
    seed_prompts(spark, cfg.input.table or "demo.prompts", ROOT / "data" / "prompts.jsonl")
    with LocalEndpoint(port) as endpoint:
        summary = run_job(spark, cfg)
    out = cfg.output.table
    location = spark.sql(f"DESCRIBE DETAIL {out}").first()["location"]
    print()
    print(f"Local endpoint on {endpoint.url} served {len(endpoint.received)} requests (a stand-in, not a model).")
    print(f"Run {summary.run_id}: {summary.by_status} in {summary.seconds:.1f}s")
    print(f"Results: Delta table {out} at {location}")
    print("Query it:")
    query = (f"SELECT id, prompt, response, status, latency_ms FROM {out} ORDER BY id LIMIT 5")
    print(f'  spark.sql("{query}").show(truncate=False)')
    spark.sql(query).show(truncate=60)
    return 0 if summary.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
