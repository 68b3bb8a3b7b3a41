"""Several endpoints in one run (`endpoints:`): overflow, fallback and split, against real loopback
endpoints, through the whole job on local Spark (both calling modes) into real Delta tables."""

from __future__ import annotations

import re
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from jobs.config import ConfigError, parse_config
from jobs.dryrun.forecast import forecast_lines
from jobs.local.stand_in import LocalEndpoint, Request
from jobs.observe.stats import tokens_of_chars
from jobs.pipeline import run_job
from udfs.outcome import Outcome
from udfs.router import for_fallback


def view(spark, rows: list[tuple], schema: str = "id long, prompt string") -> str:
    name = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame(rows, schema).createOrReplaceTempView(name)
    return name


def config(src: str, out: str, endpoints: list[dict[str, Any]], *, mode: str = "driver", **sections: Any):
    base: dict[str, Any] = {
        "input": {"table": src}, "output": {"table": out}, "endpoints": endpoints,
        "retry": {"backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "run": {"chunk_rows": 1000, "task_slots": 2, "max_error_share": 1.0, "calls_from": mode},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return parse_config(base)


def proxy(ep: LocalEndpoint, name: str, c: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "driver_proxy", "url": f"{ep.url}/", "limits": {"max_concurrency": c}, **extra}


class Capped:
    """An endpoint that admits at most `k` requests at once, answering 429 (no Retry-After) above it, as
    a provisioned-throughput endpoint does; each admitted request takes `latency_s`. Records who it
    admitted, its peak, and how many it admitted when each request arrived."""

    def __init__(self, k: int, latency_s: float | None = None) -> None:
        self.k, self.latency_s = k, latency_s
        self.admitted = 0
        self.peak = 0
        self.refused = 0
        self.served: Counter = Counter()  # prompts admitted (and answered)
        self.lock = threading.Lock()

    def __call__(self, req: Request) -> Any:
        with self.lock:
            if self.admitted >= self.k:
                self.refused += 1
                return 429, {}, b'{"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "too many requests"}'
            self.admitted += 1
            self.peak = max(self.peak, self.admitted)
            self.served[req.body["prompt"]] += 1
        try:
            time.sleep(self.latency_s if self.latency_s is not None else spread(req))
        finally:
            with self.lock:
                self.admitted -= 1
        return None  # the stand-in's own answer


def readme_recipes() -> list[str]:
    """The `spark.sql` recipes of README.md's section on several endpoints."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Several endpoints"):]
    section = section[:section.index("\n## ", 3)]
    return re.findall(r'spark\.sql\("""(.*?)"""\)', section, re.S)


def spread(req: Request) -> float:
    """0.05 s to 0.3 s, the same for a prompt every time: answers that do not finish in step."""
    return 0.05 + (zlib.crc32(req.body["prompt"].encode()) % 100) / 400


def received(ep: LocalEndpoint) -> Counter:
    """Prompts an endpoint was sent (each request's)."""
    return Counter(r.body["prompt"] for r in ep.received if isinstance(r.body, dict))


@pytest.fixture
def two():
    with LocalEndpoint() as a, LocalEndpoint() as b:
        yield a, b


@pytest.mark.parametrize("mode", ["driver", "executors"])
def test_overflow_takes_only_the_excess_of_a_primary_at_its_limit(spark, two, table_name, mode):
    primary, overflow = two
    k = 4  # two tasks of two in executors mode (an odd limit over two overlapping chunks' tasks loses one)
    cap = Capped(k)
    primary.fault = cap
    # The overflow's arrivals, each with how many the primary was holding at that moment.
    seen_primary: list[int] = []

    def watch(req: Request) -> Any:
        seen_primary.append(cap.admitted)
        time.sleep(spread(req))
        return None
    overflow.fault = watch
    rows = [(i, f"question {i}") for i in range(60)]
    cfg = config(view(spark, rows), table_name, [proxy(primary, "pt", k), proxy(overflow, "ppt", 6, role="overflow")],
                 mode=mode)
    summary = run_job(spark, cfg)

    assert summary.by_status == {"ok": 60}
    assert cap.peak == k and cap.refused == 0  # the primary at its limit, never above it
    assert overflow.peak_inflight <= 6  # each endpoint's own limit holds job-wide
    by_primary, by_overflow = cap.served, received(overflow)
    assert set(by_primary) | set(by_overflow) == {p for _, p in rows}
    assert not set(by_primary) & set(by_overflow)  # nothing sent twice
    assert max(by_primary.values()) == 1 and max(by_overflow.values()) == 1
    assert 0 < len(by_overflow) < 60
    # Only the excess: the overflow was sent a row only while the primary held its limit (one may just
    # have finished at the server when the client's slot was not yet free). Not while tasks start: the
    # primary's first requests may still be connecting when the overflow's arrive, and in executors
    # mode the second task starts a little after the first.
    # In executors mode each task routes by its own share (2 of the 4): once one task has sent all its
    # rows, the other may overflow while the primary holds only its share.
    # The client learns of an answer a little after the server sent it: on a loaded machine both of a
    # task's answers can be in that gap at once, so one arrival in ten may see the primary below the floor.
    steady = seen_primary[2 * 6:]
    floor, share = (k - 1, 0.8) if mode == "driver" else (k // 2 - 1, 0.5)
    print(f"primary held at the overflow's arrivals: {steady}")
    assert steady and sum(n < floor for n in steady) <= max(1, len(steady) // 10)
    assert sum(n == k for n in steady) >= share * len(steady)
    got = {r["prompt"]: r["endpoint"] for r in spark.table(table_name).select("prompt", "endpoint").collect()}
    assert {p for p, e in got.items() if e == "ppt"} == set(by_overflow)
    assert {p for p, e in got.items() if e == "pt"} == set(by_primary)

    # One request_hash across endpoints: a rerun finds every row answered, whoever answered it.
    again = run_job(spark, cfg)
    assert again.pending_rows == 0


@pytest.mark.parametrize("mode", ["driver", "executors"])
def test_with_no_excess_the_overflow_gets_nothing(spark, two, table_name, mode):
    primary, overflow = two
    rows = [(i, f"few {i}") for i in range(2)]  # fewer than any task's share of the primary (2 of 4)
    cfg = config(view(spark, rows), table_name, [proxy(primary, "pt", 4), proxy(overflow, "ppt", 6, role="overflow")],
                 mode=mode)
    assert run_job(spark, cfg).by_status == {"ok": 2}
    assert received(overflow) == Counter() and set(received(primary)) == {p for _, p in rows}


def test_a_429_from_a_primary_above_its_real_limit_hands_the_row_to_the_overflow_at_once(spark, two, table_name):
    primary, overflow = two
    cap = Capped(2, latency_s=0.1)
    primary.fault = cap
    rows = [(i, f"q{i}") for i in range(40)]
    # The primary is configured for more than it admits: its 429s hand rows over instead of pausing them.
    cfg = config(view(spark, rows), table_name, [proxy(primary, "pt", 8), proxy(overflow, "ppt", 8, role="overflow")],
                 retry={"row_budget_s": 600, "breaker_s": 600})
    summary = run_job(spark, cfg)

    assert summary.by_status == {"ok": 40}
    assert cap.peak <= 2 and cap.refused > 0
    by_primary, by_overflow = cap.served, received(overflow)
    assert not set(by_primary) & set(by_overflow) and len(by_primary) + len(by_overflow) == 40
    table = spark.table(table_name)
    handed = table.where("endpoint = 'ppt' AND attempts = 2").count()
    assert handed > 0  # a 429 on the primary, then answered by the overflow: both attempts counted
    assert table.where("endpoint = 'pt' AND attempts > 1").count() == 0  # none waited on the primary


@pytest.mark.parametrize("mode", ["driver", "executors"])
def test_a_primary_that_goes_down_halfway_leaves_the_rest_to_the_fallback_but_not_rows_refused_for_content(
        spark, two, table_name, mode):
    primary, fallback = two
    served = [0]
    ok: set[str] = set()
    refused: set[str] = set()
    lock = threading.Lock()

    def primary_fault(req: Request) -> Any:
        with lock:
            if "REFUSE" in req.body["prompt"]:
                refused.add(req.body["prompt"])
                return 400, {}, b'{"error_code": "BAD_REQUEST", "message": "this prompt is not allowed"}'
            served[0] += 1
            if served[0] > 10:
                return 503, {}, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "the endpoint is down"}'
            ok.add(req.body["prompt"])
        return None
    primary.fault = primary_fault
    rows = [(i, f"q{i}" if i % 4 else f"REFUSE {i}") for i in range(40)]
    cfg = config(view(spark, rows), table_name, [proxy(primary, "main", 2), proxy(fallback, "backup", 2, role="fallback")],
                 mode=mode, retry={"breaker_s": 0.5, "row_budget_s": 30})
    summary = run_job(spark, cfg)

    assert refused  # the primary refused some rows for their content before it went down
    assert summary.by_status == {"ok": 40 - len(refused), "error": len(refused)}
    table = spark.table(table_name)
    errors = {r["prompt"]: (r["endpoint"], r["http_status"], r["error"].split(":")[0])
              for r in table.where("status = 'error'").collect()}
    assert errors == {p: ("main", 400, "http_400") for p in refused}
    assert not refused & set(received(fallback))  # a row refused for its content never reaches the fallback
    by_backup = set(received(fallback))
    assert len(ok) == 10 and len(by_backup) >= 15 and not ok & by_backup
    assert {r["prompt"] for r in table.where("endpoint = 'backup'").collect()} == by_backup
    assert {r["prompt"] for r in table.where("endpoint = 'main' AND status = 'ok'").collect()} == ok


@pytest.mark.parametrize("mode", ["driver", "executors"])
def test_a_split_sends_each_id_to_one_endpoint_by_its_id_the_same_on_a_rerun(spark, two, table_name, mode):
    a, b = two
    rows = [(i, f"p{i % 7}") for i in range(1000)]  # repeated prompts: identical requests per endpoint
    src = view(spark, rows)
    endpoints = [proxy(a, "model-a", 4, price_per_1k_prompt_tokens=1.0, price_per_1k_completion_tokens=3.0),
                 proxy(b, "model-b", 4, price_per_1k_prompt_tokens=2.0, price_per_1k_completion_tokens=5.0)]
    runs = f"{table_name}_runs"
    cfg = config(src, table_name, endpoints, mode=mode, split={"model-a": 0.5, "model-b": 0.5},
                 output={"runs_table": runs})
    summary = run_job(spark, cfg)
    assert summary.by_status == {"ok": 1000}
    first = spark.table(table_name).select("id", "endpoint")
    counts = dict(first.groupBy("endpoint").count().collect())
    assert abs(counts["model-a"] - 500) <= 50 and abs(counts["model-b"] - 500) <= 50
    assert a.peak_inflight <= 4 and b.peak_inflight <= 4

    # The runs table reports each endpoint: its rows, its requests, its tokens at its own prices.
    [run] = spark.table(runs).where(f"run_id = '{summary.run_id}'").collect()
    per = {e["endpoint"]: e for e in run["endpoints"]}
    assert {n: (e["role"], e["rows"], e["rows_ok"]) for n, e in per.items()} == {
        n: ("primary", counts[n], counts[n]) for n in ("model-a", "model-b")}
    assert per["model-a"]["requests"] == len(a.received) and per["model-b"]["requests"] == len(b.received)
    for name, (p_in, p_out) in {"model-a": (1.0, 3.0), "model-b": (2.0, 5.0)}.items():
        e = per[name]
        assert e["prompt_tokens"] > 0 and e["estimated_cost"] == pytest.approx(
            (e["prompt_tokens"] * p_in + e["completion_tokens"] * p_out) / 1000)
    assert run["estimated_cost"] == pytest.approx(per["model-a"]["estimated_cost"] + per["model-b"]["estimated_cost"])
    # The README's recipes that compare the two, on these tables: one row per endpoint each.
    for sql in readme_recipes()[:2]:
        got = spark.sql(sql.replace("demo.completions", table_name).replace("demo.runs", runs)
                        .replace("<run id>", summary.run_id)).collect()
        assert sorted(r["endpoint"] for r in got) == ["model-a", "model-b"]
    # Each endpoint was sent each of its distinct prompts once, and only those.
    by_endpoint = {e: {p for (p,) in spark.table(table_name).where(f"endpoint = '{e}'").select("prompt").distinct()
                       .collect()} for e in ("model-a", "model-b")}
    assert sorted(r.body["prompt"] for r in a.received) == sorted(by_endpoint["model-a"])
    assert sorted(r.body["prompt"] for r in b.received) == sorted(by_endpoint["model-b"])

    fresh = f"{table_name}_again"
    run_job(spark, cfg.model_copy(update={"output": cfg.output.model_copy(update={"table": fresh})}))
    assert_df_equality(spark.table(fresh).select("id", "endpoint"), first, ignore_row_order=True,
                       ignore_nullable=True)


def test_split_weights_are_honoured_and_uneven_ones_too(spark, two, table_name):
    a, b = two
    rows = [(i, f"x{i}") for i in range(1000)]
    cfg = config(view(spark, rows), table_name, [proxy(a, "small", 4), proxy(b, "large", 4)],
                 split={"small": 1, "large": 3})
    run_job(spark, cfg)
    counts = dict(spark.table(table_name).groupBy("endpoint").count().collect())
    assert abs(counts["small"] - 250) <= 50 and abs(counts["large"] - 750) <= 50


def test_the_dry_runs_forecast_prices_each_endpoints_share_at_its_own_prices(spark, two, table_name):
    """A split 1:3 between a cheap and a dear endpoint: the forecast from 20 sampled rows prices the
    rest by the split's shares, each at its endpoint's prices, within 10 % of what the whole run then
    costs; it also gives the rest's cost were every row to go to each, and the rows in flight the
    lanes allow (the slower lane to drain its share sets the pace: min(2 / 0.25, 6 / 0.75) = 8)."""
    a, b = two
    src = view(spark, [(i, f"prompt {i} " + "x" * (i % 50)) for i in range(400)])
    endpoints = [proxy(a, "cheap", 2, price_per_1k_prompt_tokens=1.0, price_per_1k_completion_tokens=2.0),
                 proxy(b, "dear", 6, price_per_1k_prompt_tokens=10.0, price_per_1k_completion_tokens=20.0)]
    cfg = config(src, table_name, endpoints, split={"cheap": 1, "dear": 3}, run={"dry_run": True})
    summary = run_job(spark, cfg)
    f = summary.dry_run.forecast
    assert (f.sampled, f.rest) == (20, 380)
    run_job(spark, cfg.model_copy(update={"run": cfg.run.model_copy(update={"dry_run": False})}))

    prices = {"cheap": (1.0, 2.0), "dear": (10.0, 20.0)}
    tokens = (spark.table(table_name).groupBy("endpoint")
              .agg(F.sum(tokens_of_chars(F.length("prompt"))).alias("i"),
                   F.sum(tokens_of_chars(F.length("response"))).alias("o")).collect())
    truth = sum((r["i"] * prices[r["endpoint"]][0] + r["o"] * prices[r["endpoint"]][1]) / 1000 for r in tokens)
    assert {r["endpoint"] for r in tokens} == {"cheap", "dear"}
    assert abs(f.cost["mean"] - truth) <= 0.1 * truth, (f.cost, truth)
    assert set(f.cost_if_all) == {"cheap", "dear"}
    assert f.cost_if_all["dear"] == pytest.approx(10 * f.cost_if_all["cheap"], rel=1e-3)
    lines = forecast_lines(f, cfg)
    assert any("8 rows in flight" in line for line in lines), lines
    assert any("shared by split" in line for line in lines), lines


def test_a_split_row_that_fails_for_its_endpoint_goes_to_the_fallback(spark, table_name):
    with LocalEndpoint() as a, LocalEndpoint() as b, LocalEndpoint() as c:
        b.fault = lambda req: (503, {}, b'{"message": "down"}')
        rows = [(i, f"y{i}") for i in range(40)]
        cfg = config(view(spark, rows), table_name,
                     [proxy(a, "a", 2), proxy(b, "b", 2), proxy(c, "spare", 2, role="fallback")],
                     split={"a": 0.5, "b": 0.5}, retry={"breaker_s": 0.3, "row_budget_s": 30})
        assert run_job(spark, cfg).by_status == {"ok": 40}
        counts = dict(spark.table(table_name).groupBy("endpoint").count().collect())
        assert set(counts) == {"a", "spare"} and counts["spare"] > 5
        assert set(counts) == {"a", "spare"}  # b answered nothing


@pytest.mark.parametrize("outcome, goes", [
    (Outcome.failed("endpoint_unavailable: nothing answered for 480s"), True),
    (Outcome.failed("http_503: busy (gave up after 6 attempts, 13.0s)", http_status=503), True),
    (Outcome.failed("http_429: slow down", http_status=429), True),
    (Outcome.failed("http_404: no such endpoint", http_status=404), True),
    (Outcome.failed("timeout: no answer within 120s"), True),
    (Outcome.failed("credential_refused: 401"), True),
    (Outcome.failed("http_400: bad prompt", http_status=400), False),
    (Outcome.failed("invalid_output: $.label: not one of [a, b]"), False),
    (Outcome.failed("prompt_too_long: 9 chars > run.max_prompt_chars 5"), False),
    (Outcome.failed("transform_input_failed: KeyError"), False),
    (Outcome.unsent(), False),
    (Outcome(response="fine"), False),
])
def test_only_failures_of_the_endpoint_go_to_a_fallback(outcome, goes):
    assert for_fallback(outcome) is goes


@pytest.mark.parametrize("change, why", [
    ({"endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001},
                    {"name": "a", "type": "driver_proxy", "port": 3002, "role": "fallback"}]},
     "endpoints.1.name: 'a' is also endpoints.0.name"),
    ({"endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001},
                    {"name": "b", "type": "driver_proxy", "port": 3002}]}, "endpoints: 2 have role primary"),
    ({"endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001, "role": "overflow"}]},
     "endpoints: 0 have role primary"),
    ({"endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001}], "split": {"aa": 1}},
     "split.aa: no endpoint of that name; did you mean 'a'?"),
    ({"endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001},
                    {"name": "b", "type": "driver_proxy", "port": 3002, "role": "overflow"}], "split": {"a": 1}},
     "endpoints.1.role: overflow, but it is not in split"),
    ({"endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001},
                    {"name": "b", "type": "serving", "task": "llm/v1/embeddings", "role": "fallback"}]},
     "endpoints.1.task: llm/v1/embeddings and endpoints.0.task custom"),
    ({"endpoint": {"name": "a", "type": "driver_proxy", "port": 3001}, "split": {"a": 1}}, "split: needs `endpoints`"),
    ({"endpoint": {"name": "a", "type": "driver_proxy", "port": 3001},
      "endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001}]}, "endpoints: give `endpoint` (one)"),
    ({"endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001, "rol": "primary"}]},
     "endpoints.0.rol: unknown key; did you mean endpoints.0.role?"),
    ({"endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001, "limits": {"max_concurency": 3}}]},
     "endpoints.0.limits.max_concurency: unknown key; did you mean endpoints.0.limits.max_concurrency?"),
])
def test_a_bad_endpoints_config_names_the_key(change, why):
    with pytest.raises(ConfigError) as err:
        parse_config({"input": {"table": "t"}, "output": {"table": "o"}, **change})
    assert why in str(err.value)


def test_each_endpoint_gets_its_own_limits_or_the_top_level_ones_and_one_hash_covers_them_all():
    def cfg(kwargs_b: dict[str, Any], limits_a: int = 3):
        return parse_config({"input": {"table": "t"}, "output": {"table": "o"}, "limits": {"max_concurrency": 5},
                             "endpoints": [{"name": "a", "type": "driver_proxy", "port": 3001,
                                            "limits": {"max_concurrency": limits_a}},
                                           {"name": "b", "type": "driver_proxy", "port": 3002, "role": "overflow",
                                            "model_kwargs": kwargs_b}]})
    c = cfg({})
    assert [(r.endpoint.name, r.role, r.limits.max_concurrency) for r in c.routes()] == [
        ("a", "primary", 3), ("b", "overflow", 5)]
    assert c.endpoint.name == "a" and c.limits.max_concurrency == 3
    # What shapes any endpoint's requests is in the one request_hash; its limits are not.
    assert cfg({}).request_fingerprint() == cfg({}, limits_a=7).request_fingerprint()
    assert cfg({}).request_fingerprint() != cfg({"temperature": 0.5}).request_fingerprint()
    # A config of one endpoint keeps the hashes its tables hold, whether written as a list or not.
    one = {"name": "a", "type": "driver_proxy", "port": 3001}
    base = {"input": {"table": "t"}, "output": {"table": "o"}}
    assert parse_config({**base, "endpoint": one}).request_fingerprint() == \
        parse_config({**base, "endpoints": [one]}).request_fingerprint()
