"""The reason codes of error rows: one registry, for the code that writes them and for the README.

An error row's `error` column reads `code: detail`; the code is what analysts `GROUP BY`
(`substring_index(error, ':', 1)`) and what the runs table counts in `errors_by_reason`. Every code
the job writes is named here, with what it means; `http_<status>` stands for the whole family of
HTTP statuses (`http_429`, `http_503`, ...).

Example::

    Outcome.failed(reasons.EMPTY_PROMPT)
    reasons.http(503)          # "http_503"
"""

from __future__ import annotations

# Stopped before any call (precheck).
EMPTY_PROMPT = "empty_prompt"
PROMPT_TOO_LONG = "prompt_too_long"
NULL_FIELD = "null_field"
# The request went out and failed.
HTTP = "http_<status>"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
# Not sent, or given up, because the endpoint as a whole was down (the task's breaker).
ENDPOINT_UNAVAILABLE = "endpoint_unavailable"
# The endpoint refused the token (401/403) even after a fresh one, or no fresh one could be had.
CREDENTIAL_REFUSED = "credential_refused"
# An answer came back but could not be used.
BAD_RESPONSE = "bad_response"
DIMENSION_MISMATCH = "dimension_mismatch"
INVALID_OUTPUT = "invalid_output"
# The configured transforms raised.
TRANSFORM_INPUT_FAILED = "transform_input_failed"
TRANSFORM_OUTPUT_FAILED = "transform_output_failed"
# A bug of ours: the row fails, the batch does not.
INTERNAL_ERROR = "internal_error"

# Configuration errors that stop the run at the first request instead of landing on rows: the same
# for every row, so no retry or rerun could fix them (`udfs.transport.FATAL_KINDS`).
TLS_ERROR = "tls_error"
INVALID_HEADER = "invalid_header"

MEANING: dict[str, str] = {
    EMPTY_PROMPT: "the prompt is null, empty or only whitespace; never sent",
    PROMPT_TOO_LONG: "the prompt is longer than `run.max_prompt_chars`; never sent",
    NULL_FIELD: "a column `input.template` names is null (`input.null_fields: error`); never sent",
    HTTP: "the endpoint answered this HTTP status (after retries, for a retried status)",
    TIMEOUT: "no answer within `limits.read_timeout_s` (or no connection within `connect_timeout_s`)",
    CONNECTION_ERROR: "the connection failed or was reset before a whole answer came",
    ENDPOINT_UNAVAILABLE: "nothing answered for `retry.breaker_s` (429, 503, no connection): the rest of the "
                          "task's rows failed fast, some never sent; a rerun sends them again",
    CREDENTIAL_REFUSED: "the endpoint answered 401/403 to a token refreshed for the retry, or no new token "
                        "could be had (OAuth); the detail says which",
    BAD_RESPONSE: "the answer is not JSON, or not the shape the task's protocol expects",
    DIMENSION_MISMATCH: "an embedding whose length is not the run's dimension",
    INVALID_OUTPUT: "the answer is not JSON or breaks `endpoint.response_format` (first failing path "
                    "named; the raw answer stays in `response`), after `retry.invalid_output_attempts` re-asks",
    TRANSFORM_INPUT_FAILED: "`endpoint.transform_input` raised on this row's request",
    TRANSFORM_OUTPUT_FAILED: "`endpoint.transform_output` raised on this row's answer",
    INTERNAL_ERROR: "an unexpected error in the job itself (please report it)",
}


def http(status: int) -> str:
    """The code of an HTTP status: `http_503`."""
    return f"http_{status}"


def with_detail(code: str, detail: str) -> str:
    return f"{code}: {detail}" if detail else code
