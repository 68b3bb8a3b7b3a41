"""The HTTP engine on its own (no Spark) against real servers on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict

import pytest

from jobs.local.stand_in import LocalEndpoint
from udfs.engine import Engine
from udfs.spec import EngineSpec, RetrySpec

FAST_RETRY = RetrySpec(backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=100)


def proxy_spec(ep: LocalEndpoint, **kw) -> EngineSpec:
    kw.setdefault("retry", FAST_RETRY)
    return EngineSpec(url=f"{ep.url}/", task="custom", endpoint_type="driver_proxy", **kw)


def arrivals_by_prompt(ep: LocalEndpoint) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in ep.received:
        out[r.body["prompt"]].append(r.arrived)
    return out


@pytest.fixture
def ep():
    with LocalEndpoint() as endpoint:
        yield endpoint


def first_time_only(status: int, headers: dict[str, str]):
    """A fault: each prompt's first request gets `status`; later ones reach the model."""
    seen: set[str] = set()
    lock = threading.Lock()

    def fault(req):
        with lock:
            first = req.body["prompt"] not in seen
            seen.add(req.body["prompt"])
        return (status, dict(headers), b'{"message": "slow down"}') if first else None
    return fault


def test_outcomes_keep_input_order_and_batch_lengths(ep):
    batches = [["a", "b", None], [], ["c"], ["", "d"]]
    with Engine(proxy_spec(ep, max_concurrency=3)) as engine:
        out = list(engine.map_batches(batches))
    assert [[(o.status, o.response, o.error) for o in b] for b in out] == [
        [("ok", "Answer to: a", None), ("ok", "Answer to: b", None), ("error", None, "empty_prompt")],
        [],
        [("ok", "Answer to: c", None)],
        [("error", None, "empty_prompt"), ("ok", "Answer to: d", None)],
    ]


def test_pipeline_keeps_the_limit_in_flight_across_tiny_batches(ep):
    # One row per input batch: an engine that drained its pool at each batch boundary would never
    # have more than one request in flight.
    ep.latency_s = 0.05
    with Engine(proxy_spec(ep, max_concurrency=4)) as engine:
        out = [o for b in engine.map_batches([[f"p{i}"] for i in range(40)]) for o in b]
    assert [o.response for o in out] == [f"Answer to: p{i}" for i in range(40)]
    assert ep.peak_inflight == 4


def test_retry_after_is_waited_for_not_hammered(ep):
    ep.fault = first_time_only(429, {"Retry-After": "1"})
    with Engine(proxy_spec(ep, max_concurrency=4)) as engine:
        out = engine.call(["x"]) + engine.call(["y"])
    assert [(o.status, o.attempts) for o in out] == [("ok", 2), ("ok", 2)]
    for prompt, times in arrivals_by_prompt(ep).items():
        assert len(times) == 2
        assert times[1] - times[0] >= 1.0, f"{prompt} retried {times[1] - times[0]:.3f}s after a Retry-After: 1"


def test_retries_are_jittered_not_in_lockstep(ep):
    ep.fault = first_time_only(500, {})
    spec = proxy_spec(ep, max_concurrency=8, adaptive=False,
                      retry=RetrySpec(backoff_base_s=0.3, backoff_max_s=0.3, max_attempts=3))
    with Engine(spec) as engine:
        out = [o for b in engine.map_batches([[f"p{i}" for i in range(8)]]) for o in b]
    assert {o.status for o in out} == {"ok"}
    gaps = sorted(t[1] - t[0] for t in arrivals_by_prompt(ep).values())
    assert len(gaps) == 8
    assert gaps[-1] - gaps[0] > 0.02, f"retries fired together: gaps {gaps}"


@pytest.mark.parametrize("status", [429, 503])
def test_an_overload_pauses_the_task_and_one_probe_goes_before_the_others(ep, status):
    """README: a 429 or 503 pauses the whole task's sending; one request probes; the rest follow once
    it is answered, instead of every row retrying on its own."""
    ep.fault = first_time_only(status, {})
    with Engine(proxy_spec(ep, max_concurrency=8, adaptive=False)) as engine:
        out = [o for b in engine.map_batches([[f"p{i}" for i in range(8)]]) for o in b]
        assert (engine.governor.pauses, engine.governor.probes) == (1, 1)
    assert {(o.status, o.attempts) for o in out} == {("ok", 2)}
    retries = sorted(r.arrived for r in ep.received[8:])
    assert len(retries) == 8
    probe_answered = retries[0] + 0.01  # the toy model answers in well under 10 ms
    assert retries[0] - max(r.arrived for r in ep.received[:8]) >= 0.45  # after probe_first_s (0.5 s)
    assert retries[1] >= retries[0], "the others wait for the probe's answer"
    assert all(t < probe_answered + 1.0 for t in retries[1:])


