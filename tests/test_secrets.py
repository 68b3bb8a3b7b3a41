"""The token never shows: not in logs, reprs, exception messages, the output table, or the Spark plan.

The token used here is a real bearer token as far as the job knows: it comes from the environment
(`endpoint.token_env`), travels to the executors, and reaches the loopback endpoint in the
`Authorization` header, which each test checks so that "not found" is never vacuous. The endpoint
then misbehaves the way real gateways do: it echoes the header or the bare token in its errors.
"""

from __future__ import annotations

import json
import logging
import pickle
import uuid
from pathlib import Path

import pytest
import yaml
from pyspark.sql import functions as F

from jobs.calls.outcomes import with_outcomes
from jobs.calls.plan import plan_tasks
from jobs.config import parse_config
from jobs.endpoint.resolve import auth_headers, engine_spec
from jobs.input.read import read_input, with_precheck, with_request_hash
from jobs.local.stand_in import LocalEndpoint
from tests.conftest import job_config
from tests.faults import FaultPlan, FromRequest, json_error
from udfs.auth import Secret, bearer
from udfs.engine import Engine
from udfs.spec import EngineSpec, RetrySpec
from udfs.inference import inference_udf

# Not hex, so no run id, hash or address in a log can contain a piece of it by chance.
TOKEN = "dapi-TEST-Zq7w-SECRET-kx9R-v4lue-0042"
ERROR_CAP = 500  # README: an error message is cut to 500 characters


def pieces(token: str = TOKEN, size: int = 10) -> list[str]:
    """Every run of `size` characters of the token: a cut-off token still leaks its prefix."""
    return [token[i:i + size] for i in range(len(token) - size + 1)]


def assert_hidden(text: str, where: str) -> None:
    leaked = [p for p in pieces() if p in text]
    assert not leaked, f"{where} shows part of the token: {leaked[:3]}"


def exit_code(main, argv: list[str]) -> int:
    """The console script's exit status, whether it returns it or raises `SystemExit` with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def echoing(status: int, filler: int = 0) -> FromRequest:
    """An error that quotes the request's Authorization header and the bare token after `filler` chars."""
    def reply(req):
        auth = req.headers.get("Authorization", "")
        return json_error(status, "x" * filler + f"refused header {auth!r}; token {auth.split()[-1]} expired",
                          code="PERMISSION_DENIED")
    return FromRequest(reply)


# -- objects ---------------------------------------------------------------------------------------

def test_repr_str_and_format_of_every_object_holding_the_token_hide_it(monkeypatch):
    monkeypatch.setenv("BI_TEST_TOKEN", TOKEN)
    cfg = job_config(endpoint={"name": "e", "type": "driver_proxy", "url": "http://127.0.0.1:9/",
                               "token_env": "BI_TEST_TOKEN"})
    spec = engine_spec(cfg)
    engine = Engine(spec)
    try:
        objects = [Secret(TOKEN), bearer(Secret(TOKEN)), auth_headers(cfg.endpoint, spec.url), spec, engine,
                   plan_tasks(4, 2).per_task_spec(spec), cfg, cfg.redacted(), spec.retry]
        for obj in objects:
            for text in (repr(obj), str(obj), f"{obj}", f"{obj!r:>20}", json.dumps(obj, default=str)):
                assert_hidden(text, type(obj).__name__)
    finally:
        engine.close()
    # Not vacuous: the value is there for whoever builds the header, and survives the trip to executors.
    assert spec.headers["Authorization"].reveal() == f"Bearer {TOKEN}"
    assert pickle.loads(pickle.dumps(spec)).headers == spec.headers


def partial_echo(part: slice) -> FromRequest:
    """A 401 quoting only a piece of the bearer token the request carried."""
    def reply(req):
        token = req.headers.get("Authorization", "").split()[-1]
        return json_error(401, f"invalid token {token[part]}... for this workspace", code="UNAUTHENTICATED")
    return FromRequest(reply)


@pytest.mark.parametrize("part", [slice(0, 15), slice(-11, None), slice(5, 20)], ids=["prefix", "suffix", "middle"])
def test_an_endpoint_echoing_part_of_the_token_leaves_none_of_it_in_the_row(part):
    plan = FaultPlan(always={"partial": partial_echo(part)})
    with LocalEndpoint(fault=plan) as ep:
        engine = Engine(EngineSpec(url=f"{ep.url}/", endpoint_type="driver_proxy",
                                   headers={"Authorization": Secret(f"Bearer {TOKEN}")},
                                   retry=RetrySpec(max_attempts=1)))
        try:
            [outcome] = engine.call(["partial"])
        finally:
            engine.close()
        assert ep.received[-1].headers["Authorization"] == f"Bearer {TOKEN}"  # not vacuous
    assert outcome.error == "http_401: UNAUTHENTICATED: invalid token ****... for this workspace"
    assert not any(TOKEN[i:i + 8] in outcome.error for i in range(len(TOKEN) - 7))


