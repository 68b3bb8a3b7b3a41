"""One request's life against a real server on 127.0.0.1: budgets, splitting, latency with retries,
and with structured output each answer checked and asked for again.

Each test is a promise of the README's "Speed and limits" and "Failure and resume" sections, with the
README's numbers.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from jobs.local.stand_in import LocalEndpoint, fit
from tests import faults
from tests.test_structured import REVIEW
from udfs.engine import Engine
from udfs.spec import EngineSpec, RetrySpec
from udfs.structured import wire_format


@pytest.fixture
def ep():
    with LocalEndpoint() as endpoint:
        yield endpoint


def spec(ep: LocalEndpoint, **kw) -> EngineSpec:
    return EngineSpec(url=f"{ep.url}/", task="custom", endpoint_type="driver_proxy", **kw)


def test_row_budget_bounds_the_retries_before_max_attempts_does(ep):
    """`retry.row_budget_s`: total seconds across attempts and waits; past it the row fails."""
    ep.fault = lambda req: (503, {"Retry-After": "1"}, b'{"message": "scaling up"}')
    policy = RetrySpec(max_attempts=100, backoff_base_s=0.01, row_budget_s=1.5)
    with Engine(spec(ep, retry=policy)) as engine:
        [o] = engine.call(["x"])
    # Attempt 1 at 0 s, attempt 2 after the 1 s Retry-After; a third would start past 1.5 s.
    assert (o.status, o.attempts, o.http_status) == ("error", 2, 503)
    assert o.error.startswith("http_503: scaling up (gave up after 2 attempts, ")
    assert len(ep.received) == 2


@pytest.mark.parametrize("status", [413, 422])
def test_a_batch_refused_as_too_large_is_split_until_it_fits(ep, status):
    def fault(req):
        records = req.body["dataframe_records"]
        if len(records) > 2:  # the endpoint takes at most two records per request
            return status, {}, b'{"error_code": "BAD_REQUEST", "message": "request too large"}'
        return None

    ep.fault = fault
    batch = EngineSpec(url=f"{ep.url}/serving-endpoints/m/invocations", task="custom", rows_per_request=8)
    with Engine(batch) as engine:
        out = engine.call([f"p{i}" for i in range(8)])
    assert [(o.status, o.response) for o in out] == [("ok", f"Answer to: p{i}") for i in range(8)]
    sizes = sorted(len(r.body["dataframe_records"]) for r in ep.received)
    assert sizes == [2, 2, 2, 2, 4, 4, 8]  # 8 refused, two 4s refused, four 2s answered


def test_retry_after_as_an_http_date_is_honoured(ep):
    first: set[str] = set()

    def fault(req):
        if req.body["prompt"] not in first:
            first.add(req.body["prompt"])
            when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=2), usegmt=True)
            return 429, {"Retry-After": when}, b'{"message": "window full"}'
        return None

    ep.fault = fault
    with Engine(spec(ep, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        [o] = engine.call(["x"])
    first_at, second_at = (r.arrived for r in ep.received)
    assert (o.status, o.attempts) == ("ok", 2)
    assert second_at - first_at >= 1.0  # the date is whole seconds: 2 s ahead is at least 1 s of wait


def test_latency_ms_counts_the_whole_row_retries_and_waits_included(ep):
    """README: `latency_ms` is the wall time from the first attempt to the final answer, retries included."""
    first: set[str] = set()

    def fault(req):
        if req.body["prompt"] not in first:
            first.add(req.body["prompt"])
            return 503, {"Retry-After": "1"}, b'{"message": "busy"}'
        return None

    ep.fault = fault
    with Engine(spec(ep, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        [o] = engine.call(["x"])
    assert (o.status, o.attempts) == ("ok", 2)
    assert o.latency_ms >= 1000


def test_sent_at_is_the_wall_clock_of_the_first_attempt_and_latency_runs_from_it(ep):
    """`sent_at` + `latency_ms` spans the row's request: its first attempt (not its retry) to the answer."""
    ep.fault = lambda req: (503, {"Retry-After": "1"}, b'{"message": "busy"}') if len(ep.received) == 1 else None
    before = time.time()
    with Engine(spec(ep, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        [o] = engine.call(["x"])
    after = time.time()
    assert (o.status, o.attempts) == ("ok", 2)
    assert before <= o.sent_at < before + 0.5  # the first attempt, not the retry a second later
    assert after - 0.05 <= o.sent_at + o.latency_ms / 1000 <= after


@pytest.mark.parametrize("status", [429, 503])
def test_an_overload_answer_halves_the_task_s_in_flight_limit(ep, status):
    """README: a 429/503 halves the in-flight limit (AIMD); other errors do not."""
    first: set[str] = set()

    def fault(req):
        if req.body["prompt"] not in first:
            first.add(req.body["prompt"])
            return status, {}, b'{"message": "overloaded"}'
        return None

    ep.fault = fault
    with Engine(spec(ep, max_concurrency=8, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        [o] = engine.call(["x"])
        assert (o.status, engine.limiter.limit, engine.limiter.cuts) == ("ok", 4, 1)


@pytest.mark.parametrize("status, learns", [(429, True), (503, False)])
def test_a_window_that_stays_closed_teaches_the_task_a_rate_after_a_429_never_after_a_503(ep, status, learns):
    """The caller tells the governor which refusal it met: a 429 is a rate limit, a 503 an endpoint
    scaling from zero. Ten rows answered, then every request refused for 2.5 s: the row retries as the
    task's probes (at 0.5, 1, 1.5, 2.25 and 3.4 s), and the task resumes paced after a 429, unpaced
    after a 503. (Long enough that the window measured stays over a second however late the probes.)"""
    refusing: list[float] = []

    def fault(req):
        now = time.monotonic()
        if req.body["prompt"] == "refused" and not refusing:
            refusing.append(now)
        if refusing and now - refusing[0] < 2.5:
            return status, {}, b'{"message": "not now"}'
        return None

    ep.fault = fault
    with Engine(spec(ep, max_concurrency=1, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        out = [o for p in [f"p{i}" for i in range(10)] + ["refused"] for o in engine.call([p])]
        governor = engine.governor
    assert [o.status for o in out] == ["ok"] * 11 and out[-1].attempts >= 3  # refused, probes refused, answered
    assert (governor.pauses, governor.decreases, governor.rate is not None) == (1, int(learns), learns)


def test_a_server_error_is_retried_without_cutting_the_limit(ep):
    ep.fault = lambda req: (500, {}, b'{"message": "bug"}') if len(ep.received) == 1 else None
    with Engine(spec(ep, max_concurrency=8, retry=RetrySpec(backoff_base_s=0.01))) as engine:
        [o] = engine.call(["x"])
        assert (o.status, o.attempts, engine.limiter.limit) == ("ok", 2, 8)


# -- structured output: answers checked, asked again ------------------------------------------------------

def chat_spec(ep: LocalEndpoint, **kw) -> EngineSpec:
    kw.setdefault("retry", RetrySpec(backoff_base_s=0.01, backoff_max_s=0.05))
    return EngineSpec(url=f"{ep.url}/serving-endpoints/c/invocations", task="llm/v1/chat", response_schema=REVIEW,
                      **kw)


def chat_answer(content: str) -> tuple[int, dict[str, str], bytes]:
    return faults.chat_answer(content, usage={"prompt_tokens": 5, "completion_tokens": 7})


def flaky(bad: str, times: int = 1):
    """A fault: each prompt's first `times` answers are `bad`; later ones come from the model."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def fault(req):
        prompt = req.body["messages"][-1]["content"]
        with lock:
            seen[prompt] = seen.get(prompt, 0) + 1
            n = seen[prompt]
        return chat_answer(bad) if n <= times else None
    return fault


def test_one_re_ask_fixes_a_flaky_answer_and_both_attempts_are_counted():
    before = time.time()
    with LocalEndpoint(fault=flaky("not json at all"), latency_s=0.3) as ep, Engine(chat_spec(ep)) as engine:
        [o] = engine.call(["I love it, no refund needed."])
    # The row's request began with the first answer's send, 0.3 s before the re-ask's: both are its time.
    assert before <= o.sent_at < before + 0.25 and o.latency_ms >= 600
    # Both answers were paid for: the bad one's usage (5 + 7) plus the model's (6 words in, its words out).
    assert (o.status, o.error, o.attempts, o.prompt_tokens, o.completion_tokens) == (
        "ok", None, 2, 5 + 6, 7 + len(o.response.split()))
    assert json.loads(o.parsed_json) == json.loads(o.response) == fit(REVIEW, "I love it, no refund needed.")
    assert [r.body["response_format"] for r in ep.received] == [wire_format(REVIEW)] * 2


def test_an_answer_still_invalid_after_the_re_asks_keeps_its_raw_text():
    bad = '{"sentiment": "ecstatic", "refund_requested": false}'
    with LocalEndpoint(fault=flaky(bad, times=5)) as ep:
        with Engine(chat_spec(ep)) as engine:
            [o] = engine.call(["so good"])
        assert (o.status, o.response, o.attempts, o.http_status, o.parsed_json, o.prompt_tokens) == (
            "error", bad, 2, 200, None, 10)
        assert o.error == "invalid_output: $.sentiment: 'ecstatic' is not one of ['positive', 'negative', 'neutral']"
        assert len(ep.received) == 2  # one answer, one re-ask (retry.invalid_output_attempts: 1)

        ep.received.clear()
        with Engine(chat_spec(ep, retry=RetrySpec(invalid_output_attempts=0))) as engine:
            [o] = engine.call(["so good"])
        assert (o.status, o.attempts, len(ep.received)) == ("error", 1, 1)


def test_in_a_batch_only_the_invalid_rows_are_asked_again():
    calls = []

    def fault(req):
        records = req.body["dataframe_records"]
        calls.append([r["prompt"] for r in records])
        if len(calls) == 1:  # the first request: "b" answers garbage, the others fit
            return 200, {}, json.dumps({"predictions": [
                "garbage" if r["prompt"] == "b" else json.dumps(fit(REVIEW, r["prompt"])) for r in records]}).encode()
        return None

    with LocalEndpoint(fault=fault) as ep:
        spec = EngineSpec(url=f"{ep.url}/serving-endpoints/m/invocations", task="custom", rows_per_request=3,
                          response_schema=REVIEW, response_format_at="params.response_format")
        with Engine(spec) as engine:
            out = engine.call(["a", "b", "c"])
    assert [(o.status, o.attempts) for o in out] == [("ok", 1), ("ok", 2), ("ok", 1)]
    assert calls == [["a", "b", "c"], ["b"]]
    assert ep.received[0].body["params"] == {"response_format": wire_format(REVIEW)}


BAD_REVIEW = '{"sentiment": "ecstatic", "refund_requested": false}'


def invalid_then(reply):
    """A fault: each prompt's first answer breaks the schema; the re-ask gets `reply`."""
    seen: set[str] = set()

    def fault(req):
        prompt = req.body["messages"][-1]["content"]
        if prompt not in seen:
            seen.add(prompt)
            return chat_answer(BAD_REVIEW)
        return reply
    return fault


@pytest.mark.parametrize("reply, read_timeout_s", [(faults.server_error(500), 120.0), (faults.stall(2.0), 0.3)],
                         ids=["500", "timeout"])
def test_a_re_ask_that_fails_otherwise_keeps_the_first_answer(reply, read_timeout_s):
    """A re-ask that meets a 500 or a time-out says nothing about the row's answer: the row stays
    `invalid_output` with the answer it got, and both attempts are counted."""
    policy = RetrySpec(max_attempts=1, backoff_base_s=0.01)
    with LocalEndpoint(fault=invalid_then(reply)) as ep, \
            Engine(chat_spec(ep, retry=policy, read_timeout_s=read_timeout_s)) as engine:
        [o] = engine.call(["so good"])
        assert len(ep.received) == 2
    assert (o.status, o.response, o.http_status, o.attempts, o.prompt_tokens) == (
        "error", BAD_REVIEW, 200, 2, 5)
    assert o.error == "invalid_output: $.sentiment: 'ecstatic' is not one of ['positive', 'negative', 'neutral']"