def threshold_server(limit: int):
    """A fault: 429 whenever more than `limit` requests are in flight (including this one)."""
    state = {"rejected": 0}
    lock = threading.Lock()
    inflight = [0]

    def fault(req):
        with lock:
            inflight[0] += 1
            over = inflight[0] > limit
            if over:
                state["rejected"] += 1
        try:
            if over:
                return 429, {}, b'{"message": "too many requests"}'
            time.sleep(0.03)
            return None
        finally:
            with lock:
                inflight[0] -= 1
    return fault, state


def run_against_threshold(ep: LocalEndpoint, adaptive: bool) -> tuple[list, int, int, float | None]:
    fault, state = threshold_server(3)
    ep.reset()
    ep.fault = fault
    with Engine(proxy_spec(ep, max_concurrency=12, adaptive=adaptive)) as engine:
        out = [o for b in engine.map_batches([[f"p{i}" for i in range(120)]]) for o in b]
        return out, state["rejected"], engine.limiter.cuts, engine.governor.rate


def test_aimd_backs_off_under_a_server_that_rejects_above_a_threshold(ep):
    """A limit on requests in flight, not a window: each 429 pauses the task, the first probe gets
    through at once (so the next pause is shorter), and the in-flight AIMD finds the limit; no rate is
    taught by a limit that reopens at once. Without `limits.adaptive` nothing is learned."""
    out, rejected, cuts, rate = run_against_threshold(ep, adaptive=True)
    fixed_out, fixed_rejected, fixed_cuts, fixed_rate = run_against_threshold(ep, adaptive=False)
    assert {o.status for o in out} == {o.status for o in fixed_out} == {"ok"}, "every row still finishes"
    assert cuts > 0 == fixed_cuts and rate is None is fixed_rate
    assert rejected < fixed_rejected / 2, f"AIMD saw {rejected} rejections, a fixed limit of 12 {fixed_rejected}"


def test_a_rejected_batch_is_split_so_only_the_bad_row_fails(ep):
    def fault(req):
        if any(r["prompt"] == "bad" for r in req.body["dataframe_records"]):
            return 400, {}, b'{"error_code": "BAD_REQUEST", "message": "input too long"}'
        return None

    ep.fault = fault
    spec = EngineSpec(url=f"{ep.url}/serving-endpoints/m/invocations", task="custom", rows_per_request=4,
                      max_concurrency=1, retry=FAST_RETRY)
    with Engine(spec) as engine:
        out = engine.call(["a", "b", "bad", "c"])
    assert [(o.status, o.response, o.error) for o in out] == [
        ("ok", "Answer to: a", None), ("ok", "Answer to: b", None),
        ("error", None, "http_400: BAD_REQUEST: input too long"), ("ok", "Answer to: c", None)]
    # [a b bad c] -> [a b] ok + [bad c] -> [bad] 400 + [c] ok
    assert [len(r.body["dataframe_records"]) for r in ep.received] == [4, 2, 2, 1, 1]


def test_requests_per_minute_spaces_the_requests(ep):
    with Engine(proxy_spec(ep, max_concurrency=8, requests_per_s=20)) as engine:
        list(engine.map_batches([[f"p{i}" for i in range(30)]]))
    times = sorted(r.arrived for r in ep.received)
    # A burst of one second's worth (20), then one every 1/20 s: the other 10 need 0.5 s more
    # (less the first connections' set-up, which delays the first arrivals but not the last).
    assert times[-1] - times[0] >= 0.4
    assert sum(t - times[0] <= 0.25 for t in times) <= 20 + 5 + 1


def test_read_timeout_retries_then_reports_timeout(ep):
    def fault(req):
        time.sleep(1.0)
        return None

    ep.fault = fault
    spec = proxy_spec(ep, read_timeout_s=0.2, retry=RetrySpec(backoff_base_s=0.01, max_attempts=2))
    with Engine(spec) as engine:
        [o] = engine.call(["slow"])
    assert (o.status, o.attempts, o.http_status) == ("error", 2, None)
    assert o.error.startswith("timeout: no answer within read_timeout_s=0.2 (gave up after 2 attempts")