# -- the endpoint's own errors -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def echo_server():
    plan = FaultPlan(always={
        "echo": echoing(401),
        # The token straddles a cut (at ERROR_CAP; at the 4000 characters read of a long body):
        # cutting before scrubbing would keep the token's first characters.
        "long": echoing(403, filler=ERROR_CAP - 70),
        "huge": (500, {"Content-Type": "text/plain"}, b" " * 3973 + f"Bearer {TOKEN} ".encode() + b"z" * 20_000),
        "not-json": (200, {}, ("<p>" + "y" * 60 + TOKEN + "</p>").encode()),
    })
    with LocalEndpoint(fault=plan) as ep:
        yield ep


@pytest.mark.parametrize("prompt, reason", [
    ("echo", "http_401: PERMISSION_DENIED: refused header '****'; token **** expired"),
    ("long", ("http_403: PERMISSION_DENIED: " + "x" * (ERROR_CAP - 70)
              + "refused header '****'; token **** expired")[:ERROR_CAP]),
    ("huge", "http_500: **** " + "z" * 22),
    ("not-json", "bad_response: answer is not JSON: '<p>" + "y" * 60 + "****</p>'"),
], ids=["echoed", "cut-at-bound", "cut-at-read", "not-json"])
def test_errors_quoting_the_token_are_scrubbed_before_they_are_cut_to_the_bound(echo_server, prompt, reason):
    engine = Engine(EngineSpec(url=f"{echo_server.url}/", endpoint_type="driver_proxy",
                               headers={"Authorization": Secret(f"Bearer {TOKEN}")},
                               retry=RetrySpec(max_attempts=1)))
    try:
        [outcome] = engine.call([prompt])
    finally:
        engine.close()
    assert (outcome.status, outcome.error) == ("error", reason)
    assert len(outcome.error) <= ERROR_CAP
    assert echo_server.received[-1].headers["Authorization"] == f"Bearer {TOKEN}"


# -- a whole run ---------------------------------------------------------------------------------------

def test_a_whole_run_with_a_token_never_shows_it(spark, tmp_path, monkeypatch, caplog, capsys):
    """Logs of a whole `batch-inference` run, its error rows, its Delta log and its Spark plan."""
    from jobs.cli.run import main

    monkeypatch.setenv("BI_TEST_TOKEN", TOKEN)
    src = f"secret_prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(1, "fine"), (2, "echo"), (3, "long")], "id long, prompt string") \
        .createOrReplaceTempView(src)
    table = f"test.secret_{uuid.uuid4().hex[:8]}"
    plan = FaultPlan(always={"echo": echoing(401), "long": echoing(403, filler=3000)})
    with LocalEndpoint(fault=plan) as ep:
        conf = tmp_path / "job.yml"
        conf.write_text(yaml.safe_dump({
            "input": {"table": src}, "output": {"table": table},
            "endpoint": {"name": "guarded", "type": "driver_proxy", "url": f"{ep.url}/", "token_env": "BI_TEST_TOKEN"},
            "limits": {"max_concurrency": 2}, "run": {"task_slots": 2, "fail_on_error": True},
        }))
        caplog.set_level(logging.DEBUG)
        assert exit_code(main, ["--conf", str(conf)]) == 1  # fail_on_error: 2 rows failed, all 3 written
        assert {r.headers.get("Authorization") for r in ep.received} == {f"Bearer {TOKEN}"}
    out, err = capsys.readouterr()
    assert "finished" in caplog.text and "row(s) failed" in caplog.text
    assert_hidden(caplog.text + out + err, "the run's log")

    columns = spark.table(table).columns
    rows = spark.table(table).select(F.concat_ws("|", *[F.col(c).cast("string") for c in columns]))
    written = "\n".join(r[0] for r in rows.collect())
    assert "http_401: PERMISSION_DENIED: refused header '****'; token **** expired" in written
    assert_hidden(written, "the output table")
    location = spark.sql(f"DESCRIBE DETAIL {table}").first()["location"].removeprefix("file:")
    delta_log = "".join(p.read_text() for p in sorted(Path(location, "_delta_log").glob("*.json")))
    assert_hidden(delta_log, "the Delta log")

    # The plan the job runs: the UDF carries the token (pickled for the executors), the plan never shows it.
    cfg = parse_config(yaml.safe_load(conf.read_text()))
    spec = engine_spec(cfg, spark)
    job_plan = (read_input(spark, cfg.input).transform(with_request_hash(cfg.request_fingerprint()))
                .transform(with_precheck(100)).transform(with_outcomes(spec, plan_tasks(2, 2))))
    for mode in ("simple", "extended", "codegen", "cost", "formatted"):
        job_plan.explain(mode=mode)
    udf = inference_udf(spec, [1, 1])
    shown = capsys.readouterr().out + repr(udf) + str(udf) + repr(udf.func) + str(udf("prompt"))
    assert "infer" in shown
    assert_hidden(shown, "the Spark plan")
