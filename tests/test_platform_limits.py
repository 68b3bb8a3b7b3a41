"""Foundation Model APIs' limits against the loopback workspace: an hourly query limit (scaled down to
seconds) answers 429 until its window resets, longer than a row's budget and the breaker; the job
pauses and resumes instead of failing rows, up to `retry.max_pause_s`."""

from __future__ import annotations

import logging

from tests.workspace import CLIENT_ID, CLIENT_SECRET, Workspace
from udfs.auth import OAuthM2M, Secret
from udfs.engine import Engine
from udfs.spec import EngineSpec, RetrySpec


def chat(ws: Workspace, **retry) -> EngineSpec:
    creds = OAuthM2M(f"{ws.url}/oidc/v1/token", CLIENT_ID, Secret(CLIENT_SECRET))
    creds.refresh()
    return EngineSpec(url=f"{ws.url}/serving-endpoints/llm/invocations", task="llm/v1/chat", credentials=creds,
                      max_concurrency=2, retry=RetrySpec(backoff_base_s=0.01, **retry))


def test_an_hourly_query_limit_pauses_the_job_and_no_row_fails(caplog):
    """4 queries per 2-second "hour": rows 5 and 9 meet a 429 that lasts longer than the row budget
    (1 s) and the breaker (0.8 s); they wait for the window, as every row after them, and all go."""
    caplog.set_level(logging.INFO, logger="batch_inference")
    with Workspace() as ws:
        ws.queries_per_window = (4, 2.0)
        with Engine(chat(ws, row_budget_s=1.0, breaker_s=0.8, max_pause_s=30.0)) as engine:
            outcomes = [o for i in range(9) for o in engine.call([f"row {i}"])]
        limited = ws.limited
    assert [(o.status, o.error) for o in outcomes] == [("ok", None)] * 9
    assert limited >= 2  # it was refused, and waited
    assert "paused: rate limit, resuming at " in caplog.text and " UTC at the latest (retry.max_pause_s: 30s)" in caplog.text
    assert "resumed after a rate-limit pause of" in caplog.text


def test_a_rate_limit_longer_than_max_pause_s_fails_the_rows_as_endpoint_unavailable():
    with Workspace() as ws:
        ws.queries_per_window = (2, 30.0)
        with Engine(chat(ws, row_budget_s=1.0, breaker_s=0.8, max_pause_s=1.5)) as engine:
            outcomes = [o for i in range(4) for o in engine.call([f"row {i}"])]
    assert [o.status for o in outcomes] == ["ok", "ok", "error", "error"]
    assert outcomes[2].error.startswith("endpoint_unavailable: rate limited (429) for ")
    assert "s, longer than retry.max_pause_s (2s)" in outcomes[2].error