def test_connection_refused_is_retried_within_the_row_budget_as_an_endpoint_down():
    """No connection at all is the endpoint down, not this row's luck: the task pauses and probes (at
    0.5 s and 1 s) and the row gives up when its budget runs out, not after `max_attempts` (2)."""
    with LocalEndpoint() as gone:
        url = f"{gone.url}/"
    spec = EngineSpec(url=url, task="custom", endpoint_type="driver_proxy",
                      retry=RetrySpec(backoff_base_s=0.01, max_attempts=2, row_budget_s=1.2))
    with Engine(spec) as engine:
        [o] = engine.call(["x"])
    assert (o.status, o.attempts) == ("error", 3)
    assert re.fullmatch(r"connection_error: ConnectionRefusedError connecting to 127\.0\.0\.1:\d+ "
                        r"\(gave up after 3 attempts, 1\.\ds\)", o.error), o.error


def test_the_breaker_fails_the_waiting_rows_fast_when_nothing_answers():
    with LocalEndpoint() as gone:
        url = f"{gone.url}/"
    spec = EngineSpec(url=url, task="custom", endpoint_type="driver_proxy", max_concurrency=2,
                      retry=RetrySpec(breaker_s=1.0))
    started = time.monotonic()
    with Engine(spec) as engine:
        out = [o for b in engine.map_batches([[f"p{i}" for i in range(50)]]) for o in b]
    assert time.monotonic() - started < 5.0
    assert {o.status for o in out} == {"error"}
    reasons = {re.sub(r"\d+", "N", o.error) for o in out}
    assert reasons == {"endpoint_unavailable: nothing answered for Ns (last: connection_error: "
                       "ConnectionRefusedError connecting to N.N.N.N:N)"}
    assert sum(o.attempts for o in out) <= 6, "a pause and probes, not 50 rows retrying"
    assert sum(o.attempts == 0 for o in out) >= 44, "rows never sent say so"


@pytest.mark.parametrize("client", ["aiohttp", "urllib3", "requests"])
def test_every_http_client_speaks_the_same_protocol(ep, client):
    ep.fault = first_time_only(503, {"Retry-After": "0"})
    with Engine(proxy_spec(ep, max_concurrency=2, http_client=client, model_kwargs={"temperature": 0})) as engine:
        out = [o for b in engine.map_batches([["é ünïcode ✓", "two"]]) for o in b]
    assert [(o.status, o.response, o.attempts) for o in out] == [
        ("ok", "Answer to: é ünïcode ✓", 2), ("ok", "Answer to: two", 2)]
    assert {r.body["temperature"] for r in ep.received} == {0}


def test_an_abandoned_pipeline_sends_nothing_more(ep):
    ep.latency_s = 0.02
    with Engine(proxy_spec(ep, max_concurrency=2)) as engine:
        results = engine.map_batches([["first"], [f"p{i}" for i in range(200)]])
        assert [o.response for o in next(results)] == ["Answer to: first"]
        results.close()  # the consumer stops after one batch (a cancelled task): cleanup runs
        sent_at_close = len(ep.received)
        time.sleep(0.2)
    assert len(ep.received) == sent_at_close < 20, "the other ~200 queued requests were dropped"


def test_blank_prompts_of_any_whitespace_are_never_sent(ep):
    with Engine(proxy_spec(ep)) as engine:
        [out] = list(engine.map_batches([["\t\n \r\n", "\u3000", "\u2028\u00a0", "real"]]))
    assert [(o.status, o.error) for o in out] == [("error", "empty_prompt")] * 3 + [("ok", None)]
    assert [r.body["prompt"] for r in ep.received] == ["real"]


def test_a_long_error_keeps_its_gave_up_note_within_500_characters(ep):
    """README: the endpoint's message is cut to 500 characters; the `(gave up after N attempts, Ts)`
    note that says why the row stopped must survive the cut."""
    ep.fault = lambda req: (500, {}, json.dumps({"error_code": "INTERNAL_ERROR", "message": "m" * 2000}).encode())
    with Engine(proxy_spec(ep, retry=RetrySpec(backoff_base_s=0.01, max_attempts=2))) as engine:
        [o] = engine.call(["x"])
    assert (o.status, o.attempts, o.http_status) == ("error", 2, 500)
    assert len(o.error) <= 500
    assert o.error.startswith("http_500: INTERNAL_ERROR: mmmm")
    assert re.search(r"m \(gave up after 2 attempts, \d+\.\ds\)$", o.error), o.error
