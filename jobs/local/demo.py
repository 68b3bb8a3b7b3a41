"""`make demo`: the whole path on this machine, with the local stand-in endpoint.

Seeds `demo.prompts` from `data/prompts.jsonl`, starts the local endpoint (on 127.0.0.1; not a real
model), runs the batch job three times, once per config: `conf/demo.yml` (completions from a
driver-proxy style app into `demo.completions`), `conf/demo_embeddings.yml` (`llm/v1/embeddings` from a
serving-style endpoint into `demo.embeddings`) and `conf/demo_classify.yml` (structured output: a
prompt template over two columns, answers checked against a JSON Schema and landed as a typed struct
in `demo.classified`), and prints where the results are and how to query them.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

from jobs.cli.run import setup_logging
from jobs.config import JobConfig, load_config
from jobs.local.stand_in import LocalEndpoint, llm_latency
from jobs.observe.lines import duration, start_line
from jobs.output.tables import ensure_schema

ROOT = Path(__file__).resolve().parents[2]
DEMO_LATENCY_S = 0.3  # the stand-in's median answer time
log = logging.getLogger("batch_inference")

# Cosine similarity in plain Spark SQL: the nearest other prompt to each of the first three.
NEAREST = """
WITH pairs AS (
  SELECT a.id, b.id AS other, b.text AS other_text,
         aggregate(zip_with(a.embedding, b.embedding, (x, y) -> x * y), 0D, (s, v) -> s + v)
         / sqrt(aggregate(a.embedding, 0D, (s, v) -> s + v * v))
         / sqrt(aggregate(b.embedding, 0D, (s, v) -> s + v * v)) AS cosine
  FROM {t} a JOIN {t} b ON a.id < 4 AND a.id != b.id AND a.status = 'ok' AND b.status = 'ok')
SELECT id, max_by(other, cosine) AS nearest, round(max(cosine), 3) AS cosine,
       max_by(other_text, cosine) AS text
FROM pairs GROUP BY id ORDER BY id"""

# Structured output: the typed struct's fields are columns to group by, beside a kept input column.
BY_INTENT = """
SELECT parsed.intent AS intent, count(*) AS questions, count_if(parsed.is_question) AS phrased_as_questions,
       round(avg(parsed.words), 1) AS avg_words, count_if(audience = 'analyst') AS from_analysts
FROM {t} WHERE status = 'ok' GROUP BY parsed.intent ORDER BY questions DESC, intent"""


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
    ensure_schema(spark, table)
    df = spark.read.schema("id LONG, prompt STRING").json(str(source))
    df.write.format("delta").mode("overwrite").saveAsTable(table)


def configs(port: int, argv: list[str]) -> list[JobConfig]:
    """The demo configs, pointed at the local endpoint on `port`; `argv` overrides apply to each."""
    return [load_config(ROOT / "conf" / "demo.yml", [f"endpoint.port={port}", *argv]),
            load_config(ROOT / "conf" / "demo_embeddings.yml",
                        [f"endpoint.host=http://127.0.0.1:{port}", *argv]),
            load_config(ROOT / "conf" / "demo_classify.yml",
                        [f"endpoint.host=http://127.0.0.1:{port}", *argv])]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    from jobs.pipeline import calls_from, run_job
    from jobs.session import get_spark

    port = _free_port(load_config(ROOT / "conf" / "demo.yml").endpoint.port or 7777)
    completions, embeddings, classify = configs(port, list(argv or []))
    spark = get_spark("batch-inference-demo")
    seed_prompts(spark, completions.input.table or "demo.prompts", ROOT / "data" / "prompts.jsonl")
    # Answers take what an LLM's take, varying per prompt (median 0.3 s, a few seconds at most): the
    # engine keeps `limits.max_concurrency` in flight across them.
    summaries = []
    with LocalEndpoint(port, latency_of=lambda raw: llm_latency(raw, DEMO_LATENCY_S, 0.05, 3.0)) as endpoint:
        for cfg in (completions, embeddings, classify):
            mode, _ = calls_from(spark, cfg.run.calls_from)
            log.info("%s", start_line(cfg, mode, f"run.calls_from: {cfg.run.calls_from}"))
            summaries.append(run_job(spark, cfg))
    print()
    print(f"Local endpoint on {endpoint.url} served {len(endpoint.received)} requests "
          "(a stand-in, not a model).")
    for cfg, summary in zip((completions, embeddings, classify), summaries):
        out = cfg.output.table
        location = spark.sql(f"DESCRIBE DETAIL {out}").first()["location"]
        counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.by_status.items())) or "nothing to do"
        print(f"Run {summary.run_id}: {counts} in {duration(summary.seconds)}; results in Delta table {out} "
              f"at {location}")
    out = completions.output.table
    query = f"SELECT id, prompt, response, status, latency_ms FROM {out} ORDER BY id LIMIT 5"
    print("Query them:")
    print(f'  spark.sql("{query}").show(truncate=False)')
    spark.sql(query).show(truncate=60)
    query = (f"SELECT id, text, dim, slice(embedding, 1, 4) AS head, status "
             f"FROM {embeddings.output.table} ORDER BY id")
    print(f'  spark.sql("{query}").show(5)')
    spark.sql(query).show(5, truncate=48)
    print("  nearest prompts by cosine similarity, in Spark SQL (see jobs/local/demo.py NEAREST):")
    spark.sql(NEAREST.format(t=embeddings.output.table)).show(truncate=48)
    show_classified(spark, classify)
    show_runs(spark, completions)
    return 0 if all(s.errors == 0 for s in summaries) else 1


def show_classified(spark, cfg: JobConfig) -> None:
    """Structured output: the typed struct, and a GROUP BY over one of its fields."""
    out = cfg.output.table
    parsed = spark.table(out).schema["parsed"].dataType.simpleString()
    print(f"Structured output in {out}: `parsed` is {parsed}, checked against conf/demo_classify.schema.json")
    query = f"SELECT id, audience, prompt, parsed, status FROM {out} ORDER BY id"
    print(f'  spark.sql("{query}").show(3)')
    spark.sql(query).show(3, truncate=50)
    print("  a GROUP BY over a field of the struct (see jobs/local/demo.py BY_INTENT):")
    print("  " + "\n  ".join(BY_INTENT.format(t=out).strip().splitlines()))
    spark.sql(BY_INTENT.format(t=out)).show(truncate=False)


def show_runs(spark, cfg: JobConfig) -> None:
    """Where each run's summary went: the runs table (one row per run) and MLflow."""
    runs = cfg.output.runs_table
    if runs and spark.catalog.tableExists(runs):
        location = spark.sql(f"DESCRIBE DETAIL {runs}").first()["location"]
        print(f"Runs: Delta table {runs} at {location}, one row per run (README: Watching a run)")
        query = ("SELECT endpoint, rows, rows_error, latency_p95_ms, rows_per_s, total_tokens, estimated_cost, "
                 "cost_unit "
                 f"FROM {runs} ORDER BY started_at DESC LIMIT 4")
        print(f'  spark.sql("{query}").show()')
        spark.sql(query).show(truncate=False)
    if cfg.mlflow.enabled:
        from jobs.observe.tracking import tracking_uri

        print(f"MLflow runs, with a latency histogram and a throughput plot each: {tracking_uri(cfg)}")
        print("  browse them: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
