"""`run.dry_run` (`--dry-run`): check a config against the real input and endpoint before paying for a run.

It validates the config, resolves the endpoint (URL, credentials) and the input, counts the rows and
the pending rows (reading the output table if it exists, never creating or writing it), estimates
prompt tokens and cost, and sends exactly one probe request, without retries. Nothing else is called:
no table is written, no MLflow run is logged. Unless every check passes it raises `DryRunFailed` (the
entry point's exit code 1) after logging them all.

`--all` prices every input row (a full re-run), not only the pending ones.

Example::

    batch-inference --conf conf/demo.yml --dry-run
    batch-inference --conf conf/demo.yml --dry-run --all
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession, functions as F

from jobs.calls.chunking import estimate_chunks
from jobs.config import ConfigError, JobConfig
from jobs.endpoint.resolve import engine_specs
from jobs.errors import InputError, JobFailed, first_line
from jobs.input.read import read_requests, with_limit, without_final
from jobs.observe.lines import money
from jobs.observe.stats import estimate_cost
from jobs.observe.summary import DryRunReport, RunSummary
from jobs.observe.tracking import tracking_uri
from jobs.output.commit import growable_columns, table_schema
from jobs.output.tables import schema_changes
from jobs.secret_rules import redact_url
from udfs.engine import Engine
from udfs.prompts import CHARS_PER_TOKEN
from udfs.spec import EngineSpec

log = logging.getLogger("batch_inference")

# Sent when no pending row has a prompt to send (nothing pending, or the input could not be read).
FALLBACK_PROMPT = "ping"


class DryRunFailed(JobFailed):
    """A dry run found a problem; the log lists every check."""


def dry_run(spark: SparkSession, cfg: JobConfig, *, run_id: str) -> RunSummary:
    """Run every check, log each, and return what a run would do; `DryRunFailed` if any check fails."""
    started = time.monotonic()
    report = check(spark, cfg)
    for c in report.checks:
        (log.info if c.ok else log.error)("dry run: %s %s: %s", "ok  " if c.ok else "FAIL", c.name, c.detail)
    pending = report.pending_rows or 0
    summary = RunSummary(run_id=run_id, output_table=cfg.output.table, input_rows=report.input_rows or 0,
                         pending_rows=pending,
                         chunks=estimate_chunks(cfg, pending),
                         seconds=time.monotonic() - started, dry_run=report)
    if not report.ok:
        failed = [c.name for c in report.checks if not c.ok]
        raise DryRunFailed(f"dry run: {len(failed)} check(s) failed ({', '.join(failed)}); "
                           "nothing was written")
    log.info("dry run: every check passed; nothing was written")
    return summary


def check(spark: SparkSession, cfg: JobConfig) -> DryRunReport:
    r = DryRunReport()
    r.add("config", True, f"valid (config hash {cfg.config_hash()})")
    specs = _endpoints(r, spark, cfg)
    spec = next((s for s in specs if s.role == "primary"), None)
    requests = _input(r, spark, cfg)
    prior = _output(r, spark, cfg, requests)
    pending = None
    if requests is not None:
        # --all: every input row, as if the output table held none (a full re-run's price).
        unlimited = requests if cfg.run.dry_run_all else requests.transform(without_final(prior, cfg.run.retry_errors))
        pending = unlimited.transform(with_limit(cfg.run.limit))
        _count(r, pending, unlimited if cfg.run.limit else None, every_row=cfg.run.dry_run_all)
    if spec is not None:
        first = _first_prompt(pending)
        _probe(r, spec, cfg, first)
        for other in (s for s in specs if s is not spec):  # each endpoint answers, or the dry run says so
            _probe(r, other, cfg, first, check=f"probe {other.name}", keep=False)
    _estimate(r, cfg)
    return r


def _endpoints(r: DryRunReport, spark: SparkSession, cfg: JobConfig) -> list[EngineSpec]:
    """Every endpoint of the run resolved (URL, credentials), one check each; [] if any fails."""
    try:
        specs = engine_specs(cfg, spark)
    except ConfigError as exc:
        r.add("endpoint", False, str(exc))
        return []
    for spec, route in zip(specs, cfg.routes()):
        auth = "with credentials" if spec.headers or spec.credentials else "without credentials"
        name = "endpoint" if spec.role == "primary" and route.weight is None else f"endpoint {spec.name}"
        role = "" if name == "endpoint" else f" ({spec.role if route.weight is None else f'split {route.weight:.0%}'})"
        r.add(name, True, f"{route.endpoint.task} at {redact_url(spec.url)}, {auth}{role}")
    return specs


def _input(r: DryRunReport, spark: SparkSession, cfg: JobConfig) -> DataFrame | None:
    try:
        _, requests = read_requests(spark, cfg)
        r.input_rows = requests.count()
    except (InputError, AnalysisException) as exc:
        r.add("input", False, first_line(exc))
        return None
    source = cfg.input.table or cfg.input.path or "input.query"
    limit = f" (run.limit {cfg.run.limit})" if cfg.run.limit else ""
    r.add("input", True, f"{source}: {r.input_rows} rows{limit}")
    return requests


def _output(r: DryRunReport, spark: SparkSession, cfg: JobConfig,
            requests: DataFrame | None) -> DataFrame | None:
    """The existing output table, read only, if its schema fits; a run would create a missing one."""
    name = cfg.output.table
    runs = cfg.output.runs_table
    then = (f"; runs recorded in {runs}" if runs else "") + (
        f"; MLflow at {tracking_uri(cfg)}" if cfg.mlflow.enabled else "")
    try:
        exists = spark.catalog.tableExists(name)
    except AnalysisException as exc:
        r.add("output", False, f"output.table {name}: {first_line(exc)}")
        return None
    if not exists:
        r.add("output", True, f"{name} does not exist yet; a run creates it{then}")
        return None
    prior = spark.read.table(name)
    grows = ""
    if requests is not None:
        want = table_schema(cfg, requests.schema)
        adds, wrong = schema_changes(prior.schema, want, growable_columns(want, cfg.endpoint.is_embeddings))
        if wrong:
            r.add("output", False, f"{name} exists with another schema: {', '.join(wrong)}")
            return None
        grows = f"; a run adds columns {', '.join(a.split(' ', 1)[0] for a in adds)}" if adds else ""
    r.add("output", True, f"{name} exists; rows it holds as final are skipped{grows}{then}")
    return prior


def _count(r: DryRunReport, pending: DataFrame, unlimited: DataFrame | None, every_row: bool = False) -> None:
    """`pending` is what this run would take; `unlimited` every pending row, when `run.limit` cuts it;
    `every_row`: they are every input row (`--all`), final or not."""
    # Per request first: identical prompts are sent once, and their characters count once.
    per_request = pending.groupBy("request_hash").agg(
        F.count("*").alias("n"), F.max(F.col("precheck").isNull()).alias("sent"),
        F.max(F.length("prompt")).alias("chars"))
    row = per_request.agg(
        F.sum("n").alias("pending"), F.count(F.when(F.col("sent"), 1)).alias("requests"),
        F.sum(F.when(F.col("sent"), F.col("chars"))).alias("chars"),
        F.sum(F.when(~F.col("sent"), F.col("n"))).alias("not_sent")).first()
    r.pending_rows, r.requests, r.prompt_chars = row["pending"] or 0, row["requests"] or 0, row["chars"] or 0
    all_pending = unlimited.count() if unlimited is not None else r.pending_rows
    done = (r.input_rows or 0) - all_pending
    cut = f", this run takes the first {r.pending_rows} by id (run.limit)" if unlimited is not None else ""
    which = (f"all {all_pending} input rows priced (--all), final ones too" if every_row
             else f"{all_pending} of {r.input_rows} rows pending ({done} already final in the output table)")
    r.add("pending", True,
          f"{which}{cut}; "
          f"{r.requests} distinct requests to send, {r.prompt_chars} prompt characters; "
          f"{row['not_sent'] or 0} rows fail the prechecks (empty, or over run.max_prompt_chars) "
          "and are not sent")


def _first_prompt(pending: DataFrame | None) -> str | None:
    if pending is None:
        return None
    first = pending.where(F.col("precheck").isNull()).select("prompt").limit(1).collect()
    return first[0]["prompt"] if first else None


def _probe(r: DryRunReport, spec: EngineSpec, cfg: JobConfig, prompt: str | None, *, check: str = "probe",
           keep: bool = True) -> None:
    """One request, one attempt: a dry run must not retry its way into a rate limit or a bill. `keep`:
    its outcome is the report's probe (the primary's), which the estimates read."""
    text = prompt if prompt is not None else FALLBACK_PROMPT
    one = replace(spec, rows_per_request=1, max_concurrency=1, requests_per_s=None, tokens_per_s=None,
                  input_tokens_per_s=None, output_tokens_per_s=None,
                  retry=replace(spec.retry, max_attempts=1, invalid_output_attempts=0))
    try:
        with Engine(one, max_limit=1) as engine:
            [outcome] = engine.call([text])
    except Exception as exc:  # the engine turns request failures into outcomes; this is set-up failing
        r.add(check, False, f"could not call the endpoint: {type(exc).__name__}")
        return
    if keep:
        r.probe, r.probe_prompt_chars = outcome, len(text)
    took = f"{outcome.latency_ms:.0f} ms" if outcome.latency_ms is not None else "no answer"
    which = "the first pending prompt" if prompt is not None else f"{FALLBACK_PROMPT!r} (no pending prompt)"
    if outcome.status != "ok":
        r.add(check, False, f"{which}: {outcome.error} (HTTP {outcome.http_status}, {took})")
        return
    shape = (f"a vector of {len(outcome.embedding)} floats" if outcome.embedding is not None
             else f"JSON of {len(outcome.response or '')} characters that fits endpoint.response_format"
             if spec.response_schema is not None else f"text of {len(outcome.response or '')} characters")
    usage = (f"usage {outcome.prompt_tokens} prompt + {outcome.completion_tokens or 0} completion tokens"
             if outcome.prompt_tokens is not None else "no usage reported")
    dim = cfg.endpoint.embedding_dim
    if dim is not None and outcome.embedding is not None and len(outcome.embedding) != dim:
        r.add(check, False, f"{which}: endpoint.embedding_dim is {dim}, the endpoint answered {shape}")
        return
    r.add(check, True, f"{which}: HTTP {outcome.http_status} in {took}, {shape}, {usage}")


def _estimate(r: DryRunReport, cfg: JobConfig) -> None:
    """Prompt tokens at the probe's reported tokens per character, else characters / `CHARS_PER_TOKEN`;
    completion tokens as if every answer were as long as the probe's; cost at the configured prices."""
    if r.requests is None or r.prompt_chars is None:
        return
    p = r.probe if r.probe is not None and r.probe.status == "ok" else None
    if p is not None and p.prompt_tokens and r.probe_prompt_chars:
        r.prompt_tokens = math.ceil(r.prompt_chars * p.prompt_tokens / r.probe_prompt_chars)
        r.token_basis = f"at the probe's {p.prompt_tokens} tokens for {r.probe_prompt_chars} characters"
    else:
        r.prompt_tokens = math.ceil(r.prompt_chars / CHARS_PER_TOKEN)
        r.token_basis = f"characters / {CHARS_PER_TOKEN}"
    per_answer = 0 if p is None or p.response is None else (
        p.completion_tokens if p.completion_tokens is not None
        else math.ceil(len(p.response) / CHARS_PER_TOKEN))
    r.completion_tokens = per_answer * r.requests
    r.cost = estimate_cost(cfg.endpoint, r.prompt_tokens, r.completion_tokens)
    cost = (f"estimated cost {money(r.cost, cfg.endpoint.price_unit)}" if r.cost is not None
            else "no cost: set endpoint.price_per_1k_prompt_tokens / price_per_1k_completion_tokens")
    answers = f" + ~{r.completion_tokens} completion tokens (answers as long as the probe's)" if p else ""
    r.add("estimate", True, f"~{r.prompt_tokens} prompt tokens ({r.token_basis}){answers}; {cost}")


__all__ = ["DryRunFailed", "check", "dry_run"]
