"""The retry policy on its own: which failures are retried or split, how long to wait, what the row says."""

from __future__ import annotations

from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest

from udfs.retry import backoff, error_message, http_failure, parse_retry_after
from udfs.spec import RetrySpec

POLICY = RetrySpec()  # README defaults: 429, 500, 502, 503, 504; base 0.5 s, cap 30 s


@pytest.mark.parametrize("status, retried", [(429, True), (500, True), (502, True), (503, True), (504, True),
                                             (400, False), (401, False), (403, False), (404, False),
                                             (413, False), (422, False)])
def test_the_readme_statuses_are_retried_and_no_others(status, retried):
    assert http_failure(status, {}, "", rows=1, spec=POLICY).retryable is retried


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_batch_refused_as_too_large_or_invalid_is_split(status):
    """README: a batch the endpoint refuses (400, 413, 422) is split in halves."""
    assert http_failure(status, {}, "", rows=2, spec=POLICY).split
    assert not http_failure(status, {}, "", rows=1, spec=POLICY).split  # one row: nothing to split
    assert not http_failure(500, {}, "", rows=32, spec=POLICY).split


def test_retry_after_in_seconds_and_as_an_http_date():
    assert parse_retry_after("7") == 7
    in_20s = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=20), usegmt=True)
    assert 18 <= parse_retry_after(in_20s) <= 20
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_is_full_jitter_under_an_exponential_ceiling():
    highest = lambda a, b: b  # noqa: E731 - the top of each uniform draw
    assert [backoff(n, None, POLICY, uniform=highest) for n in range(1, 9)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # base 0.5 s doubling, capped at backoff_max_s 30
    assert backoff(3, None, POLICY, uniform=lambda a, b: a) == 0  # full jitter starts at zero


def test_a_retry_after_is_waited_for_in_full_plus_a_little_jitter():
    assert backoff(1, 5.0, POLICY, uniform=lambda a, b: a) == 5.0  # never earlier than asked
    assert 5.0 < backoff(1, 5.0, POLICY, uniform=lambda a, b: b) <= 5.5


def test_the_endpoints_own_message_is_kept():
    assert error_message('{"error_code": "RESOURCE_EXHAUSTED", "message": "slow down"}') == (
        "RESOURCE_EXHAUSTED: slow down")
    assert error_message('{"error": {"message": "nested"}}') == "nested"
    assert error_message("<html><body>502</body></html>") == "HTML error page"
    assert error_message("plain\n  text") == "plain text"
    assert len(error_message("x" * 10_000)) == 500
